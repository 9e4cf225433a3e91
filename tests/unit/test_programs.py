"""Host programs that are missing or cannot run: one clear FailedPrecondition naming them
(what the program is for, the path tried, how to fix it); see also tests/unit/test_proc.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from crishim.errors import FailedPrecondition, NotFound
from crishim.runtime.oci_runtime import OciRuntime
from crishim.util.proc import (
    ProgramMissing,
    find_program,
    require_program,
    run,
    run_blocking,
    spawn,
)


def script(path: Path, text: str, mode: int = 0o755) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_missing_program_names_what_it_is_its_path_and_the_remedy(tmp_path: Path) -> None:
    with pytest.raises(ProgramMissing) as caught:
        require_program(str(tmp_path / "conmon"), "conmon", "containers need conmon")
    assert str(caught.value) == f"conmon: {tmp_path}/conmon not found; containers need conmon"
    assert isinstance(caught.value, FailedPrecondition)


def test_a_name_is_looked_up_on_the_path_given(tmp_path: Path) -> None:
    tool = script(tmp_path / "tool", "#!/bin/sh\n")
    assert find_program("tool", {"PATH": str(tmp_path)}) == str(tool)
    with pytest.raises(ProgramMissing, match=r"^nsenter: tool not found in PATH \(/nowhere\)$"):
        require_program("tool", "nsenter", env={"PATH": "/nowhere"})


def test_a_file_that_is_not_executable_is_named_so(tmp_path: Path) -> None:
    plain = script(tmp_path / "runc", "#!/bin/sh\n", mode=0o644)
    with pytest.raises(ProgramMissing) as caught:
        require_program(str(plain), "runtime handler 'runc'")
    assert str(caught.value) == f"runtime handler 'runc': {plain} not executable"


async def test_running_a_missing_program_passes_on_the_remedy(tmp_path: Path) -> None:
    with pytest.raises(ProgramMissing) as caught:
        await run([str(tmp_path / "x"), "arg"], what="CNI plugin x", remedy="install it")
    assert str(caught.value) == f"CNI plugin x: {tmp_path}/x not found; install it"


async def test_a_script_without_its_interpreter_cannot_be_run(tmp_path: Path) -> None:
    broken = script(tmp_path / "broken", "#!/nonexistent/interpreter\n")
    with pytest.raises(ProgramMissing) as caught:
        await run([str(broken)], what="conmon", remedy="fix it")
    assert (
        str(caught.value) == f"conmon: {broken} cannot be run: its interpreter is missing; fix it"
    )


async def test_a_missing_working_directory_is_not_blamed_on_the_program(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        spawn(["true"], what="true", cwd=tmp_path / "gone")
    assert not isinstance(caught.value, ProgramMissing)


def test_a_blocking_run_reports_a_missing_program_the_same_way() -> None:
    assert run_blocking(["sh", "-c", "echo hi"], what="sh").stdout == b"hi\n"
    with pytest.raises(ProgramMissing, match=r"^cp: /nonexistent/cp not found; install coreutils$"):
        run_blocking(["/nonexistent/cp"], what="cp", remedy="install coreutils")


async def test_a_runtime_whose_binary_is_missing_names_its_handler(tmp_path: Path) -> None:
    runtime = OciRuntime("ghost", str(tmp_path / "runc"), str(tmp_path / "root"))
    expected = (
        f"runtime handler 'ghost': {tmp_path}/runc not found; install it, or set "
        "[runtimes.ghost] path in crishim's config"
    )
    with pytest.raises(ProgramMissing) as caught:
        runtime.require()
    assert str(caught.value) == expected
    with pytest.raises(ProgramMissing) as caught:
        await runtime.start("c1")
    assert str(caught.value) == expected
    # Nothing under its root: nothing to list or delete, so cleanups go on.
    assert await runtime.list() == []
    await runtime.delete("c1", force=True)
    # A container it knows cannot be deleted without it: that stays an error.
    (tmp_path / "root" / "c1").mkdir()
    with pytest.raises(ProgramMissing):
        await runtime.delete("c1", force=True)
    with pytest.raises(ProgramMissing):
        await runtime.list()


async def test_a_failing_runtime_reports_its_own_message(tmp_path: Path) -> None:
    failing = script(
        tmp_path / "runtime",
        '#!/bin/sh\necho \'{"level":"error","msg":"container does not exist"}\' >&2\nexit 1\n',
    )
    runtime = OciRuntime("bad", str(failing), str(tmp_path / "root"))
    with pytest.raises(NotFound, match="bad start c1: container does not exist"):
        await runtime.start("c1")
