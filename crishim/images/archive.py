"""Reading an image archive (a tar stream) into the content store's staging area.

An image archive is read once, front to back, as a stream: its members come in any order
(``docker save`` writes ``manifest.json`` last), so every regular file is written into a
:class:`~crishim.images.content.Staging` area while it is hashed, and nothing is held in
memory. What the files mean is decided afterwards (:mod:`crishim.images.archive_formats`),
and only the files an image needs are adopted into the store.

The archive is hostile input. Nothing is ever created under a member's name, so names
cannot steer a write; even so, an archive is refused with an error naming the member when:

- a name is absolute, climbs out of the archive with ``..``, holds a NUL byte or is longer
  than :data:`MAX_NAME`;
- a link (symbolic or hard) points outside the archive; links between members are legal
  (``docker save`` and skopeo write ``<id>/layer.tar`` as a symlink to the layer) and are
  followed inside the archive only, at most :data:`MAX_LINK_HOPS` deep;
- a member is a device, a fifo or any type other than file, directory and link;
- two members have the same name, or there are more than :data:`MAX_MEMBERS` of them;
- a file under ``blobs/sha256/<hex>`` does not hash to ``sha256:<hex>`` (DataLoss);
- the stream is not a tar (plain, or compressed as a whole with gzip, bzip2 or xz), has a
  damaged header, or ends inside a member.

A file whose name gives a digest the store already holds is hashed (and so verified) but
not written again: a second import of an archive costs reading it, not storing it.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, Self

from crishim.errors import DataLoss, InvalidArgument
from crishim.images.content import StagedBlob, Staging, split_digest
from crishim.util.disk import disk_full_as

__all__ = [
    "MAX_DOCUMENT",
    "MAX_LINK_HOPS",
    "MAX_MEMBERS",
    "MAX_NAME",
    "ArchiveContents",
    "ChunkReader",
    "Member",
    "read_archive",
]

#: files (and links) an archive may hold; an image is a few dozen, a multi-image save a few
#: hundred, so this only stops an archive built to exhaust inodes
MAX_MEMBERS = 50_000
#: bytes of a member name
MAX_NAME = 4096
#: bytes of one JSON document read from the archive (manifest.json, index.json, a manifest,
#: a config); registries refuse manifests past 4 MiB
MAX_DOCUMENT = 4 * 1024 * 1024
MAX_LINK_HOPS = 16
_CHUNK = 1 << 20
#: tarfile reads the stream in pieces of this size (its default, 10 KiB, costs many calls)
_TAR_BUFFER = 1 << 20
#: bytes kept from the start of each file: enough for the gzip and zstd magic numbers
_HEAD = 8
_BLOB_NAME = re.compile(r"^blobs/sha256/([a-f0-9]{64})$")


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class ChunkReader(io.RawIOBase):
    """A readable file over a function returning the stream's next chunk (b"" at the end).

    Lets ``tarfile`` in a worker thread read an archive that arrives as chunks elsewhere.
    """

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        super().__init__()
        self._next_chunk = next_chunk
        self._pending = memoryview(b"")
        self._ended = False
        #: bytes received so far
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        while not self._pending and not self._ended:
            chunk = self._next_chunk()
            if chunk:
                self._pending = memoryview(chunk)
                self.size += len(chunk)
            else:
                self._ended = True
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


@dataclass(frozen=True)
class Member:
    """A regular file of the archive, hashed; ``path`` holds its content (a staged file,
    or the store's own copy when the store already had that blob)."""

    name: str
    path: Path
    digest: str
    size: int
    head: bytes
    staged: bool

    @property
    def blob(self) -> StagedBlob:
        """The member as the staging area adopts it."""
        return StagedBlob(self.path, self.digest, self.size)


@dataclass
class ArchiveContents:
    """What an archive holds: its files by name and its links (name -> target name)."""

    members: dict[str, Member] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        """True when ``name`` is a file or a link of the archive."""
        return name in self.members or name in self.links

    def find(self, name: str, what: str) -> Member:
        """The file ``name`` names, following links inside the archive."""
        current = _normalise(name, what)
        for _ in range(MAX_LINK_HOPS + 1):
            member = self.members.get(current)
            if member is not None:
                return member
            target = self.links.get(current)
            if target is None:
                raise InvalidArgument(f'the archive lacks {what} ("{name}")')
            current = target
        raise InvalidArgument(f'{what} ("{name}"): more than {MAX_LINK_HOPS} links deep')

    def blob(self, digest: str, what: str) -> Member:
        """The file ``blobs/<algorithm>/<hex>`` of an OCI layout."""
        algorithm, hexdigest = split_digest(digest)
        try:
            return self.find(f"blobs/{algorithm}/{hexdigest}", what)
        except InvalidArgument:
            raise InvalidArgument(f"the archive lacks blob {digest} ({what})") from None

    def document(self, member: Member, what: str) -> bytes:
        """The content of a small file (a JSON document); refused past MAX_DOCUMENT."""
        if member.size > MAX_DOCUMENT:
            raise InvalidArgument(
                f'{what} ("{member.name}") is {member.size} bytes; documents over '
                f"{MAX_DOCUMENT} bytes are refused"
            )
        return member.path.read_bytes()

    def json(self, member: Member, what: str) -> Any:
        """A small file parsed as JSON."""
        try:
            return json.loads(self.document(member, what))
        except ValueError as exc:
            raise InvalidArgument(f'{what} ("{member.name}") is not valid JSON: {exc}') from None


def read_archive(source: io.RawIOBase | BinaryIO, staging: Staging) -> ArchiveContents:
    """Read the whole tar stream ``source``, staging every regular file (see the module
    docstring for what is refused). Blocking: run it in a worker thread."""
    contents = ArchiveContents()
    entries = 0
    try:
        with tarfile.open(
            fileobj=source, mode="r|*", bufsize=_TAR_BUFFER, tarinfo=_StrictTarInfo
        ) as tar:
            while (entry := tar.next()) is not None:
                entries += 1
                _read_entry(tar, entry, contents, staging)
                # Stream mode keeps every header read (an attribute typeshed does not list);
                # an archive may hold many thousands.
                tar.members.clear()  # type: ignore[attr-defined]
    except _BadStream as exc:
        if entries:
            raise InvalidArgument(f"the archive is damaged: {exc}") from None
        raise _not_a_tar(exc) from None
    except (tarfile.TarError, EOFError) as exc:
        raise _not_a_tar(exc) from None
    return contents


def _not_a_tar(exc: Exception) -> InvalidArgument:
    return InvalidArgument(
        f"not a readable tar archive (plain, or gzip, bzip2 or xz compressed): {exc}"
    )


def _read_entry(
    tar: tarfile.TarFile, entry: tarfile.TarInfo, contents: ArchiveContents, staging: Staging
) -> None:
    if entry.isdir():
        _normalise(entry.name, "archive member")
        return
    name = _normalise(entry.name, "archive member")
    if not name:
        raise InvalidArgument(f'archive member "{entry.name}" names the archive root')
    if contents.has(name):
        raise InvalidArgument(f'the archive has two members named "{name}"')
    if len(contents.members) + len(contents.links) >= MAX_MEMBERS:
        raise InvalidArgument(f"the archive has more than {MAX_MEMBERS} members")
    if entry.issym():
        contents.links[name] = _link_target(name, entry.linkname, relative_to_member=True)
    elif entry.islnk():
        contents.links[name] = _link_target(name, entry.linkname, relative_to_member=False)
    elif entry.isreg():
        data = tar.extractfile(entry)
        assert data is not None  # a regular file always has a data stream
        contents.members[name] = _stage(name, data, staging)
    else:
        raise InvalidArgument(
            f'archive member "{name}" is a {_type_name(entry)}: image archives hold only '
            "files, directories and links"
        )


def _stage(name: str, data: _Readable, staging: Staging) -> Member:
    match = _BLOB_NAME.match(name)
    expected = f"sha256:{match.group(1)}" if match else None
    existing = staging.existing(expected) if expected else None
    if existing is not None:
        digest, size, head = _hash_only(data)
        member = Member(name, existing, digest, size, head, staged=False)
    else:
        writer = staging.create()
        head = b""
        try:
            with disk_full_as(f'staging archive member "{name}" at', writer.path):
                while chunk := _read(data):
                    if len(head) < _HEAD:
                        head += chunk[: _HEAD - len(head)]
                    writer.write(chunk)
                blob = writer.finish()
        except BaseException:
            writer.abort()
            raise
        member = Member(name, blob.path, blob.digest, blob.size, head, staged=True)
    if expected is not None and member.digest != expected:
        raise DataLoss(
            f'archive member "{name}": its content has digest {member.digest}, its name '
            f"says {expected}"
        )
    return member


def _hash_only(data: _Readable) -> tuple[str, int, bytes]:
    hasher = hashlib.sha256()
    size = 0
    head = b""
    while chunk := _read(data):
        if len(head) < _HEAD:
            head += chunk[: _HEAD - len(head)]
        hasher.update(chunk)
        size += len(chunk)
    return f"sha256:{hasher.hexdigest()}", size, head


def _read(data: _Readable) -> bytes:
    try:
        return data.read(_CHUNK)
    except (tarfile.TarError, EOFError) as exc:
        raise _BadStream(str(exc) or type(exc).__name__) from exc


def _normalise(raw: str, what: str) -> str:
    """A member name as a clean relative path ("" for the root); refuses escapes."""
    if "\x00" in raw:
        raise InvalidArgument(f"{what} {raw!r}: NUL byte in the name")
    if len(raw.encode(errors="surrogateescape")) > MAX_NAME:
        raise InvalidArgument(f"{what} {raw[:80]!r}...: name longer than {MAX_NAME} bytes")
    if raw.startswith("/"):
        raise InvalidArgument(f'{what} "{raw}": absolute name')
    path = posixpath.normpath(raw) if raw else "."
    if path == ".." or path.startswith("../"):
        raise InvalidArgument(f'{what} "{raw}": the name climbs out of the archive')
    return "" if path == "." else path


def _link_target(name: str, target: str, *, relative_to_member: bool) -> str:
    kind = "symlink" if relative_to_member else "hardlink"
    if target.startswith("/"):
        raise InvalidArgument(
            f'archive member "{name}" is a {kind} out of the archive (to "{target}")'
        )
    joined = posixpath.join(posixpath.dirname(name), target) if relative_to_member else target
    try:
        resolved = _normalise(joined, f"archive {kind}")
    except InvalidArgument:
        raise InvalidArgument(
            f'archive member "{name}" is a {kind} out of the archive (to "{target}")'
        ) from None
    if not resolved:
        raise InvalidArgument(f'archive member "{name}" is a {kind} to the archive root')
    return resolved


def _type_name(entry: tarfile.TarInfo) -> str:
    if entry.ischr():
        return "character device"
    if entry.isblk():
        return "block device"
    if entry.isfifo():
        return "fifo"
    return f"member of tar type {entry.type!r}"


class _BadStream(Exception):
    """The tar stream is damaged (a bad header, or data ending inside a member)."""


class _StrictTarInfo(tarfile.TarInfo):
    """Tells a damaged header from the end of the archive.

    In stream mode ``TarFile.next()`` takes a bad header after the first one for the end of
    the archive, which would make a damaged archive look like a shorter one.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as exc:
            if buf.count(0) == len(buf):
                raise  # nothing, or zeros: the end of the archive
            raise _BadStream(f"bad tar header: {exc}") from exc
