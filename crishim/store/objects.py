"""A dumb keyed store of immutable records, persisted one directory per object.

The store never calls a runtime or decides anything: it adds, gets, lists, updates and
deletes. ``update(id, fn)`` applies ``fn`` to the current record and persists the result
with ``revision`` one higher; if ``fn`` or the write fails, the record is left unchanged.
Writes of one object are serialised; writes of different objects go on at once (dozens
of pods starting together must not queue behind each other's disk writes).

A ``durable`` store fsyncs every write (image records: a pull is expensive to repeat).
Sandbox and container records are not fsynced: what they describe lives in /run and dies
with the machine, crishim reconciles them with the runtime at start, and a record lost in
a power loss only leaves traces that recovery removes (see services/recovery.py). A
killed crishim loses nothing either way: the kernel still holds what it wrote.

Layout: ``<dir>/<id>/<kind>.json``. The directory of an object may hold other files of its
own (owned by other layers); delete removes the whole directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import anyio.to_thread
from pydantic import ValidationError

from crishim.errors import AlreadyExists, InvalidArgument, NotFound
from crishim.model.record import Record
from crishim.store.records import RecordError, read_record, write_record

log = logging.getLogger(__name__)

# Ids become directory names: no slashes, no leading dot; ":" allowed for digests.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


R = TypeVar("R", bound=Record)


class ObjectStore(Generic[R]):
    """Records of one kind, held in memory and persisted under ``directory``."""

    def __init__(self, directory: Path, kind: str, model: type[R], *, durable: bool = True) -> None:
        self._dir = directory
        self._kind = kind
        self._model = model
        self._durable = durable
        self._items: dict[str, R] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, object_id: str) -> asyncio.Lock:
        return self._locks.setdefault(object_id, asyncio.Lock())

    @property
    def kind(self) -> str:
        """The record kind, used in file names and error messages."""
        return self._kind

    def _path(self, object_id: str) -> Path:
        if not _ID.match(object_id):
            raise InvalidArgument(f"{self._kind} id {object_id!r} is not a valid id")
        return self._dir / object_id / f"{self._kind}.json"

    def load(self) -> list[str]:
        """Read every record from disk, replacing what is in memory.

        A record that cannot be read is moved aside (``.corrupt``) and reported, so one
        bad file never keeps crishim from starting. Returns the problems found.
        """
        self._items.clear()
        problems: list[str] = []
        if not self._dir.is_dir():
            return problems
        for entry in sorted(self._dir.iterdir()):
            path = entry / f"{self._kind}.json"
            if not path.is_file():
                continue
            try:
                item = self._model.model_validate(read_record(path, self._kind))
            except (RecordError, ValidationError) as exc:
                problems.append(f"{path}: {exc}")
                path.replace(path.with_name(path.name + ".corrupt"))
                continue
            self._items[item.id] = item
        for problem in problems:
            log.warning("set aside unreadable %s record: %s", self._kind, problem)
        return problems

    def get(self, object_id: str) -> R:
        """The record with ``object_id``; NotFound names the id."""
        try:
            return self._items[object_id]
        except KeyError:
            raise NotFound(f"{self._kind} {object_id!r} not found") from None

    def find(self, object_id: str) -> R | None:
        """The record with ``object_id``, or None."""
        return self._items.get(object_id)

    def list(self) -> list[R]:
        """Every record, in no particular order."""
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    async def add(self, item: R) -> R:
        """Persist a new record; AlreadyExists if the id is taken."""
        object_id = item.id
        async with self._lock(object_id):
            if object_id in self._items:
                raise AlreadyExists(f"{self._kind} {object_id!r} already exists")
            directory = self._path(object_id).parent
            try:
                await self._persist(item)
            except BaseException:
                # The directory made for the record goes with it (when nothing else is in it).
                with contextlib.suppress(OSError):
                    directory.rmdir()
                raise
            self._items[object_id] = item
        return item

    async def update(self, object_id: str, change: Callable[[R], R]) -> R:
        """Apply ``change`` to the record and persist it with the next revision."""
        async with self._lock(object_id):
            current = self.get(object_id)
            changed = change(current)
            updated = changed.model_copy(update={"revision": current.revision + 1})
            await self._persist(updated)
            self._items[object_id] = updated
        return updated

    async def delete(self, object_id: str) -> None:
        """Remove the record and its directory; a missing record is not an error."""
        async with self._lock(object_id):
            directory = self._path(object_id).parent
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(directory, ignore_errors=True))
            self._items.pop(object_id, None)
        self._locks.pop(object_id, None)

    async def _persist(self, item: R) -> None:
        path = self._path(item.id)
        data = item.model_dump(mode="json")
        await anyio.to_thread.run_sync(
            lambda: write_record(path, self._kind, data, sync=self._durable)
        )
