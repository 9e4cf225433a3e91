"""The systemd cgroup driver: pods are slices, containers and their conmons are scopes.

What kubelet sends (``pkg/kubelet/cm``, ``cgroupDriver: systemd``): the pod's slice in
cgroupfs form, ``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice``
(``-`` in kubelet's names becomes ``_``); kubelet has created the slice already. As
containerd and CRI-O do, only the last component names the unit.

- Containers: ``<slice>:crishim:<id>`` is runc's and crun's systemd ``cgroupsPath``
  ("slice:prefix:name"); with ``--systemd-cgroup`` the runtime asks systemd for the scope
  ``crishim-<id>.scope`` in that slice, and removes it on ``delete``.
- conmon: the transient scope ``crishim-conmon-<id>.scope`` in the pod's slice (as CRI-O's
  ``crio-conmon-<id>.scope``), started over D-Bus with conmon's pid while conmon waits on
  its start pipe, so everything it forks is born inside. It is not crishim.service's, so
  restarting crishim never touches it; systemd removes it once conmon exited.
- Container limits: the runtime's, and the same as properties of the scope, so systemd
  keeps them when it realizes the slice again.
- Pod limits: properties of the slice set through systemd (``SetUnitProperties``, for this
  boot only), never by writing files behind systemd's back: it would write its own values
  back at the next ``daemon-reload``.
- A pod without a parent (crictl, critest on cgroupfs) goes to ``system.slice``, the
  runtimes' own default.
"""

from __future__ import annotations

import re

from crishim.errors import FailedPrecondition, InvalidArgument
from crishim.model.specs import LinuxResources
from crishim.runtime.cgroup_driver import CgroupDriver
from crishim.runtime.cgroups import CgroupLayout, CgroupMode, detect_layout
from crishim.runtime.systemd_dbus import Property, SystemdManager

__all__ = [
    "DEFAULT_SLICE",
    "SystemdDriver",
    "container_scope",
    "expand_slice",
    "monitor_scope",
    "pod_slice",
    "slice_properties",
]

DEFAULT_SLICE = "system.slice"
# A unit name: systemd's allowed characters, one dot before the type.
_SLICE_NAME = re.compile(r"[A-Za-z0-9:_.\\-]+\.slice")
# systemd keeps CPU quotas per second in 10 ms steps (``CPUQuota=`` in percent): round up
# as runc does, so the value asked for and the one systemd writes back agree.
_QUOTA_STEP_USEC = 10_000
_USEC_PER_SEC = 1_000_000
_DEFAULT_PERIOD_USEC = 100_000
_INFINITY = (1 << 64) - 1


def pod_slice(parent: str) -> str:
    """The slice unit a cgroup parent names: its last path component ("" -> system.slice).

    Raises InvalidArgument for a parent that is not a slice (kubelet on cgroupfs).
    """
    if not parent.strip("/"):
        return DEFAULT_SLICE
    name = parent.rstrip("/").rsplit("/", 1)[-1]
    if not _SLICE_NAME.fullmatch(name):
        raise InvalidArgument(
            f"cgroup parent {parent!r} is not a systemd slice: crishim runs with "
            'cgroup_driver = "systemd", so kubelet\'s cgroupDriver must be systemd too'
        )
    return name


def expand_slice(name: str) -> str:
    """systemd's nesting of slices: ``a-b-c.slice`` is ``/a.slice/a-b.slice/a-b-c.slice``."""
    stem = name.removesuffix(".slice")
    if stem in ("", "-"):
        return "/"
    parts = stem.split("-")
    return "/" + "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def container_scope(container_id: str) -> str:
    """The scope runc and crun create for ``<slice>:crishim:<id>``."""
    return f"crishim-{container_id}.scope"


def monitor_scope(container_id: str) -> str:
    """The scope holding a container's conmon."""
    return f"crishim-conmon-{container_id}.scope"


def _quota_per_second(quota: int, period: int) -> int:
    per_second = quota * _USEC_PER_SEC // (period or _DEFAULT_PERIOD_USEC)
    return -(-per_second // _QUOTA_STEP_USEC) * _QUOTA_STEP_USEC


def slice_properties(resources: LinuxResources, layout: CgroupLayout) -> list[Property]:
    """The unit properties for CPU and memory limits of a slice or scope (0 leaves a value
    alone).

    The v1 names (``CPUShares``, ``MemoryLimit``) where memory is a v1 controller, so the
    shares kubelet computed land unchanged; the v2 names (``CPUWeight``, ``MemoryMax``)
    on a unified host, with shares mapped to a weight as runc and crun map them.
    """
    v1 = layout.mode is not CgroupMode.V2 and "memory" in layout.v1_controllers
    props: list[Property] = []
    if resources.cpu_shares:
        if v1:
            props.append(Property("CPUShares", "t", resources.cpu_shares))
        else:
            weight = 1 + ((resources.cpu_shares - 2) * 9999) // 262142
            props.append(Property("CPUWeight", "t", weight))
    if resources.cpu_period:
        props.append(Property("CPUQuotaPeriodUSec", "t", resources.cpu_period))
    if resources.cpu_quota:
        per_second = (
            _INFINITY
            if resources.cpu_quota < 0
            else _quota_per_second(resources.cpu_quota, resources.cpu_period)
        )
        props.append(Property("CPUQuotaPerSecUSec", "t", per_second))
    if resources.memory_limit_in_bytes:
        name = "MemoryLimit" if v1 else "MemoryMax"
        props.append(Property(name, "t", resources.memory_limit_in_bytes))
    return props


class SystemdDriver(CgroupDriver):
    """Slices and scopes through systemd's manager over D-Bus."""

    name = "systemd"
    runtime_options = ("--systemd-cgroup",)

    def __init__(self, manager: SystemdManager | None = None) -> None:
        self._manager = manager or SystemdManager()

    def container_cgroups_path(self, parent: str, container_id: str) -> str:
        return f"{pod_slice(parent)}:crishim:{container_id}"

    def pod_cgroup(self, parent: str) -> str:
        return expand_slice(pod_slice(parent)) if parent.strip("/") else ""

    async def place_monitor(self, pid: int, parent: str, container_id: str) -> None:
        await self._manager.start_transient_unit(
            monitor_scope(container_id),
            [
                Property("Description", "s", f"crishim conmon of container {container_id}"),
                Property("Slice", "s", pod_slice(parent)),
                Property("PIDs", "au", [pid]),
                # Not stopped before the pod's containers at shutdown: conmon records their
                # exit codes (CRI-O does the same).
                Property("DefaultDependencies", "b", False),
                # Gone once conmon is, even when it was killed (a failed unit stays loaded).
                Property("CollectMode", "s", "inactive-or-failed"),
            ],
        )

    async def release(self, parent: str, container_id: str) -> None:
        # conmon exits by itself after its container; stopping only makes sure of it.
        await self._manager.stop_unit(monitor_scope(container_id))
        # The runtime stops the scopes of containers it knows; a create it never finished
        # can leave one behind, with processes in it.
        await self._manager.stop_unit(container_scope(container_id))
        # A container scope that failed (an OOM kill) would stay listed until reset.
        await self._manager.reset_failed_unit(container_scope(container_id))

    def parent_of(self, cgroups_path: str) -> str:
        return cgroups_path.split(":", 1)[0]

    async def settle_container_resources(
        self, container_id: str, resources: LinuxResources
    ) -> None:
        # runc also sets these on the scope; crun 1.8 on a v1 (hybrid) host only writes the
        # files, which systemd puts back to its own values when it next realizes the slice.
        props = slice_properties(resources, detect_layout())
        if props:
            await self._manager.set_unit_properties(container_scope(container_id), props)

    async def update_pod_resources(self, parent: str, resources: LinuxResources) -> None:
        if not parent.strip("/"):
            raise FailedPrecondition("the pod has no slice to apply pod resources to")
        props = slice_properties(resources, detect_layout())
        if props:
            await self._manager.set_unit_properties(pod_slice(parent), props)

    async def close(self) -> None:
        await self._manager.close()
