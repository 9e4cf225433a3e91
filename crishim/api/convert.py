"""Conversion between protobuf messages and crishim's model types."""

from __future__ import annotations

import dataclasses
import enum
import signal
from collections.abc import Iterable
from typing import Any, TypeVar, cast

import betterproto2
import pydantic

from crishim import model
from crishim.api import v1
from crishim.errors import InvalidArgument
from crishim.model import metrics, specs, stats

K = TypeVar("K")
V = TypeVar("V")
M = TypeVar("M", bound=pydantic.BaseModel)


def _lookup(table: dict[K, V], value: K, what: str) -> V:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(f"{what}: unknown value {value!r}") from None


_SANDBOX_STATE = {
    model.SandboxState.READY: v1.PodSandboxState.SANDBOX_READY,
    model.SandboxState.NOTREADY: v1.PodSandboxState.SANDBOX_NOTREADY,
}
_SANDBOX_STATE_IN = {v: k for k, v in _SANDBOX_STATE.items()}

_CONTAINER_STATE = {
    model.ContainerState.CREATED: v1.ContainerState.CONTAINER_CREATED,
    model.ContainerState.RUNNING: v1.ContainerState.CONTAINER_RUNNING,
    model.ContainerState.EXITED: v1.ContainerState.CONTAINER_EXITED,
    model.ContainerState.UNKNOWN: v1.ContainerState.CONTAINER_UNKNOWN,
}
_CONTAINER_STATE_IN = {v: k for k, v in _CONTAINER_STATE.items()}

_CGROUP_DRIVER = {"systemd": v1.CgroupDriver.SYSTEMD, "cgroupfs": v1.CgroupDriver.CGROUPFS}


def pod_sandbox(sandbox: model.Sandbox) -> v1.PodSandbox:
    """A sandbox as ListPodSandbox reports it."""
    meta = sandbox.metadata
    return v1.PodSandbox(
        id=sandbox.id,
        metadata=v1.PodSandboxMetadata(
            name=meta.name, uid=meta.uid, namespace=meta.namespace, attempt=meta.attempt
        ),
        state=_SANDBOX_STATE[sandbox.state],
        created_at=sandbox.created_at,
        labels=dict(sandbox.labels),
        annotations=dict(sandbox.annotations),
        runtime_handler=sandbox.runtime_handler,
    )


def container(item: model.Container) -> v1.Container:
    """A container as ListContainers reports it."""
    return v1.Container(
        id=item.id,
        pod_sandbox_id=item.sandbox_id,
        metadata=v1.ContainerMetadata(name=item.metadata.name, attempt=item.metadata.attempt),
        image=v1.ImageSpec(image=item.image, user_specified_image=item.user_specified_image),
        image_ref=item.image_ref,
        state=_CONTAINER_STATE[item.state],
        created_at=item.created_at,
        labels=dict(item.labels),
        annotations=dict(item.annotations),
        image_id=item.image_id,
    )


def sandbox_filter(msg: v1.PodSandboxFilter | None) -> model.SandboxFilter:
    """ListPodSandbox's filter; an absent filter matches everything."""
    if msg is None:
        return model.SandboxFilter()
    return model.SandboxFilter(
        id=msg.id,
        state=(
            _lookup(_SANDBOX_STATE_IN, msg.state.state, "filter.state")
            if msg.state is not None
            else None
        ),
        label_selector=dict(msg.label_selector),
    )


def container_filter(msg: v1.ContainerFilter | None) -> model.ContainerFilter:
    """ListContainers' filter; an absent filter matches everything."""
    if msg is None:
        return model.ContainerFilter()
    return model.ContainerFilter(
        id=msg.id,
        state=(
            _lookup(_CONTAINER_STATE_IN, msg.state.state, "filter.state")
            if msg.state is not None
            else None
        ),
        sandbox_id=msg.pod_sandbox_id,
        label_selector=dict(msg.label_selector),
    )


def status_response(status: model.RuntimeStatus) -> v1.StatusResponse:
    """Status' reply from the model."""
    return v1.StatusResponse(
        status=v1.RuntimeStatus(
            conditions=[
                v1.RuntimeCondition(
                    type=c.type, status=c.status, reason=c.reason, message=c.message
                )
                for c in status.conditions
            ]
        ),
        info=dict(status.info),
        runtime_handlers=[
            v1.RuntimeHandler(
                name=h.name,
                features=v1.RuntimeHandlerFeatures(
                    recursive_read_only_mounts=h.recursive_read_only_mounts,
                    user_namespaces=h.user_namespaces,
                ),
            )
            for h in status.handlers
        ],
        features=v1.RuntimeFeatures(supplemental_groups_policy=status.supplemental_groups_policy),
    )


def cgroup_driver(name: str) -> v1.CgroupDriver:
    """The protobuf enum for a configured cgroup driver name."""
    return _CGROUP_DRIVER[name]


def image(item: model.Image) -> v1.Image:
    """An image as ImageStatus and ListImages report it."""
    uid, username = item.uid_and_username()
    return v1.Image(
        id=item.id,
        repo_tags=list(item.repo_tags),
        repo_digests=list(item.repo_digests),
        size=item.size,
        uid=v1.Int64Value(value=uid) if uid is not None else None,
        username=username,
        spec=v1.ImageSpec(image=item.id),
        pinned=item.pinned,
    )


def pod_sandbox_status(sandbox: model.Sandbox) -> v1.PodSandboxStatus:
    """PodSandboxStatus' status message."""
    meta = sandbox.metadata
    ips = sandbox.ips if sandbox.state is model.SandboxState.READY else []
    modes = v1.NamespaceOption(
        network=v1.NamespaceMode.NODE if sandbox.host_network else v1.NamespaceMode.POD,
        pid=(
            v1.NamespaceMode.NODE
            if sandbox.host_pid
            else v1.NamespaceMode.POD
            if sandbox.shared_pid
            else v1.NamespaceMode.CONTAINER
        ),
        ipc=v1.NamespaceMode.NODE if sandbox.host_ipc else v1.NamespaceMode.POD,
        userns_options=_userns_status(sandbox),
    )
    return v1.PodSandboxStatus(
        id=sandbox.id,
        metadata=v1.PodSandboxMetadata(
            name=meta.name, uid=meta.uid, namespace=meta.namespace, attempt=meta.attempt
        ),
        state=_SANDBOX_STATE[sandbox.state],
        created_at=sandbox.created_at,
        network=v1.PodSandboxNetworkStatus(
            ip=ips[0] if ips else "", additional_ips=[v1.PodIp(ip=ip) for ip in ips[1:]]
        ),
        linux=v1.LinuxPodSandboxStatus(namespaces=v1.Namespace(options=modes)),
        labels=dict(sandbox.labels),
        annotations=dict(sandbox.annotations),
        runtime_handler=sandbox.runtime_handler,
    )


def _userns_status(sandbox: model.Sandbox) -> v1.UserNamespace | None:
    """The pod's own user namespace with its mappings; None (unset) for the node's."""
    if not sandbox.userns:
        return None
    userns = specs.SandboxConfig.model_validate(sandbox.config).namespace_options.userns_options
    assert userns is not None  # a pinned user namespace was asked for

    def mappings(items: list[specs.IdMapping]) -> list[v1.IdMapping]:
        return [
            v1.IdMapping(host_id=m.host_id, container_id=m.container_id, length=m.length)
            for m in items
        ]

    return v1.UserNamespace(
        mode=v1.NamespaceMode.POD, uids=mappings(userns.uids), gids=mappings(userns.gids)
    )


def container_status(item: model.Container) -> v1.ContainerStatus:
    """A container's status: the one message ContainerStatus, PodSandboxStatus'
    ``containers_statuses`` and the GetContainerEvents replies all carry."""
    return v1.ContainerStatus(
        id=item.id,
        metadata=v1.ContainerMetadata(name=item.metadata.name, attempt=item.metadata.attempt),
        state=_CONTAINER_STATE[item.state],
        created_at=item.created_at,
        started_at=item.started_at,
        finished_at=item.finished_at,
        exit_code=item.exit_code,
        image=v1.ImageSpec(image=item.image, user_specified_image=item.user_specified_image),
        image_ref=item.image_ref,
        reason=item.reason,
        message=item.message,
        labels=dict(item.labels),
        annotations=dict(item.annotations),
        mounts=_status_mounts(item),
        log_path=item.log_path,
        image_id=item.image_id,
        user=v1.ContainerUser(
            linux=v1.LinuxContainerUser(
                uid=item.uid, gid=item.gid, supplemental_groups=list(item.supplemental_groups)
            )
        ),
        stop_signal=status_stop_signal(item.stop_signal),
    )


def container_statuses(items: Iterable[model.Container]) -> list[v1.ContainerStatus]:
    """The statuses of a pod's containers, newest first: kubelet takes the first status of
    a name as that container's current one, and does not sort PodSandboxStatus' list
    before it looks (kuberuntime_manager.go GetPodStatus; FindContainerStatusByName)."""
    return [container_status(c) for c in newest_first(items)]


def newest_first(items: Iterable[model.Container]) -> list[model.Container]:
    """Containers in the order of PodSandboxStatus' ``containers_statuses``."""
    return sorted(items, key=lambda c: c.created_at, reverse=True)


def _status_mounts(item: model.Container) -> list[v1.Mount]:
    """The mounts the container was created with (kubelet finds the host file of its
    termination message among them)."""
    found = []
    for raw in cast(list[Any], item.config.get("mounts") or []):
        mount = specs.MountSpec.model_validate(raw)
        found.append(
            v1.Mount(
                container_path=mount.container_path,
                host_path=mount.host_path,
                readonly=mount.readonly,
                selinux_relabel=mount.selinux_relabel,
                propagation=v1.MountPropagation(int(mount.propagation)),
                recursive_read_only=mount.recursive_read_only,
                image=(
                    v1.ImageSpec(
                        image=mount.image.image,
                        user_specified_image=mount.image.user_specified_image,
                    )
                    if mount.image is not None
                    else None
                ),
                image_sub_path=mount.image_sub_path,
            )
        )
    return found


def status_stop_signal(name: str) -> v1.Signal:
    """The signal that stops the container, as the CRI enum: the container's or its image's
    (``"SIGRTMIN+3"``, ``"TERM"`` and ``"15"`` are spelled in all three ways), SIGTERM when
    neither names one; RUNTIME_DEFAULT only for a name the enum lacks."""
    text = name.strip().upper() or "SIGTERM"
    if text.isdigit():
        try:
            text = signal.Signals(int(text)).name
        except ValueError:
            return v1.Signal.RUNTIME_DEFAULT
    if not text.startswith("SIG"):
        text = "SIG" + text
    text = text.replace("+", "PLUS").replace("-", "MINUS")
    try:
        return v1.Signal[text]
    except KeyError:
        return v1.Signal.RUNTIME_DEFAULT


# ---- requests -> model specs -------------------------------------------------------------

_WRAPPERS = ("Int64Value", "UInt64Value")


def _plain(value: Any) -> Any:
    """A protobuf value as plain Python data with CRI field names (for the spec models)."""
    if isinstance(value, betterproto2.Message):
        if type(value).__name__ in _WRAPPERS:
            return getattr(value, "value")  # noqa: B009 - wrappers all name it value
        fields = dataclasses.fields(cast(Any, value))
        return {f.name: _plain(getattr(value, f.name)) for f in fields}
    if isinstance(value, enum.Enum):
        return int(value.value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _validated(model_type: type[M], data: dict[str, Any], what: str) -> M:
    try:
        return model_type.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidArgument(f"{what}: {problems}") from None


def sandbox_config(msg: v1.PodSandboxConfig | None) -> specs.SandboxConfig:
    """A RunPodSandbox config as the model type."""
    if msg is None or msg.metadata is None:
        raise InvalidArgument("sandbox config: metadata is required")
    return _validated(specs.SandboxConfig, _plain(msg), "sandbox config")


def container_config(msg: v1.ContainerConfig | None) -> specs.ContainerConfig:
    """A CreateContainer config as the model type."""
    if msg is None or msg.metadata is None:
        raise InvalidArgument("container config: metadata is required")
    data = _plain(msg)
    data["stop_signal"] = "" if not msg.stop_signal.value else msg.stop_signal.name
    return _validated(specs.ContainerConfig, data, "container config")


def linux_resources(msg: v1.LinuxContainerResources | None) -> specs.LinuxResources:
    """UpdateContainerResources' linux resources as the model type."""
    if msg is None:
        raise InvalidArgument("linux resources are required")
    return _validated(specs.LinuxResources, _plain(msg), "linux resources")


# ---- stats -------------------------------------------------------------------------------


def _u64(value: int | None) -> v1.UInt64Value | None:
    return None if value is None else v1.UInt64Value(value=max(value, 0))


def _cpu(cpu: stats.CpuUsage | None) -> v1.CpuUsage | None:
    if cpu is None:
        return None
    return v1.CpuUsage(
        timestamp=cpu.timestamp,
        usage_core_nano_seconds=_u64(cpu.usage_core_nano_seconds),
        usage_nano_cores=_u64(cpu.usage_nano_cores),
    )


def _memory(mem: stats.MemoryUsage | None) -> v1.MemoryUsage | None:
    if mem is None:
        return None
    return v1.MemoryUsage(
        timestamp=mem.timestamp,
        working_set_bytes=_u64(mem.working_set_bytes),
        available_bytes=_u64(mem.available_bytes),
        usage_bytes=_u64(mem.usage_bytes),
        rss_bytes=_u64(mem.rss_bytes),
        page_faults=_u64(mem.page_faults),
        major_page_faults=_u64(mem.major_page_faults),
    )


def filesystem_usage(fs: stats.FilesystemUsage | None) -> v1.FilesystemUsage | None:
    """A filesystem usage record (writable layers, image and container filesystems)."""
    if fs is None:
        return None
    return v1.FilesystemUsage(
        timestamp=fs.timestamp,
        fs_id=v1.FilesystemIdentifier(mountpoint=fs.mountpoint),
        used_bytes=_u64(fs.used_bytes),
        inodes_used=_u64(fs.inodes_used),
    )


def _interface(item: stats.NetworkInterfaceUsage) -> v1.NetworkInterfaceUsage:
    return v1.NetworkInterfaceUsage(
        name=item.name,
        rx_bytes=_u64(item.rx_bytes),
        rx_errors=_u64(item.rx_errors),
        tx_bytes=_u64(item.tx_bytes),
        tx_errors=_u64(item.tx_errors),
    )


def container_stats(item: stats.ContainerStats) -> v1.ContainerStats:
    """ContainerStats from the model."""
    attrs = item.attributes
    swap = item.swap
    return v1.ContainerStats(
        attributes=v1.ContainerAttributes(
            id=attrs.id,
            metadata=v1.ContainerMetadata(name=attrs.metadata.name, attempt=attrs.metadata.attempt),
            labels=dict(attrs.labels),
            annotations=dict(attrs.annotations),
        ),
        cpu=_cpu(item.cpu),
        memory=_memory(item.memory),
        writable_layer=filesystem_usage(item.writable_layer),
        swap=None
        if swap is None
        else v1.SwapUsage(
            timestamp=swap.timestamp,
            swap_available_bytes=_u64(swap.swap_available_bytes),
            swap_usage_bytes=_u64(swap.swap_usage_bytes),
        ),
    )


def pod_sandbox_stats(item: stats.PodStats) -> v1.PodSandboxStats:
    """PodSandboxStats from the model."""
    attrs = item.attributes
    meta = attrs.metadata
    network = item.network
    return v1.PodSandboxStats(
        attributes=v1.PodSandboxAttributes(
            id=attrs.id,
            metadata=v1.PodSandboxMetadata(
                name=meta.name, uid=meta.uid, namespace=meta.namespace, attempt=meta.attempt
            ),
            labels=dict(attrs.labels),
            annotations=dict(attrs.annotations),
        ),
        linux=v1.LinuxPodSandboxStats(
            cpu=_cpu(item.cpu),
            memory=_memory(item.memory),
            network=None
            if network is None
            else v1.NetworkUsage(
                timestamp=network.timestamp,
                default_interface=_interface(network.default_interface)
                if network.default_interface
                else None,
                interfaces=[_interface(i) for i in network.interfaces],
            ),
            process=None
            if item.process is None
            else v1.ProcessUsage(
                timestamp=item.process.timestamp, process_count=_u64(item.process.process_count)
            ),
            containers=[container_stats(c) for c in item.containers],
        ),
    )


def container_stats_filter(msg: v1.ContainerStatsFilter | None) -> model.ContainerFilter:
    """ListContainerStats' filter."""
    if msg is None:
        return model.ContainerFilter()
    return model.ContainerFilter(
        id=msg.id, sandbox_id=msg.pod_sandbox_id, label_selector=dict(msg.label_selector)
    )


def pod_stats_filter(msg: v1.PodSandboxStatsFilter | None) -> model.SandboxFilter:
    """ListPodSandboxStats' filter."""
    if msg is None:
        return model.SandboxFilter()
    return model.SandboxFilter(id=msg.id, label_selector=dict(msg.label_selector))


# ---- CRI metrics -------------------------------------------------------------------------

_METRIC_TYPE = {"counter": v1.MetricType.COUNTER, "gauge": v1.MetricType.GAUGE}


def _metric(item: metrics.Metric) -> v1.Metric:
    return v1.Metric(
        name=item.name,
        timestamp=item.timestamp,
        metric_type=_METRIC_TYPE[str(item.metric_type)],
        label_values=list(item.label_values),
        value=v1.UInt64Value(value=item.value),
    )


def metric_descriptor(item: metrics.MetricDescriptor) -> v1.MetricDescriptor:
    """A metric descriptor for ListMetricDescriptors."""
    return v1.MetricDescriptor(name=item.name, help=item.help, label_keys=list(item.label_keys))


def pod_sandbox_metrics(item: metrics.PodMetricsModel) -> v1.PodSandboxMetrics:
    """One pod's metrics for ListPodSandboxMetrics."""
    return v1.PodSandboxMetrics(
        pod_sandbox_id=item.pod_sandbox_id,
        metrics=[_metric(m) for m in item.metrics],
        container_metrics=[
            v1.ContainerMetrics(
                container_id=c.container_id, metrics=[_metric(m) for m in c.metrics]
            )
            for c in item.container_metrics
        ],
    )
