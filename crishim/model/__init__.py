"""Plain types of crishim's objects, their states and legal transitions. Pure: no I/O."""

from crishim.model.container import Container, ContainerFilter, ContainerMetadata, ContainerState
from crishim.model.image import Image, ImageLayer
from crishim.model.labels import matches_selector
from crishim.model.record import Record
from crishim.model.runtime import HandlerFeatures, RuntimeCondition, RuntimeStatus
from crishim.model.sandbox import PodMetadata, Sandbox, SandboxFilter, SandboxState

__all__ = [
    "Container",
    "ContainerFilter",
    "ContainerMetadata",
    "ContainerState",
    "HandlerFeatures",
    "Image",
    "ImageLayer",
    "PodMetadata",
    "Record",
    "RuntimeCondition",
    "RuntimeStatus",
    "Sandbox",
    "SandboxFilter",
    "SandboxState",
    "matches_selector",
]
