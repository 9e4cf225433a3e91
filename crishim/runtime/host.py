"""Facts about the host that container specs depend on: devices, LSMs, swap accounting."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from crishim.errors import InvalidArgument, NotFound

# Device directories a privileged container does not get (they are per-container there).
_SKIPPED_DEVICE_DIRS = frozenset({"/dev/pts", "/dev/shm", "/dev/mqueue"})


@dataclass(frozen=True)
class HostDevice:
    """A device node of the host as stat(2) describes it."""

    path: str
    type: str  # "c" or "b"
    major: int
    minor: int
    file_mode: int
    uid: int
    gid: int


def stat_device(path: str) -> HostDevice:
    """The device node at ``path`` (symlinks followed); NotFound or InvalidArgument."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"device {path} does not exist on this host") from None
    if stat.S_ISCHR(info.st_mode):
        kind = "c"
    elif stat.S_ISBLK(info.st_mode):
        kind = "b"
    else:
        raise InvalidArgument(f"device {path} is not a character or block device")
    return HostDevice(
        path=path,
        type=kind,
        major=os.major(info.st_rdev),
        minor=os.minor(info.st_rdev),
        file_mode=stat.S_IMODE(info.st_mode),
        uid=info.st_uid,
        gid=info.st_gid,
    )


def list_devices(root: str = "/dev") -> list[HostDevice]:
    """Every device node under /dev, for privileged containers."""
    found: list[HostDevice] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(directory, d) not in _SKIPPED_DEVICE_DIRS]
        for name in files:
            path = os.path.join(directory, name)
            try:
                found.append(stat_device(path))
            except (NotFound, InvalidArgument, OSError):
                continue
    return found


def host_lsms() -> frozenset[str]:
    """The Linux security modules containers can be confined by here."""
    lsms = set()
    if Path("/sys/kernel/security/apparmor").is_dir():
        lsms.add("apparmor")
    if Path("/sys/fs/selinux/enforce").exists():
        lsms.add("selinux")
    return frozenset(lsms)


def swap_accounting() -> bool:
    """True when cgroups can limit swap (v1 memsw files or v2 memory.swap.max)."""
    v1 = Path("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes")
    v2 = [Path("/sys/fs/cgroup/memory.swap.max"), Path("/sys/fs/cgroup/unified/memory.swap.max")]
    return v1.exists() or any(p.exists() for p in v2)


def capability_bounding_mask(status: Path = Path("/proc/self/status")) -> int | None:
    """crishim's capability bounding set as a bit mask (None when it cannot be read)."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None
