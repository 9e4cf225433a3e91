"""Mounting and unmounting on the host: container root filesystems, a pod's /dev/shm.

Mounts are made with the system calls (no ``mount(8)`` process per mount), in a worker
thread: an overlay mount of a deep image takes the kernel a moment.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from crishim.errors import CrishimError, Internal
from crishim.runtime.idmap import Idmap, mount_bind_idmapped, mount_overlay_idmapped
from crishim.util import syscalls
from crishim.util.disk import disk_full_as

# mount(8)'s option words that are flags, not file-system data.
_FLAGS = {
    "ro": syscalls.MS_RDONLY,
    "rw": 0,
    "nosuid": syscalls.MS_NOSUID,
    "nodev": syscalls.MS_NODEV,
    "noexec": syscalls.MS_NOEXEC,
    "sync": syscalls.MS_SYNCHRONOUS,
    "dirsync": syscalls.MS_DIRSYNC,
    "noatime": syscalls.MS_NOATIME,
    "nodiratime": syscalls.MS_NODIRATIME,
    "relatime": syscalls.MS_RELATIME,
    "strictatime": syscalls.MS_STRICTATIME,
}


@dataclass(frozen=True)
class MountRequest:
    """One mount as ``mount -t type -o options source target`` would make it."""

    type: str
    source: str
    options: tuple[str, ...] = ()


def split_options(options: Sequence[str]) -> tuple[int, str]:
    """mount(8) options as mount(2) takes them: (flags, comma-joined file-system data)."""
    flags = 0
    data = []
    for option in options:
        if option in _FLAGS:
            flags |= _FLAGS[option]
        else:
            data.append(option)
    return flags, ",".join(data)


def _mount_one(mount: MountRequest, target: str, idmap: Idmap | None, stage: Path | None) -> None:
    options = [o for o in mount.options if o not in ("bind", "rbind")]
    flags, data = split_options(options)
    if idmap is not None and mount.type == "bind":
        mount_bind_idmapped(mount.source, target, idmap, recursive="rbind" in mount.options)
        if flags & syscalls.MS_RDONLY:
            syscalls.mount(None, target, None, syscalls.MS_REMOUNT | syscalls.MS_BIND | flags)
    elif idmap is not None and mount.type == "overlay" and "lowerdir=" in data:
        assert stage is not None, "an ID-mapped overlay needs a stage directory"
        mount_overlay_idmapped(flags, data, target, idmap, stage)
    elif mount.type == "bind":
        recursive = syscalls.MS_REC if "rbind" in mount.options else 0
        syscalls.mount(mount.source, target, None, syscalls.MS_BIND | recursive)
        if flags & syscalls.MS_RDONLY:
            # A bind mount takes its flags only from a remount.
            syscalls.mount(None, target, None, syscalls.MS_REMOUNT | syscalls.MS_BIND | flags)
    else:
        syscalls.mount(mount.source, target, mount.type, flags, data or None)


def _mount_all(
    mounts: Sequence[MountRequest], target: Path, idmap: Idmap | None, stage: Path | None
) -> None:
    with disk_full_as("making the mount point", target):
        target.mkdir(parents=True, exist_ok=True)
    for mount in mounts:
        try:
            _mount_one(mount, str(target), idmap, stage)
        except CrishimError:
            raise
        except OSError as exc:
            raise Internal(
                f"mounting {mount.type} {mount.source} on {target}: {exc.strerror}"
            ) from None


async def mount_all(
    mounts: Sequence[MountRequest],
    target: Path,
    idmap: Idmap | None = None,
    stage: Path | None = None,
) -> None:
    """Mount ``mounts`` in order on ``target``, creating the directory. With ``idmap``, the
    files show through that user namespace (overlay layers staged under ``stage``)."""
    await anyio.to_thread.run_sync(_mount_all, mounts, target, idmap, stage)


def _unmount(target: Path) -> None:
    path = str(target)
    # Loops for stacked mounts; a busy one (a process still inside) is detached instead, so
    # it goes once its last user does. EINVAL: nothing (more) mounted there.
    while True:
        try:
            syscalls.umount(path)
            continue
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            if exc.errno != errno.EBUSY:
                raise Internal(f"unmounting {target}: {exc.strerror}") from None
        try:
            syscalls.umount(path, syscalls.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise Internal(f"unmounting {target}: {exc.strerror}") from None


async def unmount(target: Path) -> None:
    """Unmount everything on ``target`` (lazily when busy); nothing mounted is fine."""
    if not os.path.ismount(target):
        return
    await anyio.to_thread.run_sync(_unmount, target)
