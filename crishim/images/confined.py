"""Directories below the root of a layer being unpacked, and the layers below it.

:class:`ConfinedRoot` finds and makes directories without ever leaving the root (see
``unpack`` for the rules). The layers below, as overlayfs shows them merged, are
consulted for one thing only: a parent directory that a layer's entry needs
and the layer itself does not hold is made the way the merged lowers show it (its owner
and mode), or, where they show a symlink, the symlink is followed. A layer can also be
unpacked *ahead*, before the layers below it are there: missing parents are then made
with the defaults (root, 0755) and noted as :class:`ParentGuesses`, and
:func:`settle_parents` later gives them what the lowers show, or finds that a lower has
a symlink or a non-directory where a guess made a directory (then the layer must be
unpacked again with its lowers known). Either way the result equals an unpack with the
lowers known from the start.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from crishim.images.layer_stream import UnpackError

__all__ = [
    "OVERLAY_OPAQUE_XATTR",
    "ConfinedRoot",
    "Dir",
    "LowerEntry",
    "ParentGuesses",
    "lower_entry",
    "open_real_dir",
    "settle_parents",
]

Parts = tuple[str, ...]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
#: the kernel's own limit on symlinks followed in one lookup
MAX_SYMLINKS = 40
#: directories below the root a lookup may hold open at once: each is a descriptor, and
#: a layer's names (or links) could otherwise nest them until the process runs out
MAX_DEPTH = 256


@dataclass(frozen=True)
class Dir:
    """An open directory inside the root, and its real path below the root."""

    fd: int
    parts: Parts


def show(parts: Parts) -> str:
    """A real path below the root, for messages."""
    return "/".join(parts)


@dataclass(frozen=True)
class LowerEntry:
    """An entry of the merged lowers: its stat, and its target when it is a symlink."""

    st: os.stat_result
    link: str


@dataclass
class ParentGuesses:
    """Parent directories made with default owner and mode while the lowers were unknown:
    real path below the root -> whether it still has them (an entry of the layer itself
    for that directory sets its own)."""

    made: dict[Parts, bool] = field(default_factory=dict)

    def guessed(self, parts: Parts) -> None:
        self.made[parts] = True

    def declared(self, parts: Parts) -> None:
        if parts in self.made:
            self.made[parts] = False


class ConfinedRoot:
    """Directories below the root of a layer being unpacked, found without ever leaving
    it: missing ones made as the lowers show them (or, unpacking ahead, guessed)."""

    def __init__(
        self, root_fd: int, lower_fds: Sequence[int], guesses: ParentGuesses | None
    ) -> None:
        self._root = root_fd
        self._lowers = lower_fds
        self._guesses = guesses

    @contextmanager
    def walk(
        self, parts: Parts, entry: str, *, create: bool, follow: bool = True
    ) -> Iterator[Dir | None]:
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

    def _resolve(self, parts: Parts, entry: str, *, create: bool, follow: bool) -> Dir | None:
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
                    if len(stack) > MAX_DEPTH:
                        raise UnpackError(
                            f'layer entry "{entry}": path is nested deeper than '
                            f"{MAX_DEPTH} directories"
                        )
                    continue
                links += 1
                if links > MAX_SYMLINKS:
                    raise UnpackError(f'layer entry "{entry}": too many levels of symbolic links')
                if step.startswith("/"):
                    while stack:
                        os.close(stack.pop()[0])
                pending.extend(reversed(step.split("/")))
            real = tuple(n for _, n in stack)
            return Dir(stack.pop()[0] if stack else os.dup(self._root), real)
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _step(
        self, here: int, name: str, where: Parts, entry: str, *, create: bool, follow: bool
    ) -> int | str | None:
        """One component: an open directory, a symlink's target to follow, or None."""
        try:
            return os.open(name, DIR_FLAGS, dir_fd=here)
        except FileNotFoundError:
            return self._missing(here, name, where, entry) if create else None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        st = os.stat(name, dir_fd=here, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            raise UnpackError(f'layer entry "{entry}": "{show(where)}" is not a directory')
        if not follow:
            raise UnpackError(f'layer entry "{entry}": path passes through symlink "{show(where)}"')
        return self._link_target(os.readlink(name, dir_fd=here), where, entry)

    def _missing(self, here: int, name: str, where: Parts, entry: str) -> int | str:
        """Create a missing parent as the lowers show it (mkdir -p), or follow their link;
        unpacking ahead, with the defaults, noted as a guess."""
        if self._guesses is not None:
            self._guesses.guessed(where)
            lower = None
        else:
            lower = lower_entry(self._lowers, where)
        if lower is not None and stat.S_ISLNK(lower.st.st_mode):
            return self._link_target(lower.link, where, entry)
        if lower is not None and not stat.S_ISDIR(lower.st.st_mode):
            raise UnpackError(f'layer entry "{entry}": "{show(where)}" is not a directory')
        mode, uid, gid = (
            (0o755, 0, 0)
            if lower is None
            else (stat.S_IMODE(lower.st.st_mode), lower.st.st_uid, lower.st.st_gid)
        )
        os.mkdir(name, 0o700, dir_fd=here)
        fd = os.open(name, DIR_FLAGS, dir_fd=here)
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
            raise UnpackError(f'layer entry "{entry}": symlink "{show(where)}" is empty')
        return link


def lower_entry(lower_fds: Sequence[int], where: Parts) -> LowerEntry | None:
    """The entry at ``where`` as overlayfs would show the lowers (top first) merged."""
    for lower in lower_fds:
        found, final = _lookup_in_lower(lower, where)
        if final:
            return found
    return None


def settle_parents(target: Path, guesses: ParentGuesses, lowers: Sequence[Path]) -> bool:
    """Give the parents guessed while unpacking ahead into ``target`` the owner and mode
    the ``lowers`` (top first) show. False when a lower has a symlink or a non-directory
    where a guess made a directory: an unpack with the lowers known would have followed
    the link or refused the layer, so the layer must be unpacked again."""
    with ExitStack() as stack:
        root = _open_trusted(target, stack)
        lower_fds = [_open_trusted(lower, stack) for lower in lowers]
        fixes: list[tuple[Parts, os.stat_result]] = []
        for parts, unchanged in guesses.made.items():
            found = lower_entry(lower_fds, parts)
            if found is None:
                continue  # the defaults are what an unpack with the lowers makes too
            if not stat.S_ISDIR(found.st.st_mode):
                return False
            if unchanged:
                fixes.append((parts, found.st))
        for parts, st in fixes:
            fd = open_real_dir(root, parts)
            if fd is None:
                continue  # replaced later in the layer by something else
            try:
                # Owner first: chown clears setuid/setgid bits.
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
            finally:
                os.close(fd)
    return True


def open_real_dir(root_fd: int, parts: Parts) -> int | None:
    """Open the real directory at ``parts`` below ``root_fd`` following no symlink at
    all, or None."""
    fd = os.dup(root_fd)
    try:
        for name in parts:
            next_fd = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except OSError:
        os.close(fd)
        return None
    return fd


def _open_trusted(path: Path, stack: ExitStack) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    return fd


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(dir_fd: int) -> bool:
    try:
        return os.getxattr(dir_fd, OVERLAY_OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _lookup_in_lower(lower_fd: int, where: Parts) -> tuple[LowerEntry | None, bool]:
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
                return LowerEntry(st, link), True
            if not stat.S_ISDIR(st.st_mode):
                return None, True
            next_fd = os.open(name, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
            opaque = opaque or _is_opaque(fd)
        return None, opaque
    finally:
        os.close(fd)
