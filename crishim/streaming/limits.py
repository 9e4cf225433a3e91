"""What keeps one client, or a flood of them, from taking the streaming server from others.

- **Sessions** (connections past their request head, being served): at most
  ``max_sessions`` at once. One more is refused at once with ``429 Too Many Requests``
  and a message naming the limit; it never waits, so it holds nothing and delays no one.
- **Request heads** (connections still sending their HTTP request, or sending nothing):
  at most ``max_handshakes`` at once, each for at most ``request_timeout`` seconds. When
  one more arrives, the connection that has waited longest is dropped. A real client sends
  its head as soon as it connects and leaves this phase within a round trip, so only a
  slow or silent connection is ever the oldest: a flood of half-open connections recycles
  its own slots and cannot lock real clients out, and the memory it holds stays bounded.
- **Idle sessions**: a session with no traffic in either direction for ``idle_timeout``
  seconds is ended as if its client had gone away (the exec'd process is killed, the
  forwarded connections closed). Any frame counts as traffic, pings included, as in
  kubelet's own streaming server (spdystream's idle timer).

Refusals and drops are logged at most once a minute each, with a count, so that a flood
cannot flood the log as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "Abortable",
    "Expirable",
    "HandshakeGate",
    "LogTally",
    "StreamingLimits",
    "idle_timeout",
]

log = logging.getLogger(__name__)

_LOG_INTERVAL = 60.0
# The idle watch wakes up at least this often, so that any timeout, however large, is
# only ever a short sleep for the event loop.
_MAX_IDLE_SLEEP = 3600.0


@dataclass(frozen=True, slots=True)
class StreamingLimits:
    """The limits of one streaming server (see the module docstring); seconds for times.

    ``idle_timeout`` 0 means sessions are never closed for being idle.
    """

    max_sessions: int = 128
    max_handshakes: int = 128
    request_timeout: float = 10.0
    idle_timeout: float = 4 * 3600.0


class LogTally:
    """Counts events and says when to log them: the first at once, then once per interval."""

    def __init__(self, interval: float = _LOG_INTERVAL) -> None:
        self._interval = interval
        self._count = 0
        self._logged_at = -interval

    def add(self) -> int:
        """Count one event; the number to report now (0: not yet)."""
        self._count += 1
        now = time.monotonic()
        if now - self._logged_at < self._interval:
            return 0
        count, self._count, self._logged_at = self._count, 0, now
        return count


class Abortable(Protocol):
    """A connection's transport, as far as the gate needs it."""

    def abort(self) -> None:
        """Close at once, dropping unsent data."""
        ...


class HandshakeGate:
    """The connections still sending their request head, oldest first, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._waiting: OrderedDict[Abortable, None] = OrderedDict()
        self._dropped = LogTally()

    def __len__(self) -> int:
        return len(self._waiting)

    @contextlib.contextmanager
    def waiting(self, transport: Abortable) -> Iterator[None]:
        """Hold a place for ``transport`` while its head is read; drop the oldest if full."""
        while len(self._waiting) >= self._limit:
            oldest, _ = self._waiting.popitem(last=False)
            # Its reader sees the end of the stream, and its task ends by itself.
            oldest.abort()
            if dropped := self._dropped.add():
                log.warning(
                    "dropped %d streaming connection(s) that had not sent their request: "
                    "more than %d were waiting ([streaming] max_handshakes)",
                    dropped,
                    self._limit,
                )
        self._waiting[transport] = None
        try:
            yield
        finally:
            self._waiting.pop(transport, None)


class Expirable(Protocol):
    """A served connection that can tell when it last moved bytes and be ended for it."""

    @property
    def last_activity(self) -> float:
        """``time.monotonic()`` of the last read from or write to the socket."""
        ...

    async def expire(self, reason: str) -> None:
        """End the connection now, as if the client had gone away."""
        ...


async def _expire_when_idle(connection: Expirable, timeout: float) -> None:
    # A timer that only looks at the clock when due: traffic costs a time stamp, no wakeup.
    while True:
        idle = time.monotonic() - connection.last_activity
        if idle >= timeout:
            break
        await asyncio.sleep(min(timeout - idle, _MAX_IDLE_SLEEP))
    log.info("closing a streaming session idle for %g seconds", timeout)
    await connection.expire(f"no traffic for {timeout:g} seconds")


@contextlib.asynccontextmanager
async def idle_timeout(connection: Expirable, timeout: float) -> AsyncIterator[None]:
    """Within the block, end ``connection`` once it has been idle ``timeout`` seconds.

    ``timeout`` 0 disables the watch.
    """
    if timeout <= 0:
        yield
        return
    watch = asyncio.create_task(_expire_when_idle(connection, timeout))
    try:
        yield
    finally:
        watch.cancel()
        # wait() rather than awaiting the task: a cancellation of this task itself must
        # propagate, not be taken for the watch's.
        await asyncio.wait([watch])
        if not watch.cancelled():
            watch.result()
