"""The small I/O helpers every layer relies on: descriptors read and written on the loop
without taking them over, background tasks that cannot die unseen, tree removal."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
from pathlib import Path

import pytest
import uvloop

from crishim.util.fdio import read_chunk, read_line, write_all
from crishim.util.fs import remove_tree
from crishim.util.tasks import BackgroundTasks, join_shared, run_all


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> type[asyncio.AbstractEventLoop]:
    return uvloop.Loop if request.param == "uvloop" else asyncio.SelectorEventLoop


def run(loop_factory: type[asyncio.AbstractEventLoop], coro: object) -> object:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def still_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# ---- fdio ----------------------------------------------------------------------------------


def test_read_line_returns_the_first_line_and_leaves_the_descriptor_open(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    r, w = os.pipe()

    async def main() -> bytes:
        async def writer() -> None:
            await asyncio.sleep(0.05)
            os.write(w, b'{"data": 42}\n{"data": 1}\n')

        task = asyncio.create_task(writer())
        line = await read_line(r)
        await task
        return line

    try:
        assert run(loop_factory, main()) == b'{"data": 42}\n'
        # Still the caller's: open, and closing it is the caller's single close.
        assert still_open(r)
    finally:
        os.close(r)
        os.close(w)


def test_read_line_at_end_of_file(loop_factory: type[asyncio.AbstractEventLoop]) -> None:
    r, w = os.pipe()
    os.write(w, b"partial")
    os.close(w)
    try:
        assert run(loop_factory, read_line(r)) == b"partial"
        assert run(loop_factory, read_line(r)) == b""
    finally:
        os.close(r)


def test_read_line_stops_at_the_limit(loop_factory: type[asyncio.AbstractEventLoop]) -> None:
    r, w = os.pipe()
    os.write(w, b"x" * 100)
    try:
        assert run(loop_factory, read_line(r, limit=10)) == b"x" * 10
    finally:
        os.close(r)
        os.close(w)


def test_a_cancelled_read_stops_watching_the_descriptor(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    r, w = os.pipe()

    async def main() -> None:
        task = asyncio.create_task(read_line(r))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Closed by its owner and the number reused: a leftover watch would fire on it.
        os.close(r)
        r2, w2 = os.pipe()
        try:
            os.write(w2, b"for someone else\n")
            await asyncio.sleep(0.05)
            assert os.read(r2, 100) == b"for someone else\n"
        finally:
            os.close(r2)
            os.close(w2)

    try:
        run(loop_factory, main())
    finally:
        os.close(w)


def test_write_all_waits_for_a_slow_reader(loop_factory: type[asyncio.AbstractEventLoop]) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    data = os.urandom(1024 * 1024)  # far more than a pipe buffers

    async def main() -> bytes:
        os.set_blocking(r, False)
        received = bytearray()
        writer = asyncio.create_task(write_all(w, data))
        while len(received) < len(data):
            received += await read_chunk(r, 65536)
        await writer
        return bytes(received)

    try:
        assert run(loop_factory, main()) == data
        assert still_open(w)
    finally:
        os.close(r)
        os.close(w)


def test_read_chunk_maps_chosen_errors_to_end_of_file(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    # A terminal's master reads EIO once the last holder of its other side is gone.
    master, slave = os.openpty()
    os.close(slave)
    os.set_blocking(master, False)
    try:
        with pytest.raises(OSError, match="Input/output error"):
            run(loop_factory, read_chunk(master, 10))
        assert run(loop_factory, read_chunk(master, 10, eof_errnos=(errno.EIO,))) == b""
    finally:
        os.close(master)


# ---- tasks ---------------------------------------------------------------------------------


def test_a_failing_background_task_is_logged(
    loop_factory: type[asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    async def fails() -> None:
        raise LookupError("container abc vanished")

    async def main() -> int:
        tasks = BackgroundTasks()
        tasks.spawn(fails(), "the exit watcher")
        await asyncio.sleep(0.01)
        return len(tasks)

    with caplog.at_level(logging.ERROR):
        assert run(loop_factory, main()) == 0
    assert "the exit watcher failed: container abc vanished" in caplog.text


def test_close_cancels_the_background_tasks(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    async def main() -> bool:
        tasks = BackgroundTasks()
        forever = tasks.spawn(asyncio.sleep(3600), "a loop")
        await asyncio.sleep(0)
        await tasks.close()
        return forever.cancelled()

    assert run(loop_factory, main())


def test_drain_lets_quick_tasks_finish_and_cancels_the_slow(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    async def main() -> tuple[bool, bool]:
        tasks = BackgroundTasks()
        quick = tasks.spawn(asyncio.sleep(0.01), "quick")
        slow = tasks.spawn(asyncio.sleep(3600), "slow")
        await tasks.drain(0.2)
        return quick.cancelled(), slow.cancelled()

    assert run(loop_factory, main()) == (False, True)


def test_shared_work_outlives_a_cancelled_caller_and_its_failure_is_logged(
    loop_factory: type[asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    async def slow_failure() -> None:
        await asyncio.sleep(0.05)
        raise ValueError("disk full")

    async def main() -> None:
        work = asyncio.create_task(slow_failure())
        caller = asyncio.create_task(join_shared(work, "create of container 'web'"))
        await asyncio.sleep(0.01)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert not work.done()
        await asyncio.sleep(0.1)
        assert work.done()

    with caplog.at_level(logging.ERROR):
        run(loop_factory, main())
    assert "create of container 'web' (its caller had gone) failed: disk full" in caplog.text


def test_shared_work_hands_its_result_to_the_caller(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    async def main() -> int:
        async def answer() -> int:
            return 7

        return await join_shared(asyncio.create_task(answer()), "answer")

    assert run(loop_factory, main()) == 7


def test_steps_run_at_once_and_give_their_results_in_order(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        async def step(value: str, delay: float) -> str:
            await asyncio.sleep(delay)
            return value

        start = asyncio.get_running_loop().time()
        results = await run_all(step("slow", 0.2), step("quick", 0.0), step("mid", 0.2))
        took = asyncio.get_running_loop().time() - start
        assert results == ["slow", "quick", "mid"]
        assert took < 0.35  # at once: not 0.4 s one after the other
        assert await run_all() == []

    run(loop_factory, main())


def test_a_failing_step_lets_the_others_finish_then_the_first_failure_is_raised(
    loop_factory: type[asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    finished: list[str] = []

    async def main() -> None:
        async def fail(message: str, delay: float) -> None:
            await asyncio.sleep(delay)
            finished.append(message)
            raise OSError(message)

        async def succeed() -> None:
            await asyncio.sleep(0.1)
            finished.append("undo registered")

        with pytest.raises(OSError, match="network"):
            await run_all(fail("network", 0.05), succeed(), fail("later", 0.0))

    with caplog.at_level(logging.WARNING):
        run(loop_factory, main())
        gc.collect()  # an unretrieved exception is reported when its task is collected
    assert sorted(finished) == ["later", "network", "undo registered"]
    assert "never retrieved" not in caplog.text
    # the failure not raised is not lost
    assert "a step run alongside also failed: later" in caplog.text


@pytest.mark.parametrize("cancellations", ["once", "as at shutdown, then again"])
def test_a_cancelled_caller_cancels_the_steps_and_waits_for_their_cleanup(
    loop_factory: type[asyncio.AbstractEventLoop], cancellations: str
) -> None:
    cleaned: list[str] = []

    async def main() -> None:
        async def step(name: str) -> None:
            try:
                await asyncio.sleep(10)
            finally:
                await asyncio.sleep(0.05)  # its own cleanup takes a moment
                cleaned.append(name)

        caller = asyncio.create_task(run_all(step("network"), step("infra")))
        await asyncio.sleep(0.01)
        if cancellations == "once":
            caller.cancel()
        else:
            # Every task is cancelled, the steps along with the caller ...
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await asyncio.sleep(0.01)
            # ... and the caller once more while it waits for their cleanup, which a
            # second cancellation of the steps would cut short.
            caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        # Both had cleaned up before the cancellation reached the caller's caller.
        assert sorted(cleaned) == ["infra", "network"]

    run(loop_factory, main())


# ---- remove_tree ---------------------------------------------------------------------------


async def test_remove_tree_removes_a_symlink_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "config.json").write_text("{}")
    link = tmp_path / "attach-link"
    link.symlink_to(target)
    await remove_tree(link)
    assert not link.is_symlink()
    assert (target / "config.json").exists()


async def test_remove_tree_removes_trees_and_files_and_tolerates_missing(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    (tmp_path / "file").write_text("y")
    await remove_tree(tmp_path / "a")
    await remove_tree(tmp_path / "file")
    await remove_tree(tmp_path / "missing")
    assert sorted(os.listdir(tmp_path)) == []
