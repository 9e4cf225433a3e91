"""Apply one image layer (a tar stream, plain or compressed) onto a directory.

This is what containerd's ``archive.Apply`` does, with the image treated as hostile:

- The layer is streamed: decompressed, hashed (the diff ID covers every decompressed
  byte, trailing padding included) and its tar headers parsed on the way
  (``layer_stream``); file data goes from the decompressed chunks straight to the files.
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
import logging
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import Enum
from pathlib import Path

from crishim.errors import Internal
from crishim.images.confined import (
    DIR_FLAGS,
    OVERLAY_OPAQUE_XATTR,
    ConfinedRoot,
    Dir,
    ParentGuesses,
    Parts,
    open_real_dir,
    settle_parents,
)
from crishim.images.layer_stream import (
    CorruptStream,
    LayerStream,
    Readable,
    TarReader,
    UnpackError,
    readable,
)
from crishim.util.disk import disk_full_error, is_disk_full

__all__ = [
    "LayerResult",
    "ParentGuesses",
    "Readable",
    "UnpackError",
    "WhiteoutStyle",
    "apply_layer",
    "apply_layer_ahead",
    "settle_parents",
]

log = logging.getLogger(__name__)


_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: what is read from a blob file at once
_READ_BUFFER = 1 << 20
_WHITEOUT_PREFIX = ".wh."
_WHITEOUT_META_PREFIX = ".wh..wh."
_OPAQUE_MARKER = ".wh..wh..opq"
_OVERLAY_XATTR_PREFIX = "trusted.overlay."
_PAX_XATTR_PREFIX = "SCHILY.xattr."
#: decimal digits before the point of a PAX time that can still be a file time (int64 ns)
_PAX_TIME_DIGITS_MAX = 18
#: failures of the host rather than of the image: reported as Internal, not InvalidArgument
#: (a full disk is ResourceExhausted)
_HOST_ERRNOS = frozenset({errno.EIO, errno.EROFS, errno.ENOMEM})


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
    blob: Path | Readable,
    media_type: str,
    target: Path,
    *,
    lowers: Sequence[Path] = (),
    whiteouts: WhiteoutStyle,
) -> LayerResult:
    """Extract the layer ``blob`` (a file, or a stream of its bytes) onto the existing
    directory ``target``.

    ``lowers`` are the directories of the layers below (top first), consulted only to
    create missing parent directories the way overlayfs would show them. Raises
    :class:`UnpackError` for a hostile or damaged layer; ``target`` is then half-made and
    the caller removes it.
    """
    return _apply(blob, media_type, target, lowers, whiteouts, None)


def apply_layer_ahead(
    blob: Path | Readable, media_type: str, target: Path
) -> tuple[LayerResult, ParentGuesses]:
    """:func:`apply_layer` in overlay style before the layers below are there (so layers
    can be unpacked side by side); :func:`settle_parents` with them completes it."""
    guesses = ParentGuesses()
    return _apply(blob, media_type, target, (), WhiteoutStyle.OVERLAY, guesses), guesses


def _apply(
    blob: Path | Readable,
    media_type: str,
    target: Path,
    lowers: Sequence[Path],
    whiteouts: WhiteoutStyle,
    guesses: ParentGuesses | None,
) -> LayerResult:
    with ExitStack() as stack:
        try:
            raw = (
                stack.enter_context(blob.open("rb", buffering=_READ_BUFFER))
                if isinstance(blob, Path)
                else blob
            )
            root_fd = _open_trusted_dir(target, stack)
            lower_fds = [_open_trusted_dir(lower, stack) for lower in lowers]
        except OSError as exc:
            raise Internal(f"cannot open for unpacking: {exc.filename}: {exc.strerror}") from exc
        try:
            stream = LayerStream(raw, media_type)
            extractor = _Extractor(root_fd, lower_fds, whiteouts, target, guesses)
            entries = extractor.run(TarReader(stream))
            stream.drain()
        except (CorruptStream, tarfile.TarError) as exc:
            raise UnpackError(f"layer is not a valid tar/gzip/zstd stream: {exc}") from exc
    return LayerResult(diff_id=stream.digest, size=stream.size, entries=entries)


def _open_trusted_dir(path: Path, stack: ExitStack) -> int:
    # The caller's own directories: following symlinks in these paths is fine.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    return fd


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


def _entry_error(entry: str, exc: Exception, target: Path) -> Exception:
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if isinstance(exc.filename, str) else ""
        if is_disk_full(exc):
            return disk_full_error(f'unpacking layer entry "{entry}" into', target, exc)
        if exc.errno in _HOST_ERRNOS:
            return Internal(readable(f'unpacking layer entry "{entry}": {exc.strerror}{where}'))
        return UnpackError(f'layer entry "{entry}": {exc.strerror or exc}{where}')
    return UnpackError(f'layer entry "{entry}": {exc}')


# --- extraction ---------------------------------------------------------------------------


class _Extractor:
    """Applies the entries of one tar stream under the directory open as ``root_fd``."""

    def __init__(
        self,
        root_fd: int,
        lower_fds: Sequence[int],
        style: WhiteoutStyle,
        target: Path,
        guesses: ParentGuesses | None = None,
    ) -> None:
        self._root = root_fd
        self._target = target  # for messages only: every access goes through root_fd
        self._style = style
        # Unpacking ahead (the lowers are not there yet): parents made without them.
        self._guesses = guesses
        self._root_dir = ConfinedRoot(root_fd, lower_fds, guesses)
        # Real paths this layer created, and their ancestors: an opaque marker applied in
        # DELETE style removes everything else in its directory.
        self._touched: set[Parts] = set()
        # Directory times are set last: writing their contents would change them again.
        self._dir_times: dict[Parts, tuple[int, int]] = {}

    def run(self, reader: TarReader) -> int:
        count = 0
        for member in reader.entries():
            count += 1
            try:
                self._apply(reader, member)
            except (OSError, ValueError, OverflowError) as exc:
                raise _entry_error(member.name, exc, self._target) from exc
        self._restore_dir_times()
        return count

    # -- one entry --

    def _apply(self, reader: TarReader, member: tarfile.TarInfo) -> None:
        entry = member.name
        parts = _clean(entry, entry, "path")
        if not parts:
            log.debug('layer entry "%s" ignored: it names the root', entry)
            reader.skip(member)
            return
        base = parts[-1]
        if base.startswith(_WHITEOUT_PREFIX):
            self._whiteout(parts, entry)
            reader.skip(member)
            return
        if member.islnk():
            self._hardlink(parts, member)
            return
        with self._root_dir.walk(parts[:-1], entry, create=True) as parent:
            assert parent is not None  # create=True never gives None
            if member.isdir():
                self._directory(parent, base, member)
            elif member.isreg():
                self._regular(parent, base, member, reader)
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

    def _make_room(self, parent: Dir, name: str, *, keep_dir: bool) -> bool:
        """Remove what is at ``name`` (docker semantics); True when a directory was kept."""
        st = _lstat_at(parent.fd, name)
        if st is None:
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        _remove_at(parent.fd, name, st)
        return False

    def _directory(self, parent: Dir, name: str, member: tarfile.TarInfo) -> None:
        # A directory over a directory merges: the old one stays and takes the new metadata.
        if not self._make_room(parent, name, keep_dir=True):
            os.mkdir(name, 0o700, dir_fd=parent.fd)
        self._set_attributes(parent.fd, name, member, symlink=False)
        path = (*parent.parts, name)
        self._dir_times[path] = _times_ns(member)
        if self._guesses is not None:
            self._guesses.declared(path)

    def _regular(self, parent: Dir, name: str, member: tarfile.TarInfo, reader: TarReader) -> None:
        self._make_room(parent, name, keep_dir=False)
        # The new file itself (O_EXCL, O_NOFOLLOW) is written and given its metadata
        # through its descriptor: no further lookups by name.
        fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent.fd)
        try:
            for piece in reader.data(member):
                while piece:
                    piece = piece[os.write(fd, piece) :]
            # Owner first: chown clears setuid/setgid bits and file capabilities.
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)
            for attr, value in self._xattrs(member):
                self._set_xattr(fd, member, attr, value)
            os.utime(fd, ns=_times_ns(member))
        finally:
            os.close(fd)

    def _symlink(self, parent: Dir, name: str, member: tarfile.TarInfo) -> None:
        self._make_room(parent, name, keep_dir=False)
        os.symlink(member.linkname, name, dir_fd=parent.fd)
        self._set_attributes(parent.fd, name, member, symlink=True)
        self._set_times(parent.fd, name, member)

    def _special(self, parent: Dir, name: str, member: tarfile.TarInfo) -> None:
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
        with self._root_dir.walk(target[:-1], entry, create=False, follow=False) as source_dir:
            source = None if source_dir is None else _lstat_at(source_dir.fd, target[-1])
            if source_dir is None or source is None:
                raise UnpackError(
                    f'layer entry "{entry}": hardlink target "{member.linkname}" not found'
                )
            if stat.S_ISDIR(source.st_mode):
                raise UnpackError(f'layer entry "{entry}": hardlink target is a directory')
            with self._root_dir.walk(parts[:-1], entry, create=True) as parent:
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
            with self._root_dir.walk(parts[:-1], entry, create=False) as parent:
                st = None if parent is None else _lstat_at(parent.fd, hidden)
                if parent is not None and st is not None:
                    _remove_at(parent.fd, hidden, st)
            return
        with self._root_dir.walk(parts[:-1], entry, create=True) as parent:
            assert parent is not None
            self._make_room(parent, hidden, keep_dir=False)
            os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent.fd)

    def _opaque(self, dir_parts: Parts, entry: str) -> None:
        overlay = self._style is WhiteoutStyle.OVERLAY
        with self._root_dir.walk(dir_parts, entry, create=overlay) as directory:
            if directory is None:
                return  # DELETE style: nothing below to hide
            if overlay:
                os.setxattr(directory.fd, OVERLAY_OPAQUE_XATTR, b"y")
            else:
                self._remove_untouched(directory)

    def _remove_untouched(self, directory: Dir) -> None:
        """Delete everything below ``directory`` that this layer did not create."""
        for name in os.listdir(directory.fd):
            path = (*directory.parts, name)
            st = _lstat_at(directory.fd, name)
            if st is None:
                continue
            if path not in self._touched:
                _remove_at(directory.fd, name, st)
            elif stat.S_ISDIR(st.st_mode):
                fd = os.open(name, DIR_FLAGS, dir_fd=directory.fd)
                try:
                    self._remove_untouched(Dir(fd, path))
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
        for attr, value in self._xattrs(member):
            self._set_xattr(path, member, attr, value)

    @staticmethod
    def _xattrs(member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
        """The entry's xattrs from its PAX records, overlayfs' own left out."""
        for key, value in member.pax_headers.items():
            if not key.startswith(_PAX_XATTR_PREFIX):
                continue
            attr = key[len(_PAX_XATTR_PREFIX) :]
            if attr.startswith(_OVERLAY_XATTR_PREFIX):
                log.debug('layer entry "%s": dropped overlayfs xattr %s', member.name, attr)
                continue
            yield attr, value.encode("utf-8", "surrogateescape")

    @staticmethod
    def _set_xattr(where: str | int, member: tarfile.TarInfo, attr: str, value: bytes) -> None:
        """Set one xattr on a path not to follow, or on an open descriptor."""
        try:
            if isinstance(where, int):
                os.setxattr(where, attr, value)
            else:
                os.setxattr(where, attr, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            log.debug('layer entry "%s": xattr %s not supported here', member.name, attr)

    def _set_times(self, dir_fd: int, name: str, member: tarfile.TarInfo) -> None:
        os.utime(name, ns=_times_ns(member), dir_fd=dir_fd, follow_symlinks=False)

    def _restore_dir_times(self) -> None:
        for parts, times in self._dir_times.items():
            fd = open_real_dir(self._root, parts)
            if fd is None:
                continue  # removed or replaced later in this layer
            try:
                os.utime(fd, ns=times)
            finally:
                os.close(fd)
