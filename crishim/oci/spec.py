"""Typed models of the OCI runtime spec (config.json) as used on Linux, and the bundled defaults.

Field names are snake_case with the spec's camelCase as aliases; every optional field is
``None`` when unset, so ``spec.model_dump(by_alias=True, exclude_none=True)`` (``dump_spec``)
writes exactly the keys that were set. Models are mutable: spec options edit them in place.

The base spec and the RuntimeDefault seccomp profile live in the ``bundles/`` directory
(found by ``bundles_dir``) and are parsed once.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from crishim.errors import ConfigError

# 1.1.0, not newer: Debian 12's crun (1.8.1) refuses specs that claim 1.2.0.
OCI_VERSION = "1.1.0"

BASE_SPEC_FILE = "base-spec.json"
SECCOMP_DEFAULT_FILE = "seccomp-default.json"
BUNDLES_ENV = "CRISHIM_BUNDLES_DIR"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
    )


class User(_Model):
    """The identity of the container's process."""

    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: list[int] | None = None


class LinuxCapabilities(_Model):
    """The five capability sets of the process, as "CAP_..." names."""

    bounding: list[str] | None = None
    effective: list[str] | None = None
    inheritable: list[str] | None = None
    permitted: list[str] | None = None
    ambient: list[str] | None = None


class PosixRlimit(_Model):
    """One resource limit (RLIMIT_NOFILE, ...)."""

    type: str
    hard: int
    soft: int


class ConsoleSize(_Model):
    """Initial size of the terminal."""

    height: int
    width: int


class Process(_Model):
    """The container's first process."""

    terminal: bool | None = None
    console_size: ConsoleSize | None = None
    user: User = Field(default_factory=User)
    args: list[str] | None = None
    env: list[str] | None = None
    cwd: str = "/"
    capabilities: LinuxCapabilities | None = None
    rlimits: list[PosixRlimit] | None = None
    no_new_privileges: bool | None = None
    apparmor_profile: str | None = None
    oom_score_adj: int | None = None
    selinux_label: str | None = None


class Root(_Model):
    """The root file system, relative to the bundle or absolute."""

    path: str = "rootfs"
    readonly: bool | None = None


class Mount(_Model):
    """One mount, performed in order after the root is set up."""

    destination: str
    type: str | None = None
    source: str | None = None
    options: list[str] | None = None


class Hook(_Model):
    """A program run by the runtime at a lifecycle point."""

    path: str
    args: list[str] | None = None
    env: list[str] | None = None
    timeout: int | None = None


class Hooks(_Model):
    """Lifecycle hooks."""

    prestart: list[Hook] | None = None
    create_runtime: list[Hook] | None = None
    create_container: list[Hook] | None = None
    start_container: list[Hook] | None = None
    poststart: list[Hook] | None = None
    poststop: list[Hook] | None = None


class LinuxNamespace(_Model):
    """A namespace to create (no path) or to join (path)."""

    type: str
    path: str | None = None


class LinuxIdMapping(_Model):
    """A user namespace ID range."""

    container_id: int = Field(alias="containerID")
    host_id: int = Field(alias="hostID")
    size: int


class LinuxDevice(_Model):
    """A device node created in the container."""

    path: str
    type: str
    major: int | None = None
    minor: int | None = None
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


class LinuxDeviceCgroup(_Model):
    """A device cgroup rule; absent type/major/minor match everything."""

    allow: bool
    type: str | None = None
    major: int | None = None
    minor: int | None = None
    access: str | None = None


class LinuxMemory(_Model):
    """Memory controller settings, bytes."""

    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None
    kernel: int | None = None
    kernel_tcp: int | None = Field(default=None, alias="kernelTCP")
    swappiness: int | None = None
    disable_oom_killer: bool | None = Field(default=None, alias="disableOOMKiller")
    use_hierarchy: bool | None = None
    check_before_update: bool | None = None


class LinuxCpu(_Model):
    """CPU controller settings."""

    shares: int | None = None
    quota: int | None = None
    burst: int | None = None
    period: int | None = None
    realtime_runtime: int | None = None
    realtime_period: int | None = None
    cpus: str | None = None
    mems: str | None = None
    idle: int | None = None


class LinuxPids(_Model):
    """Pids controller settings."""

    limit: int


class LinuxHugepageLimit(_Model):
    """Hugetlb limit for one page size."""

    page_size: str
    limit: int


class LinuxResources(_Model):
    """The container's cgroup settings."""

    devices: list[LinuxDeviceCgroup] | None = None
    memory: LinuxMemory | None = None
    cpu: LinuxCpu | None = None
    pids: LinuxPids | None = None
    hugepage_limits: list[LinuxHugepageLimit] | None = None
    unified: dict[str, str] | None = None


class LinuxSeccompArg(_Model):
    """A condition on one syscall argument."""

    index: int
    value: int
    value_two: int | None = None
    op: str


class LinuxSyscall(_Model):
    """An action for a group of syscalls, optionally under argument conditions."""

    names: list[str]
    action: str
    errno_ret: int | None = None
    args: list[LinuxSeccompArg] | None = None


class LinuxSeccomp(_Model):
    """A seccomp filter."""

    default_action: str
    default_errno_ret: int | None = None
    architectures: list[str] | None = None
    flags: list[str] | None = None
    listener_path: str | None = None
    listener_metadata: str | None = None
    syscalls: list[LinuxSyscall] | None = None


class Linux(_Model):
    """The Linux-specific part of the spec."""

    namespaces: list[LinuxNamespace] | None = None
    uid_mappings: list[LinuxIdMapping] | None = None
    gid_mappings: list[LinuxIdMapping] | None = None
    devices: list[LinuxDevice] | None = None
    cgroups_path: str | None = None
    resources: LinuxResources | None = None
    sysctl: dict[str, str] | None = None
    seccomp: LinuxSeccomp | None = None
    rootfs_propagation: str | None = None
    masked_paths: list[str] | None = None
    readonly_paths: list[str] | None = None
    mount_label: str | None = None


class Spec(_Model):
    """A runtime spec: the config.json of a bundle."""

    oci_version: str = OCI_VERSION
    process: Process | None = None
    root: Root | None = None
    hostname: str | None = None
    domainname: str | None = None
    mounts: list[Mount] | None = None
    hooks: Hooks | None = None
    annotations: dict[str, str] | None = None
    linux: Linux | None = None


def dump_spec(spec: Spec) -> dict[str, Any]:
    """The spec as config.json's JSON object."""
    return spec.model_dump(by_alias=True, exclude_none=True)


def spec_json(spec: Spec) -> str:
    """The spec serialized as config.json text."""
    return json.dumps(dump_spec(spec), indent=2, sort_keys=False)


def bundles_dir() -> Path:
    """The directory holding base-spec.json and seccomp-default.json.

    Looked for, in order: ``$CRISHIM_BUNDLES_DIR``; ``bundles/`` next to the ``crishim``
    package (a checkout or an editable install); ``<prefix>/share/crishim/bundles`` (where a
    ``pip install .`` puts the files when pyproject lists them as data-files).
    """
    candidates: list[Path] = []
    if env := os.environ.get(BUNDLES_ENV):
        candidates.append(Path(env))
    candidates.append(Path(__file__).resolve().parents[2] / "bundles")
    candidates.append(Path(sys.prefix) / "share" / "crishim" / "bundles")
    for candidate in candidates:
        if (candidate / BASE_SPEC_FILE).is_file():
            return candidate
    searched = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"bundles directory with {BASE_SPEC_FILE} not found; searched {searched}")


def _read_bundle(name: str) -> Any:
    path = bundles_dir() / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


@functools.cache
def _base_spec_json() -> str:
    return Spec.model_validate(_read_bundle(BASE_SPEC_FILE)).model_dump_json(by_alias=True)


@functools.cache
def _default_seccomp_json() -> str:
    profile = LinuxSeccomp.model_validate(_read_bundle(SECCOMP_DEFAULT_FILE))
    return profile.model_dump_json(by_alias=True)


def base_spec() -> Spec:
    """A fresh copy of the bundled base spec (the file is read once)."""
    return Spec.model_validate_json(_base_spec_json())


def default_seccomp() -> LinuxSeccomp:
    """A fresh copy of the bundled RuntimeDefault seccomp profile (read once)."""
    return LinuxSeccomp.model_validate_json(_default_seccomp_json())
