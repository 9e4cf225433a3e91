"""Work that must run in a thread of its own, never in a pooled one.

Namespaces (network, UTS, IPC) belong to a thread. A thread that enters or creates one
must never run anything else afterwards, as a pooled worker would: it lives in the pod's
network from then on. :func:`in_own_thread` starts a new thread for one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["in_own_thread"]

T = TypeVar("T")


async def in_own_thread(name: str, func: Callable[[], T]) -> T:
    """``func()`` in a new thread; its result or exception.

    Also when cancelled, this returns only once the thread is done, so that the caller's
    cleanup never races what the thread is still doing.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if done.done():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = func()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=body, name=name, daemon=True).start()
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await done
        raise
