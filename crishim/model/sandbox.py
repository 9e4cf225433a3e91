"""Pod sandboxes: their record, states and list filter."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from crishim.model.labels import matches_selector
from crishim.model.record import Record


class SandboxState(StrEnum):
    """A sandbox is ready while its namespaces and network exist, not ready once stopped."""

    READY = "ready"
    NOTREADY = "notready"


class PodMetadata(BaseModel):
    """Who the pod is in Kubernetes terms; (name, namespace, attempt) must be unique."""

    model_config = ConfigDict(frozen=True)

    name: str
    uid: str
    namespace: str
    attempt: int = 0


class Sandbox(Record):
    """The durable record of one pod sandbox.

    Records are immutable snapshots: a change makes a new object with ``revision`` one
    higher, which lets readers cache anything derived from a given revision.
    """

    metadata: PodMetadata
    state: SandboxState = SandboxState.READY
    created_at: int = Field(description="nanoseconds since the epoch")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    runtime_handler: str = ""
    hostname: str = ""
    log_directory: str = ""
    cgroup_parent: str = ""
    host_network: bool = False
    host_ipc: bool = False
    host_pid: bool = False
    shared_pid: bool = Field(default=False, description="containers share the pod's PID ns")
    netns: str = Field(default="", description="pinned network namespace ('' = host)")
    ipcns: str = Field(default="", description="pinned IPC namespace ('' = host)")
    utsns: str = Field(default="", description="pinned UTS namespace ('' = host)")
    userns: str = Field(default="", description="pinned user namespace ('' = the node's)")
    infra_pid: int = Field(
        default=0, description="pid of the process holding a shared PID ns; 0: none, or stopped"
    )
    ips: list[str] = Field(default_factory=list, description="pod IPs, primary first")
    network_ready: bool = Field(default=False, description="CNI ADD done and not yet torn down")
    network: str = Field(default="", description="the CNI network the pod joined")
    network_config: str = Field(
        default="",
        description="where that network's list came from: its file, or 'built-in default'",
    )
    config: dict[str, object] = Field(
        default_factory=dict, description="the sandbox config, kept for containers and status"
    )


class SandboxFilter(BaseModel):
    """ListPodSandbox's filter; every set criterion must hold."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default="", description="full id or a prefix of it")
    state: SandboxState | None = None
    label_selector: dict[str, str] = Field(default_factory=dict)

    def matches(self, sandbox: Sandbox) -> bool:
        """True when ``sandbox`` passes every criterion that is set."""
        return (
            sandbox.id.startswith(self.id)
            and (self.state is None or sandbox.state is self.state)
            and matches_selector(sandbox.labels, self.label_selector)
        )
