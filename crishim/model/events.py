"""Lifecycle events of containers and sandboxes, as kubelet's evented PLEG consumes them."""

from __future__ import annotations

from enum import IntEnum

from pydantic import BaseModel, ConfigDict


class EventType(IntEnum):
    """What happened (numbered as the CRI's ContainerEventType)."""

    CREATED = 0
    STARTED = 1
    STOPPED = 2
    DELETED = 3


class LifecycleEvent(BaseModel):
    """One event: a container's, or a sandbox's when ``container_id == sandbox_id``."""

    model_config = ConfigDict(frozen=True)

    container_id: str
    sandbox_id: str
    type: EventType
    created_at: int
