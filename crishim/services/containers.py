"""Container use cases. Listing now; the lifecycle arrives with the pods issue."""

from __future__ import annotations

from crishim.model import Container, ContainerFilter
from crishim.store import ObjectStore


class ContainerService:
    """Containers as kubelet sees them."""

    def __init__(self, store: ObjectStore[Container]) -> None:
        self._store = store

    def matching(self, criteria: ContainerFilter) -> list[Container]:
        """Containers matching ``criteria``, oldest first."""
        found = [c for c in self._store.list() if criteria.matches(c)]
        found.sort(key=lambda c: c.created_at)
        return found

    def count(self) -> int:
        """How many containers exist."""
        return len(self._store)

    def ids(self) -> list[str]:
        """The id of every container."""
        return [c.id for c in self._store.list()]
