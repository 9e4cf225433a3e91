"""Small file-system helpers that keep blocking work off the event loop."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread


async def remove_tree(path: Path) -> None:
    """Remove a directory tree in a worker thread; a missing one is fine."""
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))


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
