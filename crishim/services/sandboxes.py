"""Pod sandbox use cases. Listing now; the lifecycle arrives with the pods issue."""

from __future__ import annotations

from crishim.model import Sandbox, SandboxFilter
from crishim.store import ObjectStore


class SandboxService:
    """Pod sandboxes as kubelet sees them."""

    def __init__(self, store: ObjectStore[Sandbox]) -> None:
        self._store = store

    def matching(self, criteria: SandboxFilter) -> list[Sandbox]:
        """Sandboxes matching ``criteria``, oldest first."""
        found = [s for s in self._store.list() if criteria.matches(s)]
        found.sort(key=lambda s: s.created_at)
        return found

    def count(self) -> int:
        """How many sandboxs exist."""
        return len(self._store)

    def ids(self) -> list[str]:
        """The id of every sandbox."""
        return [s.id for s in self._store.list()]
