"""Apply one image layer (a tar stream, plain or compressed) onto a directory.

This is what containerd's ``archive.Apply`` does, with the image treated as hostile:

- The layer is streamed: decompressed and read by ``tarfile`` in stream mode, hashed on
  the way (the diff ID covers every decompressed byte, trailing padding included).
- Nothing outside ``target`` is ever created or changed. Entry names are normalised
  (leading ``/`` and ``./`` dropped, ``a/../b`` folded); a name that would climb out of the
  root is refused. Parent directories are walked one component at a time through
  directory file descriptors opened with ``O_NOFOLLOW``. A symlink met in a parent is
  *confined*, as containerd does: it is resolved as if ``target`` were ``/`` (absolute
  targets restart at ``target``, ``..`` stops at it), at most 40 links deep. So a layer
  with ``evil -> /`` and then ``evil/etc/passwd`` writes ``target/etc/passwd``.
- The last component is never followed: existing entries are removed (never written
  through), regular files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW``, and owners, modes,
  xattrs and times are set on the entry itself.
- Hardlink targets are stricter than parents: a target that climbs out of the root, passes
  through any symlink, is missing or is a directory is refused. A hardlink entry only adds
  a name; it never changes the metadata of the inode it shares.
- Device nodes and fifos are created with mknod inside ``target``; symlink targets are data
  and are never followed while extracting.
- ``trusted.overlay.*`` xattrs from the image are dropped: they are overlayfs' own
  bookkeeping, and in an overlay upper dir the kernel would act on them.
- GNU sparse files (old and PAX forms) are refused, as OCI recommends not to use them.

Whiteouts become overlayfs whiteouts (:attr:`WhiteoutStyle.OVERLAY`) or deletions
(:attr:`WhiteoutStyle.DELETE`, for a target that already holds the layers below).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, Protocol, Self

import zstandard

from crishim.errors import Internal, InvalidArgument
from crishim.util.disk import disk_full_error, is_disk_full

__all__ = ["LayerResult", "UnpackError", "WhiteoutStyle", "apply_layer"]

log = logging.getLogger(__name__)

Parts = tuple[str, ...]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: the kernel's own limit on symlinks followed in one lookup
_MAX_SYMLINKS = 40
#: directories below the root a lookup may hold open at once: each is a descriptor, and
#: a layer's names (or links) could otherwise nest them until the process runs out
_MAX_DEPTH = 256
_COPY_CHUNK = 1 << 20
_WHITEOUT_PREFIX = ".wh."
_WHITEOUT_META_PREFIX = ".wh..wh."
_OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_OVERLAY_XATTR_PREFIX = "trusted.overlay."
_PAX_XATTR_PREFIX = "SCHILY.xattr."
#: decimal digits before the point of a PAX time that can still be a file time (int64 ns)
_PAX_TIME_DIGITS_MAX = 18
#: failures of the host rather than of the image: reported as Internal, not InvalidArgument
#: (a full disk is ResourceExhausted)
_HOST_ERRNOS = frozenset({errno.EIO, errno.EROFS, errno.ENOMEM})

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: zstd input fed per call: one call's output is at most ~32x this many KiB even for a
#: crafted stream of tiny RLE blocks, so the decompressed layer is never held in memory
_ZSTD_INPUT_CHUNK = 1024
# zlib's wbits for "gzip header and trailer"; input read per call and output cap per call.
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_GZIP_INPUT_CHUNK = 256 * 1024
_GZIP_MAX_OUTPUT = 4 * 1024 * 1024
# tarfile reads the stream in pieces of this size (its default, 10 KiB, costs many calls).
_TAR_BUFFER = 1 << 20
#: headers that hold the next entry's long name or link, or PAX records; Go's archive/tar
#: (containerd's reader) refuses them past 1 MiB too
_EXTENDED_HEADER_TYPES = frozenset(
    (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    )
)
_EXTENDED_HEADER_MAX = 1 << 20
#: global PAX records a layer may set (``git archive`` writes one); each costs time on
#: every later entry
_GLOBAL_PAX_RECORDS_MAX = 128
#: error messages are cut to about this many characters
_MESSAGE_MAX = 1000


class UnpackError(InvalidArgument):
    """The layer is damaged or hostile; the message names the entry and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(_readable(message))


def _readable(message: str) -> str:
    """A message quoting entry names, made fit to send: names come from the layer.

    A name may be a MiB long (both ends are kept: the start of the name and the problem),
    and its bytes that are not UTF-8 are surrogate escapes, which gRPC cannot encode
    (they are spelled out as ``\\udcNN``).
    """
    if len(message) > _MESSAGE_MAX:
        half = _MESSAGE_MAX // 2
        message = f"{message[:half]}...{message[-half:]}"
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


class WhiteoutStyle(Enum):
    """How ``.wh.`` entries are applied."""

    #: whiteouts become 0/0 char devices, opaque dirs get ``trusted.overlay.opaque=y``
    OVERLAY = "overlay"
    #: whiteouts delete the path from the target (which holds the lower layers)
    DELETE = "delete"


@dataclass(frozen=True)
class LayerResult:
    """What applying a layer found: its diff ID, uncompressed size and entry count."""

    diff_id: str
    size: int
    entries: int


def apply_layer(
    blob: Path,
    media_type: str,
    target: Path,
    *,
    lowers: Sequence[Path] = (),
    whiteouts: WhiteoutStyle,
) -> LayerResult:
    """Extract the layer ``blob`` onto the existing directory ``target``.

    ``lowers`` are the directories of the layers below (top first), consulted only to
    create missing parent directories the way overlayfs would show them. Raises
    :class:`UnpackError` for a hostile or damaged layer; ``target`` is then half-made and
    the caller removes it.
    """
    with ExitStack() as stack:
        try:
            raw = stack.enter_context(blob.open("rb"))
            root_fd = _open_trusted_dir(target, stack)
            lower_fds = [_open_trusted_dir(lower, stack) for lower in lowers]
        except OSError as exc:
            raise Internal(f"cannot open for unpacking: {exc.filename}: {exc.strerror}") from exc
        stream = _DigestReader(_decompressed(raw, media_type))
        try:
            entries = _Extractor(root_fd, lower_fds, whiteouts, target).run(stream)
            stream.drain()
        except (_CorruptStream, tarfile.TarError) as exc:
            raise UnpackError(f"layer is not a valid tar/gzip/zstd stream: {exc}") from exc
    return LayerResult(diff_id=stream.digest, size=stream.size, entries=entries)


def _open_trusted_dir(path: Path, stack: ExitStack) -> int:
    # The caller's own directories: following symlinks in these paths is fine.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    return fd


# --- the stream: decompression and digest -----------------------------------------------


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class _CorruptStream(Exception):
    """The compressed stream or the tar headers are damaged (not an OSError on purpose:
    errors of the target file system are reported per entry, these for the whole layer)."""


class _Compression(Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_MEDIA_TYPES: dict[str, _Compression] = {
    "application/vnd.oci.image.layer.v1.tar": _Compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": _Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": _Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": _Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": _Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": _Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": _Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": _Compression.GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": _Compression.ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar": _Compression.NONE,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": _Compression.GZIP,
}


def _compression_of(raw: io.BufferedReader, media_type: str) -> _Compression:
    """By media type; for an unknown one, by the stream's magic bytes."""
    known = _MEDIA_TYPES.get(media_type.split(";", 1)[0].strip().lower())
    if known is not None:
        return known
    magic = raw.peek(len(_ZSTD_MAGIC))[: len(_ZSTD_MAGIC)]
    if magic.startswith(_GZIP_MAGIC):
        return _Compression.GZIP
    if magic == _ZSTD_MAGIC:
        return _Compression.ZSTD
    return _Compression.NONE


def _decompressed(raw: io.BufferedReader, media_type: str) -> _Readable:
    compression = _compression_of(raw, media_type)
    if compression is _Compression.GZIP:
        return _GzipReader(raw)
    if compression is _Compression.ZSTD:
        return _ZstdReader(raw)
    return raw


class _GzipReader:
    """A gzip stream decoder on zlib directly: header, CRC and length are checked in C,
    which is markedly faster than ``gzip.GzipFile`` for large layers. Concatenated members
    are decoded in turn, zero padding after the last one is allowed, a stream that ends
    inside a member is an error. Output per step is capped, so a crafted stream cannot
    make one read balloon in memory."""

    def __init__(self, source: _Readable) -> None:
        self._source = source
        self._member: Any = None  # zlib's decompress object of the current member
        self._input = b""

    def read(self, size: int, /) -> bytes:
        while True:
            if not self._input:
                self._input = self._source.read(_GZIP_INPUT_CHUNK)
                if not self._input:
                    if self._member is not None:
                        raise EOFError("gzip stream ends inside a member")
                    return b""
            if self._member is None:
                if not self._input.strip(b"\0"):
                    self._input = b""  # padding between or after members
                    continue
                self._member = zlib.decompressobj(_GZIP_WBITS)
            out: bytes = self._member.decompress(self._input, min(size, _GZIP_MAX_OUTPUT))
            self._input = self._member.unconsumed_tail
            if self._member.eof:
                self._input = self._member.unused_data
                self._member = None
            if out:
                return out


class _ZstdReader:
    """A zstd stream decoder that, unlike ``ZstdDecompressor.stream_reader``, reports a
    stream that ends inside a frame instead of returning the part it could decode."""

    def __init__(self, source: _Readable) -> None:
        self._source = source
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._pending = b""
        self._offset = 0

    def read(self, size: int, /) -> bytes:
        while self._offset == len(self._pending):
            chunk = self._source.read(_ZSTD_INPUT_CHUNK)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ends inside a frame")
                return b""
            self._pending, self._offset = self._decode(chunk), 0
        out = self._pending[self._offset : self._offset + size]
        self._offset += len(out)
        return out

    def _decode(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._frame.decompress(data))
            self._in_frame = not self._frame.eof
            if self._in_frame:
                break
            # A layer may be several concatenated frames: start a new one on the rest.
            data = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
        return b"".join(out)


class _DigestReader(io.RawIOBase):
    """Hands the decompressed stream to tarfile, hashing and counting every byte."""

    def __init__(self, source: _Readable) -> None:
        super().__init__()
        self._source = source
        self._sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        try:
            data = self._source.read(size)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise _CorruptStream(str(exc) or type(exc).__name__) from exc
        self._sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read past the end-of-archive marker: padding after it is part of the diff ID."""
        while self.read(_COPY_CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._sha256.hexdigest()


class _StrictTarInfo(tarfile.TarInfo):
    """Tells a damaged header from the end of the archive.

    ``TarFile.next()`` takes any bad header after the first one for the end of the
    archive; only an empty read or a zero block really is one. And tarfile lets the
    ValueErrors of parsing a damaged PAX header escape as they are (a ``hdrcharset`` that
    is not UTF-8, a record length of thousands of digits): those are damage too.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as exc:
            if buf.count(0) == len(buf):
                raise  # nothing, or zeros: the end of the archive
            raise _CorruptStream(f"bad tar header: {exc}") from exc
        if info.type == tarfile.GNUTYPE_SPARSE:
            _refuse_sparse(info)
        # tarfile reads an extended header whole into memory, whatever size it declares.
        if info.type in _EXTENDED_HEADER_TYPES and info.size > _EXTENDED_HEADER_MAX:
            raise UnpackError(
                f"layer holds a tar extended header of {info.size} bytes "
                f"(at most {_EXTENDED_HEADER_MAX} are read)"
            )
        return info

    # tarfile's hooks for the PAX forms of GNU sparse files (formats 0.0, 0.1 and 1.0),
    # called with the entry the PAX header describes, before 1.0 reads its map.
    def _proc_gnusparse_00(self, entry: tarfile.TarInfo, *rest: object) -> None:
        _refuse_sparse(entry)

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(archive)
        except ValueError as exc:  # UnicodeDecodeError is one too
            raise _CorruptStream(f"bad extended tar header: {exc}") from exc


def _refuse_sparse(entry: tarfile.TarInfo) -> NoReturn:
    # OCI asks images not to use them. tarfile reads a sparse map with no bound on its
    # length (a small compressed layer can hold billions of entries) and writes the holes
    # out as zeros (a "file" of terabytes), so they are refused before either happens.
    raise UnpackError(f'layer entry "{entry.name}": sparse files are not supported')


# --- names --------------------------------------------------------------------------------


def _clean(name: str, entry: str, what: str) -> Parts:
    """Normalise a tar path to components below the root; refuse one that escapes."""
    if "\x00" in name:
        raise UnpackError(f'layer entry "{entry}": NUL byte in the {what}')
    relative = name.lstrip("/")
    path = posixpath.normpath(relative) if relative else "."
    if path == ".." or path.startswith("../"):
        raise UnpackError(f'layer entry "{entry}": {what} escapes the root')
    return () if path == "." else tuple(path.split("/"))


def _show(parts: Parts) -> str:
    return "/".join(parts)


# --- metadata helpers ----------------------------------------------------------------------


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd: int, name: str, st: os.stat_result) -> None:
    if stat.S_ISDIR(st.st_mode):
        # rmtree with dir_fd walks by descriptors and never follows symlinks.
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _chmod_nofollow(dir_fd: int, name: str, mode: int) -> None:
    # Linux has no lchmod: chmod the inode through an O_PATH descriptor of the entry itself.
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def _pax_time_ns(member: tarfile.TarInfo, key: str) -> int | None:
    # PAX times are decimal strings with up to nanosecond precision; a float loses it.
    text = member.pax_headers.get(key)
    if text is None:
        return None
    try:
        seconds = Decimal(text)
    except InvalidOperation:
        return None
    # Beyond any file time ("1e999999" overflows the multiplication, and int() of
    # "1e999990" takes half a minute): left to the header's value, which is checked later.
    if not seconds.is_finite() or seconds.adjusted() > _PAX_TIME_DIGITS_MAX:
        return None
    return int(seconds * 1_000_000_000)


def _times_ns(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) in nanoseconds; atime defaults to mtime."""
    mtime = _pax_time_ns(member, "mtime")
    if mtime is None:
        mtime = int(member.mtime) * 1_000_000_000
    atime = _pax_time_ns(member, "atime")
    return (mtime if atime is None else atime, mtime)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(dir_fd: int) -> bool:
    try:
        return os.getxattr(dir_fd, OVERLAY_OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _entry_error(entry: str, exc: Exception, target: Path) -> Exception:
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if isinstance(exc.filename, str) else ""
        if is_disk_full(exc):
            return disk_full_error(f'unpacking layer entry "{entry}" into', target, exc)
        if exc.errno in _HOST_ERRNOS:
            return Internal(_readable(f'unpacking layer entry "{entry}": {exc.strerror}{where}'))
        return UnpackError(f'layer entry "{entry}": {exc.strerror or exc}{where}')
    return UnpackError(f'layer entry "{entry}": {exc}')


# --- extraction ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dir:
    """An open directory inside the root, and its real path below the root."""

    fd: int
    parts: Parts


@dataclass(frozen=True)
class _LowerEntry:
    st: os.stat_result
    link: str


class _Extractor:
    """Applies the entries of one tar stream under the directory open as ``root_fd``."""

    def __init__(
        self, root_fd: int, lower_fds: Sequence[int], style: WhiteoutStyle, target: Path
    ) -> None:
        self._root = root_fd
        self._target = target  # for messages only: every access goes through root_fd
        self._lowers = lower_fds
        self._style = style
        # Real paths this layer created, and their ancestors: an opaque marker applied in
        # DELETE style removes everything else in its directory.
        self._touched: set[Parts] = set()
        # Directory times are set last: writing their contents would change them again.
        self._dir_times: dict[Parts, tuple[int, int]] = {}

    def run(self, stream: _DigestReader) -> int:
        count = 0
        with tarfile.open(
            fileobj=stream, mode="r|", tarinfo=_StrictTarInfo, bufsize=_TAR_BUFFER
        ) as tar:
            while (member := tar.next()) is not None:
                count += 1
                # tarfile applies every global PAX record to every later entry, one by one.
                if len(tar.pax_headers) > _GLOBAL_PAX_RECORDS_MAX:
                    raise UnpackError(
                        f"layer holds {len(tar.pax_headers)} global PAX records "
                        f"(at most {_GLOBAL_PAX_RECORDS_MAX})"
                    )
                try:
                    self._apply(tar, member)
                except (OSError, ValueError, OverflowError) as exc:
                    raise _entry_error(member.name, exc, self._target) from exc
                # In stream mode tarfile keeps every header it read (an attribute typeshed
                # does not list); nothing here needs them, and a layer may hold 100k entries.
                tar.members.clear()  # type: ignore[attr-defined]
        self._restore_dir_times()
        return count

    # -- one entry --

    def _apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        entry = member.name
        parts = _clean(entry, entry, "path")
        if not parts:
            log.debug('layer entry "%s" ignored: it names the root', entry)
            _skip_data(tar, member)
            return
        base = parts[-1]
        if base.startswith(_WHITEOUT_PREFIX):
            self._whiteout(parts, entry)
            _skip_data(tar, member)
            return
        if member.islnk():
            self._hardlink(parts, member)
            return
        with self._walk(parts[:-1], entry, create=True) as parent:
            assert parent is not None  # create=True never gives None
            if member.isdir():
                self._directory(parent, base, member)
            elif member.isreg():
                self._regular(parent, base, member, tar)
            elif member.issym():
                self._symlink(parent, base, member)
            elif member.ischr() or member.isblk() or member.isfifo():
                self._special(parent, base, member)
            else:
                raise UnpackError(
                    f'layer entry "{entry}": unsupported tar entry type {member.type!r}'
                )
            self._touch((*parent.parts, base))

    def _touch(self, path: Parts) -> None:
        self._touched.update(path[:depth] for depth in range(1, len(path) + 1))

    def _make_room(self, parent: _Dir, name: str, *, keep_dir: bool) -> bool:
        """Remove what is at ``name`` (docker semantics); True when a directory was kept."""
        st = _lstat_at(parent.fd, name)
        if st is None:
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        _remove_at(parent.fd, name, st)
        return False

    def _directory(self, parent: _Dir, name: str, member: tarfile.TarInfo) -> None:
        # A directory over a directory merges: the old one stays and takes the new metadata.
        if not self._make_room(parent, name, keep_dir=True):
            os.mkdir(name, 0o700, dir_fd=parent.fd)
        self._set_attributes(parent.fd, name, member, symlink=False)
        self._dir_times[(*parent.parts, name)] = _times_ns(member)

    def _regular(
        self, parent: _Dir, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile
    ) -> None:
        self._make_room(parent, name, keep_dir=False)
        fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent.fd)
        try:
            source = tar.extractfile(member)
            if source is not None:
                with os.fdopen(fd, "wb", closefd=False) as out:
                    shutil.copyfileobj(source, out, _COPY_CHUNK)
        finally:
            os.close(fd)
        self._set_attributes(parent.fd, name, member, symlink=False)
        self._set_times(parent.fd, name, member)

    def _symlink(self, parent: _Dir, name: str, member: tarfile.TarInfo) -> None:
        self._make_room(parent, name, keep_dir=False)
        os.symlink(member.linkname, name, dir_fd=parent.fd)
        self._set_attributes(parent.fd, name, member, symlink=True)
        self._set_times(parent.fd, name, member)

    def _special(self, parent: _Dir, name: str, member: tarfile.TarInfo) -> None:
        if member.ischr():
            kind = stat.S_IFCHR
        elif member.isblk():
            kind = stat.S_IFBLK
        else:
            kind = stat.S_IFIFO
        self._make_room(parent, name, keep_dir=False)
        device = os.makedev(member.devmajor, member.devminor)
        os.mknod(name, kind | 0o600, device, dir_fd=parent.fd)
        self._set_attributes(parent.fd, name, member, symlink=False)
        self._set_times(parent.fd, name, member)

    def _hardlink(self, parts: Parts, member: tarfile.TarInfo) -> None:
        entry = member.name
        target = _clean(member.linkname, entry, "hardlink target")
        if not target:
            raise UnpackError(f'layer entry "{entry}": hardlink target is a directory')
        with self._walk(target[:-1], entry, create=False, follow=False) as source_dir:
            source = None if source_dir is None else _lstat_at(source_dir.fd, target[-1])
            if source_dir is None or source is None:
                raise UnpackError(
                    f'layer entry "{entry}": hardlink target "{member.linkname}" not found'
                )
            if stat.S_ISDIR(source.st_mode):
                raise UnpackError(f'layer entry "{entry}": hardlink target is a directory')
            with self._walk(parts[:-1], entry, create=True) as parent:
                assert parent is not None
                existing = _lstat_at(parent.fd, parts[-1])
                if existing is not None and (existing.st_dev, existing.st_ino) == (
                    source.st_dev,
                    source.st_ino,
                ):
                    return  # already this very file (a link to itself, or a repeat)
                self._make_room(parent, parts[-1], keep_dir=False)
                os.link(
                    target[-1],
                    parts[-1],
                    src_dir_fd=source_dir.fd,
                    dst_dir_fd=parent.fd,
                    follow_symlinks=False,
                )
                self._touch((*parent.parts, parts[-1]))

    # -- whiteouts --

    def _whiteout(self, parts: Parts, entry: str) -> None:
        base = parts[-1]
        if base == _OPAQUE_MARKER:
            self._opaque(parts[:-1], entry)
            return
        if base.startswith(_WHITEOUT_META_PREFIX):
            return  # aufs bookkeeping such as .wh..wh.plnk: nothing to apply
        hidden = base[len(_WHITEOUT_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise UnpackError(f'layer entry "{entry}": whiteout names no file')
        if self._style is WhiteoutStyle.DELETE:
            with self._walk(parts[:-1], entry, create=False) as parent:
                st = None if parent is None else _lstat_at(parent.fd, hidden)
                if parent is not None and st is not None:
                    _remove_at(parent.fd, hidden, st)
            return
        with self._walk(parts[:-1], entry, create=True) as parent:
            assert parent is not None
            self._make_room(parent, hidden, keep_dir=False)
            os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent.fd)

    def _opaque(self, dir_parts: Parts, entry: str) -> None:
        overlay = self._style is WhiteoutStyle.OVERLAY
        with self._walk(dir_parts, entry, create=overlay) as directory:
            if directory is None:
                return  # DELETE style: nothing below to hide
            if overlay:
                os.setxattr(directory.fd, OVERLAY_OPAQUE_XATTR, b"y")
            else:
                self._remove_untouched(directory)

    def _remove_untouched(self, directory: _Dir) -> None:
        """Delete everything below ``directory`` that this layer did not create."""
        for name in os.listdir(directory.fd):
            path = (*directory.parts, name)
            st = _lstat_at(directory.fd, name)
            if st is None:
                continue
            if path not in self._touched:
                _remove_at(directory.fd, name, st)
            elif stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _DIR_FLAGS, dir_fd=directory.fd)
                try:
                    self._remove_untouched(_Dir(fd, path))
                finally:
                    os.close(fd)

    # -- attributes --

    def _set_attributes(
        self, dir_fd: int, name: str, member: tarfile.TarInfo, *, symlink: bool
    ) -> None:
        # Owner first: chown clears setuid/setgid bits and file capabilities.
        os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
        if not symlink:
            _chmod_nofollow(dir_fd, name, member.mode & 0o7777)
        self._set_xattrs(dir_fd, name, member)

    def _set_xattrs(self, dir_fd: int, name: str, member: tarfile.TarInfo) -> None:
        # l*xattr on /proc/self/fd/<dir>/<name>: the directory is the one we hold open and
        # the entry itself is not followed.
        path = f"/proc/self/fd/{dir_fd}/{name}"
        for key, value in member.pax_headers.items():
            if not key.startswith(_PAX_XATTR_PREFIX):
                continue
            attr = key[len(_PAX_XATTR_PREFIX) :]
            if attr.startswith(_OVERLAY_XATTR_PREFIX):
                log.debug('layer entry "%s": dropped overlayfs xattr %s', member.name, attr)
                continue
            data = value.encode("utf-8", "surrogateescape")
            try:
                os.setxattr(path, attr, data, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.EOPNOTSUPP:
                    raise
                log.debug('layer entry "%s": xattr %s not supported here', member.name, attr)

    def _set_times(self, dir_fd: int, name: str, member: tarfile.TarInfo) -> None:
        os.utime(name, ns=_times_ns(member), dir_fd=dir_fd, follow_symlinks=False)

    def _restore_dir_times(self) -> None:
        for parts, times in self._dir_times.items():
            fd = self._reopen(parts)
            if fd is None:
                continue  # removed or replaced later in this layer
            try:
                os.utime(fd, ns=times)
            finally:
                os.close(fd)

    def _reopen(self, parts: Parts) -> int | None:
        """Open the real directory at ``parts`` following no symlink at all, or None."""
        fd = os.dup(self._root)
        try:
            for name in parts:
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = next_fd
        except OSError:
            os.close(fd)
            return None
        return fd

    # -- confined lookup --

    @contextmanager
    def _walk(
        self, parts: Parts, entry: str, *, create: bool, follow: bool = True
    ) -> Iterator[_Dir | None]:
        """Open the directory at ``parts``, confined to the root.

        Missing directories are made (``create``; shaped after the lowers when they show
        one) or give None. Symlinks are resolved with the root as ``/`` (``follow``) or
        refused.
        """
        directory = self._resolve(parts, entry, create=create, follow=follow)
        try:
            yield directory
        finally:
            if directory is not None:
                os.close(directory.fd)

    def _resolve(self, parts: Parts, entry: str, *, create: bool, follow: bool) -> _Dir | None:
        # The stack holds the open directories below the root: ".." pops one (never past
        # the root) and an absolute symlink empties it.
        stack: list[tuple[int, str]] = []
        pending = list(reversed(parts))
        links = 0
        try:
            while pending:
                name = pending.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if stack:
                        os.close(stack.pop()[0])
                    continue
                here = stack[-1][0] if stack else self._root
                where = (*(n for _, n in stack), name)
                step = self._step(here, name, where, entry, create=create, follow=follow)
                if step is None:
                    return None
                if isinstance(step, int):
                    stack.append((step, name))
                    if len(stack) > _MAX_DEPTH:
                        raise UnpackError(
                            f'layer entry "{entry}": path is nested deeper than '
                            f"{_MAX_DEPTH} directories"
                        )
                    continue
                links += 1
                if links > _MAX_SYMLINKS:
                    raise UnpackError(f'layer entry "{entry}": too many levels of symbolic links')
                if step.startswith("/"):
                    while stack:
                        os.close(stack.pop()[0])
                pending.extend(reversed(step.split("/")))
            real = tuple(n for _, n in stack)
            return _Dir(stack.pop()[0] if stack else os.dup(self._root), real)
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _step(
        self, here: int, name: str, where: Parts, entry: str, *, create: bool, follow: bool
    ) -> int | str | None:
        """One component: an open directory, a symlink's target to follow, or None."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=here)
        except FileNotFoundError:
            return self._missing(here, name, where, entry) if create else None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        st = os.stat(name, dir_fd=here, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            raise UnpackError(f'layer entry "{entry}": "{_show(where)}" is not a directory')
        if not follow:
            raise UnpackError(
                f'layer entry "{entry}": path passes through symlink "{_show(where)}"'
            )
        return self._link_target(os.readlink(name, dir_fd=here), where, entry)

    def _missing(self, here: int, name: str, where: Parts, entry: str) -> int | str:
        """Create a missing parent as the lowers show it (mkdir -p), or follow their link."""
        lower = self._lower_entry(where)
        if lower is not None and stat.S_ISLNK(lower.st.st_mode):
            return self._link_target(lower.link, where, entry)
        if lower is not None and not stat.S_ISDIR(lower.st.st_mode):
            raise UnpackError(f'layer entry "{entry}": "{_show(where)}" is not a directory')
        mode, uid, gid = (
            (0o755, 0, 0)
            if lower is None
            else (stat.S_IMODE(lower.st.st_mode), lower.st.st_uid, lower.st.st_gid)
        )
        os.mkdir(name, 0o700, dir_fd=here)
        fd = os.open(name, _DIR_FLAGS, dir_fd=here)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _link_target(link: str, where: Parts, entry: str) -> str:
        if not link:
            raise UnpackError(f'layer entry "{entry}": symlink "{_show(where)}" is empty')
        return link

    def _lower_entry(self, where: Parts) -> _LowerEntry | None:
        """The entry at ``where`` as overlayfs would show the lowers merged, or None."""
        for lower in self._lowers:
            found, final = _lookup_in_lower(lower, where)
            if final:
                return found
        return None


def _skip_data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    """Read past the data of a regular entry that is not extracted.

    tarfile would skip it itself, but in a stream its seek reads block after block for
    the whole declared size even once the stream has ended: an entry declaring 2**62
    bytes would never finish. Read here, a missing end is a ReadError at once.
    """
    if member.isreg() and member.size:
        source = tar.extractfile(member)
        assert source is not None  # always a file object for a regular entry
        while source.read(_COPY_CHUNK):
            pass


def _lookup_in_lower(lower_fd: int, where: Parts) -> tuple[_LowerEntry | None, bool]:
    """Look ``where`` up in one lower without following symlinks.

    Returns the entry, and whether the answer is final: True when found, or when this
    lower hides the layers below (a whiteout, a non-directory or an opaque directory on
    the way).
    """
    fd = os.dup(lower_fd)
    opaque = False
    try:
        for depth, name in enumerate(where):
            st = _lstat_at(fd, name)
            if st is None:
                return None, opaque
            if _is_whiteout(st):
                return None, True
            if depth == len(where) - 1:
                link = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else ""
                return _LowerEntry(st, link), True
            if not stat.S_ISDIR(st.st_mode):
                return None, True
            next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
            opaque = opaque or _is_opaque(fd)
        return None, opaque
    finally:
        os.close(fd)
