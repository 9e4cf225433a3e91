"""Spec options: one small function per concern, each editing a spec in place.

Every option has the signature ``(spec, config, ctx) -> None`` (``SpecOpt``): ``spec`` is the
spec being built, ``config`` the CRI container request and ``ctx`` everything else the
request does not carry (ids, the sandbox, the image config, host facts). Options read the
file system only through the lookups in ``BuildContext`` (``PasswdView``, ``DeviceStat``,
``FileLoader``, ``HostDevices``), so this module stays pure and testable without root.
The build context lives in :mod:`crishim.oci.context`, the security options in
:mod:`crishim.oci.security`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

from crishim.errors import InvalidArgument
from crishim.model.specs import (
    ContainerConfig,
    DeviceSpec,
    IdMapping,
    MountPropagation,
    MountSpec,
    NamespaceMode,
    SupplementalGroupsPolicy,
)
from crishim.model.specs import LinuxResources as CriResources
from crishim.model.userns import check_container_userns, pod_userns
from crishim.oci.context import (
    CONTAINER_TYPE_CONTAINER,
    BuildContext,
    PasswdView,
    namespace_options,
    spec_linux,
    spec_process,
    spec_resources,
)
from crishim.oci.spec import (
    LinuxCpu,
    LinuxDevice,
    LinuxDeviceCgroup,
    LinuxHugepageLimit,
    LinuxIdMapping,
    LinuxMemory,
    LinuxNamespace,
    LinuxResources,
    Mount,
    Root,
    Spec,
)

ANNOTATION_PREFIX = "io.kubernetes.cri."
# Sysctls that belong to a namespace the container does not share with the node.
_IPC_SYSCTLS = ("kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")
_IPC_SYSCTL_PREFIXES = ("kernel.msg", "fs.mqueue.")
_SEM_SYSCTL = "kernel.sem"


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
    spec_process(spec).args = argv


def with_env(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The image's environment, then the config's; a later value of a key wins."""
    process = spec_process(spec)
    configured = [f"{kv.key}={kv.value}" for kv in config.envs]
    process.env = merge_env(process.env or [], [*ctx.image.env, *configured])


def with_cwd(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The config's working directory, else the image's, else "/"."""
    spec_process(spec).cwd = config.working_dir or ctx.image.working_dir or "/"


def with_terminal(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """A pseudo-terminal when the config asks for one, with TERM set unless given."""
    process = spec_process(spec)
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
        process = spec_process(spec)
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
    user = spec_process(spec).user
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
        spec_linux(spec).rootfs_propagation = "rshared"
    elif MountPropagation.PROPAGATION_HOST_TO_CONTAINER in propagations:
        spec_linux(spec).rootfs_propagation = "rslave"


def _check_permissions(device: DeviceSpec) -> str:
    permissions = device.permissions or "rwm"
    if set(permissions) - set("rwm"):
        raise InvalidArgument(f"device {device.host_path}: bad permissions {permissions!r}")
    return permissions


def with_devices(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Host devices from the config: a node in the container and a cgroup rule allowing it."""
    linux = spec_linux(spec)
    resources = spec_resources(spec)
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
    linux = spec_linux(spec)
    spec_resources(spec).devices = [LinuxDeviceCgroup(allow=True, access="rwm")]
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


# -- namespaces, resources, kernel parameters ---------------------------------------------------


def _pod_namespace(kind: str, ctx: BuildContext) -> LinuxNamespace:
    path = ctx.namespace_paths.get(kind)
    if not path:
        raise InvalidArgument(f"sandbox {ctx.sandbox_id}: no {kind} namespace to join")
    return LinuxNamespace(type=kind, path=path)


def _oci_mappings(mappings: list[IdMapping]) -> list[LinuxIdMapping]:
    return [
        LinuxIdMapping(container_id=m.container_id, host_id=m.host_id, size=m.length)
        for m in mappings
    ]


def with_namespaces(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Join the pod's user namespace when it has one (with its mappings, which runtimes
    check), its network, IPC and UTS namespaces (NODE: stay in the host's); the PID
    namespace per mode (POD: the pod's, CONTAINER: a new one, TARGET: another container's,
    NODE: the host's); new mount and cgroup namespaces (no cgroup one when privileged)."""
    opts = namespace_options(config, ctx)
    userns = pod_userns(ctx.sandbox.namespace_options)
    check_container_userns(config.security_context.namespace_options, userns)
    namespaces: list[LinuxNamespace] = []
    if userns is not None:
        namespaces.append(_pod_namespace("user", ctx))
        spec_linux(spec).uid_mappings = _oci_mappings(userns.uids)
        spec_linux(spec).gid_mappings = _oci_mappings(userns.gids)
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
    spec_linux(spec).namespaces = namespaces


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
    current = spec_resources(spec)
    update = linux_resources(res, ctx.swap_available)
    current.cpu, current.memory = update.cpu, update.memory
    current.hugepage_limits, current.unified = update.hugepage_limits, update.unified


def with_oom_score_adj(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """The OOM score adjustment, never below crishim's own (lowering it needs
    CAP_SYS_RESOURCE) and never above 1000."""
    res = config.linux.resources if config.linux else None
    if res is None:
        return
    spec_process(spec).oom_score_adj = min(max(res.oom_score_adj, ctx.min_oom_score_adj), 1000)


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
    opts = namespace_options(config, ctx)
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
    spec_linux(spec).sysctl = result


def with_cgroups_path(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Place the container in the cgroup its pod's cgroup driver named for it."""
    if ctx.cgroups_path:
        spec_linux(spec).cgroups_path = ctx.cgroups_path


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
