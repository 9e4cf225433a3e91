"""Directories made into private mount points, so mounts made below them stay put.

A directory on a shared mount (``/run`` on a systemd host) passes every mount made below it
on to the mount's peers and slaves: other mount namespaces, containers with ``rslave`` or
``rshared`` binds of ``/run``, the host. crishim's pins of namespace files and its
ID-mapped stages must not travel (a copy elsewhere keeps a namespace or a volume mounted
behind crishim's back), so each such directory is bind-mounted onto itself and made
private first, as ``ip netns`` does for ``/run/netns``.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from crishim.errors import Internal
from crishim.util import syscalls

__all__ = ["is_mount_point", "make_private_mount_point"]

# Serialises the check-then-mount: two callers at once must not stack two bind mounts.
# A threading lock (taken in a worker thread) works across event loops.
_lock = threading.Lock()


def is_mount_point(path: str) -> bool:
    """True when ``path`` (absolute, symlinks resolved) is a mount point of this namespace."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and the like escaped as octal.
            mount_point = line.split(" ", 5)[4]
            decoded = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mount_point)
            if decoded == path:
                return True
    return False


def _mount(source: str, target: str, flags: int) -> None:
    try:
        syscalls.mount(source, target, None, flags)
    except OSError as exc:
        raise Internal(f"mount {target} (flags {flags:#x}): {exc.strerror}") from None


def make_private_mount_point(directory: Path) -> None:
    """Create ``directory`` and make it a mount point with private propagation (bound onto
    itself when it is not one yet). Blocking; Internal when the host refuses."""
    with _lock:
        directory.mkdir(parents=True, exist_ok=True)
        target = os.path.realpath(directory)
        if not is_mount_point(target):
            _mount(target, target, syscalls.MS_BIND)
        _mount("none", target, syscalls.MS_PRIVATE)
