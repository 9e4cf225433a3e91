"""The content-addressed blob store: manifests, configs and layers by digest.

Layout under the store's root: ``blobs/<algorithm>/<hex>`` for verified content and
``ingest/`` for downloads in progress. A blob is streamed into a uniquely named file in
``ingest/``, hashed and counted while it arrives, fsynced, and renamed to its final name only
when digest and size match. A partial blob therefore never appears under its final name;
what a crash leaves in ``ingest/`` is removed by ``recover()``.

Concurrent requests for one digest share a single download (``ensure``).

An import from an archive does not know which of the archive's files it keeps until it has
read them all: it writes each into a :class:`Staging` area in ``ingest/`` and *adopts* the
ones it needs (moved under their digest); closing the staging area removes the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import anyio.to_thread

from crishim.errors import DataLoss, Internal, InvalidArgument
from crishim.util.disk import disk_full_as
from crishim.util.tasks import join_shared

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"^(sha256):([a-f0-9]{64})$")

BlobSource = Callable[[], AsyncIterator[bytes]]


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
            task = asyncio.create_task(self._ingest_blob(digest, size, source))
            self._inflight[digest] = task
            task.add_done_callback(lambda _: self._inflight.pop(digest, None))
        return await join_shared(task, f"download of {digest}")

    async def _ingest_blob(self, digest: str, size: int | None, source: BlobSource) -> Path:
        final = self.path(digest)
        self._counter += 1
        temp = self._ingest / f"{final.name}.{os.getpid()}.{self._counter}"
        try:
            with disk_full_as(f"downloading blob {digest} into", temp):
                await self._write_verified(temp, digest, size, source)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return final

    async def _write_verified(
        self, temp: Path, digest: str, size: int | None, source: BlobSource
    ) -> None:
        """Stream ``source`` into ``temp``, fsynced; DataLoss unless it is ``digest``."""
        self._ingest.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        written = 0
        async with aiofiles.open(temp, "wb") as out:
            async for chunk in source():
                written += len(chunk)
                if size is not None and written > size:
                    raise DataLoss(
                        f"blob {digest}: more than the {size} bytes its descriptor declares"
                    )
                hasher.update(chunk)
                await out.write(chunk)
            await out.flush()
            await anyio.to_thread.run_sync(os.fsync, out.fileno())
        if size is not None and written != size:
            raise DataLoss(f"blob {digest}: got {written} bytes, its descriptor says {size}")
        actual = f"sha256:{hasher.hexdigest()}"
        if actual != digest:
            raise DataLoss(f"blob {digest}: content has digest {actual}")

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
