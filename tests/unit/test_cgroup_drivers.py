"""The cgroup drivers: names for the runtime spec and stats, and systemd's unit properties."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from crishim.errors import InvalidArgument
from crishim.model.specs import LinuxResources
from crishim.runtime.cgroup_driver import CgroupfsDriver
from crishim.runtime.cgroups import CgroupLayout, CgroupMode
from crishim.runtime.systemd_cgroups import (
    SystemdDriver,
    expand_slice,
    monitor_scope,
    pod_slice,
    slice_properties,
)
from crishim.runtime.systemd_dbus import Property, SystemdManager

# What kubelet sends with cgroupDriver: systemd (the slice in cgroupfs form).
KUBELET_PARENT = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a_2b.slice"
HYBRID = CgroupLayout(
    mode=CgroupMode.HYBRID,
    v1_controllers=frozenset({"cpu", "cpuacct", "memory", "pids"}),
    v2_mount="/sys/fs/cgroup/unified",
)
UNIFIED = CgroupLayout(
    mode=CgroupMode.V2,
    v2_controllers=frozenset({"cpu", "memory", "pids"}),
    v2_mount="/sys/fs/cgroup",
)


def test_cgroupfs_containers_go_below_the_parent() -> None:
    driver = CgroupfsDriver()
    assert driver.container_cgroups_path("/kubepods/podu1/", "c1") == "/kubepods/podu1/crishim-c1"
    assert driver.container_cgroups_path("", "c1") == "/crishim-c1"
    assert driver.pod_cgroup("/kubepods/podu1") == "/kubepods/podu1"
    assert driver.runtime_options == ()


def test_systemd_containers_are_scopes_in_the_pods_slice() -> None:
    driver = SystemdDriver()
    assert driver.container_cgroups_path(KUBELET_PARENT, "c1") == (
        "kubepods-burstable-pod1a_2b.slice:crishim:c1"
    )
    assert driver.container_cgroups_path("/test.slice", "c1") == "test.slice:crishim:c1"
    assert driver.container_cgroups_path("kubepods.slice", "c1") == "kubepods.slice:crishim:c1"
    assert driver.container_cgroups_path("", "c1") == "system.slice:crishim:c1"
    assert driver.runtime_options == ("--systemd-cgroup",)


def test_systemd_pod_cgroup_is_the_expanded_slice() -> None:
    driver = SystemdDriver()
    assert driver.pod_cgroup(KUBELET_PARENT) == KUBELET_PARENT
    assert driver.pod_cgroup("kubepods-besteffort-pod9.slice") == (
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod9.slice"
    )
    assert driver.pod_cgroup("") == ""


@pytest.mark.parametrize("parent", ["/kubepods/burstable/pod1", "kubepods", "/a.slice/b.scope"])
def test_systemd_refuses_a_cgroupfs_parent(parent: str) -> None:
    with pytest.raises(InvalidArgument, match="cgroupDriver must be systemd"):
        pod_slice(parent)


def test_expand_slice() -> None:
    assert expand_slice("a-b-c.slice") == "/a.slice/a-b.slice/a-b-c.slice"
    assert expand_slice("test.slice") == "/test.slice"
    assert expand_slice("-.slice") == "/"


def test_monitor_scope_name() -> None:
    assert monitor_scope("abc") == "crishim-conmon-abc.scope"


def test_slice_properties_on_v1_keep_kubelets_shares() -> None:
    resources = LinuxResources(
        cpu_shares=512, cpu_quota=50000, cpu_period=100000, memory_limit_in_bytes=64 << 20
    )
    assert slice_properties(resources, HYBRID) == [
        Property("CPUShares", "t", 512),
        Property("CPUQuotaPeriodUSec", "t", 100000),
        Property("CPUQuotaPerSecUSec", "t", 500000),
        Property("MemoryLimit", "t", 64 << 20),
    ]


def test_slice_properties_on_v2_use_weight_and_max() -> None:
    resources = LinuxResources(cpu_shares=1024, memory_limit_in_bytes=1 << 30)
    assert slice_properties(resources, UNIFIED) == [
        Property("CPUWeight", "t", 39),
        Property("MemoryMax", "t", 1 << 30),
    ]


def test_slice_quota_rounds_up_to_systemds_10ms_steps_and_minus_one_is_unlimited() -> None:
    odd = slice_properties(LinuxResources(cpu_quota=12345, cpu_period=100000), UNIFIED)
    assert Property("CPUQuotaPerSecUSec", "t", 130000) in odd
    unlimited = slice_properties(LinuxResources(cpu_quota=-1), UNIFIED)
    assert unlimited == [Property("CPUQuotaPerSecUSec", "t", (1 << 64) - 1)]


def test_nothing_asked_sets_nothing() -> None:
    assert slice_properties(LinuxResources(), HYBRID) == []


class _Manager(SystemdManager):
    """Records what the driver asks of systemd."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str, list[Property]]] = []

    async def set_unit_properties(self, name: str, properties: Sequence[Property]) -> None:
        self.calls.append(("set", name, list(properties)))

    async def stop_unit(self, name: str) -> None:
        self.calls.append(("stop", name, []))

    async def reset_failed_unit(self, name: str) -> None:
        self.calls.append(("reset-failed", name, []))


async def test_container_limits_are_kept_as_scope_properties() -> None:
    manager = _Manager()
    driver = SystemdDriver(manager)
    await driver.settle_container_resources("c1", LinuxResources(memory_limit_in_bytes=1 << 20))
    ((call, unit, props),) = manager.calls
    assert (call, unit) == ("set", "crishim-c1.scope")
    assert props[0].value == 1 << 20


async def test_pod_limits_go_to_the_slice_and_release_stops_the_monitor() -> None:
    manager = _Manager()
    driver = SystemdDriver(manager)
    await driver.update_pod_resources(KUBELET_PARENT, LinuxResources(cpu_shares=512))
    await driver.release(KUBELET_PARENT, "c1")
    assert [(c, u) for c, u, _ in manager.calls] == [
        ("set", "kubepods-burstable-pod1a_2b.slice"),
        ("stop", "crishim-conmon-c1.scope"),
        ("stop", "crishim-c1.scope"),
        ("reset-failed", "crishim-c1.scope"),
    ]


def test_recovery_finds_the_parent_in_a_containers_cgroups_path() -> None:
    cgroupfs = CgroupfsDriver()
    path = cgroupfs.container_cgroups_path("/kubepods/pod1", "c1")
    assert cgroupfs.parent_of(path) == "/kubepods/pod1"
    assert cgroupfs.parent_of(cgroupfs.container_cgroups_path("", "c1")) == ""
    systemd = SystemdDriver(_Manager())
    path = systemd.container_cgroups_path(KUBELET_PARENT, "c1")
    assert systemd.container_cgroups_path(systemd.parent_of(path), "c1") == path
