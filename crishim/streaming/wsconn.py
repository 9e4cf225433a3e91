"""A WebSocket server connection on an asyncio stream pair, plus Kubernetes channel framing.

``websocket.py`` is the RFC 6455 codec; this module does the I/O: it answers PINGs, the
closing handshake, and turns messages into ``(channel, payload)`` pairs as the Kubernetes
channel protocols define them:

- binary protocols (``channel.k8s.io``, ``v4.channel.k8s.io``, ``v5.channel.k8s.io``):
  a binary message whose first byte is the channel number;
- base64 protocols (``base64.channel.k8s.io``, ``v4.base64.channel.k8s.io``): a text
  message whose first character is the channel digit, followed by the payload in base64.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import time

from crishim.streaming import websocket as ws

__all__ = ["ChannelConnection"]

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024
# Big outputs go out in pieces so no message exceeds what clients accept by default
# (the websockets library refuses messages over 1 MiB unless told otherwise).
_MAX_OUT_MESSAGE = 64 * 1024


class ChannelConnection:
    """The server end of one upgraded WebSocket connection carrying numbered channels."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        base64_framing: bool,
        max_message: int = ws.DEFAULT_MAX_MESSAGE,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._base64 = base64_framing
        self._parser = ws.WebSocketFrameParser(max_payload=max_message)
        self._assembler = ws.MessageAssembler(max_message=max_message)
        # Frames parsed but not yet handed out: receive() returns one message at a time.
        self._pending: collections.deque[ws.WebSocketFrame] = collections.deque()
        self._send_lock = asyncio.Lock()
        self._close_sent = False
        self._close_received = False
        self.closed = asyncio.Event()
        # time.monotonic() of the last bytes read from or written to the socket.
        self.last_activity = time.monotonic()

    async def receive(self) -> tuple[int, bytes] | None:
        """The next channel message from the client; ``None`` once the connection ended.

        Malformed input closes the connection with the matching close code.
        """
        try:
            while True:
                while self._pending:
                    message = await self._handle(self._pending.popleft())
                    if message is not None:
                        return message
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    break
                self.last_activity = time.monotonic()
                self._pending.extend(self._parser.feed(data))
        except ws.WebSocketProtocolError as exc:
            log.info("WebSocket protocol error, closing the connection: %s", exc)
            # Failing the connection (RFC 6455 §7.1.7): no waiting for the peer's CLOSE.
            await self.close(exc.code, str(exc), linger=0)
        except ConnectionError:
            pass
        await self._finish()
        return None

    async def _handle(self, frame: ws.WebSocketFrame) -> tuple[int, bytes] | None:
        message = self._assembler.add(frame)
        if message is None:
            return None
        if message.opcode == ws.Opcode.PING:
            await self._send_raw(ws.encode_frame(ws.Opcode.PONG, message.data))
            return None
        if message.opcode == ws.Opcode.PONG:
            return None
        if message.opcode == ws.Opcode.CLOSE:
            self._close_received = True
            code, _ = ws.parse_close(message.data)
            await self.close(1000 if code == 1005 else code)
            raise ConnectionResetError("client closed the WebSocket")
        return self._decode_channel(message)

    def _decode_channel(self, message: ws.Message) -> tuple[int, bytes] | None:
        if not message.data:
            return None
        if self._base64:
            if message.opcode != ws.Opcode.TEXT:
                raise ws.WebSocketProtocolError("base64 channel protocols use text messages")
            channel = message.data[0] - ord("0")
            if not 0 <= channel <= 9:
                raise ws.WebSocketProtocolError("base64 message without a channel digit")
            try:
                return channel, base64.b64decode(message.data[1:], validate=True)
            except binascii.Error as exc:
                raise ws.WebSocketProtocolError("invalid base64 payload") from exc
        return message.data[0], message.data[1:]

    async def send(self, channel: int, data: bytes) -> None:
        """Send ``data`` on ``channel``, split into messages of bounded size."""
        for start in range(0, max(len(data), 1), _MAX_OUT_MESSAGE):
            piece = data[start : start + _MAX_OUT_MESSAGE]
            if self._base64:
                payload = str(channel).encode() + base64.b64encode(piece)
                frame = ws.encode_frame(ws.Opcode.TEXT, payload)
            else:
                frame = ws.encode_frame(ws.Opcode.BINARY, bytes([channel]) + piece)
            await self._send_raw(frame)

    async def close(
        self, code: int = ws.CloseCode.NORMAL, reason: str = "", *, linger: float = 5.0
    ) -> None:
        """Start (or answer) the closing handshake, then drop the socket.

        After sending CLOSE the server waits (up to ``linger`` seconds) for the client's
        CLOSE, so that nothing the client has not read yet is cut off by a TCP reset. Call
        it when no :meth:`receive` is running.
        """
        if not self._close_sent:
            self._close_sent = True
            with contextlib.suppress(ConnectionError):
                await self._send_raw(ws.encode_close(code, reason), closing=True)
            if linger > 0 and not self._close_received and not self.closed.is_set():
                with contextlib.suppress(TimeoutError, ConnectionError, ws.WebSocketProtocolError):
                    await asyncio.wait_for(self._await_client_close(), linger)
        await self._finish()

    async def _await_client_close(self) -> None:
        while not any(frame.opcode == ws.Opcode.CLOSE for frame in self._pending):
            data = await self._reader.read(_READ_SIZE)
            if not data:
                return
            self.last_activity = time.monotonic()
            self._pending.extend(self._parser.feed(data))

    async def expire(self, reason: str) -> None:
        """End the connection now, as when the client vanishes: CLOSE, then drop the socket.

        For a connection gone idle, so the client may be reading nothing: the CLOSE frame
        is written past the send lock (a writer may hold it, stuck in drain; frames never
        interleave, each is written whole) and the socket is aborted if it cannot be sent.
        """
        transport = self._writer.transport
        if not self._close_sent and not transport.is_closing():
            self._close_sent = True
            self._writer.write(ws.encode_close(ws.CloseCode.GOING_AWAY, reason))
        if transport.get_write_buffer_size():
            transport.abort()
        await self._finish()

    async def _finish(self) -> None:
        self.closed.set()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def _send_raw(self, frame: bytes, *, closing: bool = False) -> None:
        if self.closed.is_set() or (self._close_sent and not closing):
            raise ConnectionResetError("the WebSocket is closed")
        async with self._send_lock:
            self._writer.write(frame)
            self.last_activity = time.monotonic()
            await self._writer.drain()
            self.last_activity = time.monotonic()
