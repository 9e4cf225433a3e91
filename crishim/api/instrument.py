"""The one wrapper every RPC goes through: error mapping, logging, timing, draining.

- crishim errors become gRPC statuses here and nowhere else; anything unexpected becomes
  INTERNAL with its message, and its traceback is logged. A full disk that no specific
  place reported still answers RESOURCE_EXHAUSTED.
- A failed call logs one line: method, status, message. At debug level every call logs
  its status and duration.
- RPCs crishim does not implement yet answer UNIMPLEMENTED naming the RPC.
- While the server drains for shutdown, new calls get UNAVAILABLE and the tracker tells
  the server when the last in-flight call has finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from grpclib import GRPCError
from grpclib.const import Handler, Status

from crishim import errors
from crishim.util.disk import is_disk_full

log = logging.getLogger("crishim.rpc")

StreamHandler = Callable[[Any], Awaitable[None]]

STATUS_FOR_ERROR: dict[type[errors.CrishimError], Status] = {
    errors.NotFound: Status.NOT_FOUND,
    errors.AlreadyExists: Status.ALREADY_EXISTS,
    errors.InvalidArgument: Status.INVALID_ARGUMENT,
    errors.FailedPrecondition: Status.FAILED_PRECONDITION,
    errors.Unavailable: Status.UNAVAILABLE,
    errors.DeadlineExceeded: Status.DEADLINE_EXCEEDED,
    errors.Unimplemented: Status.UNIMPLEMENTED,
    errors.Unauthenticated: Status.UNAUTHENTICATED,
    errors.DataLoss: Status.DATA_LOSS,
    errors.ResourceExhausted: Status.RESOURCE_EXHAUSTED,
    errors.ConfigError: Status.FAILED_PRECONDITION,
    errors.Internal: Status.INTERNAL,
}


def status_for(exc: errors.CrishimError) -> Status:
    """The gRPC status of a crishim error (its closest mapped ancestor)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[cls]
    return Status.UNKNOWN


class CallTracker:
    """Counts calls in flight and refuses new ones once draining has begun."""

    def __init__(self) -> None:
        # Told about every finished call: (method, status name, seconds); set by the app.
        self.observe: Callable[[str, str, float], None] | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def in_flight(self) -> int:
        """Calls that have started and not yet finished."""
        return self._in_flight

    def enter(self) -> None:
        """A call starts."""
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        """A call ends."""
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait for the running ones; False if time ran out."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _rpc_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def unimplemented_handler(path: str) -> StreamHandler:
    """A handler answering UNIMPLEMENTED with a message naming the RPC."""
    name = _rpc_name(path)

    async def handler(stream: Any) -> None:
        raise errors.Unimplemented(f"{name} is not implemented by crishim yet")

    return handler


def _unexpected(exc: Exception) -> tuple[Status, str]:
    """The status and message of an error that no part of crishim translated."""
    if isinstance(exc, OSError) and is_disk_full(exc):
        # A write no specific place reports: still the status kubelet expects.
        where = f" writing {exc.filename}" if exc.filename else ""
        return Status.RESOURCE_EXHAUSTED, f"the disk is full{where} ({exc.strerror})"
    return Status.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def instrument(path: str, func: StreamHandler, tracker: CallTracker) -> StreamHandler:
    """Wrap one RPC handler with error mapping, logging, timing and drain tracking."""
    name = _rpc_name(path)

    async def handler(stream: Any) -> None:
        if tracker.draining:
            log.info("%s refused: UNAVAILABLE crishim is shutting down", name)
            raise GRPCError(Status.UNAVAILABLE, "crishim is shutting down")
        tracker.enter()
        start = time.perf_counter()
        status, message = Status.OK, ""
        try:
            await func(stream)
        except GRPCError as exc:
            status, message = exc.status, exc.message or ""
            raise
        except errors.CrishimError as exc:
            status, message = status_for(exc), str(exc)
            raise GRPCError(status, message) from exc
        except asyncio.CancelledError:
            status, message = Status.CANCELLED, "call cancelled"
            raise
        except Exception as exc:
            log.exception("%s: unexpected error", name)
            status, message = _unexpected(exc)
            raise GRPCError(status, message) from exc
        finally:
            tracker.leave()
            elapsed = time.perf_counter() - start
            if tracker.observe is not None:
                tracker.observe(name, status.name, elapsed)
            elapsed_ms = elapsed * 1000
            if status is not Status.OK:
                log.warning("%s failed: %s %s (%.3f ms)", name, status.name, message, elapsed_ms)
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("%s OK %.3f ms", name, elapsed_ms)

    return handler


def build_mapping(
    servicer: Any,
    base: type,
    tracker: CallTracker,
    overrides: Mapping[str, StreamHandler] | None = None,
) -> dict[str, Handler]:
    """The instrumented grpclib mapping of a servicer derived from a generated base.

    RPCs whose method the servicer does not override answer UNIMPLEMENTED; ``overrides``
    replaces the generated stream handler of an RPC (used for pre-encoded replies).
    """
    generated: Any = base
    mapping: dict[str, Handler] = generated.__mapping__(servicer)
    result = {}
    for path, handler in mapping.items():
        method = handler.func.__name__.removeprefix("__rpc_")
        func: StreamHandler = handler.func
        if overrides and path in overrides:
            func = overrides[path]
        elif getattr(type(servicer), method) is getattr(base, method):
            func = unimplemented_handler(path)
        result[path] = Handler(
            instrument(path, func, tracker),
            handler.cardinality,
            handler.request_type,
            handler.reply_type,
        )
    return result
