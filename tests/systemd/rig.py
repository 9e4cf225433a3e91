"""Pods through crishim.service in the systemd test bed, with kubelet's systemd cgroup parents.

``systemd_rig`` (module scope) boots one :class:`~tests.systemd.bed.Bed`, pulls the rig's
busybox and yields a :class:`SystemdRig`; ``srig`` (per test) removes every pod afterwards
and fails the test if a unit, cgroup, conmon or file of crishim's is left in the container.

The rig plays kubelet's part around the runtime: it creates each pod's slice before
RunPodSandbox (a transient ``kubepods-burstable-pod<uid>.slice``, as kubelet does over
D-Bus) and, after the pod is removed, stops the slices and removes the empty slice
directories runc made in the v1 hierarchies systemd does not manage (kubelet's
``Destroy`` does that too).

Running: as root with debootstrap and systemd-nspawn (Debian: debootstrap,
systemd-container); ``CRISHIM_SYSTEMD_TESTS=0`` skips the suite.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib.client import Channel

from crishim.api import v1
from tests.rig.crishim_fixtures import CriClient
from tests.rig.fixtures import PushedImage
from tests.rig.host import run
from tests.systemd.bed import BRIDGE, SUBNET, Bed, subnet_rules

__all__ = ["SystemdRig", "srig_fixture", "systemd_rig_fixture"]

LOG_DIR = "/var/lib/crishim/pod-logs"


def kubelet_slice(uid: str) -> str:
    """The slice kubelet makes for a burstable pod (``-`` is ``_`` in systemd names)."""
    return f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"


def kubelet_parent(uid: str) -> str:
    """The cgroup parent kubelet sends for it: the slice in cgroupfs form."""
    return f"/kubepods.slice/kubepods-burstable.slice/{kubelet_slice(uid)}"


@dataclass
class SystemdRig:
    """The bed, a CRI client on its socket, and kubelet's side of pods."""

    bed: Bed
    image: str
    cri: CriClient = field(init=False)
    slices: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.connect()

    def connect(self) -> None:
        channel = Channel(path=str(self.bed.socket))
        self.cri = CriClient(channel, v1.RuntimeServiceStub(channel), v1.ImageServiceStub(channel))

    def close(self) -> None:
        self.cri.channel.close()

    @property
    def runtime(self) -> v1.RuntimeServiceStub:
        return self.cri.runtime

    def journal(self) -> str:
        return "\n--- crishim.service journal ---\n" + self.bed.journal(lines=300)

    # -- kubelet's part --

    def make_slice(self, uid: str) -> str:
        """Create the pod's slice as kubelet does (a transient unit); its cgroup parent."""
        name = kubelet_slice(uid)
        self.bed.run(
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "StartTransientUnit",
            "ssa(sv)a(sa(sv))",
            name,
            "fail",
            "1",
            "Description",
            "s",
            f"kubelet stand-in: pod {uid}",
            "0",
        )
        self.slices.add(name)
        deadline = time.monotonic() + 10
        while self.bed.systemctl("is-active", name, check=False).strip() != "active":
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.05)
        return kubelet_parent(uid)

    def remove_slices(self) -> None:
        """Stop the pods' slices and their parents, remove the directories runc left."""
        for name in [*sorted(self.slices), "kubepods-burstable.slice", "kubepods.slice"]:
            self.bed.systemctl("stop", name, check=False)
        self.slices.clear()
        self.bed.run(
            "sh",
            "-c",
            "for d in /sys/fs/cgroup/*/kubepods.slice; do "
            '[ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + ; done; true',
        )

    # -- pods and containers --

    def sandbox_config(
        self, name: str, parent: str, uid: str, pid: v1.NamespaceMode = v1.NamespaceMode.CONTAINER
    ) -> v1.PodSandboxConfig:
        return v1.PodSandboxConfig(
            metadata=v1.PodSandboxMetadata(name=name, uid=uid, namespace="sd-test", attempt=0),
            hostname=name,
            log_directory=f"{LOG_DIR}/sd-test_{name}_{uid}",
            labels={"io.kubernetes.pod.name": name},
            linux=v1.LinuxPodSandboxConfig(
                cgroup_parent=parent,
                security_context=v1.LinuxSandboxSecurityContext(
                    namespace_options=v1.NamespaceOption(
                        network=v1.NamespaceMode.POD, pid=pid, ipc=v1.NamespaceMode.POD
                    )
                ),
            ),
        )

    async def run_pod(
        self, name: str, handler: str, pid: v1.NamespaceMode = v1.NamespaceMode.CONTAINER
    ) -> tuple[str, str]:
        """A pod in its own kubelet-made slice; (sandbox id, cgroup parent)."""
        uid = str(uuid.uuid4())
        parent = self.make_slice(uid)
        config = self.sandbox_config(name, parent, uid, pid)
        reply = await self.runtime.run_pod_sandbox(
            v1.RunPodSandboxRequest(config=config, runtime_handler=handler)
        )
        assert reply.pod_sandbox_id, self.journal()
        return reply.pod_sandbox_id, parent

    async def start_container(
        self,
        pod_id: str,
        name: str,
        command: list[str],
        resources: v1.LinuxContainerResources | None = None,
        mounts: list[v1.Mount] | None = None,
    ) -> str:
        status = (
            await self.runtime.pod_sandbox_status(v1.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
        ).status
        assert status is not None
        assert status.metadata is not None
        sandbox_config = self.sandbox_config(status.metadata.name, "", status.metadata.uid)
        config = v1.ContainerConfig(
            metadata=v1.ContainerMetadata(name=name),
            image=v1.ImageSpec(image=self.image),
            command=command,
            log_path=f"{name}/0.log",
            mounts=mounts or [],
            linux=v1.LinuxContainerConfig(
                resources=resources or v1.LinuxContainerResources(cpu_shares=2),
                security_context=v1.LinuxContainerSecurityContext(
                    namespace_options=v1.NamespaceOption(
                        network=v1.NamespaceMode.POD,
                        pid=v1.NamespaceMode.CONTAINER,
                        ipc=v1.NamespaceMode.POD,
                    )
                ),
            ),
        )
        created = await self.runtime.create_container(
            v1.CreateContainerRequest(
                pod_sandbox_id=pod_id, config=config, sandbox_config=sandbox_config
            )
        )
        assert created.container_id, self.journal()
        await self.runtime.start_container(
            v1.StartContainerRequest(container_id=created.container_id)
        )
        return created.container_id

    async def status(self, container_id: str) -> v1.ContainerStatus:
        reply = await self.runtime.container_status(
            v1.ContainerStatusRequest(container_id=container_id)
        )
        assert reply.status is not None
        return reply.status

    async def exec_out(self, container_id: str, *cmd: str) -> str:
        reply = await self.runtime.exec_sync(
            v1.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=10)
        )
        assert reply.exit_code == 0, f"{cmd}: {reply.stderr!r}{self.journal()}"
        return reply.stdout.decode()

    def log_file(self, pod_name: str, pod_uid: str, container: str) -> Path:
        """A container's CRI log as the host reads it (below the bound /var/lib/crishim)."""
        relative = Path(LOG_DIR).relative_to("/var/lib/crishim")
        return self.bed.state / relative / f"sd-test_{pod_name}_{pod_uid}" / container / "0.log"

    async def until(
        self, check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}{self.journal()}")
            await asyncio.sleep(0.1)

    async def wait_serving(self, timeout: float = 30.0) -> None:
        """After a (re)start of crishim.service: active, and answering on a new channel."""
        await asyncio.to_thread(self.bed.wait_crishim, timeout)
        self.close()
        self.connect()
        await self.runtime.version(v1.VersionRequest())

    # -- teardown --

    async def remove_all_pods(self) -> None:
        listed = await self.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())
        for item in listed.items:
            await self.runtime.remove_pod_sandbox(
                v1.RemovePodSandboxRequest(pod_sandbox_id=item.id)
            )

    def leftovers(self) -> list[str]:
        """What removing every pod (and kubelet stopping their slices) should have removed."""
        found: list[str] = []
        units = self.bed.systemctl(
            "list-units", "--all", "--plain", "--no-legend", "crishim-*", "*pod*"
        )
        found += [f"unit {line.split()[0]}" for line in units.splitlines() if line.strip()]
        cgroups = self.bed.run(
            "find", "/sys/fs/cgroup", "-name", "crishim-*", "-o", "-name", "kubepods*"
        )
        found += [f"cgroup {line}" for line in cgroups.splitlines()]
        dropins = self.bed.run(
            "sh",
            "-c",
            "ls -d /run/systemd/system.control/* /run/systemd/transient/* 2>/dev/null; true",
        )
        found += [f"unit file {line}" for line in dropins.splitlines() if "crishim" in line]
        found += [f"unit file {line}" for line in dropins.splitlines() if "kubepods" in line]
        conmons = self.bed.run(
            "sh",
            "-c",
            'for p in /proc/[0-9]*; do [ "$(cat $p/comm 2>/dev/null)" = conmon ] && echo $p; '
            "done; true",
        )
        found += [f"conmon {line}" for line in conmons.splitlines()]
        state = self.bed.run(
            "sh",
            "-c",
            "cd /run/crishim && { find containers sandboxes exits attach -mindepth 1 "
            "-maxdepth 1; find ns -mindepth 2 -maxdepth 2; } 2>/dev/null; true",
        )
        found += [f"state {line}" for line in state.splitlines()]
        found += subnet_rules()
        return found


def _bed_wanted() -> None:
    if os.environ.get("CRISHIM_SYSTEMD_TESTS", "1") == "0":
        pytest.skip("the systemd suite is off (CRISHIM_SYSTEMD_TESTS=0)")
    if os.geteuid() != 0:
        pytest.skip("the systemd test bed needs root")
    for tool, package in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: apt-get install {package}")
    if run("ip", "route", "show", SUBNET).strip() or run("ip", "link", "show", BRIDGE, check=False):
        pytest.skip(f"{SUBNET} or bridge {BRIDGE} is already in use on this host")


@pytest_asyncio.fixture(name="systemd_rig", scope="module", loop_scope="module")
async def systemd_rig_fixture(
    tmp_path_factory: pytest.TempPathFactory, busybox_pushed: PushedImage
) -> AsyncIterator[SystemdRig]:
    """A booted bed with crishim.service on the systemd driver and busybox pulled."""
    _bed_wanted()
    bed = Bed(tmp_path_factory.mktemp("systemd-bed"))
    rig: SystemdRig | None = None
    try:
        await asyncio.to_thread(bed.start)
        await asyncio.to_thread(bed.wait_crishim)
        rig = SystemdRig(bed, busybox_pushed.ref)
        pulled = await rig.cri.images.pull_image(
            v1.PullImageRequest(image=v1.ImageSpec(image=busybox_pushed.ref))
        )
        assert pulled.image_ref.startswith("sha256:"), rig.journal()
        yield rig
    finally:
        if rig is not None:
            rig.close()
        await asyncio.to_thread(bed.stop)


@pytest_asyncio.fixture(name="srig", loop_scope="module")
async def srig_fixture(systemd_rig: SystemdRig) -> AsyncIterator[SystemdRig]:
    """The module's rig; afterwards every pod is removed and nothing may be left."""
    try:
        yield systemd_rig
    finally:
        if systemd_rig.bed.systemctl("is-active", "crishim", check=False).strip() != "active":
            systemd_rig.bed.systemctl("start", "crishim")
            await systemd_rig.wait_serving()
        await asyncio.wait_for(systemd_rig.remove_all_pods(), 60)
        await asyncio.to_thread(systemd_rig.remove_slices)
    # RemoveContainer releases what a container leaves in the background: a moment.
    deadline = time.monotonic() + 10
    left = systemd_rig.leftovers()
    while left and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        left = systemd_rig.leftovers()
    assert left == [], f"left behind: {left}{systemd_rig.journal()}"
