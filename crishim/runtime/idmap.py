"""ID-mapped mounts for pods with a user namespace of their own.

The files of an image and of the node's volumes belong to node IDs (root is 0); in a pod
whose root is node ID 65536, say, they would show as ``nobody``. An ID-mapped mount (Linux
>= 5.12) shows them through the pod's user namespace instead: node 0 is the pod's 0 (node
65536 on the way down), so nothing is copied or chowned and one image serves every pod.
crishim makes these mounts itself, so every runtime handler gets them (runc 1.1 cannot).

- Root file systems: each overlay lower dir is cloned ID-mapped into a stage directory,
  the overlay is mounted on those, and the stage mounts are detached at once (overlayfs
  keeps private clones of its layers). The upper dir is the container's own: its top is
  given to the pod's root, and what the pod writes there is stored with node IDs.
- Volumes (CRI mounts with mappings): cloned ID-mapped into the container's stage
  directory, which the runtime then bind-mounts like any host path. The stage is released
  with the container: entries are unmounted and removed one by one, never recursively, so
  a volume can never lose its files to a cleanup.

The directory holding the stages is a private mount point (:func:`prepare_stage_root`):
on a shared mount the staged volumes would otherwise propagate into every mount namespace
with a shared or slave view of it (containers with ``rslave`` binds of ``/run``, the host).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from crishim.errors import FailedPrecondition, Internal, InvalidArgument
from crishim.util import syscalls
from crishim.util.mountpoint import make_private_mount_point
from crishim.util.userns import user_namespace_holder

__all__ = [
    "Idmap",
    "idmapped_mounts_supported",
    "mount_bind_idmapped",
    "mount_overlay_idmapped",
    "prepare_stage_root",
    "release_stage",
    "stage_idmapped",
    "unsearchable_parent",
]

# Any mapping serves the probe; this is the first range kubelet gives pods.
_PROBE_MAP = "0 65536 65536\n"


@dataclass(frozen=True)
class Idmap:
    """A pod's user namespace (its pin) and the node IDs of the pod's root."""

    userns: str
    root_uid: int
    root_gid: int


@contextlib.contextmanager
def _userns_fd(path: str) -> Iterator[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise FailedPrecondition(f"the pod's user namespace {path}: {exc.strerror}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _attach_idmapped(source: str, target: str, userns_fd: int, *, recursive: bool) -> None:
    try:
        fd = syscalls.idmapped_clone(source, userns_fd, recursive=recursive)
    except OSError as exc:
        hint = " (its file system cannot be ID-mapped)" if exc.errno == errno.EINVAL else ""
        raise FailedPrecondition(f"ID-mapped mount of {source}{hint}: {exc.strerror}") from None
    try:
        syscalls.move_mount(fd, target)
    except OSError as exc:
        message = f"attaching the ID-mapped mount of {source} at {target}: {exc.strerror}"
        raise Internal(message) from None
    finally:
        os.close(fd)


def _detach(path: Path) -> None:
    while True:
        try:
            syscalls.umount(str(path), syscalls.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise Internal(f"unmounting {path}: {exc.strerror}") from None


def _make_target(path: Path, like: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(like):
        path.mkdir(exist_ok=True)
    else:
        path.touch(exist_ok=True)


def mount_overlay_idmapped(flags: int, data: str, target: str, idmap: Idmap, stage: Path) -> None:
    """Mount an overlay whose lower dirs are seen through the pod's user namespace.

    ``data`` is the overlay's option string (``lowerdir=a:b,upperdir=...,workdir=...``);
    the lower dirs are staged under ``stage`` only while the mount is made.
    """
    parts = data.split(",")
    lower_at = next(i for i, p in enumerate(parts) if p.startswith("lowerdir="))
    lowers = parts[lower_at].removeprefix("lowerdir=").split(":")
    upper = next((p.removeprefix("upperdir=") for p in parts if p.startswith("upperdir=")), "")
    staged: list[Path] = []
    try:
        with _userns_fd(idmap.userns) as userns_fd:
            for n, lower in enumerate(lowers):
                where = stage / str(n)
                _make_target(where, lower)
                staged.append(where)
                _attach_idmapped(lower, str(where), userns_fd, recursive=False)
        if upper:
            os.chown(upper, idmap.root_uid, idmap.root_gid)
        parts[lower_at] = "lowerdir=" + ":".join(str(s) for s in staged)
        syscalls.mount("overlay", target, "overlay", flags, ",".join(parts))
    finally:
        for where in staged:
            _detach(where)
            with contextlib.suppress(OSError):
                where.rmdir()
        with contextlib.suppress(OSError):
            stage.rmdir()


def mount_bind_idmapped(source: str, target: str, idmap: Idmap, *, recursive: bool) -> None:
    """Bind ``source`` on ``target`` seen through the pod's user namespace."""
    with _userns_fd(idmap.userns) as userns_fd:
        _attach_idmapped(source, target, userns_fd, recursive=recursive)


def _stage(source: str, stage: Path, name: str, userns: str) -> str:
    if not os.path.lexists(source):
        raise InvalidArgument(f"mount source {source} does not exist")
    where = stage / name
    _make_target(where, source)
    with _userns_fd(userns) as userns_fd:
        try:
            _attach_idmapped(source, str(where), userns_fd, recursive=True)
        except BaseException:
            _remove_entry(where)
            raise
    return str(where)


async def prepare_stage_root(root: Path) -> None:
    """Make ``root``, the directory of every container's stage, a private mount point, so
    that no staged mount propagates out of crishim's mount namespace."""
    await anyio.to_thread.run_sync(make_private_mount_point, root)


async def stage_idmapped(source: str, stage: Path, name: str, userns: str) -> str:
    """An ID-mapped copy of the mount tree at ``source`` under ``stage``; its path."""
    return await anyio.to_thread.run_sync(_stage, source, stage, name, userns)


def _remove_entry(path: Path) -> None:
    _detach(path)
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Still mounted or not empty: left alone rather than emptied.
        raise Internal(f"removing the ID-mapped mount point {path}: {exc.strerror}") from None


def _release(stage: Path) -> None:
    try:
        entries = list(stage.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        _remove_entry(entry)
    with contextlib.suppress(FileNotFoundError):
        stage.rmdir()


async def release_stage(stage: Path) -> None:
    """Unmount and remove every staged mount under ``stage``, then ``stage``; missing is
    fine. Never removes anything recursively."""
    await anyio.to_thread.run_sync(_release, stage)


async def idmapped_mounts_supported(path: Path) -> str:
    """Try an ID-mapped mount of ``path`` (the snapshots' file system); "" when it works,
    else why not."""
    try:
        async with user_namespace_holder(_PROBE_MAP, _PROBE_MAP) as pid:
            with _userns_fd(f"/proc/{pid}/ns/user") as userns_fd:
                fd = syscalls.idmapped_clone(str(path), userns_fd, recursive=False)
                os.close(fd)
    except OSError as exc:
        return f"ID-mapped mount of {path}: {exc.strerror}"
    except (Internal, FailedPrecondition) as exc:
        return exc.message
    return ""


def unsearchable_parent(path: Path) -> str:
    """The first directory from ``/`` down to ``path`` that others may not search, as a
    message, or "". The runtime works as the pod's root, a node user without rights, when
    it mounts the container's root file system: it must reach the bundle."""
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        try:
            mode = os.stat(current).st_mode
        except OSError as exc:
            return f"{current}: {exc.strerror}"
        if not mode & stat.S_IXOTH:
            return f"{current} (mode {stat.S_IMODE(mode):04o}) is not searchable by others"
    return ""
