"""File work of the installer: syncing the image's root into the host, atomic writes, and
removals that never reach through a mount point.

A bind of a host directory inside the rootfs looks like any directory; a recursive delete
that walked into one would delete the host's data (``/var/lib/kubelet``). Every removal
here first looks for mount points at or below its target in ``/proc/self/mountinfo`` and
refuses when it finds one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from crishim.errors import FailedPrecondition
from crishim.util import syscalls

__all__ = [
    "file_digest",
    "mount_points",
    "release_stale_mounts",
    "remove_tree",
    "same_mount_namespace",
    "sync_tree",
    "write_atomic",
]

_TMP_SUFFIX = ".crishim-new"


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Every mount point of this process's mount namespace."""
    points = []
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) > 4:
            points.append(_unescape(fields[4]))
    return points


def same_mount_namespace(pid: int) -> bool:
    """Whether process ``pid`` is in this process's mount namespace (OSError when its
    namespace cannot be read)."""
    return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino


def _mounts_at_or_below(path: Path) -> list[str]:
    return _at_or_below(mount_points(), os.path.realpath(path))


def _at_or_below(points: Iterable[str], root: str) -> list[str]:
    return [p for p in points if p == root or p.startswith(root.rstrip("/") + "/")]


def release_stale_mounts(path: Path, host_path: str, node_pid: int = 1) -> list[str]:
    """Detach the mounts at or below ``path`` that this mount namespace holds but the
    node's (``node_pid``'s, where ``path`` is ``host_path``) no longer has; the ones
    detached.

    A DaemonSet's pod got a copy of the node's mounts when it started, and a copy of a
    private mount never learns that the node unmounted it: after crishim-rootfs.service
    stopped, the pod (and the installer's hand-off, which runs in the pod's mount
    namespace) still sees the rootfs and every bind in it. The copies are this namespace's
    own: detaching them changes nothing on the node. Refuses (FailedPrecondition) when the
    node itself still has mounts there; does nothing in the node's own namespace or when
    its mount table cannot be read (remove_tree then refuses if anything is mounted)."""
    try:
        if same_mount_namespace(node_pid):
            return []
        on_node = _at_or_below(mount_points(Path(f"/proc/{node_pid}/mountinfo")), host_path)
    except OSError:
        return []
    if on_node:
        raise FailedPrecondition(
            f"{host_path}: still mounted on the node: {', '.join(on_node[:5])}"
        )
    released = []
    while here := _at_or_below(mount_points(), os.path.realpath(path)):
        top = min(here, key=len)
        try:
            syscalls.umount(top, syscalls.MNT_DETACH)
        except OSError as exc:
            raise FailedPrecondition(f"{top}: cannot detach this namespace's copy: {exc}") from exc
        released.append(top)
    return released


def remove_tree(path: Path) -> bool:
    """Remove ``path`` (file, symlink or directory tree); False when it was not there.
    Refuses (FailedPrecondition) when anything is mounted at or below it."""
    if not path.is_symlink() and not path.exists():
        return False
    if path.is_dir() and not path.is_symlink():
        mounted = _mounts_at_or_below(path)
        if mounted:
            raise FailedPrecondition(
                f"{path}: not removed, file systems are mounted in it: {', '.join(mounted[:5])}"
            )
        shutil.rmtree(path)
    else:
        path.unlink()
    return True


def file_digest(path: Path) -> str | None:
    """The sha256 of a file's bytes; None when there is no such file."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it."""
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _same(src: os.stat_result, dst: os.stat_result) -> bool:
    return (
        stat.S_IFMT(src.st_mode) == stat.S_IFMT(dst.st_mode)
        and src.st_mode == dst.st_mode
        and src.st_uid == dst.st_uid
        and src.st_gid == dst.st_gid
        and src.st_size == dst.st_size
        and src.st_mtime_ns == dst.st_mtime_ns
    )


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _replace_with_copy(src: Path, dst: Path, st: os.stat_result) -> None:
    tmp = dst.with_name(dst.name + _TMP_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), tmp)
    else:
        shutil.copyfile(src, tmp, follow_symlinks=False)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
    os.lchown(tmp, st.st_uid, st.st_gid)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    existing = _lstat(dst)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        remove_tree(dst)
    os.replace(tmp, dst)


def sync_tree(source: Path, dest: Path, skip: Iterable[str]) -> int:
    """Make ``dest`` a copy of ``source``: new and changed files written (each through a
    temporary file renamed into place, so running programs keep their old copy), files
    gone from ``source`` removed. ``skip`` holds paths relative to both roots (``run``,
    ``etc/hosts``) neither copied nor removed. Returns how many entries changed."""
    skipped = {s.strip("/") for s in skip}
    # Kept in dest though not in source: what is skipped and the directories holding it.
    kept = {"/".join(p.split("/")[:n]) for p in skipped for n in range(1, p.count("/") + 2)}
    dest.mkdir(parents=True, exist_ok=True)
    return _sync_dir(source, dest, "", skipped, kept)


def _sync_dir(source: Path, dest: Path, rel: str, skipped: set[str], kept: set[str]) -> int:
    changes = 0
    names = set()
    with os.scandir(source) as entries:
        listed = sorted(entries, key=lambda e: e.name)
    for entry in listed:
        entry_rel = f"{rel}/{entry.name}" if rel else entry.name
        if entry_rel in skipped:
            continue
        names.add(entry.name)
        src, dst = Path(entry.path), dest / entry.name
        st = entry.stat(follow_symlinks=False)
        existing = _lstat(dst)
        if stat.S_ISDIR(st.st_mode):
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                if existing is not None:
                    dst.unlink()
                dst.mkdir()
                changes += 1
                existing = dst.lstat()
            changes += _sync_dir(src, dst, entry_rel, skipped, kept)
            if (existing.st_mode, existing.st_uid, existing.st_gid) != (
                st.st_mode,
                st.st_uid,
                st.st_gid,
            ):
                os.chmod(dst, stat.S_IMODE(st.st_mode))
                os.lchown(dst, st.st_uid, st.st_gid)
                changes += 1
        elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            if stat.S_ISLNK(st.st_mode) and existing is not None and stat.S_ISLNK(existing.st_mode):
                unchanged = os.readlink(src) == os.readlink(dst)
            else:
                unchanged = existing is not None and _same(st, existing)
            if not unchanged:
                _replace_with_copy(src, dst, st)
                changes += 1
        # Devices, sockets and pipes have no place in an image's root: not copied.
    with os.scandir(dest) as entries:
        extra = [e.name for e in entries if e.name not in names]
    for name in extra:
        entry_rel = f"{rel}/{name}" if rel else name
        if entry_rel not in kept:
            remove_tree(dest / name)
            changes += 1
    return changes
