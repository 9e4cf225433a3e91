"""Pod and container metrics as the CRI metrics calls report them (cAdvisor-compatible).

ListMetricDescriptors names each metric with its help text and label keys;
ListPodSandboxMetrics answers samples whose label values follow those keys in order. Values
are unsigned integers (``UInt64Value`` on the wire), timestamps nanoseconds since the epoch.
Pure types: services compute them from the stats models, the api layer converts them.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ContainerMetricsModel",
    "Metric",
    "MetricDescriptor",
    "MetricType",
    "PodMetricsModel",
]

_FROZEN = ConfigDict(frozen=True)


class MetricType(StrEnum):
    """Prometheus kind of a metric: a counter only ever rises, a gauge may fall."""

    COUNTER = "counter"
    GAUGE = "gauge"


class MetricDescriptor(BaseModel):
    """A metric's name as exported, its one-line help, and its label keys in order."""

    model_config = _FROZEN

    name: str
    help: str
    label_keys: list[str] = Field(default_factory=list)


class Metric(BaseModel):
    """One sample of a described metric."""

    model_config = _FROZEN

    name: str
    timestamp: int = Field(description="nanoseconds since the epoch")
    metric_type: MetricType
    label_values: list[str] = Field(
        default_factory=list, description="ordered like the descriptor's label_keys"
    )
    value: int = Field(ge=0)


class ContainerMetricsModel(BaseModel):
    """The samples of one container."""

    model_config = _FROZEN

    container_id: str
    metrics: list[Metric] = Field(default_factory=list)


class PodMetricsModel(BaseModel):
    """The samples of one pod sandbox: its own (pod cgroup, network) and its containers'."""

    model_config = _FROZEN

    pod_sandbox_id: str
    metrics: list[Metric] = Field(default_factory=list)
    container_metrics: list[ContainerMetricsModel] = Field(default_factory=list)
