"""Unix socket helpers."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path


async def unix_socket_answers(path: Path, timeout: float = 2.0) -> bool:
    """True when a process accepts connections on the unix socket at ``path``.

    A socket that neither accepts nor refuses within ``timeout`` counts as alive, so that
    a busy server is never mistaken for a stale file.
    """
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except TimeoutError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
