"""Lifecycle events of containers and sandboxes, as kubelet's evented PLEG consumes them."""

from __future__ import annotations

from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field

from crishim.model.container import Container
from crishim.model.sandbox import Sandbox


class EventType(IntEnum):
    """What happened (numbered as the CRI's ContainerEventType)."""

    CREATED = 0
    STARTED = 1
    STOPPED = 2
    DELETED = 3


class LifecycleEvent(BaseModel):
    """One event: a container's, or a sandbox's when ``container_id == sandbox_id``.

    It carries the pod as it was at ``created_at``: kubelet's evented PLEG caches exactly
    that state under that time, so it must not be read later, when it may have moved on
    (or, for a removed sandbox, be gone).
    """

    model_config = ConfigDict(frozen=True)

    container_id: str
    sandbox_id: str
    type: EventType
    created_at: int = Field(description="nanoseconds since the epoch")
    sandbox: Sandbox | None = Field(
        default=None, description="the sandbox then; its last state when it was removed"
    )
    containers: tuple[Container, ...] = Field(
        default=(), description="every container of the sandbox then"
    )
