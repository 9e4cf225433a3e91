"""Small file-system helpers that keep blocking work off the event loop."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio.to_thread


async def remove_tree(path: Path) -> None:
    """Remove a directory tree in a worker thread; a missing one is fine."""
    await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))
