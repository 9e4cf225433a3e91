"""Spec options for a container's security: privilege, capabilities, no_new_privs, the
read-only root, masked and read-only paths, seccomp, AppArmor and SELinux.

Same shape as :mod:`crishim.oci.opts`: one function per concern, ``(spec, config, ctx)``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from crishim.errors import InvalidArgument
from crishim.model.specs import (
    ContainerConfig,
    ProfileType,
    SecurityProfile,
)
from crishim.oci.context import (
    ALL_CAPABILITIES,
    BuildContext,
    spec_linux,
    spec_process,
)
from crishim.oci.spec import (
    LinuxCapabilities,
    LinuxSeccomp,
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
    spec_process(spec).capabilities = LinuxCapabilities(
        bounding=caps,
        effective=list(caps),
        permitted=list(caps),
        inheritable=list(dict.fromkeys(ambient)) or None,
        ambient=list(dict.fromkeys(ambient)) or None,
    )


def with_no_new_privs(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Set no_new_privs when the config asks for it."""
    spec_process(spec).no_new_privileges = config.security_context.no_new_privs or None


def with_readonly_rootfs(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Mount the root read-only when the config asks for it."""
    root = spec.root or Root(path=ctx.rootfs)
    root.readonly = config.security_context.readonly_rootfs or None
    spec.root = root


def with_masked_and_readonly_paths(spec: Spec, config: ContainerConfig, ctx: BuildContext) -> None:
    """Masked and read-only paths: the config's lists when non-empty, else the defaults;
    none at all for privileged containers."""
    sc = config.security_context
    linux = spec_linux(spec)
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
    linux = spec_linux(spec)
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
    process = spec_process(spec)
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
    process, linux = spec_process(spec), spec_linux(spec)
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
