"""Child processes through util.proc: vfork'd, awaited on a pidfd, pipes owned once."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import uvloop

from crishim.errors import DeadlineExceeded, FailedPrecondition
from crishim.util import proc


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> type[asyncio.AbstractEventLoop]:
    return uvloop.Loop if request.param == "uvloop" else asyncio.SelectorEventLoop


def run(loop_factory: type[asyncio.AbstractEventLoop], coro: object) -> object:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


def zombie_children() -> list[int]:
    """This process's children that have exited but were not reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            found.append(int(entry.name))
    return found


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_run_collects_output_and_status(loop_factory: type[asyncio.AbstractEventLoop]) -> None:
    async def main() -> tuple[proc.Completed, set[int], set[int]]:
        before = open_fds()
        done = await proc.run(
            ["sh", "-c", "cat; echo err >&2; exit 3"], what="a shell", input=b"in\n"
        )
        return done, before, open_fds()

    result = run(loop_factory, main())
    assert isinstance(result, tuple)
    done, before, after = result
    assert done == proc.Completed(3, b"in\n", b"err\n")
    assert after == before  # pipes and pidfd closed, each once
    assert zombie_children() == []


def test_big_output_and_input_do_not_deadlock(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    data = os.urandom(3 * 1024 * 1024)
    done = run(loop_factory, proc.run(["cat"], what="cat", input=data))
    assert isinstance(done, proc.Completed)
    assert done.stdout == data


def test_limit_keeps_the_start_and_drains_the_rest(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    done = run(
        loop_factory,
        proc.run(["sh", "-c", "yes | head -c 1000000"], what="yes", limit=10),
    )
    assert isinstance(done, proc.Completed)
    assert (done.returncode, done.stdout) == (0, b"y\ny\ny\ny\ny\n")


def test_a_missing_binary_is_named(loop_factory: type[asyncio.AbstractEventLoop]) -> None:
    with pytest.raises(
        FailedPrecondition, match="runtime handler 'x': /nonexistent/runc not found"
    ):
        run(loop_factory, proc.run(["/nonexistent/runc", "list"], what="runtime handler 'x'"))


def test_a_file_that_cannot_run_is_named(
    loop_factory: type[asyncio.AbstractEventLoop], tmp_path: Path
) -> None:
    plain = tmp_path / "conmon"
    plain.write_text("not a program")
    with pytest.raises(FailedPrecondition, match=f"conmon: {plain} not executable"):
        run(loop_factory, proc.run([str(plain)], what="conmon"))


def test_timeout_kills_and_reaps(loop_factory: type[asyncio.AbstractEventLoop]) -> None:
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded, match=r"sleeper: no answer within 0\.2s, killed"):
        run(loop_factory, proc.run(["sleep", "30"], what="sleeper", timeout=0.2))
    assert time.monotonic() - start < 5
    deadline = time.monotonic() + 2
    while zombie_children() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert zombie_children() == []


def test_a_cancelled_wait_still_reaps_the_child(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    async def main() -> proc.Process:
        child = proc.spawn(["sleep", "0.2"], what="sleep")
        waiter = asyncio.create_task(child.wait())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0.5)  # the child exits meanwhile; nobody waits for it any more
        return child

    child = run(loop_factory, main())
    assert isinstance(child, proc.Process)
    assert child.returncode == 0
    assert zombie_children() == []


def test_a_descriptor_passed_as_stdio_stays_the_callers(
    loop_factory: type[asyncio.AbstractEventLoop], tmp_path: Path
) -> None:
    target = tmp_path / "out"

    async def main() -> int:
        with target.open("wb") as out:
            child = proc.spawn(["echo", "to a file"], what="echo", stdout=out.fileno())
            code = await child.wait()
            assert not out.closed
            os.fstat(out.fileno())  # still open, still ours
        return code

    assert run(loop_factory, main()) == 0
    assert target.read_text() == "to a file\n"


def test_many_children_at_once(loop_factory: type[asyncio.AbstractEventLoop]) -> None:
    async def main() -> list[proc.Completed]:
        return await asyncio.gather(
            *(proc.run(["sh", "-c", f"echo {i}"], what="sh") for i in range(100))
        )

    done = run(loop_factory, main())
    assert [c.stdout for c in done] == [f"{i}\n".encode() for i in range(100)]  # type: ignore[attr-defined]
    assert zombie_children() == []
