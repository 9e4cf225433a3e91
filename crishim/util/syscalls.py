"""The mount system calls, for the layers that mount (pod namespaces, root filesystems).

Calling mount(2) directly instead of running ``mount(8)`` saves a process per mount, and a
node starting dozens of pods makes hundreds of mounts. Errors are OSErrors with the errno,
for the caller to word.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = [
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SLAVE",
    "idmapped_clone",
    "mount",
    "move_mount",
    "pivot_root",
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
MS_SLAVE = 0x80000
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
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000

# The new mount API (Linux >= 5.12 for idmapped mounts); x86_64 and arm64 share the numbers.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_OPEN_TREE_CLONE = 1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_MOUNT_ATTR_IDMAP = 0x100000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
# pivot_root(2) has no libc wrapper; its number differs between the two architectures.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


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


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2); OSError on failure (EINVAL: a root or parent mount is shared)."""
    machine = os.uname().machine
    if machine not in _SYS_PIVOT_ROOT:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown system call number on {machine}")
    number = _SYS_PIVOT_ROOT[machine]
    _check(_libc.syscall(number, os.fsencode(new_root), os.fsencode(put_old)), new_root)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


def idmapped_clone(source: str, userns_fd: int, *, recursive: bool) -> int:
    """A detached copy of the mount tree at ``source`` whose file owners are mapped through
    the user namespace ``userns_fd`` (open_tree + mount_setattr MOUNT_ATTR_IDMAP).

    Returns the new mount's descriptor, the caller's to close (or to attach with
    :func:`move_mount`). OSError on failure (EINVAL: the file system cannot be ID-mapped).
    """
    recursive_flag = _AT_RECURSIVE if recursive else 0
    flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | recursive_flag
    fd = _check(_libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), flags), source)
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        _check(
            _libc.syscall(
                _SYS_MOUNT_SETATTR,
                fd,
                b"",
                _AT_EMPTY_PATH | recursive_flag,
                ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            source,
        )
    except BaseException:
        os.close(fd)
        raise
    return int(fd)


def move_mount(mount_fd: int, target: str) -> None:
    """Attach the detached mount ``mount_fd`` at ``target``; OSError on failure."""
    _check(
        _libc.syscall(
            _SYS_MOVE_MOUNT,
            mount_fd,
            b"",
            _AT_FDCWD,
            os.fsencode(target),
            _MOVE_MOUNT_F_EMPTY_PATH,
        ),
        target,
    )
