"""A full disk, reported as such: ENOSPC and EDQUOT become ResourceExhausted.

Where crishim writes (blobs, layers, snapshots, records, bundles, the CNI cache), the
write is wrapped in :func:`disk_full_as`, so the error names what was being written and
where, and says the disk is full, instead of a bare ``OSError: [Errno 28]``. kubelet then
sees RESOURCE_EXHAUSTED, the status the CRI has for it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from crishim.errors import ResourceExhausted

__all__ = ["DISK_FULL_ERRNOS", "disk_full_as", "disk_full_error", "is_disk_full"]

#: errnos that mean "no room to write": the file system is full, or the writer's quota is
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError saying the disk or a quota is full."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


def disk_full_error(what: str, path: str | os.PathLike[str], exc: OSError) -> ResourceExhausted:
    """The ResourceExhausted for ``exc`` raised while ``what`` at ``path``."""
    reason = "the disk quota is used up" if exc.errno == errno.EDQUOT else "the disk is full"
    return ResourceExhausted(f"{what} {os.fspath(path)}: {reason} ({exc.strerror})")


@contextmanager
def disk_full_as(what: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise a full disk inside the block as ResourceExhausted naming ``what`` and
    ``path`` (for example ``"writing the bundle of container 1a2b at"``, a directory)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(what, path, exc) from exc
        raise
