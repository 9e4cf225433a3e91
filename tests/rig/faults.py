"""Shared by the fault tests (root): crishim as a subprocess on directories of its own,
with a client, torn down whatever a test left; shell-script stand-ins for binaries; what
crishim and its containers leave on the host; and the module-scoped instance whose runtime,
conmon and CNI plugins the tests replace (``faulty``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from grpclib import GRPCError

from crishim.api import v1
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.fixtures import PushedImage, require_busybox
from tests.rig.host import active_snapshots, conmons_of, entries, mounts_under, run
from tests.rig.pods import PodRig

CNI_BIN = "/usr/lib/cni"
NETWORK = "crishim-ft-net"
HOST_NETWORK = v1.NamespaceMode.NODE
SLEEP = ["sleep", "1000"]
DISK_SIZE = "24m"
RUNTIMES = ("runc", "crun")
# What conmon and the runtime have of a container (see container_traces).
MONITOR_TRACES = ("conmon pid", "state/exits/", "state/attach/", "state/runtimes/")


def require_host_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("faults of the host need root")
    for tool in ("conmon", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found on PATH")
    if not os.access(f"{CNI_BIN}/loopback", os.X_OK):
        pytest.skip("CNI plugins missing: install the Debian package containernetworking-plugins")
    require_busybox()


def script(path: Path, body: str) -> Path:
    """An executable shell script at ``path``."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


async def grpc_error(call: Awaitable[object]) -> GRPCError:
    """The GRPCError a call raises (fails the test if it succeeds)."""
    try:
        result = await call
    except GRPCError as exc:
        return exc
    pytest.fail(f"the call succeeded: {result}")


async def start_rig(base: Path, config: str, image: str) -> PodRig:
    """crishim on ``base`` with ``config`` as its drop-in, and a client."""
    proc = CrishimProcess(base, config=config)
    await asyncio.to_thread(proc.start)
    return PodRig(
        runtime_name="runc",
        proc=proc,
        base=base,
        image=image,
        image_id="",
        image_digest_ref="",
        configured_image="",
        configured_image_id="",
    )


async def stop_rig(rig: PodRig) -> None:
    """Remove the pods through the CRI, then whatever is left once crishim is gone: its
    conmons, the containers in the runtimes' state, every mount under its directories."""
    proc = rig.proc
    try:
        if proc.proc is not None and proc.proc.poll() is None:
            await asyncio.wait_for(rig.remove_all_pods(), 60)
    finally:
        rig.close()
        proc.kill()
        for pid in conmons_of(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for name in RUNTIMES:
            runtime_root = proc.state / "runtimes" / name
            for cid in entries(runtime_root):
                run(name, "--root", str(runtime_root), "delete", "--force", cid, check=False)
        proc.unmount_all()


async def pull(rig: PodRig) -> str:
    reply = await rig.images.pull_image(v1.PullImageRequest(image=v1.ImageSpec(image=rig.image)))
    return reply.image_ref


async def image_of(rig: PodRig) -> v1.Image | None:
    reply = await rig.images.image_status(
        v1.ImageStatusRequest(image=v1.ImageSpec(image=rig.image))
    )
    return reply.image


async def container_traces(rig: PodRig) -> list[str]:
    """What any container of the instance has on the host (its pods aside)."""
    proc = rig.proc
    listed = await rig.runtime.list_containers(v1.ListContainersRequest())
    found = [f"container {c.id[:12]}" for c in listed.containers]
    found += [f"conmon pid {pid}" for pid in conmons_of(proc)]
    found += [f"mount {m}" for m in mounts_under(proc.state / "containers")]
    found += [f"snapshot of {key[:12]}" for key in active_snapshots(proc.root)]
    for directory in (
        proc.state / "containers",
        proc.state / "exits",
        proc.state / "attach",
        proc.root / "containers",
        *(proc.state / "runtimes" / name for name in RUNTIMES),
    ):
        found += [f"{directory.relative_to(proc.base)}/{n[:12]}" for n in entries(directory)]
    return found


async def assert_no_container_traces(
    rig: PodRig, only: tuple[str, ...] = (), timeout: float = 5.0
) -> None:
    """Fail unless :func:`container_traces` (those starting with one of ``only``, if given)
    come back empty within ``timeout`` (a killed conmon takes a moment to go)."""

    async def traces() -> list[str]:
        return [t for t in await container_traces(rig) if not only or t.startswith(only)]

    deadline = time.monotonic() + timeout
    found = await traces()
    while found and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        found = await traces()
    assert found == [], f"left behind: {found}{rig.log_tail()}"


def image_files(root: Path) -> list[str]:
    """Blobs, downloads in progress, image records and snapshots (layers, work in
    progress) under ``root``."""
    images = root / "images"
    found = [str(p.relative_to(root)) for p in (images / "content").glob("*/*/*")]
    found += [str(p.relative_to(root)) for p in (images / "content" / "ingest").iterdir()]
    found += [str(p.relative_to(root)) for p in (images / "records").glob("*")]
    found += [str(p.relative_to(root)) for p in (images / "snapshots").glob("*/*/*")]
    return found


def errors_logged(rig: PodRig, offset: int) -> list[str]:
    """Tracebacks crishim logged since ``offset``: an error nothing translated."""
    return [line for line in rig.proc.log()[offset:].splitlines() if "unexpected error" in line]


@dataclass
class Binaries:
    """crishim with runtime handlers "ghost" (no binary), "bad" (a script that fails) and
    "counted" (runc, each call's arguments written to ``runtime_calls``), conmon at
    ``conmon`` (a link to the real one that tests replace), and CNI plugins searched in
    ``bin_dir`` first."""

    rig: PodRig
    bin_dir: Path
    conmon: Path
    ghost: Path
    bad_runtime: Path
    runtime_calls: Path

    def restore_conmon(self) -> None:
        self.conmon.unlink(missing_ok=True)
        real = shutil.which("conmon")
        assert real is not None
        self.conmon.symlink_to(real)

    def write_conflist(self, *plugin_types: str) -> None:
        conflist = {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [{"type": "loopback"}, *({"type": t} for t in plugin_types)],
        }
        path = self.rig.proc.cni_conf_dir / "10-faults.conflist"
        path.write_text(json.dumps(conflist))


@pytest_asyncio.fixture(name="binaries", scope="module", loop_scope="module")
async def binaries_fixture(
    tmp_path_factory: pytest.TempPathFactory, busybox_pushed: PushedImage
) -> AsyncIterator[Binaries]:
    require_host_tools()
    base = tmp_path_factory.mktemp("binaries")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    bad_runtime = script(
        bin_dir / "bad-runtime", 'echo "bad-runtime: broken on purpose" >&2\nexit 1\n'
    )
    ghost = base / "not-installed" / "runc"
    runtime_calls = base / "counted.calls"
    counted = script(bin_dir / "counted", f'echo "$@" >> {runtime_calls}\nexec runc "$@"\n')
    config = (
        f'conmon = "{bin_dir}/conmon"\n'
        f'[runtimes.ghost]\npath = "{ghost}"\n'
        f'[runtimes.bad]\npath = "{bad_runtime}"\n'
        f'[runtimes.counted]\npath = "{counted}"\n'
        f'[cni]\nbin_dirs = ["{bin_dir}", "{CNI_BIN}"]\n'
    )
    rig = await start_rig(base / "crishim", config, busybox_pushed.ref)
    binaries = Binaries(rig, bin_dir, bin_dir / "conmon", ghost, bad_runtime, runtime_calls)
    binaries.restore_conmon()
    try:
        await pull(rig)
        yield binaries
    finally:
        await stop_rig(rig)


@pytest_asyncio.fixture(name="faulty", loop_scope="module")
async def faulty_fixture(binaries: Binaries) -> AsyncIterator[Binaries]:
    """The module's instance; afterwards conmon is real again, no network is configured,
    every pod is removed and nothing may be left."""
    offset = len(binaries.rig.proc.log())
    try:
        yield binaries
    finally:
        binaries.restore_conmon()
        for path in binaries.rig.proc.cni_conf_dir.iterdir():
            path.unlink()
        await asyncio.wait_for(binaries.rig.remove_all_pods(), 60)
    await binaries.rig.assert_nothing_left()
    assert errors_logged(binaries.rig, offset) == []


async def run_pod_error(rig: PodRig, name: str, handler: str = "", **overrides: Any) -> GRPCError:
    """The error of a RunPodSandbox that must fail."""
    config = rig.sandbox_config(name, **overrides)
    request = v1.RunPodSandboxRequest(config=config, runtime_handler=handler)
    return await grpc_error(rig.runtime.run_pod_sandbox(request))
