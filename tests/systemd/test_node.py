"""crishim as a systemd service with the systemd cgroup driver, in a booted container.

Each test runs against one booted bed per module (``systemd_rig``); ``srig`` removes every
pod afterwards and fails the test if a unit, cgroup, conmon or state file is left. Pods get
kubelet's cgroup parents (``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-
pod<uid>.slice``) on runc and on crun.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from crishim.api import v1
from tests.systemd.rig import (
    SystemdRig,
    srig_fixture,  # noqa: F401 - the per-test fixture ``srig``
    systemd_rig_fixture,  # noqa: F401 - the module-scoped fixture ``systemd_rig``
)

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

RUNTIMES = ("runc", "crun")
TICKER = ["sh", "-c", "i=0; while :; do echo tick$i; i=$((i+1)); sleep 0.2; done"]
MEMORY = 64 << 20


def _scope_dir(controller: str, parent: str, container_id: str) -> str:
    return f"/sys/fs/cgroup/{controller}{parent}/crishim-{container_id}.scope"


async def test_the_service_is_ready_and_reports_the_systemd_driver(srig: SystemdRig) -> None:
    shown = srig.bed.show("crishim", "Type", "ActiveState", "SubState", "KillMode", "Delegate")
    assert shown == {
        "Type": "notify",
        "ActiveState": "active",
        "SubState": "running",
        "KillMode": "process",
        "Delegate": "yes",
    }
    srig.bed.run("systemd-analyze", "verify", "/etc/systemd/system/crishim.service")
    status = await srig.runtime.status(v1.StatusRequest())
    assert all(c.status for c in (status.status.conditions if status.status else []))
    config = await srig.runtime.runtime_config(v1.RuntimeConfigRequest())
    assert config.linux is not None
    assert config.linux.cgroup_driver == v1.CgroupDriver.SYSTEMD


@pytest.mark.parametrize("handler", RUNTIMES)
async def test_containers_are_scopes_in_the_pods_slice_with_their_limits(
    srig: SystemdRig, handler: str
) -> None:
    pod, parent = await srig.run_pod(f"limits-{handler}", handler)
    slice_name = parent.rsplit("/", 1)[-1]
    cid = await srig.start_container(
        pod,
        "app",
        ["sleep", "1000"],
        v1.LinuxContainerResources(
            cpu_period=100000, cpu_quota=50000, cpu_shares=256, memory_limit_in_bytes=MEMORY
        ),
    )
    scope = srig.bed.show(f"crishim-{cid}.scope", "Slice", "ActiveState")
    assert scope == {"Slice": slice_name, "ActiveState": "active"}
    monitor = srig.bed.show(f"crishim-conmon-{cid}.scope", "Slice", "ActiveState")
    assert monitor == {"Slice": slice_name, "ActiveState": "active"}
    group = srig.bed.show(f"crishim-conmon-{cid}.scope", "ControlGroup")["ControlGroup"]
    assert group == f"{parent}/crishim-conmon-{cid}.scope"

    memory = srig.bed.read(f"{_scope_dir('memory', parent, cid)}/memory.limit_in_bytes")
    assert int(memory) == MEMORY
    quota = srig.bed.read(f"{_scope_dir('cpu', parent, cid)}/cpu.cfs_quota_us")
    assert int(quota) == 50000
    shares = srig.bed.read(f"{_scope_dir('cpu', parent, cid)}/cpu.shares")
    assert int(shares) == 256

    assert (await srig.exec_out(cid, "echo", "hello")).strip() == "hello"

    await srig.runtime.update_container_resources(
        v1.UpdateContainerResourcesRequest(
            container_id=cid,
            linux=v1.LinuxContainerResources(memory_limit_in_bytes=2 * MEMORY, cpu_quota=20000),
        )
    )
    memory = srig.bed.read(f"{_scope_dir('memory', parent, cid)}/memory.limit_in_bytes")
    assert int(memory) == 2 * MEMORY
    quota = srig.bed.read(f"{_scope_dir('cpu', parent, cid)}/cpu.cfs_quota_us")
    assert int(quota) == 20000

    await srig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    await srig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))
    units = srig.bed.systemctl("list-units", "--all", "--plain", "--no-legend", "crishim-*")
    assert units.strip() == ""


@pytest.mark.parametrize("handler", RUNTIMES)
async def test_stopping_a_pod_whose_container_just_exited(srig: SystemdRig, handler: str) -> None:
    # systemd removes the scope as soon as the container exits, before crishim notices.
    pod, _ = await srig.run_pod(f"exited-{handler}", handler)
    cid = await srig.start_container(pod, "brief", ["true"])
    await srig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    status = await srig.status(cid)
    assert status.state == v1.ContainerState.CONTAINER_EXITED
    assert status.exit_code in (0, 137)  # 137: stopped before it ran


async def test_pod_resources_are_slice_properties(srig: SystemdRig) -> None:
    pod, parent = await srig.run_pod("podres", "runc")
    slice_name = parent.rsplit("/", 1)[-1]
    await srig.runtime.update_pod_sandbox_resources(
        v1.UpdatePodSandboxResourcesRequest(
            pod_sandbox_id=pod,
            resources=v1.LinuxContainerResources(
                cpu_shares=512, cpu_quota=150000, cpu_period=100000, memory_limit_in_bytes=MEMORY
            ),
        )
    )
    shown = srig.bed.show(slice_name, "CPUShares", "CPUQuotaPerSecUSec", "MemoryLimit")
    assert shown == {
        "CPUShares": "512",
        "CPUQuotaPerSecUSec": "1.500000s",
        "MemoryLimit": str(MEMORY),
    }
    assert int(srig.bed.read(f"/sys/fs/cgroup/cpu{parent}/cpu.shares")) == 512
    assert int(srig.bed.read(f"/sys/fs/cgroup/cpu{parent}/cpu.cfs_quota_us")) == 150000
    assert int(srig.bed.read(f"/sys/fs/cgroup/memory{parent}/memory.limit_in_bytes")) == MEMORY


async def test_a_cgroupfs_parent_is_refused(srig: SystemdRig) -> None:
    uid = str(uuid.uuid4())
    config = srig.sandbox_config("wrong-parent", f"/kubepods/burstable/pod{uid}", uid)
    with pytest.raises(GRPCError, match="cgroupDriver must be systemd") as raised:
        await srig.runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))
    assert raised.value.status == Status.INVALID_ARGUMENT


@pytest.mark.parametrize("handler", RUNTIMES)
async def test_stats_come_from_the_scope_and_the_slice(srig: SystemdRig, handler: str) -> None:
    pod, _ = await srig.run_pod(f"stats-{handler}", handler)
    cid = await srig.start_container(
        pod, "app", ["sh", "-c", "head -c 20000000 /dev/zero > /dev/shm/fill; sleep 1000"]
    )
    await asyncio.sleep(1.0)
    reply = await srig.runtime.container_stats(v1.ContainerStatsRequest(container_id=cid))
    stats = reply.stats
    assert stats is not None
    assert stats.cpu is not None
    assert stats.cpu.usage_core_nano_seconds is not None
    assert stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.memory is not None
    assert stats.memory.working_set_bytes is not None
    assert stats.memory.working_set_bytes.value > 0
    pod_reply = await srig.runtime.pod_sandbox_stats(v1.PodSandboxStatsRequest(pod_sandbox_id=pod))
    pod_stats = pod_reply.stats
    assert pod_stats is not None
    assert pod_stats.linux is not None
    assert pod_stats.linux.memory is not None
    assert pod_stats.linux.memory.usage_bytes is not None
    # The slice's own counters: conmon's memory is charged there too.
    assert pod_stats.linux.memory.usage_bytes.value >= stats.memory.working_set_bytes.value


async def test_shared_pid_namespace_infra_runs_in_the_slice(srig: SystemdRig) -> None:
    pod, parent = await srig.run_pod("sharedpid", "runc", pid=v1.NamespaceMode.POD)
    slice_name = parent.rsplit("/", 1)[-1]
    for unit in (f"crishim-conmon-{pod}.scope", f"crishim-{pod}.scope"):
        shown = srig.bed.show(unit, "Slice", "ActiveState")
        assert shown == {"Slice": slice_name, "ActiveState": "active"}, unit


@pytest.mark.parametrize("handler", RUNTIMES)
async def test_restart_keeps_containers_running_and_logging(srig: SystemdRig, handler: str) -> None:
    pod, _ = await srig.run_pod(f"restart-{handler}", handler)
    cid = await srig.start_container(pod, "ticker", TICKER)
    before = await srig.status(cid)
    main_pid = srig.bed.show("crishim", "MainPID")["MainPID"]
    pod_status = await srig.runtime.pod_sandbox_status(
        v1.PodSandboxStatusRequest(pod_sandbox_id=pod)
    )
    assert pod_status.status is not None
    assert pod_status.status.metadata is not None
    log = srig.log_file(pod_status.status.metadata.name, pod_status.status.metadata.uid, "ticker")

    srig.bed.systemctl("restart", "crishim")
    await srig.wait_serving()

    assert srig.bed.show("crishim", "MainPID")["MainPID"] != main_pid
    after = await srig.status(cid)
    assert after.state == v1.ContainerState.CONTAINER_RUNNING
    assert after.started_at == before.started_at
    lines = len(log.read_text().splitlines())

    async def more_lines() -> bool:
        return len(log.read_text().splitlines()) > lines + 3

    await srig.until(more_lines, "the ticker to keep logging after the restart")
    assert (await srig.exec_out(cid, "echo", "still")).strip() == "still"


async def test_stop_then_start(srig: SystemdRig) -> None:
    pod, _ = await srig.run_pod("stopstart", "crun")
    cid = await srig.start_container(pod, "app", ["sleep", "1000"])
    srig.bed.systemctl("stop", "crishim")
    assert srig.bed.systemctl("is-active", "crishim", check=False).strip() == "inactive"
    # With KillMode=process only crishim went: conmon and the container run on.
    assert srig.bed.show(f"crishim-{cid}.scope", "ActiveState")["ActiveState"] == "active"
    assert srig.bed.show(f"crishim-conmon-{cid}.scope", "ActiveState")["ActiveState"] == "active"
    srig.bed.systemctl("start", "crishim")
    await srig.wait_serving()
    assert (await srig.status(cid)).state == v1.ContainerState.CONTAINER_RUNNING
    await srig.runtime.stop_container(v1.StopContainerRequest(container_id=cid, timeout=1))
    assert (await srig.status(cid)).state == v1.ContainerState.CONTAINER_EXITED
