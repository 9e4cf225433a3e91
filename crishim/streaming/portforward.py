"""Kubernetes port forwarding over SPDY (``portforward.k8s.io``) and WebSocket.

SPDY: for each forwarded connection the client picks a request id and opens two streams
with headers ``streamtype`` (``data`` or ``error``), ``port`` and ``requestid``. Once both
are there the server connects to the port inside the pod; the data stream then carries
the TCP bytes both ways, and a failure is written as text on the error stream.

WebSocket (``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io`` and the unversioned ones):
the ports come from the ``port`` query parameters (else from the CRI request); port
number ``i`` uses channel ``2i`` for data and ``2i+1`` for errors, and the first message
on every channel is the port as two little-endian bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable

from crishim.streaming.backend import PortForwardRequest, StreamingBackend
from crishim.streaming.session import SpdySession, SpdyStream
from crishim.streaming.wsconn import ChannelConnection

__all__ = ["SPDY_PROTOCOLS", "WEBSOCKET_PROTOCOLS", "serve_spdy", "serve_websocket"]

log = logging.getLogger(__name__)

SPDY_PROTOCOLS = ("portforward.k8s.io",)
WEBSOCKET_PROTOCOLS = (
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
)
_CHUNK = 64 * 1024


def _forward_error(request: PortForwardRequest, port: int | str, exc: BaseException) -> str:
    return f"error forwarding port {port} to pod {request.sandbox_id}: {exc}"


async def _copy_to_tcp(read: Callable[[], Awaitable[bytes]], writer: asyncio.StreamWriter) -> None:
    """Client bytes into the pod's socket; half-close it when the client is done sending."""
    while data := await read():
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _copy_from_tcp(
    reader: asyncio.StreamReader, write: Callable[[bytes], Awaitable[None]]
) -> None:
    while data := await reader.read(_CHUNK):
        await write(data)


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    read: Callable[[], Awaitable[bytes]],
    write: Callable[[bytes], Awaitable[None]],
) -> None:
    """Copy both ways until the pod closes its side (or the client resets).

    The connection ends when the pod closes it: what the client might still send has
    nowhere to go, so the upload is stopped then too.
    """
    upload = asyncio.create_task(_copy_to_tcp(read, writer))
    try:
        await _copy_from_tcp(reader, write)
    finally:
        upload.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await upload
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# --- SPDY ---------------------------------------------------------------------------------


async def serve_spdy(
    session: SpdySession, request: PortForwardRequest, backend: StreamingBackend
) -> None:
    """Serve port-forward stream pairs until the client closes the session."""
    pending: dict[str, dict[str, SpdyStream]] = {}
    tasks: set[asyncio.Task[None]] = set()
    try:
        while (stream := await session.accept()) is not None:
            kind = stream.headers.get("streamtype", "")
            # Old clients omit requestid and forward one connection per port.
            request_id = stream.headers.get("requestid", stream.headers.get("port", ""))
            if kind not in ("data", "error"):
                await stream.reset()
                continue
            pair = pending.setdefault(request_id, {})
            if kind in pair:
                await stream.reset()
                continue
            pair[kind] = stream
            if len(pair) == 2:
                del pending[request_id]
                task = asyncio.create_task(_forward_spdy(pair, request, backend))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()


async def _forward_spdy(
    pair: dict[str, SpdyStream], request: PortForwardRequest, backend: StreamingBackend
) -> None:
    data, error = pair["data"], pair["error"]
    try:
        port = int(data.headers.get("port", ""))
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        reader, writer = await backend.port_forward(request.sandbox_id, port)
    except Exception as exc:
        port_text = data.headers.get("port", "?")
        with contextlib.suppress(ConnectionError):
            await error.write(_forward_error(request, port_text, exc).encode())
            await error.close()
            await data.close()
        return
    try:
        await _pipe(reader, writer, data.read, data.write)
    except ConnectionError as exc:
        log.debug("port-forward to %s:%d ended: %s", request.sandbox_id, port, exc)
    finally:
        with contextlib.suppress(ConnectionError):
            await data.close()
            await error.close()


# --- WebSocket ----------------------------------------------------------------------------


async def serve_websocket(
    connection: ChannelConnection,
    request: PortForwardRequest,
    backend: StreamingBackend,
    ports: list[int],
) -> None:
    """Serve one WebSocket port-forward connection (one TCP connection per port)."""
    inboxes: list[asyncio.Queue[bytes]] = [asyncio.Queue(maxsize=16) for _ in ports]
    tasks: list[asyncio.Task[None]] = []
    try:
        for index, port in enumerate(ports):
            prefix = struct.pack("<H", port)
            await connection.send(2 * index, prefix)
            await connection.send(2 * index + 1, prefix)
        for index, port in enumerate(ports):
            tasks.append(
                asyncio.create_task(
                    _forward_websocket(connection, request, backend, index, port, inboxes[index])
                )
            )
        while (message := await connection.receive()) is not None:
            channel, payload = message
            index = channel // 2
            if channel % 2 == 0 and index < len(inboxes) and payload:
                await inboxes[index].put(payload)
    except ConnectionError:
        pass
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await connection.close()


async def _forward_websocket(
    connection: ChannelConnection,
    request: PortForwardRequest,
    backend: StreamingBackend,
    index: int,
    port: int,
    inbox: asyncio.Queue[bytes],
) -> None:
    try:
        reader, writer = await backend.port_forward(request.sandbox_id, port)
    except Exception as exc:
        with contextlib.suppress(ConnectionError):
            await connection.send(2 * index + 1, _forward_error(request, port, exc).encode())
        return

    async def write(data: bytes) -> None:
        await connection.send(2 * index, data)

    with contextlib.suppress(ConnectionError):
        await _pipe(reader, writer, inbox.get, write)
