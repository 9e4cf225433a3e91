"""Containers: their record, states, legal transitions and list filter."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from crishim.model.labels import matches_selector
from crishim.model.record import Record


class ContainerState(StrEnum):
    """The CRI container lifecycle: created -> running -> exited; unknown when lost."""

    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    UNKNOWN = "unknown"


class ContainerMetadata(BaseModel):
    """The container's name within its pod and kubelet's restart attempt."""

    model_config = ConfigDict(frozen=True)

    name: str
    attempt: int = 0


class Container(Record):
    """The durable record of one container; immutable, a change bumps ``revision``."""

    sandbox_id: str
    metadata: ContainerMetadata
    image: str = Field(description="the image as resolved: its id")
    user_specified_image: str = ""
    image_ref: str = Field(default="", description="repo digest or id the container runs")
    image_id: str = ""
    state: ContainerState = ContainerState.CREATED
    created_at: int = Field(description="nanoseconds since the epoch")
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = Field(default="", description="Completed, Error, OOMKilled when exited")
    message: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    runtime_handler: str = ""
    log_path: str = Field(default="", description="absolute path of the CRI log file")
    pid: int = 0
    uid: int = Field(default=0, description="the process's uid, as the spec set it")
    gid: int = 0
    supplemental_groups: list[int] = Field(default_factory=list)
    stop_signal: str = ""
    config: dict[str, object] = Field(
        default_factory=dict, description="the container config, kept for status and exec"
    )

    def can_start(self) -> bool:
        """Only a created container can be started, and only once."""
        return self.state is ContainerState.CREATED

    def can_remove(self) -> bool:
        """A running container must be stopped before its record goes."""
        return self.state is not ContainerState.RUNNING


class ContainerFilter(BaseModel):
    """ListContainers' filter; every set criterion must hold."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(default="", description="full id or a prefix of it")
    state: ContainerState | None = None
    sandbox_id: str = Field(default="", description="full pod sandbox id or a prefix of it")
    label_selector: dict[str, str] = Field(default_factory=dict)

    def matches(self, container: Container) -> bool:
        """True when ``container`` passes every criterion that is set."""
        return (
            container.id.startswith(self.id)
            and container.sandbox_id.startswith(self.sandbox_id)
            and (self.state is None or container.state is self.state)
            and matches_selector(container.labels, self.label_selector)
        )
