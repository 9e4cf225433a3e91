"""Tasks that outlive the call that started them, and are never left unobserved.

A task nobody awaits dies silently: its exception only surfaces as "Task exception was
never retrieved" when it is garbage collected, if ever. Two kinds of such tasks exist in
crishim, and both go through here:

- Background loops (watching exits): :class:`BackgroundTasks` starts them, logs how any of
  them failed, and cancels and awaits the rest at shutdown.
- Shared work that a caller may abandon (a create kept running for kubelet's retry, a
  pull several callers wait on): :func:`join_shared` awaits it shielded; when the caller
  is cancelled, the task goes on and its outcome is logged instead of lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["BackgroundTasks", "join_shared"]

log = logging.getLogger(__name__)

T = TypeVar("T")


def _report(what: str) -> Callable[[asyncio.Task[Any]], None]:
    def report(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s failed: %s", what, exc, exc_info=exc)

    return report


async def join_shared(task: asyncio.Task[T], what: str) -> T:
    """The result of ``task``, which goes on when this caller is cancelled; a failure it
    then ends with is logged as ``what``."""
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_report(f"{what} (its caller had gone)"))
        raise


class BackgroundTasks:
    """Long-running tasks of one owner: failures logged, all cancelled by :meth:`close`."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; ``what`` names it in the log."""
        task = asyncio.create_task(coro, name=what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_report(what))
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float) -> None:
        """Let the tasks finish for up to ``timeout`` seconds, then cancel the rest."""
        tasks = list(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self.close()

    async def close(self) -> None:
        """Cancel every task and wait until all have ended."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
