"""The parts of CRI v1 requests that shape a container's runtime spec.

Frozen mirrors of the protobuf messages (``ContainerConfig``, ``PodSandboxConfig`` and what
they hold), with CRI's field names so the api layer converts them one to one. Optional
messages are ``None`` when unset; CRI's ``Int64Value`` wrappers become ``int | None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from crishim.model.container import ContainerMetadata
from crishim.model.sandbox import PodMetadata


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class NamespaceMode(IntEnum):
    """Scope in which a Linux namespace is shared (CRI ``NamespaceMode``)."""

    POD = 0
    CONTAINER = 1
    NODE = 2
    TARGET = 3


class MountPropagation(IntEnum):
    """Mount propagation of a CRI mount: rprivate, rslave or rshared."""

    PROPAGATION_PRIVATE = 0
    PROPAGATION_HOST_TO_CONTAINER = 1
    PROPAGATION_BIDIRECTIONAL = 2


class SupplementalGroupsPolicy(IntEnum):
    """How the first process' supplemental groups are computed."""

    Merge = 0
    Strict = 1


class ProfileType(IntEnum):
    """Kind of seccomp or AppArmor profile (CRI ``SecurityProfile.ProfileType``)."""

    RuntimeDefault = 0
    Unconfined = 1
    Localhost = 2


class Protocol(IntEnum):
    """Transport protocol of a port mapping."""

    TCP = 0
    UDP = 1
    SCTP = 2


class IdMapping(_Frozen):
    """A contiguous range of IDs mapped between the node and a container."""

    host_id: int
    container_id: int
    length: int


class UserNamespace(_Frozen):
    """User namespace settings; mode POD asks for a dedicated one."""

    mode: NamespaceMode = NamespaceMode.NODE
    uids: list[IdMapping] = Field(default_factory=list)
    gids: list[IdMapping] = Field(default_factory=list)


class NamespaceOptions(_Frozen):
    """CRI ``NamespaceOption``: which namespaces a sandbox or container gets."""

    network: NamespaceMode = NamespaceMode.POD
    pid: NamespaceMode = NamespaceMode.POD
    ipc: NamespaceMode = NamespaceMode.POD
    target_id: str = ""
    userns_options: UserNamespace | None = None


class SecurityProfile(_Frozen):
    """A seccomp or AppArmor profile choice; ``localhost_ref`` is used with Localhost."""

    profile_type: ProfileType = ProfileType.RuntimeDefault
    localhost_ref: str = ""


class SELinuxOption(_Frozen):
    """SELinux label components; empty ones keep the runtime's default."""

    user: str = ""
    role: str = ""
    type: str = ""
    level: str = ""


class Capability(_Frozen):
    """Capability changes relative to the runtime's default set; "ALL" is allowed."""

    add_capabilities: list[str] = Field(default_factory=list)
    drop_capabilities: list[str] = Field(default_factory=list)
    add_ambient_capabilities: list[str] = Field(default_factory=list)


class HugepageLimit(_Frozen):
    """Limit in bytes for one huge page size such as "2MB"."""

    page_size: str
    limit: int


class LinuxResources(_Frozen):
    """CRI ``LinuxContainerResources``; 0 (or empty) in a field means unset."""

    cpu_period: int = 0
    cpu_quota: int = 0
    cpu_shares: int = 0
    memory_limit_in_bytes: int = 0
    oom_score_adj: int = 0
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    hugepage_limits: list[HugepageLimit] = Field(default_factory=list)
    unified: dict[str, str] = Field(default_factory=dict)
    memory_swap_limit_in_bytes: int = 0


class SecurityContext(_Frozen):
    """CRI ``LinuxContainerSecurityContext``."""

    capabilities: Capability | None = None
    privileged: bool = False
    namespace_options: NamespaceOptions | None = None
    selinux_options: SELinuxOption | None = None
    run_as_user: int | None = None
    run_as_group: int | None = None
    run_as_username: str = ""
    readonly_rootfs: bool = False
    supplemental_groups: list[int] = Field(default_factory=list)
    supplemental_groups_policy: SupplementalGroupsPolicy = SupplementalGroupsPolicy.Merge
    no_new_privs: bool = False
    masked_paths: list[str] = Field(default_factory=list)
    readonly_paths: list[str] = Field(default_factory=list)
    seccomp: SecurityProfile | None = None
    apparmor: SecurityProfile | None = None
    apparmor_profile: str = Field(default="", description="deprecated by apparmor")
    seccomp_profile_path: str = Field(default="", description="deprecated by seccomp")


class LinuxContainerConfig(_Frozen):
    """The Linux part of a container config."""

    resources: LinuxResources | None = None
    security_context: SecurityContext | None = None


class ImageSpec(_Frozen):
    """The image a container (or image volume) refers to."""

    image: str = ""
    annotations: dict[str, str] = Field(default_factory=dict)
    user_specified_image: str = ""
    runtime_handler: str = ""
    image_ref: str = ""


class MountSpec(_Frozen):
    """CRI ``Mount``: a host path (or image) made visible at ``container_path``.

    ``uid_mappings``/``gid_mappings`` ask for an ID-mapped mount (a pod with its own user
    namespace: the files keep the owners the pod sees).
    """

    container_path: str
    host_path: str = ""
    readonly: bool = False
    selinux_relabel: bool = False
    propagation: MountPropagation = MountPropagation.PROPAGATION_PRIVATE
    recursive_read_only: bool = False
    image: ImageSpec | None = None
    image_sub_path: str = ""
    uid_mappings: list[IdMapping] = Field(default_factory=list)
    gid_mappings: list[IdMapping] = Field(default_factory=list)


class DeviceSpec(_Frozen):
    """CRI ``Device``: a host device node exposed in the container."""

    container_path: str
    host_path: str
    permissions: str = "rwm"


class KeyValue(_Frozen):
    """One environment variable."""

    key: str
    value: str = ""


class CdiDevice(_Frozen):
    """A device injected through the Container Device Interface, by qualified name."""

    name: str


class ContainerConfig(_Frozen):
    """CRI ``ContainerConfig``: everything kubelet asks of a new container.

    ``stop_signal`` is the CRI ``Signal`` enum's name ("SIGTERM"), "" for the runtime default.
    """

    metadata: ContainerMetadata
    image: ImageSpec = Field(default_factory=ImageSpec)
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    working_dir: str = ""
    envs: list[KeyValue] = Field(default_factory=list)
    mounts: list[MountSpec] = Field(default_factory=list)
    devices: list[DeviceSpec] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    log_path: str = ""
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    linux: LinuxContainerConfig | None = None
    cdi_devices: list[CdiDevice] = Field(default_factory=list)
    stop_signal: str = ""

    @property
    def security_context(self) -> SecurityContext:
        """The Linux security context, or an empty one when unset."""
        if self.linux is None or self.linux.security_context is None:
            return SecurityContext()
        return self.linux.security_context


class DnsConfig(_Frozen):
    """resolv.conf contents for a sandbox."""

    servers: list[str] = Field(default_factory=list)
    searches: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)


class PortMapping(_Frozen):
    """A sandbox port exposed on the node; host_port 0 means not exposed."""

    protocol: Protocol = Protocol.TCP
    container_port: int = 0
    host_port: int = 0
    host_ip: str = ""


class SandboxSecurityContext(_Frozen):
    """CRI ``LinuxSandboxSecurityContext``."""

    namespace_options: NamespaceOptions | None = None
    selinux_options: SELinuxOption | None = None
    run_as_user: int | None = None
    run_as_group: int | None = None
    readonly_rootfs: bool = False
    supplemental_groups: list[int] = Field(default_factory=list)
    supplemental_groups_policy: SupplementalGroupsPolicy = SupplementalGroupsPolicy.Merge
    privileged: bool = False
    seccomp: SecurityProfile | None = None
    apparmor: SecurityProfile | None = None
    seccomp_profile_path: str = Field(default="", description="deprecated by seccomp")


class LinuxSandboxConfig(_Frozen):
    """CRI ``LinuxPodSandboxConfig``."""

    cgroup_parent: str = ""
    security_context: SandboxSecurityContext | None = None
    sysctls: dict[str, str] = Field(default_factory=dict)
    overhead: LinuxResources | None = None
    resources: LinuxResources | None = None


class SandboxConfig(_Frozen):
    """CRI ``PodSandboxConfig`` (its Windows part is not mirrored)."""

    metadata: PodMetadata
    hostname: str = ""
    log_directory: str = ""
    dns_config: DnsConfig | None = None
    port_mappings: list[PortMapping] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    linux: LinuxSandboxConfig | None = None

    @property
    def security_context(self) -> SandboxSecurityContext:
        """The Linux sandbox security context, or an empty one when unset."""
        if self.linux is None or self.linux.security_context is None:
            return SandboxSecurityContext()
        return self.linux.security_context

    @property
    def namespace_options(self) -> NamespaceOptions:
        """The pod's namespace options, POD for everything when unset."""
        return self.security_context.namespace_options or NamespaceOptions()

    @property
    def host_network(self) -> bool:
        """True when the pod uses the node's network namespace."""
        return self.namespace_options.network is NamespaceMode.NODE


class ImageConfigView(_Frozen):
    """The fields of an OCI image config that a container's spec depends on."""

    user: str = ""
    env: list[str] = Field(default_factory=list)
    entrypoint: list[str] = Field(default_factory=list)
    cmd: list[str] = Field(default_factory=list)
    working_dir: str = ""
    stop_signal: str = ""
    volumes: list[str] = Field(default_factory=list)

    @classmethod
    def from_image_config(cls, document: Mapping[str, Any]) -> ImageConfigView:
        """The view of an OCI image config document (its "config" object; absent keys and
        JSON nulls mean unset)."""
        raw = document.get("config") or {}
        return cls(
            user=raw.get("User") or "",
            env=list(raw.get("Env") or []),
            entrypoint=list(raw.get("Entrypoint") or []),
            cmd=list(raw.get("Cmd") or []),
            working_dir=raw.get("WorkingDir") or "",
            stop_signal=raw.get("StopSignal") or "",
            volumes=sorted(raw.get("Volumes") or {}),
        )
