"""Waiting for files to appear in a directory, with inotify(7) on the event loop.

A process that writes a file to say something happened (conmon's exit files) can be
noticed the moment the file lands instead of at the next poll. :class:`DirectoryWatch`
reports files created, written and closed, or moved into the directory; a caller takes a
:meth:`DirectoryWatch.changed` future *before* it looks at the directory, so nothing that
lands between the look and the wait is missed.

Where inotify is not available (or its queue overflows) the future simply resolves at the
caller's timeout: callers keep a slow poll as the fallback, and lose only speed.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
from pathlib import Path

__all__ = ["DirectoryWatch"]

log = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000  # the watch is gone (the directory was removed)
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def parse_events(data: bytes) -> tuple[list[str], int]:
    """The file names in a read of inotify events, and the union of the events' masks."""
    names = []
    masks = 0
    pos = 0
    while pos + _EVENT.size <= len(data):
        _, mask, _, length = _EVENT.unpack_from(data, pos)
        pos += _EVENT.size
        masks |= mask
        if length:
            names.append(data[pos : pos + length].rstrip(b"\0").decode(errors="replace"))
        pos += length
    return names, masks


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class DirectoryWatch:
    """Files landing in one directory, as futures on the running loop."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._warned = False
        self._waiters: list[asyncio.Future[None]] = []
        self.landed = 0  # files reported so far (for tests and logs)

    @property
    def active(self) -> bool:
        """True while inotify reports this directory."""
        return self._fd is not None

    def start(self) -> bool:
        """Begin watching (the directory must exist); False where inotify cannot."""
        if self._fd is not None:
            return True
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            self._cannot("inotify is not available", ctypes.get_errno())
            return False
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        if _libc.inotify_add_watch(fd, os.fsencode(self.directory), mask) < 0:
            error = ctypes.get_errno()
            os.close(fd)
            self._cannot(f"cannot watch {self.directory}", error)
            return False
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._on_readable)
        return True

    def _cannot(self, what: str, error: int) -> None:
        # Said once at WARNING; callers retry now and then.
        level = logging.DEBUG if self._warned else logging.WARNING
        log.log(level, "%s (%s): polling instead", what, os.strerror(error))
        self._warned = True

    def changed(self) -> asyncio.Future[None]:
        """A future that resolves when the next file lands (take it before looking)."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return future

    async def wait(self, future: asyncio.Future[None], timeout: float) -> None:
        """Wait for ``future`` (from :meth:`changed`) at most ``timeout`` seconds."""
        timer = asyncio.get_running_loop().call_later(max(timeout, 0), _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            self.forget(future)

    def forget(self, future: asyncio.Future[None]) -> None:
        """Drop a future from :meth:`changed` that is no longer waited for."""
        if not future.done():
            future.cancel()
        if future in self._waiters:
            self._waiters.remove(future)

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("reading inotify events of %s: %s; polling", self.directory, exc)
            self.close()
            return
        names, masks = parse_events(data)
        if masks & IN_Q_OVERFLOW:
            log.debug("inotify queue of %s overflowed", self.directory)
        self.landed += len(names)
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            _resolve(future)
        if masks & IN_IGNORED:
            log.warning("%s is no longer watched (removed?): polling", self.directory)
            self.close()

    def close(self) -> None:
        """Stop watching; waiters resolve at their timeouts."""
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
