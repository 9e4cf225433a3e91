"""What every snapshotter does: image layers unpacked once and shared, keyed by chain ID,
and container snapshots (writable, or read-only views) on top of them.

Layout under ``root``::

    snapshots/<id>/fs          the files of a layer, a container snapshot or a view
    snapshots/<id>/meta.json   what the snapshot is (kind, name, parent chain ID, ...)
    tmp/                       work in progress; whatever is here after a crash is garbage

Ids are short numbers so that an overlay ``lowerdir=`` option for a deep image stays under
the page size that bounds mount options. A snapshot is built in ``tmp/``, its metadata
written and fsynced inside it, and the whole directory renamed into ``snapshots/``: the
rename is the commit, so a half-made snapshot never appears there. Removal renames the
directory back into ``tmp/`` before deleting it, for the same reason.

A snapshotter whose layers are independent directories (overlay) can unpack a layer
ahead of the layers below it (``stage_layer``, in ``tmp/`` too) and commit it once they
are committed (``commit_staged``): commits stay parent-first.

The methods are synchronous (they unpack and copy files): callers run them in a thread.
Several threads may call one snapshotter at once; a lock guards its index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from crishim.errors import AlreadyExists, FailedPrecondition, NotFound
from crishim.images.unpack import (
    LayerResult,
    ParentGuesses,
    Readable,
    UnpackError,
    settle_parents,
)
from crishim.util.disk import disk_full_as
from crishim.util.fs import directory_usage

__all__ = ["Kind", "Mount", "Snapshot", "Snapshotter", "StagedLayer"]

log = logging.getLogger(__name__)

_META = "meta.json"
_FS = "fs"


@dataclass(frozen=True)
class Mount:
    """One mount that makes a snapshot's root filesystem, as ``mount -t type -o options``."""

    type: str
    source: str
    options: tuple[str, ...]


class Kind(StrEnum):
    LAYER = "layer"  # a committed image layer, named by its chain ID
    ACTIVE = "active"  # a writable container root filesystem, named by its key
    VIEW = "view"  # a read-only view of a layer chain, named by its key


@dataclass(frozen=True)
class Snapshot:
    """The metadata of one snapshot directory."""

    id: int
    kind: Kind
    name: str
    parent: str | None  # chain ID of the layer below, None for the bottom one
    diff_id: str = ""  # layers only: what unpacking found
    size: int = 0
    entries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "name": self.name,
            "parent": self.parent,
            "diff_id": self.diff_id,
            "size": self.size,
            "entries": self.entries,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Snapshot:
        return cls(
            id=int(doc["id"]),
            kind=Kind(doc["kind"]),
            name=str(doc["name"]),
            parent=None if doc["parent"] is None else str(doc["parent"]),
            diff_id=str(doc.get("diff_id", "")),
            size=int(doc.get("size", 0)),
            entries=int(doc.get("entries", 0)),
        )

    def result(self) -> LayerResult:
        return LayerResult(diff_id=self.diff_id, size=self.size, entries=self.entries)


@dataclass(frozen=True)
class StagedLayer:
    """A layer unpacked ahead of the layers below it, in a work dir in ``tmp/`` (which a
    crash leaves to ``recover``): not a snapshot until :meth:`Snapshotter.commit_staged`."""

    work: Path
    result: LayerResult
    guesses: ParentGuesses

    def discard(self) -> None:
        """Remove the work dir, unless it was committed (renamed away)."""
        if self.work.exists():
            shutil.rmtree(self.work)


class Snapshotter(ABC):
    """Layers by chain ID and container snapshots on top; subclasses decide how files are
    stacked (overlay mounts, or full copies)."""

    name: ClassVar[str]
    #: whether a layer can be unpacked before the layers below it are (``stage_layer``)
    unpacks_ahead: ClassVar[bool] = False

    def __init__(self, root: Path) -> None:
        """Open the snapshotter at ``root`` (created if missing) and recover it."""
        self.root = root
        self._snapshots = root / "snapshots"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()
        self._layers: dict[str, Snapshot] = {}
        self._active: dict[str, Snapshot] = {}
        # Keys being prepared, and layers that an unpack or prepare in progress builds
        # on: neither may be taken or removed meanwhile.
        self._reserved: set[str] = set()
        self._pinned: Counter[str] = Counter()
        self._next_id = 1
        for directory in (root, self._snapshots, self._tmp):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.recover()

    # --- layers ---

    def has_layer(self, chain_id: str) -> bool:
        with self._lock:
            return chain_id in self._layers

    def layers(self) -> set[str]:
        with self._lock:
            return set(self._layers)

    def unpack_layer(
        self,
        chain_id: str,
        parent: str | None,
        blob: Path | Readable,
        media_type: str,
        expected_diff_id: str,
    ) -> LayerResult:
        """Unpack ``blob`` (a file, or a stream of its bytes read to the end) on top of the
        layer ``parent`` and commit it as ``chain_id``.

        Raises UnpackError when the layer is hostile or damaged or its diff ID is not
        ``expected_diff_id``; nothing is left behind then. When another call committed
        ``chain_id`` meanwhile, this one's work is dropped.
        """
        with self._lock:
            done = self._layers.get(chain_id)
            if done is not None:
                return done.result()
            lowers = self._pin(parent)
        try:
            with (
                disk_full_as(f"unpacking layer {chain_id} in", self._tmp),
                self._workdir(Kind.LAYER) as work,
            ):
                result = self._unpack(work / _FS, lowers, blob, media_type)
                _check_diff_id(chain_id, blob, result, expected_diff_id)
                with self._lock:
                    if chain_id not in self._layers:
                        self._layers[chain_id] = self._commit(
                            work, Kind.LAYER, chain_id, parent, result
                        )
                return result
        finally:
            with self._lock:
                self._unpin(parent)

    def stage_layer(
        self, chain_id: str, blob: Path | Readable, media_type: str, expected_diff_id: str
    ) -> StagedLayer:
        """Unpack ``blob`` for the layer ``chain_id`` before the layers below it are there
        (only when :attr:`unpacks_ahead`); :meth:`commit_staged` finishes it. Raises
        UnpackError as :meth:`unpack_layer` does, leaving nothing behind."""
        with disk_full_as(f"unpacking layer {chain_id} in", self._tmp):
            work = self._new_workdir(Kind.LAYER)
            try:
                result, guesses = self._unpack_ahead(work / _FS, blob, media_type)
                _check_diff_id(chain_id, blob, result, expected_diff_id)
            except BaseException:
                shutil.rmtree(work)
                raise
        return StagedLayer(work, result, guesses)

    def commit_staged(self, staged: StagedLayer, chain_id: str, parent: str | None) -> bool:
        """Commit a staged layer on top of the committed layer ``parent``. False when it
        cannot be (a layer below has a symlink or a file where it guessed a directory):
        unpack it with :meth:`unpack_layer` then. ``staged`` is used up either way."""
        try:
            with self._lock:
                if chain_id in self._layers:
                    return True
                lowers = self._pin(parent)
            try:
                if not settle_parents(staged.work / _FS, staged.guesses, lowers):
                    return False
                with disk_full_as(f"committing layer {chain_id} in", self._tmp), self._lock:
                    if chain_id not in self._layers:
                        self._layers[chain_id] = self._commit(
                            staged.work, Kind.LAYER, chain_id, parent, staged.result
                        )
                return True
            finally:
                with self._lock:
                    self._unpin(parent)
        finally:
            staged.discard()

    def remove_layer(self, chain_id: str) -> None:
        """Remove a committed layer (no-op when absent); refused while anything uses it."""
        with self._lock:
            snapshot = self._layers.get(chain_id)
            if snapshot is None:
                return
            users = self._users_of(chain_id)
            if users:
                raise FailedPrecondition(
                    f"layer {chain_id} is in use: parent of {', '.join(users)}"
                )
            del self._layers[chain_id]
            trash = self._to_trash(snapshot)
        shutil.rmtree(trash)

    # --- container snapshots ---

    def prepare(self, key: str, parent: str | None) -> list[Mount]:
        """A new writable snapshot ``key`` on the layer ``parent``; returns its mounts."""
        return self._create(Kind.ACTIVE, key, parent)

    def view(self, key: str, parent: str | None) -> list[Mount]:
        """A new read-only snapshot ``key`` of the layer ``parent``; returns its mounts."""
        return self._create(Kind.VIEW, key, parent)

    def mounts(self, key: str) -> list[Mount]:
        with self._lock:
            snapshot = self._active.get(key)
            if snapshot is None:
                raise NotFound(f"snapshot {key} not found")
            lowers = self._chain_dirs(snapshot.parent)
        return self._mounts_of(snapshot, lowers)

    def remove(self, key: str) -> None:
        """Remove a writable snapshot or a view (no-op when absent). Unmount it first."""
        with self._lock:
            snapshot = self._active.pop(key, None)
            if snapshot is None:
                return
            trash = self._to_trash(snapshot)
        shutil.rmtree(trash)

    def active(self) -> dict[str, str | None]:
        """Writable snapshots and views: key -> parent chain ID."""
        with self._lock:
            return {key: snapshot.parent for key, snapshot in self._active.items()}

    # --- the whole store ---

    def usage(self) -> tuple[int, int]:
        """Bytes (allocated blocks) and inodes under ``root``, each hardlinked inode once."""
        return directory_usage(self.root)

    def mountpoint(self) -> str:
        """The directory whose file system holds the snapshots (for ImageFsInfo)."""
        return str(self.root)

    def recover(self) -> None:
        """Drop work a crash left in ``tmp/`` and re-read every snapshot's metadata."""
        with self._lock:
            for leftover in self._tmp.iterdir():
                _remove_path(leftover)
            self._layers.clear()
            self._active.clear()
            self._next_id = 1
            for directory in self._snapshots.iterdir():
                self._load(directory)

    def _load(self, directory: Path) -> None:
        try:
            snapshot = Snapshot.from_json(json.loads((directory / _META).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Commits are atomic, so this is damage, not a crash mid-way: set it aside.
            log.warning("snapshot directory %s is unreadable (%s); removing it", directory, exc)
            _remove_path(directory)
            return
        if snapshot.kind is Kind.LAYER:
            self._layers[snapshot.name] = snapshot
        else:
            self._active[snapshot.name] = snapshot
        self._next_id = max(self._next_id, snapshot.id + 1)

    # --- what subclasses provide ---

    @abstractmethod
    def _unpack(
        self, fs: Path, lowers: list[Path], blob: Path | Readable, media_type: str
    ) -> LayerResult:
        """Fill the empty ``fs`` with the layer, given the parent chain's dirs (top first)."""

    def _unpack_ahead(
        self, fs: Path, blob: Path | Readable, media_type: str
    ) -> tuple[LayerResult, ParentGuesses]:
        """Fill the empty ``fs`` with the layer before the layers below are there."""
        raise NotImplementedError(f"the {self.name} snapshotter does not unpack ahead")

    @abstractmethod
    def _make_active(self, directory: Path, lowers: list[Path]) -> None:
        """Make what a writable snapshot needs in ``directory`` (``fs`` exists, empty)."""

    @abstractmethod
    def _active_mounts(self, directory: Path, lowers: list[Path]) -> list[Mount]:
        """The mounts of a writable snapshot kept in ``directory``."""

    def _view_mounts(self, directory: Path, lowers: list[Path]) -> list[Mount]:
        """A read-only bind of the top layer, or of the empty ``fs`` for no parent."""
        source = lowers[0] if lowers else directory / _FS
        return [Mount("bind", str(source), ("rbind", "ro"))]

    # --- steps ---

    def _create(self, kind: Kind, key: str, parent: str | None) -> list[Mount]:
        with self._lock:
            if key in self._active or key in self._reserved:
                raise AlreadyExists(f"snapshot {key} already exists")
            lowers = self._pin(parent)
            self._reserved.add(key)
        try:
            with (
                disk_full_as(f"making snapshot {key} in", self._tmp),
                self._workdir(kind) as work,
            ):
                if kind is Kind.ACTIVE:
                    self._make_active(work, lowers)
                with self._lock:
                    snapshot = self._commit(work, kind, key, parent)
                    self._active[key] = snapshot
        finally:
            with self._lock:
                self._reserved.discard(key)
                self._unpin(parent)
        return self._mounts_of(snapshot, lowers)

    def _mounts_of(self, snapshot: Snapshot, lowers: list[Path]) -> list[Mount]:
        directory = self._dir(snapshot.id)
        if snapshot.kind is Kind.ACTIVE:
            return self._active_mounts(directory, lowers)
        return self._view_mounts(directory, lowers)

    def _dir(self, snapshot_id: int) -> Path:
        return self._snapshots / str(snapshot_id)

    def _chain_dirs(self, top: str | None) -> list[Path]:
        """The fs dirs of the layer ``top`` and all below it, top first (lock held)."""
        dirs: list[Path] = []
        while top is not None:
            layer = self._layers[top]
            dirs.append(self._dir(layer.id) / _FS)
            top = layer.parent
        return dirs

    def _pin(self, parent: str | None) -> list[Path]:
        """Keep ``parent`` from removal while work builds on it (lock held)."""
        if parent is None:
            return []
        if parent not in self._layers:
            raise NotFound(f"parent layer {parent} is not unpacked")
        self._pinned[parent] += 1
        return self._chain_dirs(parent)

    def _unpin(self, parent: str | None) -> None:
        if parent is not None:
            self._pinned[parent] -= 1
            if not self._pinned[parent]:
                del self._pinned[parent]

    def _users_of(self, chain_id: str) -> list[str]:
        users = [f"layer {s.name}" for s in self._layers.values() if s.parent == chain_id]
        users += [f"snapshot {s.name}" for s in self._active.values() if s.parent == chain_id]
        if chain_id in self._pinned:
            users.append("work in progress")
        return users

    def _new_workdir(self, kind: Kind) -> Path:
        """A fresh directory in ``tmp/`` with an empty ``fs`` (the caller removes it
        unless committed)."""
        work = Path(tempfile.mkdtemp(prefix=f"{kind.value}-", dir=self._tmp))
        try:
            # The fs dir becomes a container's "/": the usual mode, not mkdtemp's 0700.
            (work / _FS).mkdir()
            os.chmod(work / _FS, 0o755)  # noqa: S103 (a root dir is world-readable)
        except BaseException:
            shutil.rmtree(work)
            raise
        return work

    @contextmanager
    def _workdir(self, kind: Kind) -> Iterator[Path]:
        """A fresh work dir; gone afterwards unless committed (renamed away)."""
        work = self._new_workdir(kind)
        try:
            yield work
        finally:
            if work.exists():
                shutil.rmtree(work)

    def _commit(
        self,
        work: Path,
        kind: Kind,
        name: str,
        parent: str | None,
        result: LayerResult | None = None,
    ) -> Snapshot:
        """Give ``work`` an id and metadata and rename it into place (lock held)."""
        while self._dir(self._next_id).exists():
            self._next_id += 1
        snapshot = Snapshot(id=self._next_id, kind=kind, name=name, parent=parent)
        if result is not None:
            snapshot = replace(
                snapshot, diff_id=result.diff_id, size=result.size, entries=result.entries
            )
        self._next_id += 1
        _write_synced(work / _META, json.dumps(snapshot.to_json()).encode())
        _fsync_dir(work)
        os.rename(work, self._dir(snapshot.id))
        _fsync_dir(self._snapshots)
        return snapshot

    def _to_trash(self, snapshot: Snapshot) -> Path:
        """Move a snapshot's directory into ``tmp/`` (lock held); the caller deletes it."""
        trash = Path(tempfile.mkdtemp(prefix="removed-", dir=self._tmp))
        os.rename(self._dir(snapshot.id), trash / str(snapshot.id))
        return trash


def _check_diff_id(
    chain_id: str, blob: Path | Readable, result: LayerResult, expected_diff_id: str
) -> None:
    if result.diff_id != expected_diff_id:
        source = f"blob {blob}" if isinstance(blob, Path) else "read as downloaded"
        raise UnpackError(
            f"diff_id mismatch: layer {chain_id} ({source}) gives "
            f"{result.diff_id}, config says {expected_diff_id}"
        )


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
