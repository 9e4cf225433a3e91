"""The event bus behind GetContainerEvents: every subscriber gets every event, in order.

An event is stamped and given the pod's state (its sandbox and containers, from
``pod_state``) in the same synchronous step in which it is published, right after the
change it reports was stored: kubelet's evented PLEG caches that state under that time.

Publishing never waits: each subscriber has a bounded queue, and a subscriber that falls
that far behind is dropped (its stream ends) rather than slowing the runtime down; kubelet
then falls back to relisting, as it does when the stream breaks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from crishim.model import Container, Sandbox
from crishim.model.events import EventType, LifecycleEvent

log = logging.getLogger(__name__)

# Events a subscriber may lag behind before it is dropped.
SUBSCRIBER_BACKLOG = 4096


class _Dropped:
    """Marks the end of a subscriber's stream."""


_END = _Dropped()

# A sandbox id's sandbox (None when unknown) and its containers, as they are now.
PodState = Callable[[str], tuple[Sandbox | None, list[Container]]]


def _no_pod_state(sandbox_id: str) -> tuple[Sandbox | None, list[Container]]:
    return None, []


class EventBus:
    """Fans lifecycle events out to subscribers."""

    def __init__(self, backlog: int = SUBSCRIBER_BACKLOG) -> None:
        self._backlog = backlog
        self._subscribers: set[asyncio.Queue[LifecycleEvent | _Dropped]] = set()
        #: where events get the pod's state from; set by the app once both services exist
        self.pod_state: PodState = _no_pod_state

    @property
    def subscribers(self) -> int:
        """How many streams are open."""
        return len(self._subscribers)

    def publish(
        self,
        container_id: str,
        sandbox_id: str,
        kind: EventType,
        *,
        removed_sandbox: Sandbox | None = None,
    ) -> None:
        """Send an event with the pod's state as of now to every subscriber; never blocks.

        ``removed_sandbox`` is the last state of a sandbox that was just removed, which
        ``pod_state`` can no longer find.
        """
        if not self._subscribers:
            return
        created_at = time.time_ns()
        sandbox, containers = self.pod_state(sandbox_id)
        event = LifecycleEvent(
            container_id=container_id,
            sandbox_id=sandbox_id,
            type=kind,
            created_at=created_at,
            sandbox=sandbox or removed_sandbox,
            containers=tuple(containers),
        )
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("dropping an event subscriber that is %d events behind", self._backlog)
                self._subscribers.discard(queue)
                queue.get_nowait()  # make room for the end marker
                queue.put_nowait(_END)

    async def subscribe(self) -> AsyncIterator[LifecycleEvent]:
        """Events from now on, until the caller stops or falls too far behind."""
        queue: asyncio.Queue[LifecycleEvent | _Dropped] = asyncio.Queue(self._backlog)
        self._subscribers.add(queue)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Dropped):
                    return
                yield item
        finally:
            self._subscribers.discard(queue)
