"""HTTP/2 framing and the fixed parts of gRPC over HTTP/2 (RFC 9113, RFC 7541, gRPC's
PROTOCOL-HTTP2), as much as a gRPC server needs. Pure: bytes in, bytes out.

The server never adds to the peer's HPACK table: its header blocks are static-table
references and literals without indexing, so the blocks of a reply's headers and of an OK
trailer are the same bytes every time, computed once here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = struct.Struct(">HBBBI")  # length as 16 + 8 bits, type, flags, stream id
FRAME_HEADER_SIZE = 9
MESSAGE_PREFIX = struct.Struct(">BI")  # compressed flag, length
MESSAGE_PREFIX_SIZE = 5

# Frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9

# Flags
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

# Error codes
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 2**24 - 1


class H2ConnectionError(Exception):
    """A connection error: the connection ends with GOAWAY carrying ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: the 9-byte header and the payload."""
    length = len(payload)
    return FRAME_HEADER.pack(length >> 8, length & 0xFF, frame_type, flags, stream_id) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    """A SETTINGS frame with these values."""
    payload = b"".join(struct.pack(">HI", key, value) for key, value in settings.items())
    return frame(SETTINGS, 0, 0, payload)


def window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame."""
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    """A RST_STREAM frame."""
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    """A GOAWAY frame."""
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug)


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def parse_settings(payload: bytes) -> dict[int, int]:
    """The values of a SETTINGS frame's payload; checked as RFC 9113 6.5.2 asks."""
    if len(payload) % 6:
        raise H2ConnectionError(FRAME_SIZE_ERROR, "SETTINGS payload is not a multiple of 6")
    values = {}
    for offset in range(0, len(payload), 6):
        key, value = struct.unpack_from(">HI", payload, offset)
        if key == SETTINGS_ENABLE_PUSH and value > 1:
            raise H2ConnectionError(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH of {value}")
        if key == SETTINGS_INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise H2ConnectionError(FLOW_CONTROL_ERROR, f"initial window of {value}")
        if key == SETTINGS_MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
            raise H2ConnectionError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE of {value}")
        values[key] = value
    return values


def strip_padding(flags: int, payload: bytes, extra: int = 0) -> bytes:
    """The payload of a DATA or HEADERS frame without padding (and ``extra`` leading bytes
    after the pad length, the priority fields of HEADERS)."""
    start = 0
    end = len(payload)
    if flags & PADDED:
        if not payload:
            raise H2ConnectionError(PROTOCOL_ERROR, "padded frame without a pad length")
        start = 1
        end -= payload[0]
    start += extra
    if end < start:
        raise H2ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[start:end]


# --- HPACK: what the server writes (static references, literals without indexing) ---


def hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with an N-bit prefix; ``first`` holds the pattern's high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, its name a literal too (no Huffman)."""
    return b"\x00" + hpack_int(len(name), 7, 0) + name + hpack_int(len(value), 7, 0) + value


_STATUS_200 = b"\x88"  # static table index 8
# content-type (static name index 31), literal value without indexing
_CONTENT_TYPE = hpack_int(31, 4, 0) + hpack_int(16, 7, 0) + b"application/grpc"

REPLY_HEADERS = _STATUS_200 + _CONTENT_TYPE


def status_block(http_status: int) -> bytes:
    """The :status field of any status (200 from the static table)."""
    if http_status == 200:
        return _STATUS_200
    # :status is static name index 8, literal value
    text = str(http_status).encode()
    return hpack_int(8, 4, 0) + hpack_int(len(text), 7, 0) + text


# The encoded grpc-message is cut here: a trailer block must fit one frame (16 KiB).
GRPC_MESSAGE_LIMIT = 4096
_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def percent_encode(message: str) -> bytes:
    """grpc-message's encoding: UTF-8, bytes outside printable ASCII and '%' as %XX; at
    most :data:`GRPC_MESSAGE_LIMIT` bytes, cut between escapes."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= GRPC_MESSAGE_LIMIT and all(b in _UNRESERVED for b in raw):
        return raw
    out = bytearray()
    for b in raw:
        piece = bytes((b,)) if b in _UNRESERVED else b"%%%02X" % b
        if len(out) + len(piece) > GRPC_MESSAGE_LIMIT:
            break
        out += piece
    return bytes(out)


def trailer_block(status: int, message: str | None) -> bytes:
    """grpc-status and, when there is one, grpc-message."""
    block = hpack_literal(b"grpc-status", str(status).encode())
    if message:
        block += hpack_literal(b"grpc-message", percent_encode(message))
    return block


OK_TRAILERS = trailer_block(0, None)

# --- gRPC request headers ---

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float:
    """grpc-timeout (at most 8 digits and a unit) in seconds; ValueError if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(digits) * _TIMEOUT_UNITS[unit]


@dataclass(frozen=True, slots=True)
class Request:
    """The fields of a request's header block the server acts on."""

    method: str
    path: str
    content_type: str
    timeout: float | None


def parse_request(headers: list[tuple[str, str]]) -> Request:
    """A request from its decoded header list; ValueError names what is malformed."""
    method = path = content_type = ""
    timeout: float | None = None
    for name, value in headers:
        if name == ":path":
            path = value
        elif name == ":method":
            method = value
        elif name == "content-type":
            content_type = value
        elif name == "grpc-timeout":
            timeout = parse_timeout(value)
    if not path:
        raise ValueError("request without :path")
    return Request(method, path, content_type, timeout)
