"""Per-object cache of encoded list items, keyed by record id, valid for one record object.

Records are frozen and replaced on every change, so an entry holds the record it encoded
and serves only that object. (A revision alone is not enough: an image removed and pulled
again comes back with the same id at revision 0.)

A repeated message field is the concatenation of (tag, length, item bytes) for each item,
so a list reply can be built by joining cached items without encoding anything. Given the
service its records come from, the cache forgets removed records once it holds
:data:`PRUNE_SLACK` more than the service has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, Protocol, TypeVar

from crishim.api.wire import varint
from crishim.model import Record

R = TypeVar("R", bound=Record)
# Cached encodings of removed objects tolerated before the cache is pruned.
PRUNE_SLACK = 64


class Listing(Protocol):
    """What pruning asks of the service the records come from."""

    def count(self) -> int: ...

    def ids(self) -> Iterable[str]: ...


def frame_field(field_number: int, payload: bytes) -> bytes:
    """A length-delimited field: key, length, payload."""
    return varint(field_number << 3 | 2) + varint(len(payload)) + payload


class EncodedItems(Generic[R]):
    """Caches the framed wire form of each record for one repeated field."""

    def __init__(
        self, field_number: int, encode: Callable[[R], bytes], source: Listing | None = None
    ) -> None:
        self._field_number = field_number
        self._encode = encode
        self._source = source
        self._cache: dict[str, tuple[R, bytes]] = {}

    def join(self, items: Iterable[R]) -> bytes:
        """The reply bytes holding ``items`` in the repeated field (and, with a source, the
        cache pruned once it holds many more objects than the source has)."""
        parts = []
        cache = self._cache
        for item in items:
            hit = cache.get(item.id)
            if hit is None or hit[0] is not item:
                hit = (item, frame_field(self._field_number, self._encode(item)))
                cache[item.id] = hit
            parts.append(hit[1])
        source = self._source
        if source is not None and len(cache) > source.count() + PRUNE_SLACK:
            self.prune(source.ids())
        return b"".join(parts)

    def prune(self, live_ids: Iterable[str]) -> None:
        """Forget items whose records are gone."""
        live = set(live_ids)
        for object_id in [k for k in self._cache if k not in live]:
            del self._cache[object_id]

    def __len__(self) -> int:
        return len(self._cache)
