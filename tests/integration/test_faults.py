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

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib import GRPCError
from grpclib.const import Status

from crishim.api import admin_v1, v1
from tests.rig.archives import docker_archive, tar_bytes
from tests.rig.faults import (
    CNI_BIN,
    DISK_SIZE,
    HOST_NETWORK,
    MONITOR_TRACES,
    NETWORK,
    SLEEP,
    Binaries,
    assert_no_container_traces,
    binaries_fixture,  # noqa: F401 - the module-scoped fixture ``binaries``
    errors_logged,
    faulty_fixture,  # noqa: F401 - the per-test fixture ``faulty``
    grpc_error,
    image_files,
    image_of,
    pull,
    require_host_tools,
    run_pod_error,
    script,
    start_rig,
    stop_rig,
)
from tests.rig.fixtures import PushedImage
from tests.rig.host import mounts_under, run
from tests.rig.oci_image import busybox_image
from tests.rig.pods import PodRig

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]


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
