"""Tasks that outlive the call that started them, and are never left unobserved.

A task nobody awaits dies silently: its exception only surfaces as "Task exception was
never retrieved" when it is garbage collected, if ever. Two kinds of such tasks exist in
crishim, and both go through here:

- Background loops (watching exits): :class:`BackgroundTasks` starts them, logs how any of
  them failed, and cancels and awaits the rest at shutdown.
- Shared work that a caller may abandon (a create kept running for kubelet's retry, a
  pull several callers wait on): :func:`join_shared` awaits it shielded; when the caller
  is cancelled, the task goes on and its outcome is logged instead of lost.

And one kind of task that never outlives its caller: independent steps of one call run at
once by :func:`run_all`, which does not return before every one of them has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["BackgroundTasks", "join_shared", "run_all"]

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


async def run_all(*steps: Awaitable[Any]) -> list[Any]:
    """Run independent ``steps`` at once; their results, in order, once all succeeded.

    A failing step does not stop the others: each runs to its end (so a step that succeeds
    has done, and registered the undo of, all of its work), then the first failure in
    ``steps`` order is raised and any other is logged. When the caller is cancelled, the
    steps are cancelled once and awaited to their end (a step's own cleanup is never cut
    short by a second cancellation) before the cancellation goes on.
    """
    tasks = [asyncio.ensure_future(step) for step in steps]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for task in tasks:
            if not task.done() and not task.cancelling():
                task.cancel()
        await _wait_out(tasks)
        _failures(tasks)  # retrieved: the cancellation is what the caller sees
        raise
    failures = _failures(tasks)
    if failures:
        for other in failures[1:]:
            log.warning("a step run alongside also failed: %s", other, exc_info=other)
        raise failures[0]
    return [task.result() for task in tasks]


async def _wait_out(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait until every task has ended, whatever cancels the waiting meanwhile."""
    pending = [task for task in tasks if not task.done()]
    while pending:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait(pending)
        pending = [task for task in pending if not task.done()]


def _failures(tasks: list[asyncio.Task[Any]]) -> list[BaseException]:
    """The ended tasks' exceptions, in order (each retrieved, so none is reported as
    "never retrieved")."""
    failures = []
    for task in tasks:
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        if exc is not None:
            failures.append(exc)
    return failures


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
