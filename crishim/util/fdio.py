"""Reading and writing raw descriptors on the event loop, without giving them away.

Every descriptor has exactly one owner, and these helpers are never it: they wait for the
descriptor with ``add_reader``/``add_writer``, do non-blocking reads or writes, and stop
watching it before they return, so the caller can close it right after. This is the way to
talk to pipes and terminals that crishim creates itself.

Why not ``loop.connect_read_pipe(protocol, os.fdopen(fd))``: under uvloop the transport and
the file object both close the same descriptor number (MagicStack/uvloop issue 763). The
second close lands on whatever another thread opened in between. Why not a worker thread
doing a blocking ``os.read``/``os.write``: a cancelled ``await`` does not stop the thread,
so it may still use the number after the owner closed it and it was handed out again.
"""

from __future__ import annotations

import asyncio
import os

__all__ = ["read_chunk", "read_line", "write_all"]


async def _ready(fd: int, *, write: bool) -> None:
    """Wait until ``fd`` is readable (or writable); stops watching it on return."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def read_line(fd: int, limit: int = 64 * 1024) -> bytes:
    """The bytes up to and including the first newline read from ``fd``.

    Returns what was read when the writer closes first (``b""`` for none) and stops at
    ``limit`` bytes. ``fd`` is switched to non-blocking mode and stays the caller's.
    """
    os.set_blocking(fd, False)
    data = bytearray()
    while b"\n" not in data and len(data) < limit:
        chunk = await read_chunk(fd, limit - len(data))
        if not chunk:
            break
        data += chunk
    end = data.find(b"\n")
    return bytes(data if end < 0 else data[: end + 1])


async def read_chunk(fd: int, size: int, *, eof_errnos: tuple[int, ...] = ()) -> bytes:
    """Up to ``size`` bytes from the non-blocking descriptor ``fd`` (which stays the
    caller's) once some are there; ``b""`` at end of file or on an error in ``eof_errnos``."""
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            await _ready(fd, write=False)
        except OSError as exc:
            if exc.errno in eof_errnos:
                return b""
            raise


async def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the non-blocking descriptor ``fd`` (which stays the
    caller's), waiting while the reader is behind."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await _ready(fd, write=True)
            continue
        view = view[written:]
