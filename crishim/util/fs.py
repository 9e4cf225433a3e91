"""Small file-system helpers that keep blocking work off the event loop."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread

log = logging.getLogger(__name__)


def _remove_now(path: Path) -> None:
    def report(failed: str, exc: BaseException) -> None:
        if not isinstance(exc, FileNotFoundError):
            log.warning("cannot remove %s: %s", failed, exc)

    if path.is_symlink() or (path.exists() and not path.is_dir()):
        # rmtree refuses a symlink (conmon's attach links are symlinks to bundles).
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            report(str(path), exc)
        return
    # (onerror: Python 3.11 has no onexc yet)
    shutil.rmtree(path, onerror=lambda _func, failed, info: report(failed, info[1]))


async def remove_tree(path: Path) -> None:
    """Remove a directory tree, a file or a symlink (not its target) in a worker thread.

    A missing path is fine; what cannot be removed (a mount still busy, say) is logged and
    left, so that a teardown goes on with its other steps.
    """
    await anyio.to_thread.run_sync(_remove_now, path)


def _inodes_below(root: Path) -> Iterator[os.stat_result]:
    """lstat of ``root`` and everything below it, not crossing into other mounts.

    What vanishes during the walk is not counted.
    """
    top = os.lstat(root)
    yield top
    pending = [root]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield st
                    if stat.S_ISDIR(st.st_mode) and st.st_dev == top.st_dev:
                        pending.append(Path(entry.path))
        except FileNotFoundError:
            continue


def directory_usage(root: Path) -> tuple[int, int]:
    """Bytes (allocated blocks) and inodes of ``root`` and everything below it, like ``du``:
    each hardlinked inode once, other mounted file systems not entered, entries removed
    during the walk not counted. Raises FileNotFoundError when ``root`` is missing."""
    seen: set[tuple[int, int]] = set()
    used = 0
    for st in _inodes_below(root):
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            used += st.st_blocks * 512
    return used, len(seen)
