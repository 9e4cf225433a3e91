"""Recovery after a crash: what half-made pods and containers left on the host is removed.

Contract (what the other services guarantee and this relies on):

- A sandbox or container record is written only once the object is whole (the last step of
  RunPodSandbox and CreateContainer), and deleted only once everything it owned is gone
  (the last step of the removals). So after ``kill -9`` an object either has a record and
  is whole, or was being made or removed.
- Everything a half-made or half-removed object can have left is named by its id: its
  state directory (``containers/<id>``, ``sandboxes/<id>``), namespace pins
  (``ns/{net,ipc,uts,user}/<id>``), the CNI cache entry written before the first plugin
  ran, a conmon whose bundle lies under the state directory, the runtimes' state, a
  writable snapshot keyed by the container id, its ID-mapped volume mounts
  (``idmapped/<id>``), its exit file and attach link.
- An object that has a record is left to its own calls: kubelet stops and removes it, and
  every step of those calls tolerates what is already gone.

:meth:`Recovery.sweep` runs at start, before the socket is served: for every id found in
those places that has no record, it undoes what exists, in the reverse order of creation
(conmon and runtime first, then network, mounts, pins, files), so kubelet's retry starts
from a clean slate and nothing leaks (IP leases included).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread

from crishim.errors import CrishimError
from crishim.images.snapshots.base import Snapshotter
from crishim.network.cni import CniManager
from crishim.network.netns import PodNamespaces, namespace_alive, remove_pod_namespaces
from crishim.runtime.bundle import cgroups_path as bundle_cgroups_path
from crishim.runtime.cgroup_driver import CgroupDriver
from crishim.runtime.conmon import find_conmons, kill_conmon
from crishim.runtime.idmap import release_stage
from crishim.runtime.mounts import unmount
from crishim.runtime.oci_runtime import OciRuntime
from crishim.util.fs import remove_tree

__all__ = ["Recovery", "SweepReport"]

log = logging.getLogger(__name__)

_NAMESPACES = ("net", "ipc", "uts", "user")


@dataclass
class SweepReport:
    """What a sweep removed (ids), and what it could not (id: problem)."""

    sandboxes: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)


def _names(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


class Recovery:
    """Finds and removes what no record owns under one instance's state."""

    def __init__(
        self,
        *,
        state_dir: Path,
        runtimes: Iterable[OciRuntime],
        snapshotter: Snapshotter,
        cni: CniManager | None,
        cgroups: CgroupDriver,
    ) -> None:
        self._state = state_dir
        self._runtimes = list(runtimes)
        self._snapshotter = snapshotter
        self._cni = cni
        self._cgroups = cgroups

    async def sweep(self, sandbox_ids: set[str], container_ids: set[str]) -> SweepReport:
        """Remove every trace of ids that are neither a known sandbox nor container."""
        report = SweepReport()
        known = sandbox_ids | container_ids
        conmons = await anyio.to_thread.run_sync(find_conmons, self._state)
        runtime_ids: set[str] = set()
        for runtime in self._runtimes:
            try:
                runtime_ids |= {s.id for s in await runtime.list()}
            except CrishimError as exc:
                log.warning("recovery: listing %s's containers: %s", runtime.name, exc)
        if self._cni:
            for name in await anyio.to_thread.run_sync(self._cni.discard_unfinished_writes):
                log.info("recovery: removed the half-written CNI cache file %s", name)
        pod_traces = _names(self._state / "sandboxes") | set(
            self._cni.cached_sandboxes() if self._cni else []
        )
        for kind in _NAMESPACES:
            pod_traces |= _names(self._state / "ns" / kind)
        container_traces = (
            _names(self._state / "containers")
            | set(self._snapshotter.active())
            | _names(self._state / "exits")
            | _names(self._state / "attach")
            | _names(self._state / "idmapped")
            | set(conmons)
            | runtime_ids
        )
        # A pod's infra process runs under the pod's id: it is the pod's, not a container.
        orphan_pods = sorted(pod_traces - sandbox_ids)
        orphan_containers = sorted(container_traces - known - set(orphan_pods))
        # Containers first: they may be in an orphaned pod's namespaces.
        for cid in orphan_containers:
            await self._undo(report, report.containers, cid, self._remove_container(cid, conmons))
        for pod_id in orphan_pods:
            await self._undo(report, report.sandboxes, pod_id, self._remove_pod(pod_id, conmons))
        if report.sandboxes or report.containers or report.failures:
            log.warning(
                "recovery: removed %d half-made or half-removed pod(s) and %d container(s)%s",
                len(report.sandboxes),
                len(report.containers),
                f"; could not clean {report.failures}" if report.failures else "",
            )
        return report

    @staticmethod
    async def _undo(
        report: SweepReport, done: list[str], object_id: str, steps: Awaitable[None]
    ) -> None:
        try:
            await steps
        except (CrishimError, OSError) as exc:
            # One stuck object must not keep crishim from starting; its leftovers stay
            # visible in the log and the next start tries again.
            report.failures[object_id] = str(exc)
            log.error("recovery: cleaning up %s: %s", object_id[:12], exc)
        else:
            done.append(object_id)

    async def _stop_process(self, object_id: str, conmons: dict[str, int]) -> None:
        """Kill the object's conmon (its runtime child dies with it), then the container
        and the record of every runtime that may know it."""
        pid = conmons.get(object_id)
        if pid is not None:
            kill_conmon(pid)
        for runtime in self._runtimes:
            await runtime.delete(object_id, force=True)

    async def _remove_container(self, cid: str, conmons: dict[str, int]) -> None:
        await self._stop_process(cid, conmons)
        base = self._state / "containers" / cid
        # A runtime killed in the middle of its create leaves a cgroup no runtime knows.
        cgroup = await anyio.to_thread.run_sync(bundle_cgroups_path, base / "bundle")
        if cgroup is not None:
            await self._cgroups.release(self._cgroups.parent_of(cgroup), cid)
        await unmount(base / "bundle" / "rootfs")
        await release_stage(self._state / "idmapped" / cid)
        await anyio.to_thread.run_sync(self._snapshotter.remove, cid)
        for path in (self._state / "exits" / cid, self._state / "attach" / cid, base):
            await remove_tree(path)

    async def _remove_pod(self, pod_id: str, conmons: dict[str, int]) -> None:
        await self._stop_process(pod_id, conmons)
        base = self._state / "sandboxes" / pod_id
        # The infra process of a pod sharing its PID namespace has a cgroup of its own.
        cgroup = await anyio.to_thread.run_sync(bundle_cgroups_path, base / "infra")
        if cgroup is not None:
            await self._cgroups.release(self._cgroups.parent_of(cgroup), pod_id)
        pins = {kind: self._state / "ns" / kind / pod_id for kind in _NAMESPACES}
        if self._cni is not None:
            netns = pins["net"]
            await self._cni.delete(pod_id, str(netns) if namespace_alive(netns) else None)
        await unmount(base / "shm")
        await remove_pod_namespaces(
            PodNamespaces(
                network=str(pins["net"]) if pins["net"].exists() else None,
                ipc=str(pins["ipc"]) if pins["ipc"].exists() else None,
                uts=str(pins["uts"]) if pins["uts"].exists() else None,
                user=str(pins["user"]) if pins["user"].exists() else None,
            )
        )
        for path in (self._state / "exits" / pod_id, self._state / "attach" / pod_id, base):
            await remove_tree(path)
