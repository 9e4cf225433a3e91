"""The mount system calls, for the layers that mount (pod namespaces, root filesystems).

Calling mount(2) directly instead of running ``mount(8)`` saves a process per mount, and a
node starting dozens of pods makes hundreds of mounts. Errors are OSErrors with the errno,
for the caller to word.
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "mount",
    "setns",
    "umount",
    "unshare",
]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]

CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000


def _encode(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    """mount(2); OSError on failure."""
    if _libc.mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def umount(target: str, flags: int = 0) -> None:
    """umount2(2); OSError on failure (EINVAL: not a mount point)."""
    if _libc.umount2(_encode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def unshare(flags: int) -> None:
    """unshare(2) for the calling thread; OSError on failure."""
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def setns(fd: int, nstype: int) -> None:
    """setns(2) for the calling thread; OSError on failure."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
