"""Resource usage of containers and pods, as the CRI stats calls report it.

Every counter is optional: None means unknown (not readable on this host, the container not
running) and maps to an unset ``UInt64Value`` at the gRPC edge. Timestamps are nanoseconds
since the epoch. Pure types: the readers live in runtime and network, the sampling in
services.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from crishim.model.container import ContainerMetadata
from crishim.model.sandbox import PodMetadata

__all__ = [
    "ContainerAttributes",
    "ContainerStats",
    "CpuUsage",
    "FilesystemUsage",
    "MemoryUsage",
    "NetworkInterfaceUsage",
    "NetworkUsage",
    "PodAttributes",
    "PodStats",
    "ProcessUsage",
    "SwapUsage",
]

_FROZEN = ConfigDict(frozen=True)


class CpuUsage(BaseModel):
    """Cumulative CPU time, and the rate since the previous sample of the same object."""

    model_config = _FROZEN

    timestamp: int
    usage_core_nano_seconds: int | None = None
    usage_nano_cores: int | None = Field(
        default=None, description="None on the first sample (no previous one to compare with)"
    )


class MemoryUsage(BaseModel):
    """Memory use; working set is usage minus inactive file pages (kubelet's eviction input)."""

    model_config = _FROZEN

    timestamp: int
    working_set_bytes: int | None = None
    available_bytes: int | None = Field(default=None, description="limit - working set")
    usage_bytes: int | None = None
    rss_bytes: int | None = None
    page_faults: int | None = None
    major_page_faults: int | None = None


class SwapUsage(BaseModel):
    """Swap use, and what is left of the swap limit when there is one."""

    model_config = _FROZEN

    timestamp: int
    swap_available_bytes: int | None = None
    swap_usage_bytes: int | None = None


class FilesystemUsage(BaseModel):
    """Space and inodes used on the file system mounted at ``mountpoint``."""

    model_config = _FROZEN

    timestamp: int
    mountpoint: str
    used_bytes: int | None = None
    inodes_used: int | None = None


class ProcessUsage(BaseModel):
    """How many processes (tasks) run."""

    model_config = _FROZEN

    timestamp: int
    process_count: int | None = None


class NetworkInterfaceUsage(BaseModel):
    """The counters of one network interface."""

    model_config = _FROZEN

    name: str
    rx_bytes: int | None = None
    rx_errors: int | None = None
    tx_bytes: int | None = None
    tx_errors: int | None = None


class NetworkUsage(BaseModel):
    """A pod's interfaces (loopback excluded); the default one is eth0 when present."""

    model_config = _FROZEN

    timestamp: int
    default_interface: NetworkInterfaceUsage | None = None
    interfaces: list[NetworkInterfaceUsage] = Field(default_factory=list)


class ContainerAttributes(BaseModel):
    """Which container the stats are of."""

    model_config = _FROZEN

    id: str
    metadata: ContainerMetadata
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class ContainerStats(BaseModel):
    """One container's usage; the cgroup parts are None unless it is created or running."""

    model_config = _FROZEN

    attributes: ContainerAttributes
    cpu: CpuUsage | None = None
    memory: MemoryUsage | None = None
    swap: SwapUsage | None = None
    writable_layer: FilesystemUsage | None = None
    process: ProcessUsage | None = None
    hugetlb_usage_bytes: dict[str, int] = Field(
        default_factory=dict, description="page size (2MB, 1GB) -> bytes in use"
    )


class PodAttributes(BaseModel):
    """Which pod sandbox the stats are of."""

    model_config = _FROZEN

    id: str
    metadata: PodMetadata
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class PodStats(BaseModel):
    """A pod's usage: of its cgroup parent, or the sum of its containers without one."""

    model_config = _FROZEN

    attributes: PodAttributes
    cpu: CpuUsage | None = None
    memory: MemoryUsage | None = None
    network: NetworkUsage | None = Field(default=None, description="None for host network")
    process: ProcessUsage | None = None
    containers: list[ContainerStats] = Field(default_factory=list)
    hugetlb_usage_bytes: dict[str, int] = Field(default_factory=dict)
