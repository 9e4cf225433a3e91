"""What a container has on the node's disk, and how its files are shown to a user-namespaced
pod.

Layout per container under the state directory: ``containers/<id>/bundle/`` (config.json,
rootfs mount point, conmon's pid files), ``exits/<id>`` (exit code), ``attach/<id>/``
(attach socket), and for a pod with its own user namespace ``idmapped/<id>/`` (the
ID-mapped mounts of its volumes, and of its image layers while the root is mounted). That
last one lives outside ``containers/<id>`` on purpose: the container's directory is
removed recursively, a stage of volume mounts never is (see :mod:`crishim.runtime.idmap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from crishim.model import Sandbox
from crishim.model.specs import ContainerConfig, SandboxConfig
from crishim.model.userns import check_mount_mappings, host_id_of, pod_userns
from crishim.runtime.host_paths import HostPaths
from crishim.runtime.idmap import Idmap, stage_idmapped


@dataclass(frozen=True)
class ContainerPaths:
    """Where one container's files live."""

    base: Path
    exits: Path
    attach: Path
    idmapped: Path

    @property
    def bundle(self) -> Path:
        return self.base / "bundle"

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    @property
    def pid_file(self) -> Path:
        return self.bundle / "pidfile"

    @property
    def conmon_pid_file(self) -> Path:
        return self.bundle / "conmon.pid"

    @property
    def layers_stage(self) -> Path:
        """Where the image layers are ID-mapped while the root file system is mounted."""
        return self.idmapped / "layers"


def pod_idmap(sandbox: Sandbox, sandbox_config: SandboxConfig) -> Idmap | None:
    """The pod's user namespace as ID-mapped mounts need it; None for the node's."""
    userns = pod_userns(sandbox_config.namespace_options)
    if userns is None or not sandbox.userns:
        return None
    return Idmap(sandbox.userns, host_id_of(0, userns.uids), host_id_of(0, userns.gids))


async def stage_volumes(
    config: ContainerConfig, sandbox_config: SandboxConfig, idmap: Idmap | None, stage: Path
) -> ContainerConfig:
    """The config with every mount that asks for ID mapping replaced by its ID-mapped
    stage (made here); mounts whose mappings are not the pod's are InvalidArgument."""
    userns = pod_userns(sandbox_config.namespace_options)
    mounts = []
    for n, mount in enumerate(config.mounts):
        path = mount.container_path
        if not check_mount_mappings(path, mount.uid_mappings, mount.gid_mappings, userns):
            mounts.append(mount)
            continue
        assert idmap is not None  # a pod with mappings has a user namespace
        staged = await stage_idmapped(mount.host_path, stage, f"volume-{n}", idmap.userns)
        mounts.append(mount.model_copy(update={"host_path": staged}))
    return config.model_copy(update={"mounts": mounts})


async def volumes_seen_here(config: ContainerConfig, host_paths: HostPaths) -> ContainerConfig:
    """The config with each volume's node path replaced by the path naming the node's file
    from crishim's root (the same config when crishim runs on the node's own root)."""
    if host_paths.identity or not config.mounts:
        return config

    def resolve() -> ContainerConfig:
        mounts = [
            m.model_copy(update={"host_path": host_paths.resolve(m.host_path)})
            if m.host_path
            else m
            for m in config.mounts
        ]
        return config.model_copy(update={"mounts": mounts})

    return await anyio.to_thread.run_sync(resolve)
