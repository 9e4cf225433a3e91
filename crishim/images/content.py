"""The content-addressed blob store: manifests, configs and layers by digest.

Layout under the store's root: ``blobs/<algorithm>/<hex>`` for verified content and
``ingest/`` for downloads in progress. A blob is streamed into a uniquely named file in
``ingest/``, hashed and counted while it arrives (written and hashed in a thread of its
own, a batch at a time), fsynced, and renamed to its final name only when digest and size
match. A partial blob therefore never appears under its final name; what a crash leaves in
``ingest/`` is removed by ``recover()``.

Concurrent requests for one digest share a single download (``ensure``). A download can
be read while it arrives (``open_stream``, for unpacking a layer before it is complete):
the reader waits for bytes still to come, reports the end only once the digest matched,
and fails with :class:`BlobAborted` when the download does.

An import from an archive does not know which of the archive's files it keeps until it has
read them all: it writes each into a :class:`Staging` area in ``ingest/`` and *adopts* the
ones it needs (moved under their digest); closing the staging area removes the rest.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from crishim.errors import DataLoss, Internal, InvalidArgument
from crishim.util.disk import disk_full_as
from crishim.util.tasks import join_shared

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^(sha256):([a-f0-9]{64})$")

BlobSource = Callable[[], AsyncIterator[bytes]]

#: bytes and chunks (at most, for writev) gathered while the writer thread is busy
_WRITE_BATCH_BYTES = 1 << 20
#: bytes handed to an idle writer thread at once (each hand-over costs the event loop)
_WRITE_SOON_BYTES = 256 << 10
_WRITE_BATCH_CHUNKS = 256
#: what a reader of a blob reads from the file at once
_READ_BUFFER = 1 << 20


class BlobReader(Protocol):
    """What :meth:`ContentStore.open_stream` gives: read, then close."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


class BlobAborted(Exception):
    """The download a reader followed failed; what it read is not to be trusted."""


def split_digest(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a sha256 digest; InvalidArgument otherwise."""
    match = _DIGEST.match(digest)
    if not match:
        raise InvalidArgument(f"unsupported or malformed digest {digest!r}")
    return match.group(1), match.group(2)


class ContentStore:
    """Verified blobs on disk, each written once."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._blobs = root / "blobs"
        self._ingest = root / "ingest"
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        # The downloads in progress, for their readers; set (and replaced) when one begins.
        self._ingests: dict[str, _Ingest] = {}
        self._ingest_begun = asyncio.Event()
        self._counter = 0

    @property
    def root(self) -> Path:
        """The store's directory."""
        return self._root

    def recover(self) -> None:
        """Drop downloads a crash left half done; create the layout."""
        shutil.rmtree(self._ingest, ignore_errors=True)
        self._ingest.mkdir(parents=True, exist_ok=True)
        (self._blobs / "sha256").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where the blob with ``digest`` lives (whether or not it exists)."""
        algorithm, hexdigest = split_digest(digest)
        return self._blobs / algorithm / hexdigest

    def has(self, digest: str) -> bool:
        """True when the verified blob is present."""
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        """The content of a small blob (manifest, config)."""
        return self.path(digest).read_bytes()

    def digests(self) -> set[str]:
        """Every blob in the store."""
        directory = self._blobs / "sha256"
        if not directory.is_dir():
            return set()
        return {
            f"sha256:{p.name}" for p in directory.iterdir() if _DIGEST.match(f"sha256:{p.name}")
        }

    def delete(self, digest: str) -> None:
        """Remove a blob; a missing one is not an error."""
        self.path(digest).unlink(missing_ok=True)

    async def put(self, digest: str, data: bytes) -> Path:
        """Store bytes already in memory, verified against ``digest``."""

        async def once() -> AsyncIterator[bytes]:
            yield data

        return await self.ensure(digest, len(data), once)

    async def ensure(self, digest: str, size: int | None, source: BlobSource) -> Path:
        """The blob's path, downloading it from ``source`` unless present.

        Concurrent callers for one digest share one download. ``size`` None means the
        size is not known in advance (then only the digest is checked).
        """
        path = self.path(digest)
        if path.is_file():
            return path
        task = self._inflight.get(digest)
        if task is None:
            ingest = _Ingest()
            task = asyncio.create_task(self._ingest_blob(digest, size, source, ingest))
            self._inflight[digest] = task
            self._ingests[digest] = ingest
            task.add_done_callback(lambda done: self._forget(digest, done, ingest))
            self._ingest_begun.set()
            self._ingest_begun = asyncio.Event()
        return await join_shared(task, f"download of {digest}")

    def _forget(self, digest: str, task: asyncio.Task[Path], ingest: _Ingest) -> None:
        """A download is over: no new caller or reader finds it (a retry may have begun
        a new one)."""
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        if self._ingests.get(digest) is ingest:
            del self._ingests[digest]
        # Also when the task never ran (cancelled at once): readers must not wait on.
        ingest.end(None)

    async def open_stream(self, digest: str, until: asyncio.Future[Any]) -> BlobReader | None:
        """A reader of the blob: of its download as it arrives, or of the stored blob.

        Waits for a download of it to begin, unless ``until`` (what would start one)
        finishes first: then None when the blob is not here. The reader's ``read`` blocks
        for bytes still to come (use it in a thread), reaches the end only once the
        download's digest and size matched, and raises :class:`BlobAborted` when the
        download fails (``ensure`` may fetch it again).
        """
        while True:
            ingest = self._ingests.get(digest)
            if ingest is not None:
                return _Follower(ingest)
            try:
                return self.path(digest).open("rb", buffering=_READ_BUFFER)
            except FileNotFoundError:
                if until.done():
                    return None
            begun = asyncio.ensure_future(self._ingest_begun.wait())
            try:
                await asyncio.wait({begun, until}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                begun.cancel()

    async def _ingest_blob(
        self, digest: str, size: int | None, source: BlobSource, ingest: _Ingest
    ) -> Path:
        final = self.path(digest)
        self._counter += 1
        temp = self._ingest / f"{final.name}.{os.getpid()}.{self._counter}"
        try:
            with disk_full_as(f"downloading blob {digest} into", temp):
                self._ingest.mkdir(parents=True, exist_ok=True)
                writer = _BlobWriter(temp, ingest)
                try:
                    written = await _receive(digest, size, source, writer)
                    actual = await writer.digest()
                    if size is not None and written != size:
                        raise DataLoss(
                            f"blob {digest}: got {written} bytes, its descriptor says {size}"
                        )
                    if actual != digest:
                        raise DataLoss(f"blob {digest}: content has digest {actual}")
                    ingest.verified()
                    await writer.sync()
                finally:
                    writer.close()
                final.parent.mkdir(parents=True, exist_ok=True)
                ingest.end(lambda: os.replace(temp, final), final)
        except BaseException:
            ingest.end(None)  # before the file goes: its readers learn why it did
            temp.unlink(missing_ok=True)
            raise
        return final

    @contextmanager
    def staging(self) -> Iterator[Staging]:
        """A staging area for one import; what it has not adopted is removed at the end."""
        self._counter += 1
        self._ingest.mkdir(parents=True, exist_ok=True)
        area = Staging(self, self._ingest, f"import.{os.getpid()}.{self._counter}")
        try:
            yield area
        finally:
            area.close()

    def usage(self) -> tuple[int, int]:
        """Bytes and inodes used by the blobs."""
        used = inodes = 0
        for directory, dirs, files in os.walk(self._root):
            inodes += len(dirs) + len(files)
            for name in files:
                used += os.lstat(os.path.join(directory, name)).st_blocks * 512
        return used, inodes


async def _receive(digest: str, size: int | None, source: BlobSource, writer: _BlobWriter) -> int:
    """Hand what ``source`` yields to ``writer``; the byte count."""
    written = 0
    batch: list[bytes] = []
    batched = 0
    chunks = source()
    try:
        async for chunk in chunks:
            written += len(chunk)
            if size is not None and written > size:
                raise DataLoss(f"blob {digest}: more than the {size} bytes its descriptor declares")
            batch.append(chunk)
            batched += len(chunk)
            # Handed over soon when the writer is idle (readers follow closely),
            # gathered while it is busy (fewer, larger writes under load).
            if (
                (batched >= _WRITE_SOON_BYTES and not writer.busy)
                or batched >= _WRITE_BATCH_BYTES
                or len(batch) >= _WRITE_BATCH_CHUNKS
            ):
                await writer.write(batch)
                batch, batched = [], 0
    finally:
        # Closed at once when this ends early: the source may hold a transfer slot.
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
    await writer.write(batch)
    return written


class _State(enum.Enum):
    WRITING = "writing"  # bytes arrive; the file is in ingest/
    VERIFIED = "verified"  # all bytes are there and match the digest
    STORED = "stored"  # renamed to its final name
    FAILED = "failed"  # removed


class _Ingest:
    """One download as its readers see it: the file, how much of it is written, and
    whether it is verified, stored or failed. Changed by the download, read by readers
    in other threads."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.path: Path | None = None
        self.written = 0
        self.state = _State.WRITING

    def started(self, path: Path) -> None:
        """The download's file exists now."""
        with self._changed:
            self.path = path
            self._changed.notify_all()

    def advance(self, count: int) -> None:
        """``count`` more bytes are in the file."""
        with self._changed:
            self.written += count
            self._changed.notify_all()

    def verified(self) -> None:
        """Every byte is there and matches the digest."""
        with self._changed:
            self.state = _State.VERIFIED
            self._changed.notify_all()

    def end(self, step: Callable[[], object] | None, final: Path | None = None) -> None:
        """Run ``step`` (the rename into the store, or the removal) with no reader
        opening the file meanwhile; stored at ``final``, or failed when None. An ingest
        already ended stays as it is."""
        with self._changed:
            if self.state in (_State.STORED, _State.FAILED):
                return
            try:
                if step is not None:
                    step()
            except BaseException:
                final = None
                raise
            finally:
                self.state = _State.FAILED if final is None else _State.STORED
                self.path = final
                self._changed.notify_all()

    def open(self) -> int:
        """A descriptor of the file (blocking until the download has created it)."""
        with self._changed:
            while self.path is None and self.state is _State.WRITING:
                self._changed.wait()
            if self.state is _State.FAILED or self.path is None:
                raise BlobAborted("the download failed")
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    def readable(self, offset: int) -> int:
        """Bytes past ``offset`` that may be read, blocking until there are some or the
        download is over; 0 at the verified end."""
        with self._changed:
            while offset >= self.written and self.state is _State.WRITING:
                self._changed.wait()
            if self.state is _State.FAILED:
                raise BlobAborted("the download failed")
            return self.written - offset


class _Follower:
    """Reads a download as it arrives (see :meth:`ContentStore.open_stream`): a read
    returns what is there (at least a byte, at most ``size``), waiting only when nothing
    is. Small reads are served from a buffer filled a MiB at a time."""

    def __init__(self, ingest: _Ingest) -> None:
        self._ingest = ingest
        self._fd = -1
        self._offset = 0  # in the file, of what the buffer does not hold
        self._buffer = b""
        self._start = 0  # in the buffer

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            parts = []
            while part := self.read(_READ_BUFFER):
                parts.append(part)
            return b"".join(parts)
        if self._start < len(self._buffer):
            data = self._buffer[self._start : self._start + size]
            self._start += len(data)
            return data
        if self._fd < 0:
            self._fd = self._ingest.open()
        count = self._ingest.readable(self._offset)
        if not count or not size:
            return b""
        data = os.pread(self._fd, min(count, max(size, _READ_BUFFER)), self._offset)
        self._offset += len(data)
        if len(data) <= size:
            return data
        self._buffer, self._start = data, size
        return data[:size]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> _Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _BlobWriter:
    """Writes and hashes a download's file in a thread of its own, a batch at a time, so
    the event loop only receives. One step runs at a time, in order: a step still running
    when its caller was cancelled finishes before the file is closed."""

    def __init__(self, path: Path, ingest: _Ingest) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._ingest = ingest
        self._hasher = hashlib.sha256()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-writer")
        self._pending: Future[None] | None = None
        ingest.started(path)

    @property
    def busy(self) -> bool:
        """Whether a batch is still being written."""
        return self._pending is not None and not self._pending.done()

    async def write(self, chunks: list[bytes]) -> None:
        """Hand ``chunks`` over, once the batch before them is written (so one batch is
        written while the next one arrives)."""
        await self._wait()
        if chunks:
            self._pending = self._thread.submit(self._write, chunks)

    async def digest(self) -> str:
        """The digest of everything written."""
        await self._wait()
        return f"sha256:{self._hasher.hexdigest()}"

    async def sync(self) -> None:
        """Make the file durable."""
        await self._wait()
        await asyncio.wrap_future(self._thread.submit(os.fsync, self._fd))

    def close(self) -> None:
        """Close the file after the steps handed over (without waiting for them)."""
        self._thread.submit(os.close, self._fd)
        self._thread.shutdown(wait=False)

    async def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await asyncio.wrap_future(pending)

    def _write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._hasher.update(chunk)
        views = [memoryview(chunk) for chunk in chunks]
        total = sum(len(view) for view in views)
        while views:
            done = os.writev(self._fd, views)
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if views:
                views[0] = views[0][done:]
        self._ingest.advance(total)


@dataclass(frozen=True)
class StagedBlob:
    """A file written into a staging area: where it is, its digest and its size."""

    path: Path
    digest: str
    size: int


class StagedWriter:
    """One file being written into a staging area, hashed and counted on the way."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("xb")
        self._hasher = hashlib.sha256()
        self._size = 0

    def write(self, data: bytes) -> None:
        """Append ``data``."""
        self._hasher.update(data)
        self._size += len(data)
        self._file.write(data)

    def finish(self) -> StagedBlob:
        """Close the file; what was written, with its digest."""
        self._file.close()
        return StagedBlob(self.path, f"sha256:{self._hasher.hexdigest()}", self._size)

    def abort(self) -> None:
        """Close and remove the file."""
        with suppress(OSError):  # its last write may fail again: it goes anyway
            self._file.close()
        self.path.unlink(missing_ok=True)


class Staging:
    """Files an import wrote before knowing which it keeps (see the module docstring).

    Synchronous: an import reads its archive in a worker thread.
    """

    def __init__(self, store: ContentStore, directory: Path, prefix: str) -> None:
        self._store = store
        self._directory = directory
        self._prefix = prefix
        self._count = 0
        self._paths: set[Path] = set()

    def create(self) -> StagedWriter:
        """A new, empty staged file."""
        self._count += 1
        path = self._directory / f"{self._prefix}.{self._count}"
        self._paths.add(path)
        try:
            with disk_full_as("staging a file of the import at", path):
                return StagedWriter(path)
        except OSError as exc:
            raise Internal(f"cannot stage a blob in {path.parent}: {exc.strerror}") from exc

    def existing(self, digest: str) -> Path | None:
        """The store's own copy of the blob ``digest``, if it has one."""
        path = self._store.path(digest)
        return path if path.is_file() else None

    def adopt(self, blob: StagedBlob) -> Path:
        """Move a staged file into the store under its digest (verified when it was
        written); when the store already holds that blob, the staged copy is dropped."""
        final = self._store.path(blob.digest)
        if blob.path == final:
            return final
        if final.is_file():
            blob.path.unlink(missing_ok=True)
        else:
            with (
                disk_full_as(f"storing imported blob {blob.digest} at", final),
                blob.path.open("rb") as written,
            ):
                os.fsync(written.fileno())
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(blob.path, final)
        self._paths.discard(blob.path)
        return final

    def add(self, digest: str, data: bytes) -> Path:
        """Store a small document made during the import (verified against ``digest``)."""
        writer = self.create()
        writer.write(data)
        blob = writer.finish()
        if blob.digest != digest:
            raise DataLoss(f"document {digest}: content has digest {blob.digest}")
        return self.adopt(blob)

    def close(self) -> None:
        """Remove every staged file not adopted."""
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._paths.clear()
