"""What spec options work with: the build context and the lookups it carries, and helpers
creating the parts of a spec an option edits.

``BuildContext`` holds everything a container's spec depends on besides the CRI request;
the lookups (``PasswdView``, ``DeviceStat``, ``FileLoader``, ``HostDevices``) are how options
read the file system, so the options stay pure and testable without root.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from crishim.errors import InvalidArgument
from crishim.model.specs import (
    ContainerConfig,
    ImageConfigView,
    MountSpec,
    NamespaceOptions,
    SandboxConfig,
)
from crishim.oci.spec import (
    Linux,
    LinuxResources,
    LinuxSeccomp,
    Process,
    Spec,
)

# Every capability Linux defines, in kernel number order.
ALL_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)

CONTAINER_TYPE_SANDBOX = "sandbox"
CONTAINER_TYPE_CONTAINER = "container"


@dataclass(frozen=True)
class PasswdEntry:
    """One /etc/passwd entry of the container's root file system."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class GroupEntry:
    """One /etc/group entry of the container's root file system."""

    name: str
    gid: int
    members: tuple[str, ...] = ()


class PasswdView(Protocol):
    """Users and groups of the container's root file system (its /etc/passwd, /etc/group)."""

    def user_by_name(self, name: str) -> PasswdEntry | None:
        """The first entry called ``name``."""
        ...

    def user_by_uid(self, uid: int) -> PasswdEntry | None:
        """The first entry with ``uid``."""
        ...

    def group_by_name(self, name: str) -> GroupEntry | None:
        """The first group called ``name``."""
        ...

    def groups_with_member(self, user: str) -> list[GroupEntry]:
        """The groups listing ``user`` as a member, in file order."""
        ...


@dataclass(frozen=True)
class PasswdDb:
    """A ``PasswdView`` over parsed passwd and group files (parsing only; no file access)."""

    users: tuple[PasswdEntry, ...] = ()
    groups: tuple[GroupEntry, ...] = ()

    @classmethod
    def parse(cls, passwd: str, group: str) -> PasswdDb:
        """Parse the text of /etc/passwd and /etc/group; malformed lines are skipped."""
        users: list[PasswdEntry] = []
        for line in passwd.splitlines():
            fields = line.split(":")
            if line.startswith("#") or len(fields) < 4:
                continue
            if fields[2].isdigit() and fields[3].isdigit():
                users.append(PasswdEntry(fields[0], int(fields[2]), int(fields[3])))
        groups: list[GroupEntry] = []
        for line in group.splitlines():
            fields = line.split(":")
            if line.startswith("#") or len(fields) < 3 or not fields[2].isdigit():
                continue
            members = tuple(m for m in (fields[3] if len(fields) > 3 else "").split(",") if m)
            groups.append(GroupEntry(fields[0], int(fields[2]), members))
        return cls(tuple(users), tuple(groups))

    def user_by_name(self, name: str) -> PasswdEntry | None:
        """The first entry called ``name``."""
        return next((u for u in self.users if u.name == name), None)

    def user_by_uid(self, uid: int) -> PasswdEntry | None:
        """The first entry with ``uid``."""
        return next((u for u in self.users if u.uid == uid), None)

    def group_by_name(self, name: str) -> GroupEntry | None:
        """The first group called ``name``."""
        return next((g for g in self.groups if g.name == name), None)

    def groups_with_member(self, user: str) -> list[GroupEntry]:
        """The groups listing ``user`` as a member, in file order."""
        return [g for g in self.groups if user in g.members]


@dataclass(frozen=True)
class DeviceNode:
    """What stat(2) says about a host device node; ``type`` is "c" or "b"."""

    type: str
    major: int
    minor: int
    file_mode: int = 0o666
    uid: int = 0
    gid: int = 0
    path: str = ""


DeviceStat = Callable[[str], DeviceNode]
"""Stat a host device path; raises ``InvalidArgument`` (or ``NotFound``) when it is not one."""

HostDevices = Callable[[], list[DeviceNode]]
"""Every device node of the host (for privileged containers); ``path`` is set."""

FileLoader = Callable[[str], bytes]
"""Read a file of the host, for example a Localhost seccomp profile."""


def _no_device(path: str) -> DeviceNode:
    raise InvalidArgument(f"device {path}: no device lookup configured")


def _no_file(path: str) -> bytes:
    raise InvalidArgument(f"{path}: no file loader configured")


def _no_passwd() -> PasswdView:
    return PasswdDb()


@dataclass
class BuildContext:
    """Everything a container's spec depends on besides the CRI container config.

    ``namespace_paths`` maps "network", "ipc", "uts", "user" and "pid" to the sandbox's
    pinned namespace files (pid only when the pod shares one, user only when it has one).
    ``extra_mounts`` are the sandbox's /etc/hosts, /etc/resolv.conf, /etc/hostname and
    /dev/shm. ``warnings`` collects what was
    requested but could not be honoured on this host.
    """

    container_id: str
    sandbox_id: str
    sandbox: SandboxConfig
    image: ImageConfigView = field(default_factory=ImageConfigView)
    image_name: str = ""
    rootfs: str = "rootfs"
    namespace_paths: dict[str, str | None] = field(default_factory=dict)
    target_pid: int | None = None
    cgroups_path: str = ""
    min_oom_score_adj: int = -1000
    swap_available: bool = True
    host_lsms: frozenset[str] = frozenset()
    apparmor_default_profile: str = ""
    selinux_process_label: str = "system_u:system_r:container_t:s0"
    selinux_mount_label: str = "system_u:object_r:container_file_t:s0"
    node_hostname: str = ""
    passwd: PasswdView = field(default_factory=_no_passwd)
    stat_device: DeviceStat = _no_device
    host_devices: HostDevices = list
    load_file: FileLoader = _no_file
    default_seccomp: LinuxSeccomp | None = None
    extra_mounts: list[MountSpec] = field(default_factory=list)
    container_type: str = CONTAINER_TYPE_CONTAINER
    # The capability bounding set crishim itself holds (bit n = capability n); "ALL" and
    # privileged mean these, since a process cannot grant what it lacks. None: all of them.
    host_capability_mask: int | None = None
    warnings: list[str] = field(default_factory=list)

    def all_capabilities(self) -> list[str]:
        """Every capability a container here can hold."""
        mask = self.host_capability_mask
        return [c for n, c in enumerate(ALL_CAPABILITIES) if mask is None or mask >> n & 1]


SpecOpt = Callable[[Spec, ContainerConfig, BuildContext], None]


# -- helpers creating the parts of the spec an option edits --------------------------------


def spec_process(spec: Spec) -> Process:
    """The spec's process, created when missing."""
    if spec.process is None:
        spec.process = Process()
    return spec.process


def spec_linux(spec: Spec) -> Linux:
    """The spec's linux section, created when missing."""
    if spec.linux is None:
        spec.linux = Linux()
    return spec.linux


def spec_resources(spec: Spec) -> LinuxResources:
    """The spec's linux.resources, created when missing."""
    linux = spec_linux(spec)
    if linux.resources is None:
        linux.resources = LinuxResources()
    return linux.resources


def namespace_options(config: ContainerConfig, ctx: BuildContext) -> NamespaceOptions:
    """The container's namespace options, else its pod's."""
    return config.security_context.namespace_options or ctx.sandbox.namespace_options
