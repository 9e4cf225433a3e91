"""What a container's runtime spec is built from besides its CRI config: host facts read
once (oom_score_adj floor, swap accounting, LSMs, capability bounding set), the pod's
namespaces and files, the image's users, and the cgroup the cgroup driver names for it.
"""

from __future__ import annotations

import os
from pathlib import Path

from crishim.images.rootfs import read_confined
from crishim.model import Sandbox
from crishim.model.specs import ContainerConfig, ImageConfigView, MountSpec, SandboxConfig
from crishim.oci.build import BuildContext
from crishim.oci.context import DeviceNode, PasswdDb
from crishim.runtime.cgroup_driver import CgroupDriver
from crishim.runtime.host import (
    HostDevice,
    capability_bounding_mask,
    host_lsms,
    list_devices,
    stat_device,
    swap_accounting,
)
from crishim.services.sandboxes import SandboxPaths

__all__ = ["SpecContexts", "own_oom_score_adj"]


def own_oom_score_adj() -> int:
    """crishim's own oom_score_adj: containers may not go below it (no CAP_SYS_RESOURCE)."""
    try:
        return int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        return 0


class SpecContexts:
    """Builds the BuildContext of containers and of pods' infra processes."""

    def __init__(self, cgroups: CgroupDriver) -> None:
        self._cgroups = cgroups
        self._min_oom = own_oom_score_adj()
        self._swap = swap_accounting()
        self._lsms = host_lsms()
        self._cap_mask = capability_bounding_mask()

    @property
    def swap_available(self) -> bool:
        """Whether the host accounts swap (memory-swap limits are dropped otherwise)."""
        return self._swap

    def for_container(
        self,
        container_id: str,
        sandbox: Sandbox,
        sandbox_config: SandboxConfig,
        config: ContainerConfig,
        image_config: dict[str, object],
        rootfs: Path,
        pod: SandboxPaths,
        target_pid: int | None,
    ) -> BuildContext:
        """The context of a container of ``sandbox`` whose root file system is ``rootfs``."""
        users = PasswdDb.parse(
            read_confined(rootfs, "etc/passwd") or "", read_confined(rootfs, "etc/group") or ""
        )
        extra = [
            MountSpec(container_path="/etc/hosts", host_path=str(pod.hosts)),
            MountSpec(container_path="/etc/resolv.conf", host_path=str(pod.resolv_conf)),
            MountSpec(container_path="/etc/hostname", host_path=str(pod.hostname)),
            MountSpec(
                container_path="/dev/shm",
                host_path="/dev/shm" if sandbox.host_ipc else str(pod.shm),
            ),
        ]
        return BuildContext(
            container_id=container_id,
            sandbox_id=sandbox.id,
            sandbox=sandbox_config,
            image=ImageConfigView.from_image_config(image_config),
            image_name=config.image.image if config.image else "",
            rootfs=str(rootfs),
            namespace_paths={
                **_pod_namespaces(sandbox),
                "pid": f"/proc/{sandbox.infra_pid}/ns/pid" if sandbox.infra_pid else None,
            },
            target_pid=target_pid,
            cgroups_path=self._cgroups.container_cgroups_path(sandbox.cgroup_parent, container_id),
            min_oom_score_adj=self._min_oom,
            swap_available=self._swap,
            host_lsms=self._lsms,
            node_hostname=os.uname().nodename,
            passwd=users,
            stat_device=_device_node,
            host_devices=lambda: [_as_node(d) for d in list_devices()],
            load_file=lambda path: Path(path).read_bytes(),
            extra_mounts=extra,
            host_capability_mask=self._cap_mask,
        )

    def for_infra(
        self, sandbox: Sandbox, sandbox_config: SandboxConfig, rootfs: Path
    ) -> BuildContext:
        """The context of the process holding the pod's shared PID namespace (the infra
        container has the sandbox's id)."""
        return BuildContext(
            container_id=sandbox.id,
            sandbox_id=sandbox.id,
            sandbox=sandbox_config,
            rootfs=str(rootfs),
            namespace_paths=_pod_namespaces(sandbox),
            cgroups_path=self._cgroups.container_cgroups_path(sandbox.cgroup_parent, sandbox.id),
            min_oom_score_adj=self._min_oom,
            swap_available=self._swap,
            host_lsms=self._lsms,
            node_hostname=os.uname().nodename,
            load_file=lambda path: Path(path).read_bytes(),
            host_capability_mask=self._cap_mask,
        )


def _as_node(device: HostDevice) -> DeviceNode:
    return DeviceNode(
        type=device.type,
        major=device.major,
        minor=device.minor,
        file_mode=device.file_mode,
        uid=device.uid,
        gid=device.gid,
        path=device.path,
    )


def _device_node(path: str) -> DeviceNode:
    return _as_node(stat_device(path))


def _pod_namespaces(sandbox: Sandbox) -> dict[str, str | None]:
    """The pinned namespaces of the pod that its containers join (None: the pod has none)."""
    return {
        "network": sandbox.netns or None,
        "ipc": sandbox.ipcns or None,
        "uts": sandbox.utsns or None,
        "user": sandbox.userns or None,
    }
