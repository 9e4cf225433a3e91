"""What the runtime reports about itself: conditions and per-handler features."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

RUNTIME_READY = "RuntimeReady"
NETWORK_READY = "NetworkReady"


class RuntimeCondition(BaseModel):
    """One condition of Status; reason and message say why when it is false."""

    model_config = ConfigDict(frozen=True)

    type: str
    status: bool
    reason: str = ""
    message: str = ""


class HandlerFeatures(BaseModel):
    """A runtime handler and the optional features it supports."""

    model_config = ConfigDict(frozen=True)

    name: str
    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False


class RuntimeStatus(BaseModel):
    """The answer to Status: conditions, handlers, and debug info for verbose callers."""

    model_config = ConfigDict(frozen=True)

    conditions: list[RuntimeCondition]
    handlers: list[HandlerFeatures] = Field(default_factory=list)
    supplemental_groups_policy: bool = False
    info: dict[str, str] = Field(default_factory=dict)
