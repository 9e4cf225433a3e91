"""Containers created under conmon and driven with runc and crun (root).

Every test runs for both runtimes. Containers are busybox bundles from ``tests.rig.bundle``
with their own ids, directories and cgroups; each is killed, deleted and its conmon awaited
in the fixture's teardown, whether the test passed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crishim.errors import Internal, NotFound
from crishim.runtime.binaries import resolve_binary
from crishim.runtime.cgroup_driver import CgroupfsDriver, monitor_cgroup_dirs
from crishim.runtime.conmon import (
    MonitorSpec,
    attach_socket_path,
    conmon_alive,
    create_container,
    read_exit_code,
    reopen_log,
    resize,
)
from crishim.runtime.oci_runtime import OciRuntime
from tests.rig.bundle import BUSYBOX, make_bundle

pytestmark = pytest.mark.root

CGROUP_ROOT = "/crishim-test"
# RFC3339Nano as conmon writes it: local time with a numeric offset (or Z).
LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{1,9}(Z|[+-]\d\d:\d\d) (stdout|stderr) (P|F) (.*)$"
)
EXEC_ENV = ["PATH=/bin"]


def _process(*args: str) -> dict[str, object]:
    return {"args": list(args), "cwd": "/", "env": EXEC_ENV, "user": {"uid": 0, "gid": 0}}


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def _log_lines(path: Path) -> list[tuple[str, str, str]]:
    """(stream, P|F, message) of each CRI log line; every line must match the format."""
    out = []
    for line in path.read_text().splitlines():
        match = LOG_LINE.match(line)
        assert match, f"not a CRI log line: {line!r}"
        out.append((match[2], match[3], match[4]))
    return out


def _cgroup_file(cgroups_path: str, controller: str, v1_name: str) -> Path:
    return Path("/sys/fs/cgroup", controller, cgroups_path.lstrip("/"), v1_name)


@dataclass
class Rig:
    """Makes containers for one runtime under a temporary root and cleans them up."""

    runtime: OciRuntime
    base: Path
    specs: list[MonitorSpec] = field(default_factory=list)
    #: the cgroup parent conmon was placed under, by container id
    parents: dict[str, str] = field(default_factory=dict)
    cgroups: CgroupfsDriver = field(default_factory=CgroupfsDriver)

    def spec(
        self,
        args: Sequence[str],
        *,
        resources: dict[str, object] | None = None,
        tty: bool = False,
    ) -> MonitorSpec:
        cid = f"ct-{uuid.uuid4().hex[:12]}"
        bundle = make_bundle(
            self.base / cid / "bundle",
            args,
            cgroups_path=f"{CGROUP_ROOT}/{cid}",
            resources=resources,
            terminal=tty,
        )
        spec = MonitorSpec(
            container_id=cid,
            name=f"name-{cid}",
            bundle=bundle,
            runtime=self.runtime,
            log_path=self.base / cid / "logs" / "0.log",
            exit_dir=self.base / "exits",
            socket_dir=self.base / "sockets",
            pid_file=self.base / cid / "pid",
            conmon_pid_file=self.base / cid / "conmon.pid",
            tty=tty,
        )
        self.specs.append(spec)
        return spec

    async def running(
        self,
        args: Sequence[str],
        *,
        resources: dict[str, object] | None = None,
        tty: bool = False,
        cgroup_parent: str | None = None,
    ) -> MonitorSpec:
        spec = self.spec(args, resources=resources, tty=tty)
        cid = spec.container_id
        if cgroup_parent is None:
            await create_container(spec)
        else:
            self.parents[cid] = cgroup_parent
            await create_container(
                spec, place=lambda pid: self.cgroups.place_monitor(pid, cgroup_parent, cid)
            )
        await self.runtime.start(spec.container_id)
        return spec

    async def status(self, cid: str) -> str | None:
        state = await self.runtime.state(cid)
        return state.status if state else None

    async def cleanup(self) -> None:
        """Kill and delete every container, then check each conmon exited."""
        for spec in self.specs:
            with contextlib.suppress(Internal):
                await self.runtime.kill(spec.container_id, signal.SIGKILL)
            with contextlib.suppress(Internal):
                await self.runtime.delete(spec.container_id, force=True)
        for spec in self.specs:

            async def conmon_gone(spec: MonitorSpec = spec) -> bool:
                return not conmon_alive(spec.conmon_pid_file)

            await _until(conmon_gone, f"conmon of {spec.container_id} to exit")
            parent = self.parents.pop(spec.container_id, None)
            if parent is not None:
                await self.cgroups.release(parent, spec.container_id)
        self.specs.clear()


@pytest.fixture(params=["runc", "crun"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Rig]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name: str = request.param
    for tool, package in ((name, name), ("conmon", "conmon"), (str(BUSYBOX), "busybox-static")):
        if resolve_binary(tool) is None:
            pytest.skip(f"{tool} missing: apt-get install {package}")
    path = resolve_binary(name)
    assert path is not None
    the_rig = Rig(OciRuntime(name, path, str(tmp_path / "state")), tmp_path)
    try:
        yield the_rig
    finally:
        await the_rig.cleanup()
        # The shared parent goes once the last test using it is done (busy until then).
        name = CGROUP_ROOT.lstrip("/")
        for parent in [Path("/sys/fs/cgroup", name), *Path("/sys/fs/cgroup").glob(f"*/{name}")]:
            with contextlib.suppress(OSError):
                parent.rmdir()


async def test_create_start_state_and_cri_log(rig: Rig) -> None:
    spec = rig.spec(["sh", "-c", "echo hello; echo oops >&2; exec sleep 100"])
    cid = spec.container_id

    pid = await create_container(spec)

    state = await rig.runtime.state(cid)
    assert state is not None
    assert (state.id, state.status, state.pid, state.bundle) == (
        cid,
        "created",
        pid,
        str(spec.bundle),
    )
    assert int(spec.pid_file.read_text()) == pid
    assert conmon_alive(spec.conmon_pid_file)
    assert attach_socket_path(spec.socket_dir, cid).is_socket()
    await rig.runtime.start(cid)
    assert await rig.status(cid) == "running"
    assert cid in [s.id for s in await rig.runtime.list()]

    async def logged() -> bool:
        return spec.log_path.exists() and len(_log_lines(spec.log_path)) >= 2

    await _until(logged, "two log lines")
    assert sorted(_log_lines(spec.log_path)) == [("stderr", "F", "oops"), ("stdout", "F", "hello")]


async def test_exit_code_recorded(rig: Rig) -> None:
    spec = await rig.running(["sh", "-c", "exit 3"])

    async def exited() -> bool:
        return read_exit_code(spec.exit_dir, spec.container_id) is not None

    await _until(exited, "the exit file")
    assert read_exit_code(spec.exit_dir, spec.container_id) == 3
    assert await rig.status(spec.container_id) == "stopped"


async def test_kill_term_then_kill_after_timeout(rig: Rig) -> None:
    # The init of a pid namespace ignores signals it has no handler for: SIGTERM does nothing.
    spec = await rig.running(["sleep", "100"])
    cid = spec.container_id

    await rig.runtime.kill(cid, signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert await rig.status(cid) == "running"
    await rig.runtime.kill(cid, signal.SIGKILL, all_processes=True)

    async def stopped() -> bool:
        return read_exit_code(spec.exit_dir, cid) is not None

    await _until(stopped, "the container to die")
    assert read_exit_code(spec.exit_dir, cid) == 128 + signal.SIGKILL
    assert await rig.status(cid) == "stopped"
    # Killing a stopped container is not an error: the caller wanted it dead.
    await rig.runtime.kill(cid, signal.SIGKILL)


async def test_delete(rig: Rig) -> None:
    spec = await rig.running(["sleep", "100"])
    cid = spec.container_id

    with pytest.raises(Internal):
        await rig.runtime.delete(cid)  # running, not forced
    await rig.runtime.delete(cid, force=True)

    assert await rig.runtime.state(cid) is None
    await rig.runtime.delete(cid)  # gone is not an error
    await rig.runtime.kill(cid, signal.SIGKILL)
    assert cid not in [s.id for s in await rig.runtime.list()]
    with pytest.raises(NotFound):
        await rig.runtime.start(cid)


async def test_exec_sync(rig: Rig) -> None:
    spec = await rig.running(["sleep", "100"])
    cid = spec.container_id

    result = await rig.runtime.exec_sync(
        cid, _process("sh", "-c", "id -u; echo to-stderr >&2; exit 7"), timeout=10
    )

    assert (result.exit_code, result.stdout, result.stderr) == (7, b"0\n", b"to-stderr\n")
    assert not result.timed_out
    ok = await rig.runtime.exec_sync(cid, _process("true"), timeout=None)
    assert (ok.exit_code, ok.stdout, ok.stderr) == (0, b"", b"")
    with pytest.raises(NotFound):
        await rig.runtime.exec_sync(f"{cid}-missing", _process("true"), timeout=10)


async def test_exec_sync_timeout_kills_process_tree(rig: Rig) -> None:
    spec = await rig.running(["sleep", "100"])
    cid = spec.container_id
    procs = _cgroup_file(f"{CGROUP_ROOT}/{cid}", "pids", "cgroup.procs")
    init_pid = int(spec.pid_file.read_text())

    started = time.monotonic()
    result = await rig.runtime.exec_sync(
        cid, _process("sh", "-c", "echo begun; sleep 100 & sleep 100"), timeout=1
    )

    assert result.timed_out
    assert result.stdout == b"begun\n"
    assert time.monotonic() - started < 5

    async def only_init_left() -> bool:
        return procs.read_text().split() == [str(init_pid)]

    await _until(only_init_left, "the exec'd processes to be gone", timeout=5)


async def test_update_memory_limit(rig: Rig) -> None:
    spec = await rig.running(["sleep", "100"], resources={"memory": {"limit": 64 << 20}})
    limit = _cgroup_file(f"{CGROUP_ROOT}/{spec.container_id}", "memory", "memory.limit_in_bytes")
    assert int(limit.read_text()) == 64 << 20

    await rig.runtime.update(spec.container_id, {"memory": {"limit": 32 << 20}})

    assert int(limit.read_text()) == 32 << 20
    with pytest.raises(NotFound):
        await rig.runtime.update(f"{spec.container_id}-missing", {"memory": {"limit": 1 << 30}})


async def test_log_reopen_after_rename(rig: Rig) -> None:
    spec = await rig.running(
        ["sh", "-c", "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.05; done"]
    )
    log = spec.log_path

    async def has_lines(path: Path) -> bool:
        return path.exists() and len(_log_lines(path)) >= 3

    await _until(lambda: has_lines(log), "first log lines")
    rotated = log.with_name("0.log.1")
    log.rename(rotated)

    await reopen_log(spec.bundle, log)

    await _until(lambda: has_lines(log), "log lines in the reopened file")
    old = [int(m.removeprefix("line")) for _, _, m in _log_lines(rotated)]
    new = [int(m.removeprefix("line")) for _, _, m in _log_lines(log)]
    assert old == list(range(len(old)))
    assert new[0] >= len(old)
    assert new == list(range(new[0], new[0] + len(new)))


async def test_resize_terminal(rig: Rig) -> None:
    spec = await rig.running(
        ["sh", "-c", "while true; do busybox stty size; sleep 0.05; done"], tty=True
    )

    await resize(spec.bundle, 33, 111)

    async def resized() -> bool:
        return spec.log_path.exists() and "33 111" in spec.log_path.read_text()

    await _until(resized, "the new terminal size in the log")
    assert all(stream == "stdout" for stream, _, _ in _log_lines(spec.log_path))


async def test_conmon_in_cgroup_parent(rig: Rig) -> None:
    parent = f"{CGROUP_ROOT}/pod-{uuid.uuid4().hex[:8]}"
    spec = await rig.running(["sleep", "100"], cgroup_parent=parent)
    conmon_pid = spec.conmon_pid_file.read_text().strip()

    dirs = monitor_cgroup_dirs(parent, spec.container_id)

    assert dirs
    for directory in dirs:
        assert conmon_pid in (directory / "cgroup.procs").read_text().split(), directory
    await rig.cleanup()
    for directory in dirs:
        assert not directory.exists()
        with contextlib.suppress(OSError):
            directory.parent.rmdir()


async def test_create_failure_is_reported(rig: Rig) -> None:
    spec = rig.spec(["sleep", "100"])
    (spec.bundle / "config.json").unlink()

    with pytest.raises(Internal, match=r"config\.json"):
        await create_container(spec)

    assert await rig.runtime.state(spec.container_id) is None


CHILD = """
import asyncio, json, sys
from pathlib import Path
from crishim.runtime.conmon import MonitorSpec, create_container
from crishim.runtime.oci_runtime import OciRuntime

a = json.loads(sys.argv[1])
runtime = OciRuntime(a["name"], a["path"], a["root"])
paths = {k: Path(v) for k, v in a["paths"].items()}

async def main() -> None:
    spec = MonitorSpec(container_id=a["cid"], name=a["cid"], runtime=runtime, **paths)
    print(await create_container(spec))
    await runtime.start(a["cid"])

asyncio.run(main())
"""


async def test_conmon_outlives_the_process_that_started_it(rig: Rig) -> None:
    spec = rig.spec(["sh", "-c", "while true; do echo tick; sleep 0.05; done"])
    runtime = rig.runtime
    paths = {
        k: str(getattr(spec, k))
        for k in ("bundle", "log_path", "exit_dir", "socket_dir", "pid_file", "conmon_pid_file")
    }
    args = {"name": runtime.name, "path": runtime.path, "root": runtime.root, "paths": paths}
    args["cid"] = spec.container_id

    # Pipes on purpose: if conmon or the container held them, this would hang.
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        json.dumps(args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    out, err = await asyncio.wait_for(child.communicate(), 30)

    assert child.returncode == 0, err.decode()
    assert int(out) == int(spec.pid_file.read_text())
    assert conmon_alive(spec.conmon_pid_file)
    assert await rig.status(spec.container_id) == "running"
    await _until(lambda: _ticks_grow(spec.log_path), "the log to keep growing")


async def _ticks_grow(log: Path) -> bool:
    if not log.exists():
        return False
    before = len(_log_lines(log))
    await asyncio.sleep(0.2)
    return len(_log_lines(log)) > before > 0


async def test_two_containers_in_parallel(rig: Rig) -> None:
    specs = [rig.spec(["sh", "-c", f"echo I am {i}; exec sleep 100"]) for i in range(2)]

    pids = await asyncio.gather(*(create_container(s) for s in specs))
    await asyncio.gather(*(rig.runtime.start(s.container_id) for s in specs))

    assert len(set(pids)) == 2
    for i, spec in enumerate(specs):
        assert await rig.status(spec.container_id) == "running"

        async def logged(spec: MonitorSpec = spec) -> bool:
            return spec.log_path.exists() and bool(spec.log_path.read_text())

        await _until(logged, f"the log of container {i}")
        assert _log_lines(spec.log_path) == [("stdout", "F", f"I am {i}")]
    listed = {s.id for s in await rig.runtime.list()}
    assert {s.container_id for s in specs} <= listed
