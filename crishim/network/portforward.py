"""Connecting to a port inside a pod's network namespace (for PortForward)."""

from __future__ import annotations

import asyncio
import os
import socket

from crishim.errors import Internal, Unavailable
from crishim.util import syscalls
from crishim.util.threads import in_own_thread


def _socket_in(netns: str) -> socket.socket:
    """A TCP socket created inside ``netns`` (by a thread of its own: it enters the
    namespace and never runs anything else)."""
    target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(target, syscalls.CLONE_NEWNET)
    finally:
        os.close(target)
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


async def connect_in_netns(
    netns: str, port: int, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to 127.0.0.1:``port`` as seen from inside the pod's network namespace.

    The socket is made by a thread of its own that enters the namespace, so no thread of
    the event loop or of the worker pool ever changes namespace; a socket keeps the
    namespace it was created in.
    """
    if not 0 < port < 65536:
        raise Unavailable(f"port {port} is out of range")
    try:
        sock = await in_own_thread("crishim-port-forward", lambda: _socket_in(netns))
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
