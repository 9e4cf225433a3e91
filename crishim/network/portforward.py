"""Connecting to a port inside a pod's network namespace (for PortForward)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import socket
import threading

from crishim.errors import Internal, Unavailable

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _socket_in(netns: str) -> socket.socket:
    """A TCP socket created inside ``netns`` (in this thread only, then switched back)."""
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


async def connect_in_netns(
    netns: str, port: int, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:``port`` as seen from inside the pod's network namespace.

    The socket is made in a worker thread that enters the namespace and leaves it again,
    so no thread of the event loop ever changes namespace; a socket keeps the namespace it
    was created in.
    """
    if not 0 < port < 65536:
        raise Unavailable(f"port {port} is out of range")
    try:
        sock = await asyncio.to_thread(_socket_in, netns)
    except OSError as exc:
        raise Internal(f"entering network namespace {netns}: {exc.strerror}") from exc
    sock.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout
        )
    except (OSError, TimeoutError) as exc:
        sock.close()
        raise Unavailable(f"connecting to port {port} in the pod: {exc}") from exc
    return await asyncio.open_connection(sock=sock)
