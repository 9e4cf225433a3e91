"""The gRPC server on a unix socket.

Start: the socket's directory is created; a socket file left by a dead crishim is replaced,
but if a live process answers on it, start is refused. The socket is created mode 0660.
Stop: new calls are refused, in-flight calls get a grace period to finish, then the socket
is removed and connections closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Collection
from pathlib import Path
from typing import Any

from grpclib.const import Handler

from crishim.api.codec import CriCodec
from crishim.api.grpc_server import GrpcServer
from crishim.api.instrument import CallTracker
from crishim.errors import Unavailable
from crishim.util.sockets import unix_socket_answers

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


async def prepare_socket_path(path: Path) -> None:
    """Create the parent directory and clear a stale socket; refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise Unavailable(f"{path} exists and is not a socket; refusing to replace it")
    if await unix_socket_answers(path):
        raise Unavailable(f"{path}: another process is already serving on this socket")
    log.info("removing stale socket %s", path)
    path.unlink(missing_ok=True)


class CriServer:
    """The gRPC server on a unix socket, with the CRI servicers' instrumented mappings."""

    def __init__(self, servicers: Collection[Any], socket_path: Path, tracker: CallTracker):
        mapping: dict[str, Handler] = {}
        for servicer in servicers:
            mapping.update(servicer.__mapping__())
        self._server = GrpcServer(mapping, CriCodec())
        self._path = socket_path
        self._tracker = tracker
        self._inode: int | None = None

    @property
    def socket_path(self) -> Path:
        """Where the server listens."""
        return self._path

    async def start(self) -> None:
        """Listen on the socket (mode 0660)."""
        await prepare_socket_path(self._path)
        # The umask makes the socket 0660 from the moment it exists, not after a chmod.
        old_umask = os.umask(0o777 & ~SOCKET_MODE)
        try:
            await self._server.start(str(self._path))
        finally:
            os.umask(old_umask)
        os.chmod(self._path, SOCKET_MODE)
        self._inode = self._path.stat().st_ino

    async def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish (up to ``grace`` s), then close."""
        self._remove_socket()
        if not await self._tracker.drain(grace):
            log.warning(
                "%d call(s) still running after %.1fs; cancelling them",
                self._tracker.in_flight,
                grace,
            )
        self._server.close()
        await self._server.wait_closed()

    def _remove_socket(self) -> None:
        # Only remove the socket we created: another instance may have replaced it.
        with contextlib.suppress(FileNotFoundError):
            if self._path.stat().st_ino == self._inode:
                self._path.unlink()
