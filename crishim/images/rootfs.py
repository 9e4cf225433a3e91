"""Reading files of a container's root filesystem without following links out of it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# /etc/passwd and /etc/group are small; anything bigger is not read whole.
MAX_USER_DB_BYTES = 4 * 1024 * 1024


def read_confined(rootfs: Path, relative: str) -> str | None:
    """The text of ``rootfs/relative``, or None when it is missing, a link or too large.

    Every component is opened with O_NOFOLLOW from the rootfs' own descriptor, so a
    hostile image cannot make crishim read a host file through a symlink.
    """
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    fds: list[int] = []
    try:
        fd = os.open(rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(fd)
        for part in parts[:-1]:
            fd = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
            fds.append(fd)
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        fds.append(fd)
        if os.fstat(fd).st_size > MAX_USER_DB_BYTES:
            return None
        data = os.read(fd, MAX_USER_DB_BYTES)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR):
            return None
        raise
    finally:
        for opened in reversed(fds):
            os.close(opened)
    return data.decode(errors="replace")
