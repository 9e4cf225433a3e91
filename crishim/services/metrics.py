"""crishim's metrics: a small registry rendered for Prometheus, and the CRI metrics calls.

Two audiences:

- ``/metrics`` (Prometheus text exposition format 0.0.4): ``CrishimMetrics`` defines what
  crishim reports about itself (CRI calls, image pulls, pods, containers, conmon monitors and
  the standard ``process_*`` family) on the small registry below. Counters, gauges and
  histograms are changed on the event loop and rendered there, so nothing here locks.
- ListMetricDescriptors / ListPodSandboxMetrics: ``metric_descriptors`` and ``pod_metrics``
  turn the stats models into cAdvisor-named samples, which kubelet's CRI stats provider
  re-exports on its ``/metrics/cadvisor`` endpoint in place of cAdvisor's own.
"""

from __future__ import annotations

import logging
import math
import re
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar

from crishim.model.container import Container, ContainerFilter, ContainerState
from crishim.model.metrics import (
    ContainerMetricsModel,
    Metric,
    MetricDescriptor,
    MetricType,
    PodMetricsModel,
)
from crishim.model.sandbox import PodMetadata, Sandbox, SandboxFilter, SandboxState
from crishim.model.stats import (
    ContainerStats,
    CpuUsage,
    FilesystemUsage,
    MemoryUsage,
    NetworkUsage,
    PodStats,
    ProcessUsage,
    SwapUsage,
)
from crishim.runtime.process_stats import (
    count_processes,
    cpu_seconds,
    open_fds,
    resident_memory_bytes,
    start_time_seconds,
)

__all__ = [
    "CONTAINER_LABEL_KEYS",
    "DEFAULT_BUCKETS",
    "RPC_BUCKETS",
    "ContainerLister",
    "Counter",
    "CrishimMetrics",
    "Gauge",
    "Histogram",
    "HistogramSnapshot",
    "MetricsRegistry",
    "PullCounters",
    "SandboxLister",
    "metric_descriptors",
    "pod_metrics",
]

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

LabelValues = tuple[str, ...]
LabelPairs = tuple[tuple[str, str], ...]

# ---- registry -----------------------------------------------------------------------------


def format_value(value: float) -> str:
    """A sample value as the text format writes it: integers plainly, +Inf, -Inf, NaN."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    """Escape a label value: backslash, double quote and line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """Escape HELP text: backslash and line feed."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


@dataclass(frozen=True)
class _Sample:
    """One line of a metric family: the name suffix (_bucket, _sum...), labels and value."""

    suffix: str
    labels: LabelPairs
    value: float


@dataclass(frozen=True)
class HistogramSnapshot:
    """A histogram's state: observations at or below each upper bound (cumulative), the sum
    of all observations and their count (the +Inf bucket)."""

    buckets: Mapping[float, int]
    sum: float
    count: int


class _Metric(ABC):
    """A metric family: its name, help, label names, and the samples it renders."""

    kind: ClassVar[str]
    reserved_labels: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labels:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"{name}: invalid label name {label!r}")
            if label in self.reserved_labels:
                raise ValueError(f"{name}: label name {label!r} is reserved")
        if len(set(labels)) != len(labels):
            raise ValueError(f"{name}: duplicate label names in {list(labels)}")
        self.name = name
        self.help = help
        self.label_names: LabelValues = tuple(labels)

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        """The label values of a sample, in the metric's label order; all must be given."""
        if labels.keys() != set(self.label_names):
            raise ValueError(
                f"{self.name}: labels {sorted(labels)} given, {sorted(self.label_names)} expected"
            )
        return tuple(labels[name] for name in self.label_names)

    def _pairs(self, key: LabelValues) -> LabelPairs:
        return tuple(zip(self.label_names, key, strict=True))

    @abstractmethod
    def samples(self) -> list[_Sample]:
        """The metric's current samples."""

    def render(self) -> str:
        """The family in the text format: HELP and TYPE lines, then one line per sample.

        A callback that fails leaves the family without samples (and is logged) rather
        than failing the whole scrape.
        """
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        try:
            samples = self.samples()
        except Exception:
            log.warning("metric %s could not be collected", self.name, exc_info=True)
            samples = []
        for sample in samples:
            labels = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sample.labels)
            braces = f"{{{labels}}}" if labels else ""
            lines.append(f"{self.name}{sample.suffix}{braces} {format_value(sample.value)}")
        return "\n".join(lines) + "\n"


class _Value(_Metric):
    """A single value per label set, changed by the subclass or read from a callback."""

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        *,
        callback: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name, help, labels)
        if callback is not None and labels:
            raise ValueError(f"{name}: a callback metric has no labels")
        self._callback = callback
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def _writable(self) -> None:
        if self._callback is not None:
            raise TypeError(f"{self.name} is read from a callback")

    def samples(self) -> list[_Sample]:
        """One sample per label set seen, ordered by label values."""
        if self._callback is not None:
            return [_Sample("", (), self._callback())]
        return [_Sample("", self._pairs(k), v) for k, v in sorted(self._values.items())]


class Counter(_Value):
    """A value that only rises: incremented per label set, or read from a callback."""

    kind = "counter"

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        """Add ``amount`` (not negative) to the counter of the given label values."""
        self._writable()
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease ({amount})")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Value):
    """A value that may rise and fall: set per label set, or read from a callback."""

    kind = "gauge"

    def set(self, value: float, /, **labels: str) -> None:
        """Set the gauge of the given label values."""
        self._writable()
        self._values[self._key(labels)] = value


@dataclass
class _Series:
    """One label set of an observed histogram: per-bucket (not cumulative) counts, +Inf last."""

    counts: list[int]
    sum: float = 0.0


class Histogram(_Metric):
    """Observations counted into buckets by upper bound, with their sum and count.

    Either observed here (``observe``, per label set, into ``buckets``) or read from a
    callback returning a ``HistogramSnapshot`` whose bounds are rendered as they are.
    """

    kind = "histogram"
    reserved_labels = frozenset({"le"})

    def __init__(
        self,
        name: str,
        help: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        callback: Callable[[], HistogramSnapshot] | None = None,
    ) -> None:
        super().__init__(name, help, labels)
        if callback is not None and labels:
            raise ValueError(f"{name}: a callback metric has no labels")
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct and not empty: {list(buckets)}")
        self._bounds = tuple(bounds)
        self._callback = callback
        self._series: dict[LabelValues, _Series] = {} if labels else {(): self._new_series()}

    def _new_series(self) -> _Series:
        return _Series(counts=[0] * (len(self._bounds) + 1))

    def observe(self, value: float, /, **labels: str) -> None:
        """Count one observation of ``value`` for the given label values."""
        if self._callback is not None:
            raise TypeError(f"{self.name} is read from a callback")
        series = self._series.setdefault(self._key(labels), self._new_series())
        series.counts[bisect_left(self._bounds, value)] += 1
        series.sum += value

    def _snapshots(self) -> list[tuple[LabelValues, HistogramSnapshot]]:
        if self._callback is not None:
            return [((), self._callback())]
        result = []
        for key, series in sorted(self._series.items()):
            cumulative = list(accumulate(series.counts))
            buckets = dict(zip(self._bounds, cumulative, strict=False))
            result.append((key, HistogramSnapshot(buckets, series.sum, cumulative[-1])))
        return result

    def samples(self) -> list[_Sample]:
        """Per label set: the buckets in rising order ending with +Inf, then _sum and _count."""
        samples = []
        for key, snapshot in self._snapshots():
            pairs = self._pairs(key)
            for bound, count in sorted(snapshot.buckets.items()):
                samples.append(_Sample("_bucket", (*pairs, ("le", format_value(bound))), count))
            samples.append(_Sample("_bucket", (*pairs, ("le", "+Inf")), snapshot.count))
            samples.append(_Sample("_sum", pairs, snapshot.sum))
            samples.append(_Sample("_count", pairs, snapshot.count))
        return samples


M = TypeVar("M", bound=_Metric)


class MetricsRegistry:
    """Metric families by name, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: M) -> M:
        """Add ``metric`` (its name must be new) and return it."""
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        """Every family in the Prometheus text exposition format 0.0.4."""
        return "".join(metric.render() for metric in self._metrics.values())


# ---- crishim's own metrics ----------------------------------------------------------------


class PullCounters(Protocol):
    """The image service's pull counters (``ImageService.metrics``)."""

    @property
    def bytes_total(self) -> int: ...

    @property
    def pulls_total(self) -> int: ...

    @property
    def failures_total(self) -> int: ...

    @property
    def duration_sum(self) -> float: ...

    @property
    def duration_buckets(self) -> Mapping[float, int]:
        """Upper bound in seconds -> pulls that took at most that long (cumulative)."""
        ...


class SandboxLister(Protocol):
    """The pod sandbox records (the sandbox service)."""

    def matching(self, criteria: SandboxFilter) -> list[Sandbox]:
        """Sandboxes passing ``criteria``."""
        ...


class ContainerLister(Protocol):
    """The container records (the container service)."""

    def matching(self, criteria: ContainerFilter) -> list[Container]:
        """Containers passing ``criteria``."""
        ...


class CrishimMetrics:
    """The metrics crishim serves on ``/metrics``; gauges are read at each scrape."""

    def __init__(
        self,
        *,
        pulls: PullCounters,
        sandboxes: SandboxLister,
        containers: ContainerLister,
        monitor: str = "conmon",
        proc: Path = Path("/proc"),
    ) -> None:
        registry = self.registry = MetricsRegistry()
        self._requests = registry.register(
            Counter(
                "crishim_cri_requests_total",
                "CRI calls handled, by method and gRPC status code.",
                ("method", "code"),
            )
        )
        self._durations = registry.register(
            Histogram(
                "crishim_cri_request_duration_seconds",
                "Time taken to handle CRI calls, by method.",
                ("method",),
                buckets=RPC_BUCKETS,
            )
        )
        registry.register(
            Counter(
                "crishim_image_pull_bytes_total",
                "Bytes of image layers downloaded.",
                callback=lambda: pulls.bytes_total,
            )
        )
        registry.register(
            Counter(
                "crishim_image_pulls_total",
                "Image pulls finished, successful or not.",
                callback=lambda: pulls.pulls_total,
            )
        )
        registry.register(
            Counter(
                "crishim_image_pull_failures_total",
                "Image pulls that failed.",
                callback=lambda: pulls.failures_total,
            )
        )
        registry.register(
            Histogram(
                "crishim_image_pull_duration_seconds",
                "Time taken by image pulls, successful or not.",
                callback=lambda: HistogramSnapshot(
                    pulls.duration_buckets, pulls.duration_sum, pulls.pulls_total
                ),
            )
        )
        registry.register(
            Gauge(
                "crishim_pods_running",
                "Pod sandboxes in the ready state.",
                callback=lambda: len(sandboxes.matching(SandboxFilter(state=SandboxState.READY))),
            )
        )
        registry.register(
            Gauge(
                "crishim_containers_running",
                "Containers in the running state.",
                callback=lambda: len(
                    containers.matching(ContainerFilter(state=ContainerState.RUNNING))
                ),
            )
        )
        registry.register(
            Gauge(
                "crishim_conmon_processes",
                "Container monitor (conmon) processes running on the host.",
                callback=lambda: count_processes(monitor, proc),
            )
        )
        registry.register(
            Gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                callback=lambda: resident_memory_bytes(proc),
            )
        )
        registry.register(
            Gauge(
                "process_open_fds",
                "Number of open file descriptors.",
                callback=lambda: open_fds(proc),
            )
        )
        registry.register(
            Counter(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                callback=lambda: cpu_seconds(proc),
            )
        )
        registry.register(
            Gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            )
        ).set(start_time_seconds(proc))

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Count one finished CRI call: its method (RunPodSandbox), status name (OK), time."""
        self._requests.inc(method=method, code=code)
        self._durations.observe(seconds, method=method)

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format 0.0.4."""
        return self.registry.render()


# ---- CRI metrics (ListMetricDescriptors, ListPodSandboxMetrics) ---------------------------

# cAdvisor's labels of a container's series; pod-level series have an empty "container".
CONTAINER_LABEL_KEYS = ("container", "id", "image", "name", "namespace", "pod")


@dataclass(frozen=True)
class _Spec:
    """A CRI metric: name, help, kind, and its label keys beyond the container ones."""

    name: str
    help: str
    kind: MetricType
    extra_keys: tuple[str, ...] = ()


_COUNTER, _GAUGE = MetricType.COUNTER, MetricType.GAUGE
_SPECS = (
    _Spec("container_cpu_usage_seconds_total", "Cumulative CPU time used, in seconds.", _COUNTER),
    _Spec(
        "container_memory_usage_bytes",
        "Memory in use in bytes, page cache included.",
        _GAUGE,
    ),
    _Spec(
        "container_memory_working_set_bytes",
        "Working set in bytes: usage minus inactive file pages.",
        _GAUGE,
    ),
    _Spec("container_memory_rss", "Anonymous and swap cache memory in bytes.", _GAUGE),
    _Spec("container_memory_swap", "Swap in use in bytes.", _GAUGE),
    _Spec(
        "container_memory_failures_total",
        "Cumulative page faults, by type (pgfault, pgmajfault) and scope.",
        _COUNTER,
        ("failure_type", "scope"),
    ),
    _Spec("container_processes", "Processes (tasks) running.", _GAUGE),
    _Spec(
        "container_fs_usage_bytes",
        "Bytes written to the writable layer; device is the mount point holding it.",
        _GAUGE,
        ("device",),
    ),
    _Spec(
        "container_network_receive_bytes_total",
        "Cumulative bytes received.",
        _COUNTER,
        ("interface",),
    ),
    _Spec(
        "container_network_transmit_bytes_total",
        "Cumulative bytes transmitted.",
        _COUNTER,
        ("interface",),
    ),
    _Spec(
        "container_network_receive_errors_total",
        "Cumulative errors while receiving.",
        _COUNTER,
        ("interface",),
    ),
    _Spec(
        "container_network_transmit_errors_total",
        "Cumulative errors while transmitting.",
        _COUNTER,
        ("interface",),
    ),
)
_SPEC_BY_NAME = {spec.name: spec for spec in _SPECS}


def metric_descriptors() -> list[MetricDescriptor]:
    """Every metric ``pod_metrics`` may report, with its label keys in order."""
    return [
        MetricDescriptor(
            name=spec.name, help=spec.help, label_keys=[*CONTAINER_LABEL_KEYS, *spec.extra_keys]
        )
        for spec in _SPECS
    ]


def pod_metrics(stats: PodStats, images: Mapping[str, str] | None = None) -> PodMetricsModel:
    """A pod's samples: its cgroup and network (container ""), then each container's.

    ``images`` maps container ids to the image they run, for the ``image`` label (empty
    when absent). ``name`` is the kubelet-style ``k8s_<container>_<pod>_<namespace>_<uid>_
    <attempt>`` name (``POD`` for the sandbox). CPU time is whole seconds: CRI values are
    unsigned integers. Unknown values are left out, not reported as zero.
    """
    images = images or {}
    pod = stats.attributes.metadata
    builder = _Builder(
        pod,
        container="",
        object_id=stats.attributes.id,
        image="",
        name=_kube_name("POD", pod, pod.attempt),
    )
    builder.cpu(stats.cpu)
    builder.memory(stats.memory)
    builder.processes(stats.process)
    builder.network(stats.network)
    return PodMetricsModel(
        pod_sandbox_id=stats.attributes.id,
        metrics=builder.metrics,
        container_metrics=[_container_metrics(c, pod, images) for c in stats.containers],
    )


def _container_metrics(
    stats: ContainerStats, pod: PodMetadata, images: Mapping[str, str]
) -> ContainerMetricsModel:
    attributes = stats.attributes
    name = attributes.metadata.name
    builder = _Builder(
        pod,
        container=name,
        object_id=attributes.id,
        image=images.get(attributes.id, ""),
        name=_kube_name(name, pod, attributes.metadata.attempt),
    )
    builder.cpu(stats.cpu)
    builder.memory(stats.memory)
    builder.swap(stats.swap)
    builder.processes(stats.process)
    builder.filesystem(stats.writable_layer)
    return ContainerMetricsModel(container_id=attributes.id, metrics=builder.metrics)


def _kube_name(container: str, pod: PodMetadata, attempt: int) -> str:
    return f"k8s_{container}_{pod.name}_{pod.namespace}_{pod.uid}_{attempt}"


class _Builder:
    """Collects the samples of one pod or container, whose base label values are fixed."""

    def __init__(
        self, pod: PodMetadata, *, container: str, object_id: str, image: str, name: str
    ) -> None:
        # In the order of CONTAINER_LABEL_KEYS.
        self._base = [container, object_id, image, name, pod.namespace, pod.name]
        self.metrics: list[Metric] = []

    def _add(self, name: str, timestamp: int, value: int | None, *extra: str) -> None:
        if value is None:
            return
        spec = _SPEC_BY_NAME[name]
        assert len(extra) == len(spec.extra_keys), name
        self.metrics.append(
            Metric(
                name=name,
                timestamp=timestamp,
                metric_type=spec.kind,
                label_values=[*self._base, *extra],
                value=value,
            )
        )

    def cpu(self, cpu: CpuUsage | None) -> None:
        if cpu is None or cpu.usage_core_nano_seconds is None:
            return
        seconds = cpu.usage_core_nano_seconds // 1_000_000_000
        self._add("container_cpu_usage_seconds_total", cpu.timestamp, seconds)

    def memory(self, memory: MemoryUsage | None) -> None:
        if memory is None:
            return
        at = memory.timestamp
        self._add("container_memory_usage_bytes", at, memory.usage_bytes)
        self._add("container_memory_working_set_bytes", at, memory.working_set_bytes)
        self._add("container_memory_rss", at, memory.rss_bytes)
        failures = "container_memory_failures_total"
        self._add(failures, at, memory.page_faults, "pgfault", "container")
        self._add(failures, at, memory.major_page_faults, "pgmajfault", "container")

    def swap(self, swap: SwapUsage | None) -> None:
        if swap is not None:
            self._add("container_memory_swap", swap.timestamp, swap.swap_usage_bytes)

    def processes(self, process: ProcessUsage | None) -> None:
        if process is not None:
            self._add("container_processes", process.timestamp, process.process_count)

    def filesystem(self, layer: FilesystemUsage | None) -> None:
        if layer is not None:
            self._add(
                "container_fs_usage_bytes", layer.timestamp, layer.used_bytes, layer.mountpoint
            )

    def network(self, network: NetworkUsage | None) -> None:
        if network is None:
            return
        at = network.timestamp
        for interface in network.interfaces:
            name = interface.name
            self._add("container_network_receive_bytes_total", at, interface.rx_bytes, name)
            self._add("container_network_transmit_bytes_total", at, interface.tx_bytes, name)
            self._add("container_network_receive_errors_total", at, interface.rx_errors, name)
            self._add("container_network_transmit_errors_total", at, interface.tx_errors, name)
