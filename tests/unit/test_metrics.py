"""The metrics registry's text format, crishim's metrics, the CRI metrics and process stats."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crishim.model.container import Container, ContainerFilter, ContainerMetadata, ContainerState
from crishim.model.metrics import MetricType
from crishim.model.sandbox import PodMetadata, Sandbox, SandboxFilter, SandboxState
from crishim.model.stats import (
    ContainerAttributes,
    ContainerStats,
    CpuUsage,
    FilesystemUsage,
    MemoryUsage,
    NetworkInterfaceUsage,
    NetworkUsage,
    PodAttributes,
    PodStats,
    ProcessUsage,
    SwapUsage,
)
from crishim.runtime import process_stats
from crishim.services.metrics import (
    CONTAINER_LABEL_KEYS,
    Counter,
    CrishimMetrics,
    Gauge,
    Histogram,
    HistogramSnapshot,
    MetricsRegistry,
    format_value,
    metric_descriptors,
    pod_metrics,
)
from crishim.services.pull_progress import PullMetrics

# ---- text format ------------------------------------------------------------------------


def _render(*metrics: Counter | Gauge | Histogram) -> str:
    registry = MetricsRegistry()
    for metric in metrics:
        registry.register(metric)
    return registry.render()


def test_counter_with_labels_escapes_values_and_help() -> None:
    counter = Counter("calls_total", 'Calls, \\ and "quotes"\nover lines.', ("method", "code"))
    counter.inc(method="Run", code="OK")
    counter.inc(2, method='B"q\\\n', code="OK")
    counter.inc(0.5, method="Run", code="OK")

    assert _render(counter) == (
        '# HELP calls_total Calls, \\\\ and "quotes"\\nover lines.\n'
        "# TYPE calls_total counter\n"
        'calls_total{method="B\\"q\\\\\\n",code="OK"} 2\n'
        'calls_total{method="Run",code="OK"} 1.5\n'
    )
    # A standard parser reads the escapes back.
    (family,) = text_string_to_metric_families(_render(counter))
    assert {s.labels["method"]: s.value for s in family.samples} == {'B"q\\\n': 2, "Run": 1.5}


def test_unlabelled_metrics_start_at_zero_and_labelled_ones_empty() -> None:
    assert _render(Counter("a_total", "A."), Gauge("b", "B.", ("x",))) == (
        "# HELP a_total A.\n# TYPE a_total counter\na_total 0\n# HELP b B.\n# TYPE b gauge\n"
    )


def test_gauges_set_or_read_from_a_callback() -> None:
    level = Gauge("level", "Level.")
    level.set(2.5)
    values = iter([3, 4])
    read = Gauge("read", "Read.", callback=lambda: next(values))

    assert _render(level, read).splitlines()[2::3] == ["level 2.5", "read 3"]
    assert _render(read).endswith("read 4\n")


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = Histogram("took_seconds", "Took.", ("op",), buckets=(10, 0.5, 1))
    for value in (0.25, 0.5, 5, 50):
        histogram.observe(value, op="pull")
    histogram.observe(2, op="b")

    assert _render(histogram) == (
        "# HELP took_seconds Took.\n"
        "# TYPE took_seconds histogram\n"
        'took_seconds_bucket{op="b",le="0.5"} 0\n'
        'took_seconds_bucket{op="b",le="1"} 0\n'
        'took_seconds_bucket{op="b",le="10"} 1\n'
        'took_seconds_bucket{op="b",le="+Inf"} 1\n'
        'took_seconds_sum{op="b"} 2\n'
        'took_seconds_count{op="b"} 1\n'
        'took_seconds_bucket{op="pull",le="0.5"} 2\n'
        'took_seconds_bucket{op="pull",le="1"} 2\n'
        'took_seconds_bucket{op="pull",le="10"} 3\n'
        'took_seconds_bucket{op="pull",le="+Inf"} 4\n'
        'took_seconds_sum{op="pull"} 55.75\n'
        'took_seconds_count{op="pull"} 4\n'
    )


def test_histogram_from_a_callback_renders_its_snapshot() -> None:
    snapshot = HistogramSnapshot(buckets={5.0: 2, 1.0: 1}, sum=7.5, count=3)
    histogram = Histogram("h_seconds", "H.", callback=lambda: snapshot)

    assert _render(histogram).splitlines()[2:] == [
        'h_seconds_bucket{le="1"} 1',
        'h_seconds_bucket{le="5"} 2',
        'h_seconds_bucket{le="+Inf"} 3',
        "h_seconds_sum 7.5",
        "h_seconds_count 3",
    ]


def test_a_failing_callback_leaves_its_family_empty() -> None:
    def broken() -> float:
        raise OSError("gone")

    assert _render(Gauge("g", "G.", callback=broken), Gauge("h", "H.")) == (
        "# HELP g G.\n# TYPE g gauge\n# HELP h H.\n# TYPE h gauge\nh 0\n"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3.0, "3"),
        (0.001, "0.001"),
        (1.5e-7, "1.5e-07"),
        (2**60, "1.152921504606847e+18"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid metric name"):
        Counter("1bad", "x")
    with pytest.raises(ValueError, match="invalid label name"):
        Counter("ok", "x", ("a-b",))
    with pytest.raises(ValueError, match="reserved"):
        Histogram("h", "x", ("le",))
    with pytest.raises(ValueError, match="distinct"):
        Histogram("h", "x", buckets=(1, 1))
    with pytest.raises(ValueError, match="no labels"):
        Gauge("g", "x", ("a",), callback=lambda: 1)
    counter = Counter("c", "x", ("a",))
    with pytest.raises(ValueError, match="expected"):
        counter.inc(b="1")
    with pytest.raises(ValueError, match="cannot decrease"):
        counter.inc(-1, a="1")
    with pytest.raises(TypeError, match="callback"):
        Counter("d", "x", callback=lambda: 1).inc()
    registry = MetricsRegistry()
    registry.register(counter)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Gauge("c", "y"))


# ---- crishim's metrics --------------------------------------------------------------------


@dataclass
class _Sandboxes:
    """Sandbox records answering ``matching`` as the sandbox service does."""

    records: list[Sandbox]

    def matching(self, criteria: SandboxFilter) -> list[Sandbox]:
        return [s for s in self.records if criteria.matches(s)]


@dataclass
class _Containers:
    """Container records answering ``matching`` as the container service does."""

    records: list[Container]

    def matching(self, criteria: ContainerFilter) -> list[Container]:
        return [c for c in self.records if criteria.matches(c)]


def _sandbox(sid: str, state: SandboxState) -> Sandbox:
    return Sandbox(
        id=sid,
        metadata=PodMetadata(name=f"pod-{sid}", uid=f"uid-{sid}", namespace="default"),
        state=state,
        created_at=1,
    )


def _container(cid: str, state: ContainerState) -> Container:
    return Container(
        id=cid,
        sandbox_id="s1",
        metadata=ContainerMetadata(name=f"c-{cid}"),
        image="sha256:abc",
        state=state,
        created_at=1,
    )


def crishim_metrics(pulls: PullMetrics) -> CrishimMetrics:
    """CrishimMetrics over two ready pods of three and one running container of two."""
    sandboxes = _Sandboxes(
        [
            _sandbox("s1", SandboxState.READY),
            _sandbox("s2", SandboxState.READY),
            _sandbox("s3", SandboxState.NOTREADY),
        ]
    )
    containers = _Containers(
        [_container("c1", ContainerState.RUNNING), _container("c2", ContainerState.EXITED)]
    )
    return CrishimMetrics(pulls=pulls, sandboxes=sandboxes, containers=containers)


def test_crishim_metrics_render_every_family() -> None:
    pulls = PullMetrics()
    pulls.bytes_total = 1000
    pulls.observe(0.7, ok=True)
    pulls.observe(45, ok=False)
    metrics = crishim_metrics(pulls)
    metrics.observe_rpc("RunPodSandbox", "OK", 0.2)
    metrics.observe_rpc("RunPodSandbox", "NOT_FOUND", 0.002)

    families = {f.name: f for f in text_string_to_metric_families(metrics.render())}
    assert sorted(families) == [
        "crishim_conmon_processes",
        "crishim_containers_running",
        "crishim_cri_request_duration_seconds",
        "crishim_cri_requests",
        "crishim_image_pull_bytes",
        "crishim_image_pull_duration_seconds",
        "crishim_image_pull_failures",
        "crishim_image_pulls",
        "crishim_pods_running",
        "process_cpu_seconds",
        "process_open_fds",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
    ]

    def value(family: str, name: str, **labels: str) -> float:
        samples = families[family].samples
        return next(s.value for s in samples if s.name == name and s.labels == labels)

    requests = "crishim_cri_requests_total"
    assert value("crishim_cri_requests", requests, method="RunPodSandbox", code="OK") == 1
    durations = "crishim_cri_request_duration_seconds"
    bucket = f"{durations}_bucket"
    assert value(durations, bucket, method="RunPodSandbox", le="0.0025") == 1
    assert value(durations, bucket, method="RunPodSandbox", le="0.25") == 2
    assert value(durations, f"{durations}_count", method="RunPodSandbox") == 2
    assert value("crishim_image_pull_bytes", "crishim_image_pull_bytes_total") == 1000
    assert value("crishim_image_pulls", "crishim_image_pulls_total") == 2
    assert value("crishim_image_pull_failures", "crishim_image_pull_failures_total") == 1
    pull = "crishim_image_pull_duration_seconds"
    assert value(pull, f"{pull}_bucket", le="1") == 1
    assert value(pull, f"{pull}_bucket", le="60") == 2
    assert value(pull, f"{pull}_bucket", le="+Inf") == 2
    assert value(pull, f"{pull}_sum") == pytest.approx(45.7)
    assert value("crishim_pods_running", "crishim_pods_running") == 2
    assert value("crishim_containers_running", "crishim_containers_running") == 1
    assert value("crishim_conmon_processes", "crishim_conmon_processes") >= 0
    assert value("process_open_fds", "process_open_fds") > 0
    assert value("process_start_time_seconds", "process_start_time_seconds") <= time.time()


# ---- CRI metrics --------------------------------------------------------------------------

NS = 10**9


def _pod_stats() -> PodStats:
    pod = PodMetadata(name="web", uid="u-1", namespace="prod", attempt=1)
    full = ContainerStats(
        attributes=ContainerAttributes(id="c-full", metadata=ContainerMetadata(name="app")),
        cpu=CpuUsage(timestamp=5, usage_core_nano_seconds=3 * NS + 999),
        memory=MemoryUsage(
            timestamp=6,
            working_set_bytes=100,
            available_bytes=900,
            usage_bytes=150,
            rss_bytes=80,
            page_faults=7,
            major_page_faults=2,
        ),
        swap=SwapUsage(timestamp=6, swap_usage_bytes=10),
        writable_layer=FilesystemUsage(timestamp=7, mountpoint="/var/lib/crishim", used_bytes=4096),
        process=ProcessUsage(timestamp=8, process_count=3),
    )
    exited = ContainerStats(
        attributes=ContainerAttributes(
            id="c-done", metadata=ContainerMetadata(name="init", attempt=2)
        ),
    )
    interfaces = [
        NetworkInterfaceUsage(name="eth0", rx_bytes=1, tx_bytes=2, rx_errors=0, tx_errors=0),
        NetworkInterfaceUsage(name="net1", rx_bytes=3, tx_bytes=4),
    ]
    return PodStats(
        attributes=PodAttributes(id="p-1", metadata=pod),
        cpu=CpuUsage(timestamp=1, usage_core_nano_seconds=10 * NS),
        memory=MemoryUsage(timestamp=2, usage_bytes=500, working_set_bytes=400),
        network=NetworkUsage(timestamp=3, default_interface=interfaces[0], interfaces=interfaces),
        process=ProcessUsage(timestamp=4, process_count=5),
        containers=[full, exited],
    )


def test_descriptors_are_unique_and_cadvisor_named() -> None:
    descriptors = metric_descriptors()
    names = [d.name for d in descriptors]
    assert len(names) == len(set(names))
    assert all(n.startswith("container_") for n in names)
    for descriptor in descriptors:
        assert descriptor.label_keys[: len(CONTAINER_LABEL_KEYS)] == list(CONTAINER_LABEL_KEYS)
        assert len(set(descriptor.label_keys)) == len(descriptor.label_keys)
    network = {d.name: d.label_keys[-1] for d in descriptors if "network" in d.name}
    assert network == dict.fromkeys(
        [
            "container_network_receive_bytes_total",
            "container_network_transmit_bytes_total",
            "container_network_receive_errors_total",
            "container_network_transmit_errors_total",
        ],
        "interface",
    )


def test_every_pod_metric_is_described_and_every_series_unique() -> None:
    result = pod_metrics(_pod_stats(), images={"c-full": "docker.io/library/nginx:1.27"})
    descriptors = {d.name: d for d in metric_descriptors()}
    everything = [m for c in result.container_metrics for m in c.metrics] + result.metrics

    for metric in everything:
        assert len(metric.label_values) == len(descriptors[metric.name].label_keys)
        expected = MetricType.COUNTER if metric.name.endswith("_total") else MetricType.GAUGE
        assert metric.metric_type is expected
    series = [(m.name, tuple(m.label_values)) for m in everything]
    assert len(series) == len(set(series))
    # Every descriptor is used by this pod, which has every kind of reading.
    assert {m.name for m in everything} == set(descriptors)


def test_pod_metrics_values_and_labels() -> None:
    result = pod_metrics(_pod_stats(), images={"c-full": "docker.io/library/nginx:1.27"})
    assert result.pod_sandbox_id == "p-1"
    assert [c.container_id for c in result.container_metrics] == ["c-full", "c-done"]
    full, exited = result.container_metrics
    assert exited.metrics == []  # nothing measured is reported, not zeros

    by_name = {(m.name, *m.label_values[6:]): m for m in full.metrics}
    cpu = by_name[("container_cpu_usage_seconds_total",)]
    assert (cpu.value, cpu.timestamp) == (3, 5)
    assert cpu.label_values == [
        "app",
        "c-full",
        "docker.io/library/nginx:1.27",
        "k8s_app_web_prod_u-1_0",
        "prod",
        "web",
    ]
    assert by_name[("container_memory_working_set_bytes",)].value == 100
    assert by_name[("container_memory_usage_bytes",)].value == 150
    assert by_name[("container_memory_rss",)].value == 80
    assert by_name[("container_memory_swap",)].value == 10
    assert by_name[("container_memory_failures_total", "pgfault", "container")].value == 7
    assert by_name[("container_memory_failures_total", "pgmajfault", "container")].value == 2
    assert by_name[("container_processes",)].value == 3
    fs = by_name[("container_fs_usage_bytes", "/var/lib/crishim")]
    assert (fs.value, fs.timestamp) == (4096, 7)

    pod = {(m.name, *m.label_values[6:]): m for m in result.metrics}
    assert pod[("container_cpu_usage_seconds_total",)].label_values == [
        "",
        "p-1",
        "",
        "k8s_POD_web_prod_u-1_1",
        "prod",
        "web",
    ]
    assert pod[("container_cpu_usage_seconds_total",)].value == 10
    assert pod[("container_memory_usage_bytes",)].value == 500
    assert pod[("container_processes",)].value == 5
    assert pod[("container_network_receive_bytes_total", "net1")].value == 3
    assert pod[("container_network_transmit_bytes_total", "eth0")].value == 2
    assert ("container_network_receive_errors_total", "net1") not in pod
    assert pod[("container_network_receive_errors_total", "eth0")].timestamp == 3


def test_host_network_pod_has_no_network_metrics() -> None:
    stats = _pod_stats().model_copy(update={"network": None, "containers": []})
    result = pod_metrics(stats)
    assert result.metrics
    assert not any("network" in m.name for m in result.metrics)


# ---- process stats ------------------------------------------------------------------------


def test_process_stats_of_this_process_are_sane() -> None:
    assert process_stats.resident_memory_bytes() > 1024 * 1024
    before = process_stats.open_fds()
    with open(os.devnull) as _:
        assert process_stats.open_fds() == before + 1
    first = process_stats.cpu_seconds()
    sum(i * i for i in range(200_000))
    assert process_stats.cpu_seconds() >= first > 0
    started = process_stats.start_time_seconds()
    assert time.time() - 24 * 3600 * 365 < started <= time.time()


def test_count_processes_matches_comm() -> None:
    own = Path("/proc/self/comm").read_text().strip()
    assert process_stats.count_processes(own) >= 1
    assert process_stats.count_processes("no-such-process-name") == 0


def _fake_process(proc: Path, pid: int, comm: str, stat: str = "") -> None:
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    (directory / "comm").write_text(f"{comm[:15]}\n")
    if stat:
        (directory / "stat").write_text(stat)


def test_count_processes_in_a_fake_proc(tmp_path: Path) -> None:
    _fake_process(tmp_path, 10, "conmon")
    _fake_process(tmp_path, 11, "conmon")
    _fake_process(tmp_path, 12, "runc")
    _fake_process(tmp_path, 13, "a-very-long-process-name")
    (tmp_path / "self").mkdir()
    (tmp_path / "14").mkdir()  # exited while scanned: no comm any more

    assert process_stats.count_processes("conmon", tmp_path) == 2
    assert process_stats.count_processes("a-very-long-process-name", tmp_path) == 1


def test_stat_with_parentheses_in_the_command_name(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    # utime 3 s, stime 1 s, started 10 s after boot.
    fields = ["S", *["0"] * 10, str(3 * ticks), str(ticks), *["0"] * 6, str(10 * ticks), "0"]
    _fake_process(tmp_path, 42, "x", f"42 (we (ird) ) name) {' '.join(fields)}\n")
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime 1700000000\nprocesses 9\n")

    assert process_stats.cpu_seconds(tmp_path, "42") == 4
    assert process_stats.start_time_seconds(tmp_path, "42") == 1_700_000_010
