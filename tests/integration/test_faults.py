"""Faults of the host: a full disk under crishim's root during a pull, an image import and
a create, and a missing or failing runtime, conmon or CNI plugin (root).

Each fault must give a clear gRPC status whose message names what was being written, or
which binary failed and how, must leave nothing half-made behind, and the next call must
work once the fault is gone. crishim runs as a real subprocess on its own directories;
the full disk is a small tmpfs mounted on its root (and state) before it starts, filled by
a filler file. Pods are host-network pods, or pods on a CNI network of loopback and a fake
plugin (no bridge, no addresses), so nothing on the host network is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError

from crishim.api import admin_v1, v1
from tests.rig.archives import docker_archive, tar_bytes
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.fixtures import PushedImage, require_busybox
from tests.rig.host import active_snapshots, cgroups_of, conmons_of, entries, mounts_under, run
from tests.rig.oci_image import busybox_image
from tests.rig.pods import PodRig

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

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


# ---- a full disk ---------------------------------------------------------------------------


@dataclass
class Filler:
    """A file taking all but ``leave`` bytes of a file system's free space."""

    path: Path

    def fill(self, leave: int) -> None:
        stat = os.statvfs(self.path.parent)
        size = stat.f_bavail * stat.f_frsize - leave
        assert size > 0, f"{self.path.parent} has less than {leave} bytes free"
        with self.path.open("wb") as out:
            os.posix_fallocate(out.fileno(), 0, size)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class SmallDisks:
    """crishim on a small tmpfs as root and another as state, with a filler for each."""

    rig: PodRig
    root: Filler
    state: Filler


@pytest_asyncio.fixture(loop_scope="module")
async def small_disks(tmp_path: Path, busybox_pushed: PushedImage) -> AsyncIterator[SmallDisks]:
    require_host_tools()
    base = tmp_path / "crishim"
    for directory in (base / "root", base / "state"):
        directory.mkdir(parents=True)
        run("mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "crishim-ft", str(directory))
    rig: PodRig | None = None
    try:
        rig = await start_rig(base, "", busybox_pushed.ref)
        yield SmallDisks(rig, Filler(base / "root" / "filler"), Filler(base / "state" / "filler"))
    finally:
        if rig is not None:
            await stop_rig(rig)
        for point in mounts_under(base):
            run("umount", "-l", point, check=False)
    assert mounts_under(base) == []


async def test_a_pull_on_a_full_disk_is_resource_exhausted_and_stores_nothing(
    small_disks: SmallDisks, busybox_pushed: PushedImage
) -> None:
    rig, disk = small_disks.rig, small_disks.root
    offset = len(rig.proc.log())
    layer = busybox_pushed.image.layers[0]
    cases = [
        # No room for the layer: its download fails (manifest and config fit).
        (64 << 10, "downloading blob"),
        # Room for the layer's blob, not for its files: unpacking it fails.
        (layer.size + (512 << 10), "unpacking layer"),
    ]
    for leave, failing_step in cases:
        disk.fill(leave)
        try:
            error = await grpc_error(pull(rig))
        finally:
            disk.remove()
        assert error.status is Status.RESOURCE_EXHAUSTED, error.message
        message = error.message or ""
        assert message.startswith(failing_step), message
        assert f" {rig.proc.root}/images/" in message
        assert message.endswith(": the disk is full (No space left on device)"), message
        print(f"{failing_step}: RESOURCE_EXHAUSTED {message}")
        # Nothing of the image stays: no blob (whole or partial), layer or record.
        assert image_files(rig.proc.root) == []
        assert await image_of(rig) is None
    assert errors_logged(rig, offset) == []
    # With room again the same pull works.
    assert (await pull(rig)).startswith("sha256:")
    image = await image_of(rig)
    assert image is not None
    assert rig.image in image.repo_tags


async def test_an_import_on_a_full_disk_is_resource_exhausted_and_stores_nothing(
    small_disks: SmallDisks,
) -> None:
    rig, disk = small_disks.rig, small_disks.root
    admin = admin_v1.AdminStub(rig.cri.channel)
    image = busybox_image(labels={"fault": "full-disk-import"})
    members = docker_archive([(image, ["example.test/full:1"])])
    archive = tar_bytes(members)
    # docker archives carry layers uncompressed: the largest member
    layer_size = max(len(member.data) for member in members)
    offset = len(rig.proc.log())
    cases = [
        # No room for the layer: staging it fails (the config fits).
        (64 << 10, "staging archive member"),
        # Room for the staged layer, not for its files: unpacking it fails.
        (layer_size + (512 << 10), "unpacking layer"),
    ]
    for leave, failing_step in cases:
        disk.fill(leave)
        try:
            error = await grpc_error(admin.import_image(archive_messages(archive)))
        finally:
            disk.remove()
        assert error.status is Status.RESOURCE_EXHAUSTED, error.message
        message = error.message or ""
        assert failing_step in message, message
        assert f" {rig.proc.root}/images/" in message
        assert message.endswith(": the disk is full (No space left on device)"), message
        print(f"{failing_step}: RESOURCE_EXHAUSTED {message}")
        # Nothing of the archive stays: no staged file, blob, layer or record.
        assert image_files(rig.proc.root) == []
    assert errors_logged(rig, offset) == []
    # With room again the same import works.
    reply = await admin.import_image(archive_messages(archive))
    assert [(i.id, i.repo_tags) for i in reply.images] == [
        (image.config_digest, ["example.test/full:1"])
    ]


def archive_messages(data: bytes) -> Iterator[admin_v1.ImportImageRequest]:
    for start in range(0, len(data), 64 << 10):
        yield admin_v1.ImportImageRequest(data=data[start : start + (64 << 10)])


async def test_a_create_on_a_full_disk_is_resource_exhausted_and_leaves_nothing(
    small_disks: SmallDisks,
) -> None:
    rig = small_disks.rig
    await pull(rig)
    pod = await rig.run_pod("full-disk", network=HOST_NETWORK)
    offset = len(rig.proc.log())
    cases = [
        # No room at all under root: the container's snapshot cannot be made.
        (small_disks.root, 0, "making snapshot ", rig.proc.root),
        # Room for the snapshot, not for the record: the bundle and the mounts were made.
        (small_disks.root, 4096, "writing the container record ", rig.proc.root),
        # No room under state: the bundle's runtime spec cannot be written.
        (small_disks.state, 0, "writing the runtime spec ", rig.proc.state),
    ]
    for disk, leave, failing_step, where in cases:
        disk.fill(leave)
        try:
            error = await grpc_error(rig.create_container(pod, "main", SLEEP))
        finally:
            disk.remove()
        assert error.status is Status.RESOURCE_EXHAUSTED, error.message
        message = error.message or ""
        assert message.startswith(failing_step), message
        assert f" {where}/" in message, message
        assert message.endswith(": the disk is full (No space left on device)"), message
        print(f"{failing_step}: RESOURCE_EXHAUSTED {message}")
        await assert_no_container_traces(rig)
    assert errors_logged(rig, offset) == []
    # With room again the same create works, and the container runs.
    cid = await rig.start_container(pod, "main", SLEEP)
    await rig.wait_state(cid, v1.ContainerState.CONTAINER_RUNNING)
    await rig.remove_all_pods()
    await rig.assert_nothing_left()


async def test_a_start_on_a_full_disk_is_resource_exhausted_and_leaves_nothing(
    small_disks: SmallDisks,
) -> None:
    rig = small_disks.rig
    await pull(rig)
    pod = await rig.run_pod("full-state", network=HOST_NETWORK)
    offset = len(rig.proc.log())
    cid = await rig.create_container(pod, "main", SLEEP)
    # No room under state, where conmon and the runtime keep their files.
    small_disks.state.fill(0)
    try:
        error = await grpc_error(
            rig.runtime.start_container(v1.StartContainerRequest(container_id=cid))
        )
    finally:
        small_disks.state.remove()
    assert error.status is Status.RESOURCE_EXHAUSTED, error.message
    message = error.message or ""
    assert f"{rig.proc.state}/containers/{cid}/" in message, message
    assert message.endswith("No space left on device (the disk is full)"), message
    print(f"start: RESOURCE_EXHAUSTED {message}")
    await assert_no_container_traces(rig, only=MONITOR_TRACES)
    assert errors_logged(rig, offset) == []
    # With room again kubelet's next attempt runs.
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=cid))
    cid = await rig.start_container(pod, "main", SLEEP, attempt=1)
    await rig.wait_state(cid, v1.ContainerState.CONTAINER_RUNNING)
    await rig.remove_all_pods()
    await rig.assert_nothing_left()


# ---- missing and failing binaries ----------------------------------------------------------


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


async def test_a_missing_runtime_fails_run_pod_sandbox_naming_it(faulty: Binaries) -> None:
    error = await run_pod_error(faulty.rig, "ghost", "ghost", network=HOST_NETWORK)
    assert error.status is Status.FAILED_PRECONDITION
    assert error.message == (
        f"runtime handler 'ghost': {faulty.ghost} not found; install it, or set "
        "[runtimes.ghost] path in crishim's config"
    )
    print(f"missing runtime: {error.status.name} {error.message}")


async def failed_start(rig: PodRig, pod: str) -> GRPCError:
    """CreateContainer (files and a record only: the runtime hears of a container at its
    start), then a StartContainer that must fail. The container is left exited with reason
    StartError and the error as its message, as on containerd, with nothing of it in
    conmon or the runtime; RemoveContainer then removes the rest."""
    cid = await rig.create_container(pod, "main", SLEEP)
    error = await grpc_error(
        rig.runtime.start_container(v1.StartContainerRequest(container_id=cid))
    )
    status = await rig.status(cid)
    assert status.state == v1.ContainerState.CONTAINER_EXITED
    assert (status.reason, status.exit_code) == ("StartError", 128)
    assert status.message == error.message
    # Its bundle, root filesystem, snapshot and record stay until it is removed.
    await assert_no_container_traces(rig, only=MONITOR_TRACES)
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=cid))
    await assert_no_container_traces(rig)
    return error


async def test_a_failing_runtime_fails_start_container_with_its_message(faulty: Binaries) -> None:
    rig = faulty.rig
    reply = await rig.runtime.run_pod_sandbox(
        v1.RunPodSandboxRequest(
            config=rig.sandbox_config("bad-runtime", network=HOST_NETWORK), runtime_handler="bad"
        )
    )
    error = await failed_start(rig, reply.pod_sandbox_id)
    assert error.status is Status.INTERNAL
    message = error.message or ""
    assert message.startswith("create container "), message
    assert f": runtime handler 'bad' ({faulty.bad_runtime}) failed: " in message
    assert message.endswith("bad-runtime: broken on purpose"), message
    print(f"failing runtime: {error.status.name} {message}")


async def test_a_missing_conmon_fails_start_container_naming_it(faulty: Binaries) -> None:
    rig = faulty.rig
    pod = await rig.run_pod("no-conmon", network=HOST_NETWORK)
    faulty.conmon.unlink()
    error = await failed_start(rig, pod)
    assert error.status is Status.FAILED_PRECONDITION
    assert error.message == (
        f"conmon: {faulty.conmon} not found; containers need conmon (apt-get install conmon), "
        "or set conmon in crishim's config to where it is"
    )
    print(f"missing conmon: {error.status.name} {error.message}")
    # With conmon back, kubelet's next attempt runs.
    faulty.restore_conmon()
    cid = await rig.start_container(pod, "main", SLEEP, attempt=1)
    await rig.wait_state(cid, v1.ContainerState.CONTAINER_RUNNING)


async def test_a_failing_conmon_fails_start_container_with_its_stderr(faulty: Binaries) -> None:
    rig = faulty.rig
    pod = await rig.run_pod("bad-conmon", network=HOST_NETWORK)
    faulty.conmon.unlink()
    script(faulty.conmon, 'echo "conmon: broken on purpose" >&2\nexit 1\n')
    error = await failed_start(rig, pod)
    assert error.status is Status.INTERNAL
    message = error.message or ""
    assert message.startswith(f"conmon {faulty.conmon} for container "), message
    assert message.endswith(" exited with status 1: conmon: broken on purpose"), message
    print(f"failing conmon: {error.status.name} {message}")


async def test_a_missing_cni_plugin_fails_run_pod_sandbox_naming_it(faulty: Binaries) -> None:
    faulty.write_conflist("no-such-plugin")
    error = await run_pod_error(faulty.rig, "no-plugin")
    assert error.status is Status.FAILED_PRECONDITION
    assert error.message == (
        f"CNI plugin no-such-plugin (ADD) of network {NETWORK}: not found in "
        f"{faulty.bin_dir}:{CNI_BIN}; install it in one of crishim's [cni] bin_dirs"
    )
    print(f"missing CNI plugin: {error.status.name} {error.message}")
    # The pod's namespaces, its CNI cache entry and its directory are gone (the fixture's
    # check), and loopback's ADD was undone.


async def test_a_failing_cni_plugin_fails_run_pod_sandbox_with_its_error(
    faulty: Binaries,
) -> None:
    calls = faulty.bin_dir / "ft-fail.calls"
    script(
        faulty.bin_dir / "ft-fail",
        f'echo "$CNI_COMMAND" >> {calls}\ncat >/dev/null\n'
        'if [ "$CNI_COMMAND" = ADD ]; then\n'
        '  echo \'{"cniVersion": "1.0.0", "code": 11, "msg": "no addresses left", '
        '"details": "pool empty"}\'\n'
        "  exit 1\n"
        "fi\n",
    )
    faulty.write_conflist("ft-fail")
    error = await run_pod_error(faulty.rig, "bad-plugin")
    # CNI's code 11 is "try again later".
    assert error.status is Status.UNAVAILABLE
    assert error.message == (
        f"CNI plugin ft-fail (ADD) of network {NETWORK} failed: no addresses left (pool empty)"
    )
    print(f"failing CNI plugin: {error.status.name} {error.message}")
    # The failed ADD was rolled back: the plugin got its DEL.
    assert calls.read_text().split() == ["ADD", "DEL"]


# ---- a pod sharing one PID namespace: its infra process and its network start at once ----

SHARED_PID = v1.NamespaceMode.POD


def recording_plugin(path: Path, calls: Path) -> None:
    """A CNI plugin that succeeds with an empty result and writes each command to ``calls``
    (a new file)."""
    calls.unlink(missing_ok=True)
    script(
        path,
        f'echo "$CNI_COMMAND" >> {calls}\ncat >/dev/null\n'
        'if [ "$CNI_COMMAND" = ADD ]; then echo \'{"cniVersion": "1.0.0"}\'; fi\n',
    )


async def test_a_shared_pid_pod_whose_network_fails_has_its_infra_process_undone(
    faulty: Binaries,
) -> None:
    calls = faulty.bin_dir / "ft-slow-fail.calls"
    runc_root = faulty.rig.proc.state / "runtimes" / "runc"
    # ADD waits until the infra process, started alongside it, is known to runc; then fails.
    script(
        faulty.bin_dir / "ft-slow-fail",
        f'echo "$CNI_COMMAND" >> {calls}\ncat >/dev/null\n'
        'if [ "$CNI_COMMAND" = ADD ]; then\n'
        "  for i in $(seq 200); do\n"
        f'    if [ -e "{runc_root}/$CNI_CONTAINERID/state.json" ]; then\n'
        f"      echo infra-created >> {calls}; break\n"
        "    fi\n"
        "    sleep 0.05\n"
        "  done\n"
        '  echo \'{"cniVersion": "1.0.0", "code": 11, "msg": "no addresses left"}\'\n'
        "  exit 1\n"
        "fi\n",
    )
    faulty.write_conflist("ft-slow-fail")
    error = await run_pod_error(faulty.rig, "slow-fail", pid=SHARED_PID)
    assert error.status is Status.UNAVAILABLE
    assert error.message == (
        f"CNI plugin ft-slow-fail (ADD) of network {NETWORK} failed: no addresses left"
    )
    assert calls.read_text().split() == ["ADD", "infra-created", "DEL"]
    # The infra process, its conmon and runc's state are gone (the fixture's check).


async def test_a_shared_pid_pod_whose_infra_process_fails_has_its_network_undone(
    faulty: Binaries,
) -> None:
    calls = faulty.bin_dir / "ft-record.calls"
    recording_plugin(faulty.bin_dir / "ft-record", calls)
    faulty.write_conflist("ft-record")
    faulty.conmon.unlink()
    script(faulty.conmon, 'echo "conmon: broken on purpose" >&2\nexit 1\n')
    error = await run_pod_error(faulty.rig, "bad-infra", pid=SHARED_PID)
    assert error.status is Status.INTERNAL
    assert (error.message or "").endswith(" exited with status 1: conmon: broken on purpose")
    # The ADD that ran alongside was finished, then undone.
    assert calls.read_text().split() == ["ADD", "DEL"]


def command(runtime_call: str) -> str:
    """A runtime call without crishim's global options (``--root R --log-format json``)."""
    return runtime_call.split(" --log-format json ", 1)[1]


async def test_a_stopped_shared_pid_pod_is_removed_without_the_runtime(faulty: Binaries) -> None:
    rig = faulty.rig
    calls = faulty.bin_dir / "ft-record.calls"
    recording_plugin(faulty.bin_dir / "ft-record", calls)
    faulty.write_conflist("ft-record")
    config = rig.sandbox_config("counted", pid=SHARED_PID)
    reply = await rig.runtime.run_pod_sandbox(
        v1.RunPodSandboxRequest(config=config, runtime_handler="counted")
    )
    pod = reply.pod_sandbox_id
    assert calls.read_text().split() == ["ADD"]
    started = faulty.runtime_calls.read_text().splitlines()
    assert [command(line) for line in started if " start " in line] == [f"start {pod}"]
    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    # The infra process is killed and deleted, and the network torn down, once.
    stopped = faulty.runtime_calls.read_text().splitlines()[len(started) :]
    assert [command(line) for line in stopped] == [f"kill {pod} 9", f"delete --force {pod}"]
    assert calls.read_text().split() == ["ADD", "DEL"]
    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert faulty.runtime_calls.read_text().splitlines()[len(started) :] == stopped
    assert calls.read_text().split() == ["ADD", "DEL"]


@pytest_asyncio.fixture(name="plain", loop_scope="module")
async def plain_fixture(
    tmp_path: Path, busybox_pushed: PushedImage
) -> AsyncIterator[tuple[PodRig, Path]]:
    """crishim with only runc (the module's "bad" runtime would fail every recovery
    delete, and recovery keeps what it could not delete for the next start), CNI plugins
    searched in a directory of the test's own first; nothing may be left afterwards."""
    require_host_tools()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    config = f'[cni]\nbin_dirs = ["{bin_dir}", "{CNI_BIN}"]\n'
    rig = await start_rig(tmp_path / "crishim", config, busybox_pushed.ref)
    try:
        yield rig, bin_dir
        await asyncio.wait_for(rig.remove_all_pods(), 60)
        await rig.assert_nothing_left()
    finally:
        await stop_rig(rig)


def gone(pid: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie (PID 1 here reaps no orphans) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"

    return check


@pytest.mark.parametrize("runc_state", ["kept", "lost"])
async def test_a_shared_pid_pod_cut_short_by_sigkill_is_swept_at_the_restart(
    plain: tuple[PodRig, Path], runc_state: str
) -> None:
    rig, bin_dir = plain
    calls = bin_dir / "ft-hold.calls"
    release = bin_dir / "ft-hold.release"
    runc_root = rig.proc.state / "runtimes" / "runc"
    # ADD holds the run once runc knows the infra container, until the test releases it.
    script(
        bin_dir / "ft-hold",
        f'echo "$CNI_COMMAND $CNI_CONTAINERID" >> {calls}\ncat >/dev/null\n'
        'if [ "$CNI_COMMAND" = ADD ]; then\n'
        "  for i in $(seq 200); do\n"
        f'    [ -e "{runc_root}/$CNI_CONTAINERID/state.json" ] && break\n'
        "    sleep 0.05\n"
        "  done\n"
        f"  echo infra-created >> {calls}\n"
        f'  for i in $(seq 600); do [ -e "{release}" ] && break; sleep 0.05; done\n'
        '  echo \'{"cniVersion": "1.0.0"}\'\n'
        "fi\n",
    )
    conflist = {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [{"type": "ft-hold"}]}
    (rig.proc.cni_conf_dir / "10-hold.conflist").write_text(json.dumps(conflist))
    config = rig.sandbox_config("cut-short", pid=SHARED_PID)
    run = asyncio.ensure_future(rig.runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config)))

    async def infra_created() -> bool:
        return calls.exists() and "infra-created" in calls.read_text()

    await rig.until(infra_created, "the infra container, while the ADD is held", timeout=15)
    pod = calls.read_text().split()[1]
    rig.created.add(pod)  # its cgroups are among what must not be left
    assert conmons_of(rig.proc), "the infra process has no conmon"
    # crishim dies with the pod half made: no record, an infra process under conmon, its
    # cgroup, runc's state, namespace pins and a CNI cache entry.
    rig.close()
    rig.proc.kill()
    if runc_state == "lost":
        # As if runc had been killed inside its create: the process is gone and runc knows
        # nothing, but the cgroup runc made for it is still there.
        init_pid = json.loads((runc_root / pod / "state.json").read_text())["init_process_pid"]
        for pid in [*conmons_of(rig.proc), init_pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await rig.until(gone(init_pid), "the infra process to die")
        shutil.rmtree(runc_root / pod)
        assert cgroups_of({pod}), "no cgroup of the infra process to leave behind"
    await asyncio.to_thread(rig.proc.start)
    rig.connect()
    release.touch()
    with pytest.raises(StreamTerminatedError):  # the call died with its connection
        await asyncio.wait_for(run, 5)
    # The restart swept all of it (the fixture checks everything), the network by a DEL.
    assert (await rig.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())).items == []
    assert calls.read_text().split()[-2:] == ["DEL", pod]
    await rig.assert_nothing_left()
    assert "removed 1 half-made or half-removed pod(s)" in rig.proc.log()
