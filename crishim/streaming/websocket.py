"""RFC 6455 WebSocket framing, server side: handshake key, frame codec, message assembly.

Codec only, no I/O (the connection loop lives in ``wsconn.py``). A server must receive
masked frames and sends unmasked ones; control frames are at most 125 bytes and never
fragmented; data messages may be split over a first frame and CONTINUATION frames.

    base framing: |FIN|RSV1-3|opcode(4)|MASK|len(7)| [len16 | len64] [mask key(4)] payload

Malformed input raises :class:`WebSocketProtocolError` carrying the close code to send.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "CloseCode",
    "Message",
    "MessageAssembler",
    "Opcode",
    "WebSocketFrame",
    "WebSocketFrameParser",
    "WebSocketProtocolError",
    "accept_key",
    "encode_close",
    "encode_frame",
    "parse_close",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024


class Opcode(enum.IntEnum):
    """Frame opcodes."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(enum.IntEnum):
    """Close status codes used by this server."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011


class WebSocketProtocolError(Exception):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, message: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


def accept_key(client_key: str) -> str:
    """The Sec-WebSocket-Accept value for a client's Sec-WebSocket-Key."""
    try:
        raw = base64.b64decode(client_key.strip(), validate=True)
    except ValueError as exc:
        raise WebSocketProtocolError("Sec-WebSocket-Key is not base64") from exc
    if len(raw) != 16:
        raise WebSocketProtocolError("Sec-WebSocket-Key must encode 16 bytes")
    digest = hashlib.sha1(client_key.strip().encode() + _GUID, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


@dataclass(frozen=True, slots=True)
class WebSocketFrame:
    """One frame, already unmasked."""

    opcode: int
    payload: bytes = field(repr=False)
    fin: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    """A complete message or control frame handed to the connection."""

    opcode: Opcode
    data: bytes = field(repr=False)


def _mask(payload: bytes, key: bytes) -> bytes:
    # XOR with the key repeated: done on big integers, which is fast in CPython.
    if not payload:
        return payload
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    as_int = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return as_int.to_bytes(len(payload), "big")


def encode_frame(
    opcode: Opcode, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """One frame; servers leave ``mask`` unset, clients (tests) pass a 4-byte key."""
    if opcode >= Opcode.CLOSE and (len(payload) > 125 or not fin):
        raise ValueError("control frames carry at most 125 bytes and are never fragmented")
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    size = len(payload)
    if size < 126:
        head = struct.pack(">BB", first, mask_bit | size)
    elif size < 1 << 16:
        head = struct.pack(">BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack(">BBQ", first, mask_bit | 127, size)
    if mask is not None:
        return head + mask + _mask(payload, mask)
    return head + payload


def encode_close(code: int, reason: str = "") -> bytes:
    """A CLOSE frame with a status code and a reason (cut to fit 125 bytes)."""
    # Cut at a character boundary: the peer fails the connection on a reason that is not
    # UTF-8 (RFC 6455 §5.5.1), and only the character cut in two can be invalid here.
    raw_reason = reason.encode()[:123].decode("utf-8", "ignore").encode()
    return encode_frame(Opcode.CLOSE, struct.pack(">H", code) + raw_reason)


def parse_close(payload: bytes) -> tuple[int, str]:
    """Code and reason of a CLOSE payload (1005, "no status" when empty)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise WebSocketProtocolError("close payload of one byte")
    (code,) = struct.unpack_from(">H", payload)
    if code < 1000 or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000 or code >= 5000:
        raise WebSocketProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError as exc:
        raise WebSocketProtocolError("close reason is not UTF-8", CloseCode.INVALID_DATA) from exc
    return code, reason


class WebSocketFrameParser:
    """Incremental parser of client frames (which must be masked)."""

    def __init__(self, *, max_payload: int = DEFAULT_MAX_MESSAGE, require_mask: bool = True):
        self._buffer = bytearray()
        self._max_payload = max_payload
        self._require_mask = require_mask

    def feed(self, data: bytes) -> list[WebSocketFrame]:
        """Add bytes; return every frame now complete."""
        self._buffer += data
        frames = []
        while (frame := self._next()) is not None:
            frames.append(frame)
        return frames

    def _next(self) -> WebSocketFrame | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        if first & 0x70:
            raise WebSocketProtocolError("reserved bits set without a negotiated extension")
        opcode = first & 0x0F
        fin = bool(first & 0x80)
        if opcode not in Opcode.__members__.values():
            raise WebSocketProtocolError(f"unknown opcode {opcode:#x}")
        masked = bool(second & 0x80)
        if self._require_mask and not masked:
            raise WebSocketProtocolError("client frames must be masked")
        size = second & 0x7F
        offset = 2
        if size == 126:
            if len(buf) < 4:
                return None
            (size,) = struct.unpack_from(">H", buf, 2)
            offset = 4
        elif size == 127:
            if len(buf) < 10:
                return None
            (size,) = struct.unpack_from(">Q", buf, 2)
            offset = 10
        if opcode >= Opcode.CLOSE and (size > 125 or not fin):
            raise WebSocketProtocolError("control frame too long or fragmented")
        if size > self._max_payload:
            raise WebSocketProtocolError(
                f"frame of {size} bytes exceeds {self._max_payload}", CloseCode.TOO_BIG
            )
        key = b""
        if masked:
            if len(buf) < offset + 4:
                return None
            key = bytes(buf[offset : offset + 4])
            offset += 4
        if len(buf) < offset + size:
            return None
        payload = bytes(buf[offset : offset + size])
        del buf[: offset + size]
        if masked:
            payload = _mask(payload, key)
        return WebSocketFrame(opcode, payload, fin)


class MessageAssembler:
    """Joins fragments into messages and checks the fragmentation rules.

    Control frames may arrive between fragments and are returned at once.
    """

    def __init__(self, *, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self._opcode: Opcode | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._max_message = max_message

    def add(self, frame: WebSocketFrame) -> Message | None:
        """Feed one frame; return a message when one is complete."""
        opcode = Opcode(frame.opcode)
        if opcode >= Opcode.CLOSE:
            return Message(opcode, frame.payload)
        if opcode == Opcode.CONTINUATION:
            if self._opcode is None:
                raise WebSocketProtocolError("continuation frame without a message to continue")
        elif self._opcode is not None:
            raise WebSocketProtocolError("new message started before the last one finished")
        else:
            self._opcode = opcode
        self._size += len(frame.payload)
        if self._size > self._max_message:
            raise WebSocketProtocolError(
                f"message exceeds {self._max_message} bytes", CloseCode.TOO_BIG
            )
        self._parts.append(frame.payload)
        if not frame.fin:
            return None
        message_opcode = self._opcode
        data = b"".join(self._parts)
        self._opcode, self._parts, self._size = None, [], 0
        if message_opcode == Opcode.TEXT:
            try:
                data.decode()
            except UnicodeDecodeError as exc:
                raise WebSocketProtocolError(
                    "text message is not UTF-8", CloseCode.INVALID_DATA
                ) from exc
        return Message(message_opcode, data)
