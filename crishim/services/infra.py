"""The infra process of a pod that shares one PID namespace: catatonit as its init.

It runs under conmon like a container (so it outlives crishim), with the sandbox's id, a
read-only root holding only the static catatonit binary, no capabilities and
no_new_privs. Pods that do not share a PID namespace have no such process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

from crishim.errors import CrishimError, FailedPrecondition
from crishim.model import Sandbox
from crishim.model.specs import SandboxConfig
from crishim.oci.build import build_sandbox_infra_spec
from crishim.oci.spec import dump_spec
from crishim.runtime.bundle import write_spec
from crishim.runtime.cgroup_driver import CgroupDriver
from crishim.runtime.conmon import MonitorSpec, create_container, discard_container
from crishim.runtime.oci_runtime import OciRuntime
from crishim.services.container_context import SpecContexts
from crishim.services.container_files import pod_idmap
from crishim.services.sandboxes import SandboxService
from crishim.util.fs import remove_tree

__all__ = ["InfraProcesses"]

log = logging.getLogger(__name__)


class InfraProcesses:
    """Starts and stops the infra process of pods sharing a PID namespace."""

    def __init__(
        self,
        *,
        state_dir: Path,
        sandboxes: SandboxService,
        runtime_for: Callable[[str], OciRuntime],
        cgroups: CgroupDriver,
        conmon: str = "conmon",
        catatonit: str = "catatonit",
    ) -> None:
        self._state = state_dir
        self._sandboxes = sandboxes
        self._runtime_for = runtime_for
        self._cgroups = cgroups
        self._contexts = SpecContexts(cgroups)
        self._conmon = conmon
        self._catatonit = catatonit

    async def start(self, sandbox: Sandbox, sandbox_config: SandboxConfig) -> int:
        """Run catatonit as the init of the pod's shared PID namespace; returns its pid."""
        binary = shutil.which(self._catatonit)
        if binary is None:
            raise FailedPrecondition(
                f"{self._catatonit} not found: pods sharing a PID namespace need catatonit"
            )
        infra = self._sandboxes.paths(sandbox.id).base / "infra"
        rootfs = infra / "rootfs"
        rootfs.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, rootfs / "catatonit")
        idmap = pod_idmap(sandbox, sandbox_config)
        if idmap is not None:
            # The runtime, as the pod's root, makes the mount points (/proc, /dev) in it.
            os.chown(rootfs, idmap.root_uid, idmap.root_gid)
        ctx = self._contexts.for_infra(sandbox, sandbox_config, rootfs)
        spec = build_sandbox_infra_spec(["/catatonit", "-P"], ctx)
        write_spec(infra, dump_spec(spec))
        runtime = self._runtime_for(sandbox.runtime_handler)
        parent = sandbox.cgroup_parent
        monitor = MonitorSpec(
            container_id=sandbox.id,
            name=f"{sandbox.metadata.namespace}_{sandbox.metadata.name}_infra",
            bundle=infra,
            runtime=runtime,
            log_path=infra / "infra.log",
            exit_dir=self._state / "exits",
            socket_dir=self._state / "attach",
            pid_file=infra / "pidfile",
            conmon_pid_file=infra / "conmon.pid",
        )
        try:
            pid = await create_container(
                monitor,
                conmon=self._conmon,
                place=lambda pid: self._cgroups.place_monitor(pid, parent, sandbox.id),
            )
            await runtime.start(sandbox.id)
        except BaseException:
            await asyncio.shield(self._undo(monitor, parent))
            raise
        return pid

    async def _undo(self, monitor: MonitorSpec, parent: str) -> None:
        """What a failed start made goes; a failing step is logged, not raised: the error
        that made the start fail is what the caller must see."""
        await discard_container(monitor)
        try:
            await self._cgroups.release(parent, monitor.container_id)
        except (CrishimError, OSError) as exc:
            log.warning("pod %s: releasing the infra cgroups: %s", monitor.container_id[:12], exc)

    async def stop(self, sandbox: Sandbox) -> None:
        """Kill and delete the infra process; gone already is fine."""
        runtime = self._runtime_for(sandbox.runtime_handler)
        await runtime.kill(sandbox.id, signal.SIGKILL)
        await runtime.delete(sandbox.id, force=True)
        await self._cgroups.release(sandbox.cgroup_parent, sandbox.id)
        (self._state / "exits" / sandbox.id).unlink(missing_ok=True)
        await remove_tree(self._state / "attach" / sandbox.id)
