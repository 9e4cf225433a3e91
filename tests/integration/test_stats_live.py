"""Stats of real containers (runc and crun under conmon) and of real network namespaces (root).

A CPU burner and a memory hog run in a pod cgroup parent; StatsService reads them through
small in-memory stand-ins for the container, sandbox and snapshot services, so what is
checked is the readers and the service against the kernel's real counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crishim.errors import Internal, NotFound
from crishim.model.container import Container, ContainerFilter, ContainerMetadata, ContainerState
from crishim.model.sandbox import PodMetadata, Sandbox, SandboxFilter
from crishim.model.stats import ContainerStats
from crishim.network.stats import read_interfaces, read_netns_interfaces, read_pod_interfaces
from crishim.runtime.binaries import resolve_binary
from crishim.runtime.cgroup_stats import CgroupMounts
from crishim.runtime.conmon import MonitorSpec, conmon_alive, create_container
from crishim.runtime.oci_runtime import OciRuntime
from crishim.services.stats import StatsService
from tests.rig.bundle import BUSYBOX, make_bundle

pytestmark = pytest.mark.root

BURN = ["sh", "-c", "while :; do :; done"]
# 60 MB into the tmpfs at /dev/shm: shmem pages, charged to the container and never
# "inactive file", so all of it is working set.
HOG = ["sh", "-c", "busybox dd if=/dev/zero of=/dev/shm/fill bs=1M count=60 && exec sleep 100"]
MB = 1 << 20


@dataclass(frozen=True)
class _Bind:
    type: str
    source: str
    options: tuple[str, ...]


@dataclass
class Stand:
    """In-memory container, sandbox and snapshot sources for StatsService."""

    containers: list[Container] = field(default_factory=list)
    sandboxes: list[Sandbox] = field(default_factory=list)
    rootfs: dict[str, Path] = field(default_factory=dict)
    root: Path = Path("/")

    def get(self, object_id: str) -> Container:
        for container in self.containers:
            if container.id == object_id:
                return container
        raise NotFound(object_id)

    def matching(self, criteria: ContainerFilter) -> list[Container]:
        return [c for c in self.containers if criteria.matches(c)]

    def mounts(self, key: str) -> Sequence[_Bind]:
        if key not in self.rootfs:
            raise NotFound(key)
        return [_Bind("bind", str(self.rootfs[key]), ("rbind", "rw"))]

    def mountpoint(self) -> str:
        return str(self.root)


@dataclass
class Pods:
    """The sandbox source of a Stand."""

    sandboxes: list[Sandbox]

    def get(self, sandbox_id: str) -> Sandbox:
        for sandbox in self.sandboxes:
            if sandbox.id == sandbox_id:
                return sandbox
        raise NotFound(sandbox_id)

    def matching(self, criteria: SandboxFilter) -> list[Sandbox]:
        return [s for s in self.sandboxes if criteria.matches(s)]


@dataclass
class Rig:
    """Runs busybox containers in one pod cgroup parent and removes all of it afterwards."""

    runtime: OciRuntime
    base: Path
    pod_parent: str
    specs: list[MonitorSpec] = field(default_factory=list)

    async def run(self, args: Sequence[str]) -> tuple[str, int, Path]:
        """Start a container; its id, init pid and root filesystem."""
        cid = f"st-{uuid.uuid4().hex[:12]}"
        bundle = make_bundle(
            self.base / cid / "bundle", args, cgroups_path=f"{self.pod_parent}/crishim-{cid}"
        )
        spec = MonitorSpec(
            container_id=cid,
            name=cid,
            bundle=bundle,
            runtime=self.runtime,
            log_path=self.base / cid / "0.log",
            exit_dir=self.base / "exits",
            socket_dir=self.base / "sockets",
            pid_file=self.base / cid / "pid",
            conmon_pid_file=self.base / cid / "conmon.pid",
        )
        self.specs.append(spec)
        pid = await create_container(spec)
        await self.runtime.start(cid)
        return cid, pid, bundle / "rootfs"

    async def cleanup(self) -> None:
        for spec in self.specs:
            with contextlib.suppress(Internal):
                await self.runtime.kill(spec.container_id, signal.SIGKILL, all_processes=True)
            with contextlib.suppress(Internal):
                await self.runtime.delete(spec.container_id, force=True)
        deadline = time.monotonic() + 10
        while any(conmon_alive(s.conmon_pid_file) for s in self.specs):
            assert time.monotonic() < deadline, "conmon did not exit"
            await asyncio.sleep(0.05)
        mounts = CgroupMounts.read()
        hierarchies = [m.mountpoint for m in mounts.v1.values()]
        hierarchies += [mounts.v2.mountpoint] if mounts.v2 else []
        # The runtime makes the pod's cgroup in every hierarchy, also those crishim reads
        # nothing from (blkio, cpuset, devices, freezer, the named systemd one).
        root = Path("/sys/fs/cgroup")
        hierarchies += [h for h in root.iterdir() if h.is_dir()] if root.is_dir() else []
        parts = self.pod_parent.strip("/").split("/")
        for hierarchy in set(hierarchies):
            for depth in range(len(parts), 0, -1):
                with contextlib.suppress(OSError):
                    hierarchy.joinpath(*parts[:depth]).rmdir()


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
    pod_parent = f"/crishim-stats-test/pod-{uuid.uuid4().hex[:8]}"
    the_rig = Rig(OciRuntime(name, path, str(tmp_path / "state")), tmp_path, pod_parent)
    try:
        yield the_rig
    finally:
        await the_rig.cleanup()


def _container(cid: str, pod_id: str, pid: int) -> Container:
    return Container(
        id=cid,
        sandbox_id=pod_id,
        metadata=ContainerMetadata(name=cid),
        image="sha256:busybox",
        state=ContainerState.RUNNING,
        created_at=time.time_ns(),
        labels={"app": "stats"},
        pid=pid,
    )


def _sandbox(pod_id: str, cgroup_parent: str, netns: str) -> Sandbox:
    return Sandbox(
        id=pod_id,
        metadata=PodMetadata(name="p", uid="u", namespace="ns"),
        created_at=time.time_ns(),
        cgroup_parent=cgroup_parent,
        netns=netns,
    )


def _by_id(stats: list[ContainerStats]) -> dict[str, ContainerStats]:
    return {s.attributes.id: s for s in stats}


async def test_burner_and_hog_numbers_move(rig: Rig, tmp_path: Path) -> None:
    burner, burner_pid, burner_root = await rig.run(BURN)
    hog, hog_pid, hog_root = await rig.run(HOG)
    pod_id = "pod-" + uuid.uuid4().hex
    stand = Stand(
        containers=[_container(burner, pod_id, burner_pid), _container(hog, pod_id, hog_pid)],
        rootfs={burner: burner_root, hog: hog_root},
        root=tmp_path,
    )
    netns = f"/proc/{burner_pid}/ns/net"
    with_parent = _sandbox(pod_id, rig.pod_parent, netns)
    service = StatsService(stand, Pods([with_parent]), stand)
    # The same pod as crictl makes it: no cgroup parent; its stats are its containers' sum.
    summed = StatsService(stand, Pods([_sandbox(pod_id, "", netns)]), stand)

    first = _by_id(await service.list_container_stats(ContainerFilter()))
    for pods in (service, summed):  # the first pod samples, for the rates
        assert (await pods.pod_stats(pod_id)).cpu is not None
    deadline = time.monotonic() + 15
    while True:
        await asyncio.sleep(1.5)
        second = _by_id(await service.list_container_stats(ContainerFilter(sandbox_id=pod_id)))
        memory = second[hog].memory
        assert memory is not None
        if (memory.working_set_bytes or 0) > 40 * MB or time.monotonic() > deadline:
            break

    cpu1, cpu2 = first[burner].cpu, second[burner].cpu
    assert cpu1 is not None
    assert cpu2 is not None
    assert cpu1.usage_nano_cores is None  # the first sample has nothing to compare with
    assert cpu2.usage_core_nano_seconds is not None
    assert cpu1.usage_core_nano_seconds is not None
    assert cpu2.usage_core_nano_seconds > cpu1.usage_core_nano_seconds
    assert cpu2.usage_nano_cores is not None
    assert cpu2.usage_nano_cores > 0.3e9
    assert memory.working_set_bytes is not None
    assert memory.working_set_bytes > 40 * MB
    assert memory.usage_bytes is not None
    assert memory.usage_bytes >= memory.working_set_bytes
    assert memory.page_faults
    for container_stats in second.values():
        assert container_stats.process is not None
        assert (container_stats.process.process_count or 0) >= 1
        layer = container_stats.writable_layer
        assert layer is not None
        assert layer.mountpoint == str(tmp_path)
        assert (layer.used_bytes or 0) > BUSYBOX.stat().st_size // 2  # the busybox copy
        assert (layer.inodes_used or 0) >= 10
    print(  # the numbers, for the record (pytest -s)
        f"\n{rig.runtime.name}: burner {cpu2.usage_nano_cores / 1e9:.2f} cores, "
        f"hog working set {memory.working_set_bytes / MB:.1f} MiB"
    )

    pod = await service.pod_stats(pod_id)
    pod_sum = await summed.pod_stats(pod_id)

    for stats in (pod, pod_sum):
        assert {c.attributes.id for c in stats.containers} == {burner, hog}
        assert stats.cpu is not None
        assert (stats.cpu.usage_core_nano_seconds or 0) >= cpu2.usage_core_nano_seconds
        assert (stats.cpu.usage_nano_cores or 0) > 0.3e9
        assert stats.memory is not None
        assert (stats.memory.working_set_bytes or 0) > 40 * MB
        assert stats.process is not None
        assert (stats.process.process_count or 0) >= 2
        # runc gave the containers their own network namespace: loopback only.
        assert stats.network is not None
        assert (stats.network.interfaces, stats.network.default_interface) == ([], None)
    assert await service.list_pod_stats(SandboxFilter(id=pod_id)) != []


async def test_exited_container_has_no_cgroup_stats(rig: Rig, tmp_path: Path) -> None:
    cid, pid, rootfs = await rig.run(["true"])
    exited = _container(cid, "pod", pid).model_copy(update={"state": ContainerState.EXITED})
    stand = Stand(containers=[exited], rootfs={cid: rootfs}, root=tmp_path)
    service = StatsService(stand, Pods([]), stand)

    stats = await service.container_stats(cid)

    assert (stats.cpu, stats.memory, stats.process) == (None, None, None)
    assert stats.writable_layer is not None
    assert await service.list_container_stats(ContainerFilter()) == []


@contextlib.asynccontextmanager
async def _netns_process(script: str) -> AsyncIterator[int]:
    """A shell running ``script`` then sleeping, in a fresh network namespace; its pid."""
    process = await asyncio.create_subprocess_exec(
        "unshare", "--net", "sh", "-c", f"{script} && echo ready && exec sleep 100",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 10) == b"ready\n"
        yield process.pid
    finally:
        process.kill()
        await process.wait()


async def test_fresh_netns_has_no_interfaces_but_loopback() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    async with _netns_process("true") as pid:
        netns = f"/proc/{pid}/ns/net"
        assert read_interfaces(pid) == []
        assert await read_netns_interfaces(netns) == []
        # crishim's own pid is in another namespace: skipped for the right one.
        assert await read_pod_interfaces(netns, [os.getpid(), pid]) == []
    with pytest.raises(Internal):
        await read_netns_interfaces("/nonexistent/netns")


async def test_veth_counters_move() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    setup = (
        "ip link add v0 type veth peer name v1 && ip addr add 10.9.9.1/24 dev v0 && "
        "ip link set v1 up && ip link set v0 up && "
        "ip neigh add 10.9.9.2 lladdr 02:00:00:00:00:02 dev v0 nud permanent"
    )
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for _ in range(5): s.sendto(b'x' * 1000, ('10.9.9.2', 9))"
    )
    async with _netns_process(setup) as pid:
        netns = f"/proc/{pid}/ns/net"
        before = {i.name: i for i in read_interfaces(pid)}
        sender = await asyncio.create_subprocess_exec(
            "nsenter", f"--net={netns}", sys.executable, "-c", send
        )
        assert await sender.wait() == 0
        after = {i.name: i for i in await read_netns_interfaces(netns)}

    assert set(before) == set(after) == {"v0", "v1"}
    assert after["v0"].tx_bytes - before["v0"].tx_bytes >= 5000
    assert after["v1"].rx_bytes - before["v1"].rx_bytes >= 5000
