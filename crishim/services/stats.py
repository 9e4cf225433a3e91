"""Resource usage of containers and pods: the use cases behind the CRI stats calls.

A container's cgroup is found from its init process (``/proc/<pid>/cgroup``), which works for
either cgroup driver and any cgroup parent; the cgroup must name the container, so a pid
reused after an unnoticed exit is never measured. A pod is measured through its cgroup
parent when it has one; a pod without one (crictl, tests, some operators) is the sum of its
containers, instead of the error containerd 1.6 gives there.

The pod's cgroup is where the cgroup driver says its parent is (a cgroupfs path as is, a
systemd slice expanded into its nested directories).

CPU rates (``usage_nano_cores``) compare a sample with the previous one of the same object
kept here, as cAdvisor does: None on the first sample. kubelet asks for container and pod
stats in separate calls moments apart, so a sample replaces the kept one only once it is
``RATE_INTERVAL_NS`` old; a call in between reuses the last rate.

The writable layer is the container's snapshot: the snapshotter's own ``usage_of`` when it
has one, otherwise a walk of the upper dir (overlay) or bind source (copy snapshotter) that
its mounts name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import anyio.to_thread

from crishim.errors import CrishimError, NotFound
from crishim.model.container import Container, ContainerFilter, ContainerState
from crishim.model.sandbox import Sandbox, SandboxFilter, SandboxState
from crishim.model.stats import (
    ContainerAttributes,
    ContainerStats,
    CpuUsage,
    FilesystemUsage,
    MemoryUsage,
    NetworkInterfaceUsage,
    NetworkUsage,
    PodAttributes,
    PodStats,
    ProcessUsage,
    SwapUsage,
)
from crishim.network.stats import InterfaceStats, read_pod_interfaces
from crishim.runtime.cgroup_driver import CgroupDriver, CgroupfsDriver
from crishim.runtime.cgroup_stats import (
    CgroupMounts,
    CgroupSample,
    cgroup_for_path,
    combine,
    find_cgroup,
    read_stats,
)
from crishim.util.fs import directory_usage

__all__ = [
    "ContainerSource",
    "SandboxSource",
    "SnapshotMount",
    "SnapshotSource",
    "SnapshotUsage",
    "StatsService",
]

log = logging.getLogger(__name__)

# The shortest interval a CPU rate is computed over; and how long an unused sample is kept.
RATE_INTERVAL_NS = 1_000_000_000
SAMPLE_TTL_NS = 600 * 1_000_000_000
DEFAULT_INTERFACE = "eth0"
_LIVE = frozenset({ContainerState.CREATED, ContainerState.RUNNING})


# How long the walked size of a container's writable layer is reused.
WRITABLE_LAYER_TTL_SECONDS = 30.0


class ContainerSource(Protocol):
    """The container records (the container service)."""

    def get(self, container_id: str) -> Container:
        """The container with this id or a unique prefix; NotFound otherwise."""
        ...

    def matching(self, criteria: ContainerFilter) -> list[Container]:
        """Containers passing ``criteria``."""
        ...


class SandboxSource(Protocol):
    """The pod sandbox records (the sandbox service)."""

    def get(self, sandbox_id: str) -> Sandbox:
        """The sandbox with this id or a unique prefix; NotFound otherwise."""
        ...

    def matching(self, criteria: SandboxFilter) -> list[Sandbox]:
        """Sandboxes passing ``criteria``."""
        ...


class SnapshotMount(Protocol):
    """One mount of a snapshot, as ``mount -t type -o options source``."""

    @property
    def type(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def options(self) -> Sequence[str]: ...


class SnapshotSource(Protocol):
    """What the stats need of a snapshotter: a snapshot's mounts and where the store is."""

    def mounts(self, key: str) -> Sequence[SnapshotMount]:
        """The mounts of the writable snapshot ``key``; NotFound when there is none."""
        ...

    def mountpoint(self) -> str:
        """The directory whose file system holds the snapshots."""
        ...


@runtime_checkable
class SnapshotUsage(Protocol):
    """A snapshotter that measures a writable snapshot itself (read-only)."""

    def usage_of(self, key: str) -> tuple[int, int]:
        """Bytes and inodes the snapshot ``key`` has written; NotFound when there is none."""
        ...


@dataclass(frozen=True)
class _Kept:
    """The sample a CPU rate is computed against, and the last rate computed."""

    timestamp: int
    usage: int
    rate: int | None


@dataclass(frozen=True)
class _ContainerReading:
    container: Container
    sample: CgroupSample | None
    layer: FilesystemUsage | None


class StatsService:
    """Samples containers and pods on request and turns the readings into stats."""

    def __init__(
        self,
        containers: ContainerSource,
        sandboxes: SandboxSource,
        snapshots: SnapshotSource,
        *,
        cgroups: CgroupDriver | None = None,
        mountinfo: Path = Path("/proc/self/mountinfo"),
        proc: Path = Path("/proc"),
    ) -> None:
        self._containers = containers
        self._cgroups = cgroups or CgroupfsDriver()
        self._sandboxes = sandboxes
        self._snapshots = snapshots
        self._mountinfo = mountinfo
        self._proc = proc
        self._kept: dict[str, _Kept] = {}
        self._layer_cache: dict[str, tuple[float, FilesystemUsage | None]] = {}

    # ---- containers ---------------------------------------------------------------------

    async def container_stats(self, container_id: str) -> ContainerStats:
        """The stats of one container (attributes and writable layer only once exited)."""
        container = self._containers.get(container_id)
        (reading,) = await anyio.to_thread.run_sync(self._read_containers, [container])
        return self._container_stats(reading)

    async def list_container_stats(self, criteria: ContainerFilter) -> list[ContainerStats]:
        """The stats of every created or running container passing ``criteria``."""
        self._forget_old()
        containers = [c for c in self._containers.matching(criteria) if c.state in _LIVE]
        readings = await anyio.to_thread.run_sync(self._read_containers, containers)
        return [self._container_stats(r) for r in readings]

    # ---- pods ---------------------------------------------------------------------------

    async def container_filesystem(self) -> FilesystemUsage:
        """ContainerFsInfo: the writable layers of every container, added up."""
        containers = self._containers.matching(ContainerFilter())

        def total() -> FilesystemUsage:
            used = inodes = 0
            for container in containers:
                layer = self._writable_layer(container.id)
                if layer is not None:
                    used += layer.used_bytes or 0
                    inodes += layer.inodes_used or 0
            return FilesystemUsage(
                timestamp=time.time_ns(),
                mountpoint=self._snapshots.mountpoint(),
                used_bytes=used,
                inodes_used=inodes,
            )

        return await anyio.to_thread.run_sync(total)

    async def pod_stats(self, pod_id: str) -> PodStats:
        """The stats of one pod sandbox and its created or running containers."""
        (stats,) = await self._pod_stats([self._sandboxes.get(pod_id)])
        return stats

    async def list_pod_stats(self, criteria: SandboxFilter) -> list[PodStats]:
        """The stats of every ready pod sandbox passing ``criteria``."""
        sandboxes = [s for s in self._sandboxes.matching(criteria) if s.state is SandboxState.READY]
        return await self._pod_stats(sandboxes)

    async def _pod_stats(self, sandboxes: list[Sandbox]) -> list[PodStats]:
        members = [self._members(s) for s in sandboxes]
        readings, samples = await anyio.to_thread.run_sync(self._read_pods, sandboxes, members)
        networks = await asyncio.gather(
            *(self._network(s, m) for s, m in zip(sandboxes, members, strict=True))
        )
        return [
            self._pod(sandbox, sample, network, [self._container_stats(r) for r in pod_readings])
            for sandbox, sample, network, pod_readings in zip(
                sandboxes, samples, networks, readings, strict=True
            )
        ]

    def _members(self, sandbox: Sandbox) -> list[Container]:
        """The pod's created and running containers (the filter matches id prefixes)."""
        return [
            c
            for c in self._containers.matching(ContainerFilter(sandbox_id=sandbox.id))
            if c.sandbox_id == sandbox.id and c.state in _LIVE
        ]

    # ---- reading (in a worker thread) ---------------------------------------------------

    def _read_containers(self, containers: Sequence[Container]) -> list[_ContainerReading]:
        mounts = CgroupMounts.read(self._mountinfo)
        return [self._read_container(c, mounts) for c in containers]

    def _read_pods(
        self, sandboxes: Sequence[Sandbox], members: Sequence[Sequence[Container]]
    ) -> tuple[list[list[_ContainerReading]], list[CgroupSample]]:
        mounts = CgroupMounts.read(self._mountinfo)
        readings: list[list[_ContainerReading]] = []
        samples: list[CgroupSample] = []
        for sandbox, containers in zip(sandboxes, members, strict=True):
            pod_readings = [self._read_container(c, mounts) for c in containers]
            readings.append(pod_readings)
            sample = self._pod_sample(sandbox, mounts)
            if sample is None:
                sample = combine([r.sample for r in pod_readings if r.sample is not None])
            samples.append(sample)
        return readings, samples

    def _read_container(self, container: Container, mounts: CgroupMounts) -> _ContainerReading:
        return _ContainerReading(
            container, self._container_sample(container, mounts), self._writable_layer(container.id)
        )

    def _container_sample(self, container: Container, mounts: CgroupMounts) -> CgroupSample | None:
        """The cgroup counters of a live container; None when it has no process (any more)."""
        if container.state not in _LIVE or container.pid <= 0:
            return None
        try:
            paths = find_cgroup(container.pid, mounts=mounts, proc=self._proc)
        except ProcessLookupError:
            return None
        if not any(container.id in name for name in paths.names()):
            # The pid was reused after an exit not yet recorded: someone else's cgroup.
            return None
        return read_stats(paths)

    def _pod_sample(self, sandbox: Sandbox, mounts: CgroupMounts) -> CgroupSample | None:
        """The counters of the pod's cgroup parent; None when it has none (yet)."""
        cgroup = self._cgroups.pod_cgroup(sandbox.cgroup_parent)
        if not cgroup:
            return None
        paths = cgroup_for_path(cgroup, mounts=mounts)
        return read_stats(paths) if paths.exists() else None

    def _writable_layer(self, container_id: str) -> FilesystemUsage | None:
        """Bytes and inodes the container wrote to its snapshot; None without a snapshot.

        Walking a layer is costly, so a figure is reused for WRITABLE_LAYER_TTL_SECONDS.
        """
        cached = self._layer_cache.get(container_id)
        if cached is not None and time.monotonic() - cached[0] < WRITABLE_LAYER_TTL_SECONDS:
            return cached[1]
        usage = self._walk_writable_layer(container_id)
        self._layer_cache[container_id] = (time.monotonic(), usage)
        return usage

    def _walk_writable_layer(self, container_id: str) -> FilesystemUsage | None:
        timestamp = time.time_ns()
        snapshots = self._snapshots
        try:
            if isinstance(snapshots, SnapshotUsage):
                used, inodes = snapshots.usage_of(container_id)
            else:
                directory = _writable_dir(snapshots.mounts(container_id))
                if directory is None:
                    return None
                used, inodes = directory_usage(Path(directory))
        except (NotFound, FileNotFoundError):
            return None
        return FilesystemUsage(
            timestamp=timestamp,
            mountpoint=snapshots.mountpoint(),
            used_bytes=used,
            inodes_used=inodes,
        )

    async def _network(
        self, sandbox: Sandbox, containers: Iterable[Container]
    ) -> NetworkUsage | None:
        """The pod's interfaces; None for host network pods or when they cannot be read."""
        if sandbox.host_network or not sandbox.netns:
            return None
        timestamp = time.time_ns()
        pids = [p for p in (sandbox.infra_pid, *(c.pid for c in containers)) if p > 0]
        try:
            found = await read_pod_interfaces(sandbox.netns, pids, proc=self._proc)
        except CrishimError as exc:
            log.warning("pod %s: no network stats: %s", sandbox.id[:12], exc)
            return None
        interfaces = [_interface(i) for i in found]
        default = next((i for i in interfaces if i.name == DEFAULT_INTERFACE), None)
        return NetworkUsage(
            timestamp=timestamp,
            default_interface=default or next(iter(interfaces), None),
            interfaces=interfaces,
        )

    # ---- models -------------------------------------------------------------------------

    def _container_stats(self, reading: _ContainerReading) -> ContainerStats:
        container, sample = reading.container, reading.sample
        attributes = ContainerAttributes(
            id=container.id,
            metadata=container.metadata,
            labels=container.labels,
            annotations=container.annotations,
        )
        if sample is None:
            return ContainerStats(attributes=attributes, writable_layer=reading.layer)
        swap = None
        if sample.swap_usage_bytes is not None:
            swap = SwapUsage(
                timestamp=sample.timestamp,
                swap_available_bytes=sample.swap_available_bytes,
                swap_usage_bytes=sample.swap_usage_bytes,
            )
        return ContainerStats(
            attributes=attributes,
            cpu=self._cpu(f"container:{container.id}", sample),
            memory=_memory(sample),
            swap=swap,
            writable_layer=reading.layer,
            process=_process(sample),
            hugetlb_usage_bytes=dict(sample.hugetlb_usage_bytes),
        )

    def _pod(
        self,
        sandbox: Sandbox,
        sample: CgroupSample,
        network: NetworkUsage | None,
        containers: list[ContainerStats],
    ) -> PodStats:
        return PodStats(
            attributes=PodAttributes(
                id=sandbox.id,
                metadata=sandbox.metadata,
                labels=sandbox.labels,
                annotations=sandbox.annotations,
            ),
            cpu=self._cpu(f"pod:{sandbox.id}", sample),
            memory=_memory(sample),
            network=network,
            process=_process(sample),
            containers=containers,
            hugetlb_usage_bytes=dict(sample.hugetlb_usage_bytes),
        )

    def _forget_old(self) -> None:
        """Drop kept samples of objects not sampled for a while (removed ones, mostly)."""
        now = time.time_ns()
        self._kept = {k: v for k, v in self._kept.items() if now - v.timestamp < SAMPLE_TTL_NS}
        fresh = time.monotonic() - WRITABLE_LAYER_TTL_SECONDS
        self._layer_cache = {k: v for k, v in self._layer_cache.items() if v[0] >= fresh}

    def _cpu(self, key: str, sample: CgroupSample) -> CpuUsage | None:
        """CPU time, and its rate against the kept sample of ``key`` (then kept in turn)."""
        usage = sample.cpu_usage_core_nanoseconds
        if usage is None:
            return None
        now = sample.timestamp
        kept = self._kept.get(key)
        if kept is not None and now - kept.timestamp < RATE_INTERVAL_NS:
            rate = kept.rate
        else:
            rate = None
            if kept is not None and usage >= kept.usage:
                rate = (usage - kept.usage) * 1_000_000_000 // (now - kept.timestamp)
            self._kept[key] = _Kept(now, usage, rate)
        return CpuUsage(timestamp=now, usage_core_nano_seconds=usage, usage_nano_cores=rate)


def _memory(sample: CgroupSample) -> MemoryUsage | None:
    if sample.memory_usage_bytes is None:
        return None
    return MemoryUsage(
        timestamp=sample.timestamp,
        working_set_bytes=sample.working_set_bytes,
        available_bytes=sample.available_bytes,
        usage_bytes=sample.memory_usage_bytes,
        rss_bytes=sample.rss_bytes,
        page_faults=sample.page_faults,
        major_page_faults=sample.major_page_faults,
    )


def _process(sample: CgroupSample) -> ProcessUsage | None:
    if sample.pids_current is None:
        return None
    return ProcessUsage(timestamp=sample.timestamp, process_count=sample.pids_current)


def _interface(stats: InterfaceStats) -> NetworkInterfaceUsage:
    return NetworkInterfaceUsage(
        name=stats.name,
        rx_bytes=stats.rx_bytes,
        rx_errors=stats.rx_errors,
        tx_bytes=stats.tx_bytes,
        tx_errors=stats.tx_errors,
    )


def _writable_dir(mounts: Sequence[SnapshotMount]) -> str | None:
    """The directory a snapshot's writes land in: overlay's upperdir, or a bind's source."""
    for mount in mounts:
        if mount.type == "overlay":
            for option in mount.options:
                if option.startswith("upperdir="):
                    return option.removeprefix("upperdir=")
        elif mount.type == "bind" or {"bind", "rbind"} & set(mount.options):
            return mount.source
    return None
