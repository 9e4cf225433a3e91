"""Spec options: one small function per concern, each editing a spec in place.

Every option has the signature ``(spec, config, ctx) -> None`` (``SpecOpt``): ``spec`` is the
spec being built, ``config`` the CRI container request and ``ctx`` everything else the
request does not carry (ids, the sandbox, the image config, host facts). Options read the
file system only through the lookups in ``BuildContext`` (``PasswdView``, ``DeviceStat``,
``FileLoader``, ``HostDevices``), so this module stays pure and testable without root.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Protocol

from pydantic import ValidationError

from crishim.errors import InvalidArgument
from crishim.model.specs import (
    ContainerConfig,
    DeviceSpec,
    ImageConfigView,
    MountPropagation,
    MountSpec,
    NamespaceMode,
    NamespaceOptions,
    ProfileType,
    SandboxConfig,
    SecurityProfile,
    SupplementalGroupsPolicy,
)
from crishim.model.specs import LinuxResources as CriResources
from crishim.oci.spec import (
    Linux,
    LinuxCapabilities,
    LinuxCpu,
    LinuxDevice,
    LinuxDeviceCgroup,
    LinuxHugepageLimit,
    LinuxMemory,
    LinuxNamespace,
    LinuxResources,
    LinuxSeccomp,
    Mount,
    Process,
    Root,
    Spec,
    default_seccomp,
)

DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
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

DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)

DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

ANNOTATION_PREFIX = "io.kubernetes.cri."
CONTAINER_TYPE_SANDBOX = "sandbox"
CONTAINER_TYPE_CONTAINER = "container"

# Sysctls that belong to a namespace the container does not share with the node.
_IPC_SYSCTLS = ("kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")
_IPC_SYSCTL_PREFIXES = ("kernel.msg", "fs.mqueue.")
_SEM_SYSCTL = "kernel.sem"


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

    ``namespace_paths`` maps "network", "ipc", "uts" and "pid" to the sandbox's pinned
    namespace files (pid only when the pod shares one). ``extra_mounts`` are the sandbox's
    /etc/hosts, /etc/resolv.conf, /etc/hostname and /dev/shm. ``warnings`` collects what was
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


def _process(spec: Spec) -> Process:
    if spec.process is None:
        spec.process = Process()
    return spec.process


def _linux(spec: Spec) -> Linux:
    if spec.linux is None:
        spec.linux = Linux()
    return spec.linux


def _resources(spec: Spec) -> LinuxResources:
    linux = _linux(spec)
    if linux.resources is None:
        linux.resources = LinuxResources()
    return linux.resources


def _namespace_options(config: ContainerConfig, ctx: BuildContext) -> NamespaceOptions:
    return config.security_context.namespace_options or ctx.sandbox.namespace_options


def merge_env(current: Sequence[str], updates: Iterable[str]) -> list[str]:
    """``current`` with ``updates`` applied: a later value wins, keeping the first position."""
    merged: dict[str, str] = {}
    for entry in [*current, *updates]:
        key = entry.split("=", 1)[0]
        merged[key] = entry
    return list(merged.values())


# -- process ---------------------------------------------------------------------------------


def with_root(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Point the root at the container's root file system."""
    readonly = spec.root.readonly if spec.root else None
    spec.root = Root(path=ctx.rootfs, readonly=readonly)


def with_process_args(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Command and args as kubelet means them: command replaces the image's entrypoint (and
    drops its cmd), args replace the image's cmd."""
    if config.command:
        argv = [*config.command, *config.args]
    else:
        argv = [*ctx.image.entrypoint, *(config.args or ctx.image.cmd)]
    if not argv:
        raise InvalidArgument(f"container {config.metadata.name}: no command specified")
    _process(spec).args = argv


def with_env(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The image's environment, then the config's; a later value of a key wins."""
    process = _process(spec)
    configured = [f"{kv.key}={kv.value}" for kv in config.envs]
    process.env = merge_env(process.env or [], [*ctx.image.env, *configured])


def with_cwd(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The config's working directory, else the image's, else "/"."""
    _process(spec).cwd = config.working_dir or ctx.image.working_dir or "/"


def with_terminal(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """A pseudo-terminal when the config asks for one, with TERM set unless given."""
    process = _process(spec)
    process.terminal = config.tty
    if config.tty and not any(e.startswith("TERM=") for e in process.env or []):
        process.env = [*(process.env or []), "TERM=xterm"]


def with_hostname(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The pod's hostname (only with a UTS namespace of its own) and $HOSTNAME."""
    if ctx.sandbox.host_network:
        spec.hostname = None
        hostname = ctx.node_hostname or ctx.sandbox.hostname
    else:
        hostname = ctx.sandbox.hostname
        spec.hostname = hostname or None
    if hostname:
        process = _process(spec)
        process.env = merge_env(process.env or [], [f"HOSTNAME={hostname}"])


# -- user --------------------------------------------------------------------------------------


def _resolve_user(name: str, passwd: PasswdView) -> tuple[int, int, str]:
    """(uid, primary gid, user name or "") of a user given as a name or a number."""
    if name.isdigit():
        entry = passwd.user_by_uid(int(name))
        return int(name), entry.gid if entry else 0, entry.name if entry else ""
    entry = passwd.user_by_name(name)
    if entry is None:
        raise InvalidArgument(f"user {name!r} not found in the image's /etc/passwd")
    return entry.uid, entry.gid, entry.name


def _resolve_group(name: str, passwd: PasswdView) -> int:
    if name.isdigit():
        return int(name)
    entry = passwd.group_by_name(name)
    if entry is None:
        raise InvalidArgument(f"group {name!r} not found in the image's /etc/group")
    return entry.gid


def with_user(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """uid, gid and supplemental groups of the process.

    The user is run_as_user, else run_as_username, else the image's USER ("user[:group]",
    names resolved in the image). The group is run_as_group, else the image's group, else
    the user's primary group. Additional groups start with the primary group; Merge adds the
    user's memberships in the image's /etc/group, then the requested supplemental groups.
    """
    sc = config.security_context
    if sc.run_as_group is not None and sc.run_as_user is None and not sc.run_as_username:
        # As containerd: a group alone would silently run as the image's user.
        raise InvalidArgument(
            f"container {config.metadata.name}: run_as_group is set without run_as_user "
            "or run_as_username"
        )
    if sc.run_as_user is not None:
        user_spec, group_spec = str(sc.run_as_user), ""
    elif sc.run_as_username:
        user_spec, group_spec = sc.run_as_username, ""
    else:
        image_user, _, group_spec = ctx.image.user.partition(":")
        user_spec = image_user or "0"
    uid, gid, name = _resolve_user(user_spec, ctx.passwd)
    if sc.run_as_group is not None:
        gid = sc.run_as_group
    elif group_spec:
        gid = _resolve_group(group_spec, ctx.passwd)
    groups = [gid]
    if sc.supplemental_groups_policy is SupplementalGroupsPolicy.Merge and name:
        groups += [g.gid for g in ctx.passwd.groups_with_member(name)]
    groups += sc.supplemental_groups
    user = _process(spec).user
    user.uid, user.gid = uid, gid
    user.additional_gids = list(dict.fromkeys(groups))


# -- mounts and devices ------------------------------------------------------------------------

_PROPAGATION = {
    MountPropagation.PROPAGATION_PRIVATE: "rprivate",
    MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared",
}


def _depth(path: str) -> int:
    return len(PurePosixPath(path).parts)


def _bind_mount(mount: MountSpec) -> Mount:
    if not mount.host_path:
        raise InvalidArgument(
            f"mount {mount.container_path}: no host path (image volumes arrive resolved)"
        )
    if mount.recursive_read_only and not mount.readonly:
        raise InvalidArgument(f"mount {mount.container_path}: recursive read-only needs readonly")
    if mount.recursive_read_only and mount.propagation is not MountPropagation.PROPAGATION_PRIVATE:
        # A read-only copy of a tree that keeps receiving mounts could not stay read-only.
        raise InvalidArgument(
            f"mount {mount.container_path}: recursive read-only needs private propagation"
        )
    options = ["rbind", _PROPAGATION[mount.propagation], "ro" if mount.readonly else "rw"]
    if mount.recursive_read_only:
        options.append("rro")
    return Mount(
        destination=mount.container_path, type="bind", source=mount.host_path, options=options
    )


def with_mounts(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The config's mounts, then the sandbox's (/etc/hosts, ...) it does not override.

    They replace base mounts at the same destination and are sorted parents first. The
    root's propagation becomes rshared or rslave when a mount needs it.
    """
    requested = list(config.mounts)
    taken = {m.container_path for m in requested}
    requested += [m for m in ctx.extra_mounts if m.container_path not in taken]
    requested.sort(key=lambda m: _depth(m.container_path))
    destinations = {m.container_path for m in requested}
    base = [m for m in spec.mounts or [] if m.destination not in destinations]
    spec.mounts = base + [_bind_mount(m) for m in requested]
    propagations = {m.propagation for m in requested}
    if MountPropagation.PROPAGATION_BIDIRECTIONAL in propagations:
        _linux(spec).rootfs_propagation = "rshared"
    elif MountPropagation.PROPAGATION_HOST_TO_CONTAINER in propagations:
        _linux(spec).rootfs_propagation = "rslave"


def _check_permissions(device: DeviceSpec) -> str:
    permissions = device.permissions or "rwm"
    if set(permissions) - set("rwm"):
        raise InvalidArgument(f"device {device.host_path}: bad permissions {permissions!r}")
    return permissions


def with_devices(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Host devices from the config: a node in the container and a cgroup rule allowing it."""
    linux = _linux(spec)
    resources = _resources(spec)
    for device in config.devices:
        access = _check_permissions(device)
        node = ctx.stat_device(device.host_path)
        linux.devices = [
            *(linux.devices or []),
            LinuxDevice(
                path=device.container_path or device.host_path,
                type=node.type,
                major=node.major,
                minor=node.minor,
                file_mode=node.file_mode,
                uid=node.uid,
                gid=node.gid,
            ),
        ]
        rule = LinuxDeviceCgroup(
            allow=True, type=node.type, major=node.major, minor=node.minor, access=access
        )
        resources.devices = [*(resources.devices or []), rule]


def with_privileged(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """A privileged container: every host device allowed and created, /sys writable.

    Capabilities, masked paths, seccomp and LSM labels follow privilege in their own options.
    """
    if not config.security_context.privileged:
        return
    if not ctx.sandbox.security_context.privileged:
        raise InvalidArgument(
            f"container {config.metadata.name}: privileged container in an unprivileged pod"
        )
    linux = _linux(spec)
    _resources(spec).devices = [LinuxDeviceCgroup(allow=True, access="rwm")]
    present = {d.path for d in linux.devices or []}
    host = [
        LinuxDevice(
            path=n.path,
            type=n.type,
            major=n.major,
            minor=n.minor,
            file_mode=n.file_mode,
            uid=n.uid,
            gid=n.gid,
        )
        for n in ctx.host_devices()
        if n.path and n.path not in present
    ]
    linux.devices = [*(linux.devices or []), *host] or None
    for mount in spec.mounts or []:
        if mount.type in ("sysfs", "cgroup", "cgroup2") and mount.options:
            mount.options = ["rw" if o == "ro" else o for o in mount.options]


# -- security ----------------------------------------------------------------------------------


def normalize_capability(name: str) -> str:
    """ "net_admin" or "CAP_NET_ADMIN" -> "CAP_NET_ADMIN"; unknown names are an error."""
    upper = name.strip().upper()
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full not in ALL_CAPABILITIES:
        raise InvalidArgument(f"unknown capability {name!r}")
    return full


def _is_all(name: str) -> bool:
    return name.strip().upper() in ("ALL", "CAP_ALL")


def with_capabilities(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The default set changed by the config's add and drop lists ("ALL" works in both).

    Adding ALL starts from every capability, dropping ALL from none; named additions then
    apply, then named drops. Privileged containers get every capability. Ambient
    capabilities are also raised in the other sets, and are the only inheritable ones.
    """
    sc = config.security_context
    change = sc.capabilities
    add = change.add_capabilities if change else []
    drop = change.drop_capabilities if change else []
    if sc.privileged:
        caps = ctx.all_capabilities()
    else:
        caps = list(DEFAULT_CAPABILITIES)
        if any(_is_all(c) for c in add):
            caps = ctx.all_capabilities()
        if any(_is_all(c) for c in drop):
            caps = []
        caps += [normalize_capability(c) for c in add if not _is_all(c)]
        dropped = {normalize_capability(c) for c in drop if not _is_all(c)}
        caps = [c for c in caps if c not in dropped]
    ambient = [normalize_capability(c) for c in (change.add_ambient_capabilities if change else [])]
    caps = list(dict.fromkeys([*caps, *ambient]))
    _process(spec).capabilities = LinuxCapabilities(
        bounding=caps,
        effective=list(caps),
        permitted=list(caps),
        inheritable=list(dict.fromkeys(ambient)) or None,
        ambient=list(dict.fromkeys(ambient)) or None,
    )


def with_no_new_privs(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Set no_new_privs when the config asks for it."""
    _process(spec).no_new_privileges = config.security_context.no_new_privs or None


def with_readonly_rootfs(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Mount the root read-only when the config asks for it."""
    root = spec.root or Root(path=ctx.rootfs)
    root.readonly = config.security_context.readonly_rootfs or None
    spec.root = root


def with_masked_and_readonly_paths(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Masked and read-only paths: the config's lists when non-empty, else the defaults;
    none at all for privileged containers."""
    sc = config.security_context
    linux = _linux(spec)
    if sc.privileged:
        linux.masked_paths = linux.readonly_paths = None
        return
    linux.masked_paths = list(sc.masked_paths or DEFAULT_MASKED_PATHS)
    linux.readonly_paths = list(sc.readonly_paths or DEFAULT_READONLY_PATHS)


def _legacy_profile(path: str) -> SecurityProfile:
    """A deprecated profile string ("runtime/default", "unconfined", "localhost/<ref>")."""
    if path in ("runtime/default", "docker/default"):
        return SecurityProfile(profile_type=ProfileType.RuntimeDefault)
    if path.startswith("localhost/"):
        return SecurityProfile(
            profile_type=ProfileType.Localhost, localhost_ref=path.removeprefix("localhost/")
        )
    if path in ("", "unconfined"):
        return SecurityProfile(profile_type=ProfileType.Unconfined)
    raise InvalidArgument(f"unknown security profile {path!r}")


def _flatten_docker_profile(raw: dict[str, Any]) -> dict[str, Any]:
    """Accept Docker's profile format too: archMap, syscall "name", no conditional rules."""
    profile = dict(raw)
    arch_map = profile.pop("archMap", None)
    if isinstance(arch_map, list) and "architectures" not in profile:
        arches: list[str] = []
        for entry in arch_map:
            if isinstance(entry, dict):
                arches.append(str(entry.get("architecture", "")))
                arches += entry.get("subArchitectures") or []
        profile["architectures"] = arches
    syscalls = []
    for entry in profile.get("syscalls") or []:
        rule = dict(entry)
        if rule.pop("includes", None) or rule.pop("excludes", None):
            raise InvalidArgument("seccomp profile: conditional includes/excludes unsupported")
        rule.pop("comment", None)
        if "name" in rule:
            rule["names"] = [rule.pop("name")]
        syscalls.append(rule)
    if syscalls:
        profile["syscalls"] = syscalls
    return profile


def load_seccomp_profile(data: bytes, source: str) -> LinuxSeccomp:
    """Parse a seccomp profile in OCI form (Docker's archMap form is accepted too)."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise InvalidArgument(f"seccomp profile {source}: not a JSON object")
        return LinuxSeccomp.model_validate(_flatten_docker_profile(raw))
    except (ValueError, ValidationError) as exc:
        raise InvalidArgument(f"seccomp profile {source}: {exc}") from exc


def with_seccomp(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The seccomp filter: RuntimeDefault is the bundled profile, Localhost a file of the
    node, Unconfined (or nothing requested, or privileged) none."""
    sc = config.security_context
    linux = _linux(spec)
    profile = sc.seccomp or _legacy_profile(sc.seccomp_profile_path)
    if sc.privileged or profile.profile_type is ProfileType.Unconfined:
        linux.seccomp = None
    elif profile.profile_type is ProfileType.RuntimeDefault:
        linux.seccomp = (ctx.default_seccomp or default_seccomp()).model_copy(deep=True)
    else:
        if not profile.localhost_ref:
            raise InvalidArgument("seccomp profile Localhost without localhost_ref")
        data = ctx.load_file(profile.localhost_ref)
        linux.seccomp = load_seccomp_profile(data, profile.localhost_ref)


def with_apparmor(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The AppArmor profile, set only when the host runs AppArmor (else a warning)."""
    sc = config.security_context
    profile = sc.apparmor or _legacy_profile(sc.apparmor_profile)
    process = _process(spec)
    process.apparmor_profile = None
    if sc.privileged or profile.profile_type is ProfileType.Unconfined:
        return
    if "apparmor" not in ctx.host_lsms:
        if profile.profile_type is ProfileType.Localhost:
            ctx.warnings.append(
                f"apparmor profile {profile.localhost_ref!r} ignored: AppArmor is not enabled"
            )
        return
    if profile.profile_type is ProfileType.Localhost:
        process.apparmor_profile = profile.localhost_ref.removeprefix("localhost/")
    elif ctx.apparmor_default_profile:
        process.apparmor_profile = ctx.apparmor_default_profile
    else:
        ctx.warnings.append("apparmor RuntimeDefault: no default profile configured")


def _label(default: str, user: str, role: str, type_: str, level: str) -> str:
    parts = default.split(":", 3)
    parts += [""] * (4 - len(parts))
    chosen = [user or parts[0], role or parts[1], type_ or parts[2], level or parts[3]]
    return ":".join(chosen).rstrip(":")


def with_selinux(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """SELinux process and mount labels, set only when the host runs SELinux.

    The defaults of ``ctx`` are changed component-wise by the container's options (else the
    pod's); the mount label takes the user and level only. Privileged containers get none.
    """
    options = config.security_context.selinux_options or (
        ctx.sandbox.security_context.selinux_options
    )
    process, linux = _process(spec), _linux(spec)
    process.selinux_label = linux.mount_label = None
    if config.security_context.privileged:
        return
    if "selinux" not in ctx.host_lsms:
        if options is not None and any((options.user, options.role, options.type)):
            ctx.warnings.append("selinux options ignored: SELinux is not enabled")
        return
    user = options.user if options else ""
    role = options.role if options else ""
    type_ = options.type if options else ""
    level = options.level if options else ""
    process.selinux_label = _label(ctx.selinux_process_label, user, role, type_, level)
    linux.mount_label = _label(ctx.selinux_mount_label, user, "", "", level)


# -- namespaces, resources, kernel parameters ---------------------------------------------------


def _pod_namespace(kind: str, ctx: BuildContext) -> LinuxNamespace:
    path = ctx.namespace_paths.get(kind)
    if not path:
        raise InvalidArgument(f"sandbox {ctx.sandbox_id}: no {kind} namespace to join")
    return LinuxNamespace(type=kind, path=path)


def with_namespaces(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Join the pod's network, IPC and UTS namespaces (NODE: stay in the host's); the PID
    namespace per mode (POD: the pod's, CONTAINER: a new one, TARGET: another container's,
    NODE: the host's); new mount and cgroup namespaces (no cgroup one when privileged)."""
    opts = _namespace_options(config, ctx)
    if opts.userns_options is not None and opts.userns_options.mode is NamespaceMode.POD:
        raise InvalidArgument("user namespaces are not supported")
    namespaces: list[LinuxNamespace] = []
    if opts.pid is NamespaceMode.POD:
        namespaces.append(_pod_namespace("pid", ctx))
    elif opts.pid is NamespaceMode.CONTAINER:
        namespaces.append(LinuxNamespace(type="pid"))
    elif opts.pid is NamespaceMode.TARGET:
        if ctx.target_pid is None:
            raise InvalidArgument(f"pid namespace of target {opts.target_id!r} unknown")
        namespaces.append(LinuxNamespace(type="pid", path=f"/proc/{ctx.target_pid}/ns/pid"))
    if opts.network is not NamespaceMode.NODE:
        namespaces.append(_pod_namespace("network", ctx))
    if opts.ipc is not NamespaceMode.NODE:
        namespaces.append(_pod_namespace("ipc", ctx))
    if opts.network is not NamespaceMode.NODE:
        namespaces.append(_pod_namespace("uts", ctx))
    namespaces.append(LinuxNamespace(type="mount"))
    if not config.security_context.privileged:
        namespaces.append(LinuxNamespace(type="cgroup"))
    _linux(spec).namespaces = namespaces


def linux_resources(res: CriResources, swap_available: bool = True) -> LinuxResources:
    """The OCI form of CRI resources (also what ``runc update --resources`` reads).

    0 means unset and zero hugepage limits are dropped. Without a swap limit, swap equals
    the memory limit (no swapping) when the host has a swap controller.
    """
    resources = LinuxResources()
    cpu = LinuxCpu(
        shares=res.cpu_shares or None,
        quota=res.cpu_quota or None,
        period=res.cpu_period or None,
        cpus=res.cpuset_cpus or None,
        mems=res.cpuset_mems or None,
    )
    resources.cpu = cpu if cpu.model_dump(exclude_none=True) else None
    swap = None
    if swap_available:
        swap = res.memory_swap_limit_in_bytes or res.memory_limit_in_bytes or None
    limit = res.memory_limit_in_bytes or None
    resources.memory = LinuxMemory(limit=limit, swap=swap) if limit or swap else None
    hugepages = [
        LinuxHugepageLimit(page_size=h.page_size, limit=h.limit)
        for h in res.hugepage_limits
        if h.limit
    ]
    resources.hugepage_limits = hugepages or None
    resources.unified = dict(res.unified) or None
    return resources


def with_resources(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """CPU, memory, hugetlb and unified cgroup settings (see ``linux_resources``); the
    device rules already in the spec stay."""
    res = config.linux.resources if config.linux else None
    if res is None:
        return
    current = _resources(spec)
    update = linux_resources(res, ctx.swap_available)
    current.cpu, current.memory = update.cpu, update.memory
    current.hugepage_limits, current.unified = update.hugepage_limits, update.unified


def with_oom_score_adj(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The OOM score adjustment, never below crishim's own (lowering it needs
    CAP_SYS_RESOURCE) and never above 1000."""
    res = config.linux.resources if config.linux else None
    if res is None:
        return
    _process(spec).oom_score_adj = min(max(res.oom_score_adj, ctx.min_oom_score_adj), 1000)


def _sysctl_name(name: str) -> str:
    # kubelet accepts "net/ipv4/ip_forward"; a "." inside a slash form is part of a name.
    if "/" in name:
        return name.translate(str.maketrans("./", "/."))
    return name


def _is_ipc_sysctl(name: str) -> bool:
    return name in _IPC_SYSCTLS or name == _SEM_SYSCTL or name.startswith(_IPC_SYSCTL_PREFIXES)


def with_sysctls(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The pod's sysctls; only namespaced ones, and only for namespaces the pod owns."""
    sysctls = ctx.sandbox.linux.sysctls if ctx.sandbox.linux else {}
    if not sysctls:
        return
    opts = _namespace_options(config, ctx)
    result: dict[str, str] = {}
    for raw, value in sysctls.items():
        name = _sysctl_name(raw)
        if name.startswith("net."):
            if opts.network is NamespaceMode.NODE:
                raise InvalidArgument(f"sysctl {raw}: not allowed with the host network")
        elif _is_ipc_sysctl(name):
            if opts.ipc is NamespaceMode.NODE:
                raise InvalidArgument(f"sysctl {raw}: not allowed with the host IPC namespace")
        else:
            raise InvalidArgument(f"sysctl {raw}: not a namespaced kernel parameter")
        result[name] = value
    _linux(spec).sysctl = result


def with_cgroups_path(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Place the container in the cgroup its pod's cgroup driver named for it."""
    if ctx.cgroups_path:
        _linux(spec).cgroups_path = ctx.cgroups_path


def with_annotations(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """io.kubernetes.cri.* annotations naming the container, its pod and its image."""
    pod = ctx.sandbox.metadata
    p = ANNOTATION_PREFIX
    annotations = {
        f"{p}container-type": ctx.container_type,
        f"{p}sandbox-id": ctx.sandbox_id,
        f"{p}sandbox-name": pod.name,
        f"{p}sandbox-namespace": pod.namespace,
        f"{p}sandbox-uid": pod.uid,
    }
    if ctx.container_type == CONTAINER_TYPE_CONTAINER:
        annotations[f"{p}container-name"] = config.metadata.name
        annotations[f"{p}image-name"] = ctx.image_name or config.image.image
    spec.annotations = {**(spec.annotations or {}), **annotations}
