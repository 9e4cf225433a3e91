"""Cgroup drivers: how pods and containers get their cgroups, as kubelet's ``cgroupDriver``.

kubelet creates each pod's cgroup and hands its name to RunPodSandbox as the cgroup
parent; the runtime puts the pod's containers (and their monitors) below it. Two drivers
name and manage those cgroups differently:

- ``cgroupfs``: cgroups are directories. The parent is a path (``/kubepods/burstable/
  pod<uid>``); a container is ``<parent>/crishim-<id>``, its conmon
  ``<parent>/crishim-conmon-<id>`` in every hierarchy; pod limits are written to files.
- ``systemd``: cgroups are units. kubelet's parent is the slice in cgroupfs form
  (``/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice``); only
  its last component names the unit. A container is the scope the runtime creates with
  ``--systemd-cgroup`` from ``<slice>:crishim:<id>`` (``crishim-<id>.scope``), its conmon
  the transient scope ``crishim-conmon-<id>.scope`` in the same slice; pod limits are unit
  properties set through systemd, so systemd's view and the files agree.

The services only ever talk to :class:`CgroupDriver`; which one runs is the app's choice.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from pathlib import Path

import anyio.to_thread

from crishim.model.specs import LinuxResources
from crishim.runtime.cgroups import apply_cgroup_resources, remove_cgroup

__all__ = ["CgroupDriver", "CgroupfsDriver", "monitor_cgroup_dirs"]

_CGROUP_FS_TYPES = frozenset({"cgroup", "cgroup2"})


class CgroupDriver(ABC):
    """Where a pod's containers and their monitors go, and how pod limits are applied.

    ``parent`` is always the pod's cgroup parent exactly as kubelet sent it ("" if none).
    """

    #: the name kubelet's ``cgroupDriver`` must match
    name: str
    #: global options every runtime (runc, crun) command needs under this driver
    runtime_options: tuple[str, ...] = ()

    @abstractmethod
    def container_cgroups_path(self, parent: str, container_id: str) -> str:
        """The container's ``linux.cgroupsPath`` for the runtime spec.

        Raises InvalidArgument when ``parent`` is not a name this driver understands.
        """

    @abstractmethod
    def pod_cgroup(self, parent: str) -> str:
        """The pod's cgroup as a path below each hierarchy's root ("" when it has none)."""

    @abstractmethod
    async def place_monitor(self, pid: int, parent: str, container_id: str) -> None:
        """Move a container's conmon (still waiting on its start pipe) into its cgroup."""

    @abstractmethod
    async def release(self, parent: str, container_id: str) -> None:
        """Remove what a deleted container left: its monitor's cgroup, and its own cgroup
        when the runtime never finished creating it (crishim was killed meanwhile), with
        whatever is still inside."""

    @abstractmethod
    def parent_of(self, cgroups_path: str) -> str:
        """The pod's cgroup parent of a container whose spec has ``cgroups_path`` (for
        recovery, which has only the bundle)."""

    @abstractmethod
    async def update_pod_resources(self, parent: str, resources: LinuxResources) -> None:
        """Apply CPU and memory limits (0: leave alone) to the pod's cgroup."""

    async def settle_container_resources(
        self, container_id: str, resources: LinuxResources
    ) -> None:
        """After the runtime created or updated a container with ``resources``: make sure
        whoever manages its cgroup keeps them (nothing to do when that is the runtime)."""
        return

    async def close(self) -> None:
        """Let go of what the driver holds (at shutdown)."""
        return


# ---- cgroupfs ------------------------------------------------------------------------------


def _cgroup_mounts(proc_mounts: Path = Path("/proc/self/mounts")) -> list[Path]:
    mounts: list[Path] = []
    for line in proc_mounts.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] in _CGROUP_FS_TYPES:
            mounts.append(Path(parts[1]))
    return mounts


def monitor_cgroup_dirs(parent: str, container_id: str) -> list[Path]:
    """The directories (one per hierarchy) of a conmon's cgroup under the cgroupfs driver."""
    relative = Path(parent.strip("/")) / f"crishim-conmon-{container_id}"
    return [mount / relative for mount in _cgroup_mounts()]


def _make_cgroup(path: Path) -> None:
    """mkdir -p for a cgroup; new v1 cpuset cgroups inherit cpus/mems from their parent.

    A v1 cpuset cgroup starts with empty ``cpuset.cpus``/``cpuset.mems`` and refuses tasks
    until they are set.
    """
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            mine = directory / name
            if mine.exists() and not mine.read_text().strip():
                mine.write_text((directory.parent / name).read_text())


def _move(pid: int, parent: str, container_id: str) -> None:
    for directory in monitor_cgroup_dirs(parent, container_id):
        _make_cgroup(directory)
        (directory / "cgroup.procs").write_text(str(pid))


def _remove(parent: str, container_id: str) -> bool:
    """rmdir the monitor's cgroups; False while one still holds a process."""
    done = True
    for directory in monitor_cgroup_dirs(parent, container_id):
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            done = False
    return done


class CgroupfsDriver(CgroupDriver):
    """Cgroups as plain directories below the pod's cgroup parent.

    A pod without a parent keeps its conmons in crishim's own cgroup (as before kubelet
    names one: crictl, tests).
    """

    name = "cgroupfs"
    #: how long release waits for an exited container's conmon to leave its cgroup
    release_timeout = 2.0

    def container_cgroups_path(self, parent: str, container_id: str) -> str:
        return f"{parent.rstrip('/')}/crishim-{container_id}"

    def pod_cgroup(self, parent: str) -> str:
        return parent

    async def place_monitor(self, pid: int, parent: str, container_id: str) -> None:
        if parent:
            await anyio.to_thread.run_sync(_move, pid, parent, container_id)

    async def release(self, parent: str, container_id: str) -> None:
        # runc/crun delete the cgroups of the containers they know; this is for a create
        # they never finished.
        await remove_cgroup(self.container_cgroups_path(parent, container_id))
        if not parent:
            return
        # conmon exits a moment after the container: wait for its cgroup to empty.
        deadline = asyncio.get_running_loop().time() + self.release_timeout
        while not await anyio.to_thread.run_sync(_remove, parent, container_id):
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.05)

    def parent_of(self, cgroups_path: str) -> str:
        return cgroups_path.rsplit("/", 1)[0]

    async def update_pod_resources(self, parent: str, resources: LinuxResources) -> None:
        await apply_cgroup_resources(
            parent,
            cpu_shares=resources.cpu_shares,
            cpu_quota=resources.cpu_quota,
            cpu_period=resources.cpu_period,
            memory_limit=resources.memory_limit_in_bytes,
        )
