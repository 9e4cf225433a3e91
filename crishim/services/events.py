"""The event bus behind GetContainerEvents: every subscriber gets every event, in order.

Publishing never waits: each subscriber has a bounded queue, and a subscriber that falls
that far behind is dropped (its stream ends) rather than slowing the runtime down; kubelet
then falls back to relisting, as it does when the stream breaks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from crishim.model.events import EventType, LifecycleEvent

log = logging.getLogger(__name__)

# Events a subscriber may lag behind before it is dropped.
SUBSCRIBER_BACKLOG = 4096


class _Dropped:
    """Marks the end of a subscriber's stream."""


_END = _Dropped()


class EventBus:
    """Fans lifecycle events out to subscribers."""

    def __init__(self, backlog: int = SUBSCRIBER_BACKLOG) -> None:
        self._backlog = backlog
        self._subscribers: set[asyncio.Queue[LifecycleEvent | _Dropped]] = set()

    @property
    def subscribers(self) -> int:
        """How many streams are open."""
        return len(self._subscribers)

    def publish(self, container_id: str, sandbox_id: str, kind: EventType) -> None:
        """Send an event to every subscriber now; never blocks."""
        event = LifecycleEvent(
            container_id=container_id, sandbox_id=sandbox_id, type=kind, created_at=time.time_ns()
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
