"""SPDY/3.1 framing: frame types, encoding, incremental parsing, header block compression.

This module is the wire codec only; it knows nothing about streams' lifetimes, windows or
what the frames mean to Kubernetes (see ``session.py`` for that). It follows the layout of
the SPDY/3 draft (plus the connection-level WINDOW_UPDATE of SPDY/3.1):

    control frame: |1| version(15) | type(16) | flags(8) | length(24) | payload
    data frame:    |0| stream-id(31)           | flags(8) | length(24) | payload

Header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are zlib streams primed with the SPDY/3
dictionary; each direction of a connection keeps one compression context for its lifetime,
so a connection needs exactly one :class:`HeaderCompressor` (outgoing) and one
:class:`HeaderDecompressor` (incoming, owned by :class:`FrameParser`).

Errors: anything malformed raises :class:`SpdyProtocolError`; the caller answers with
GOAWAY (or RST_STREAM when ``stream_id`` is set) and drops the connection.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "DEFAULT_WINDOW",
    "FLAG_FIN",
    "FLAG_UNIDIRECTIONAL",
    "MAX_WINDOW",
    "SPDY_DICTIONARY",
    "SPDY_VERSION",
    "Data",
    "Frame",
    "FrameParser",
    "GoAway",
    "GoAwayStatus",
    "HeaderCompressor",
    "HeaderDecompressor",
    "HeaderList",
    "Headers",
    "Ping",
    "RstStatus",
    "RstStream",
    "Settings",
    "SettingsEntry",
    "SettingsId",
    "SpdyProtocolError",
    "SynReply",
    "SynStream",
    "WindowUpdate",
    "encode",
]

SPDY_VERSION = 3
# Both directions start every stream and the connection with this window (SPDY/3.1 §2.6.8).
DEFAULT_WINDOW = 64 * 1024
MAX_WINDOW = 0x7FFFFFFF
# The 24-bit length field allows 16 MiB; nothing legitimate in Kubernetes streaming needs
# more than a few hundred KiB, so refuse big frames before buffering them.
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
# Decompressed header blocks larger than this are a zlib bomb, not headers.
MAX_HEADER_BLOCK = 256 * 1024

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
FLAG_SETTINGS_CLEAR_SETTINGS = 0x01

_TYPE_SYN_STREAM = 1
_TYPE_SYN_REPLY = 2
_TYPE_RST_STREAM = 3
_TYPE_SETTINGS = 4
_TYPE_PING = 6
_TYPE_GOAWAY = 7
_TYPE_HEADERS = 8
_TYPE_WINDOW_UPDATE = 9

_HEADER = struct.Struct(">IB3s")  # first word, flags, 24-bit length
_U32 = struct.Struct(">I")
_STREAM_ID_MASK = 0x7FFFFFFF


def _build_dictionary() -> bytes:
    """The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00 §2.6.10.1).

    The first part is a list of words each preceded by its 32-bit length, the second a run
    of raw strings; written out this way it is checkable by eye against the draft.
    """
    words = [
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ]
    tail = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently"
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error"
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct "
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,"
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,"
        "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    return b"".join(_U32.pack(len(w)) + w.encode() for w in words) + tail.encode()


SPDY_DICTIONARY = _build_dictionary()


class SpdyProtocolError(Exception):
    """The peer sent something that is not valid SPDY/3.1.

    ``stream_id`` is set when only that stream is at fault (answer with RST_STREAM); when it
    is ``None`` the connection is unusable (answer with GOAWAY and close).
    """

    def __init__(self, message: str, *, stream_id: int | None = None) -> None:
        super().__init__(message)
        self.stream_id = stream_id


class RstStatus(enum.IntEnum):
    """RST_STREAM status codes."""

    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    FRAME_TOO_LARGE = 11


class GoAwayStatus(enum.IntEnum):
    """GOAWAY status codes."""

    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class SettingsId(enum.IntEnum):
    """SETTINGS identifiers (only INITIAL_WINDOW_SIZE matters to a streaming server)."""

    UPLOAD_BANDWIDTH = 1
    DOWNLOAD_BANDWIDTH = 2
    ROUND_TRIP_TIME = 3
    MAX_CONCURRENT_STREAMS = 4
    CURRENT_CWND = 5
    DOWNLOAD_RETRANS_RATE = 6
    INITIAL_WINDOW_SIZE = 7
    CLIENT_CERTIFICATE_VECTOR_SIZE = 8


# Header names are lower case; a value may hold several values separated by NUL.
HeaderList = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class SynStream:
    """Opens a stream."""

    stream_id: int
    headers: HeaderList
    associated_stream_id: int = 0
    priority: int = 0
    slot: int = 0
    flags: int = 0

    @property
    def fin(self) -> bool:
        """Whether the sender's half is closed from the start."""
        return bool(self.flags & FLAG_FIN)


@dataclass(frozen=True, slots=True)
class SynReply:
    """Accepts a stream opened by the peer."""

    stream_id: int
    headers: HeaderList = ()
    flags: int = 0


@dataclass(frozen=True, slots=True)
class RstStream:
    """Aborts a stream."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class SettingsEntry:
    """One SETTINGS entry."""

    id: int
    value: int
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Settings:
    """Connection settings."""

    entries: tuple[SettingsEntry, ...] = ()
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Ping:
    """PING; the receiver echoes it back (clients use odd ids, servers even)."""

    ping_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    """The sender accepts no new streams after ``last_good_stream_id``."""

    last_good_stream_id: int
    status: int = GoAwayStatus.OK


@dataclass(frozen=True, slots=True)
class Headers:
    """Extra headers for an open stream."""

    stream_id: int
    headers: HeaderList
    flags: int = 0


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    """Grows the sender's receive window; stream 0 is the connection window (SPDY/3.1)."""

    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class Data:
    """Payload of a stream."""

    stream_id: int
    data: bytes = field(default=b"", repr=False)
    flags: int = 0

    @property
    def fin(self) -> bool:
        """Whether this is the sender's last frame on the stream."""
        return bool(self.flags & FLAG_FIN)


Frame = SynStream | SynReply | RstStream | Settings | Ping | GoAway | Headers | WindowUpdate | Data


class HeaderCompressor:
    """The outgoing zlib context of one connection (shared by every header block sent)."""

    def __init__(self) -> None:
        self._zlib = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 15, 8,
                                      zlib.Z_DEFAULT_STRATEGY, SPDY_DICTIONARY)  # fmt: skip

    def compress(self, headers: HeaderList) -> bytes:
        """Serialise and compress one header block.

        Each block ends with a sync flush so the peer can decode it without the next one.
        """
        parts = [_U32.pack(len(headers))]
        for name, value in headers:
            raw_name, raw_value = name.lower().encode(), value.encode()
            parts += [_U32.pack(len(raw_name)), raw_name, _U32.pack(len(raw_value)), raw_value]
        plain = b"".join(parts)
        return self._zlib.compress(plain) + self._zlib.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """The incoming zlib context of one connection."""

    def __init__(self, max_size: int = MAX_HEADER_BLOCK) -> None:
        self._zlib = zlib.decompressobj(15, SPDY_DICTIONARY)
        self._max_size = max_size

    def decompress(self, block: bytes) -> HeaderList:
        """Decompress and parse one header block; duplicates and empty names are refused."""
        try:
            plain = self._zlib.decompress(block, self._max_size)
        except zlib.error as exc:
            raise SpdyProtocolError(f"bad header block compression: {exc}") from exc
        if self._zlib.unconsumed_tail:
            raise SpdyProtocolError(f"header block larger than {self._max_size} bytes")
        return _parse_header_block(plain)


def _parse_header_block(plain: bytes) -> HeaderList:
    view = memoryview(plain)
    if len(view) < 4:
        raise SpdyProtocolError("header block shorter than its pair count")
    (count,) = _U32.unpack_from(view, 0)
    offset = 4
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()

    def take() -> bytes:
        nonlocal offset
        if offset + 4 > len(view):
            raise SpdyProtocolError("header block truncated")
        (size,) = _U32.unpack_from(view, offset)
        offset += 4
        if offset + size > len(view):
            raise SpdyProtocolError("header block truncated")
        chunk = bytes(view[offset : offset + size])
        offset += size
        return chunk

    for _ in range(count):
        try:
            name, value = take().decode(), take().decode()
        except UnicodeDecodeError as exc:
            raise SpdyProtocolError("header block is not UTF-8") from exc
        if not name:
            raise SpdyProtocolError("empty header name")
        name = name.lower()
        if name in seen:
            raise SpdyProtocolError(f"duplicate header {name!r}")
        seen.add(name)
        headers.append((name, value))
    if offset != len(view):
        raise SpdyProtocolError("trailing bytes after the header block")
    return tuple(headers)


def _control(frame_type: int, flags: int, payload: bytes) -> bytes:
    first = 0x80000000 | (SPDY_VERSION << 16) | frame_type
    return _HEADER.pack(first, flags, len(payload).to_bytes(3, "big")) + payload


def _stream_id(value: int) -> int:
    if not 0 <= value <= _STREAM_ID_MASK:
        raise ValueError(f"stream id {value} out of range")
    return value


def encode(frame: Frame, compressor: HeaderCompressor | None = None) -> bytes:
    """Serialise ``frame``; frames carrying headers need the connection's ``compressor``."""
    if isinstance(frame, Data):
        if len(frame.data) > 0xFFFFFF:
            raise ValueError("data frame payload longer than 16 MiB")
        first = _stream_id(frame.stream_id)
        return _HEADER.pack(first, frame.flags, len(frame.data).to_bytes(3, "big")) + frame.data
    if isinstance(frame, Ping):
        return _control(_TYPE_PING, 0, _U32.pack(frame.ping_id))
    if isinstance(frame, WindowUpdate):
        if not 1 <= frame.delta <= MAX_WINDOW:
            raise ValueError(f"window delta {frame.delta} out of range")
        payload = struct.pack(">II", _stream_id(frame.stream_id), frame.delta)
        return _control(_TYPE_WINDOW_UPDATE, 0, payload)
    if isinstance(frame, RstStream):
        payload = struct.pack(">II", _stream_id(frame.stream_id), frame.status)
        return _control(_TYPE_RST_STREAM, 0, payload)
    if isinstance(frame, GoAway):
        payload = struct.pack(">II", _stream_id(frame.last_good_stream_id), frame.status)
        return _control(_TYPE_GOAWAY, 0, payload)
    if isinstance(frame, Settings):
        parts = [_U32.pack(len(frame.entries))]
        parts += [struct.pack(">I", (e.flags << 24) | e.id) + _U32.pack(e.value)
                  for e in frame.entries]  # fmt: skip
        return _control(_TYPE_SETTINGS, frame.flags, b"".join(parts))
    if compressor is None:
        raise ValueError(f"{type(frame).__name__} carries headers: pass the compressor")
    block = compressor.compress(frame.headers)
    if isinstance(frame, SynStream):
        if not 0 <= frame.priority <= 7:
            raise ValueError(f"priority {frame.priority} out of range")
        payload = struct.pack(
            ">IIBB",
            _stream_id(frame.stream_id),
            _stream_id(frame.associated_stream_id),
            frame.priority << 5,
            frame.slot,
        )
        return _control(_TYPE_SYN_STREAM, frame.flags, payload + block)
    frame_type = _TYPE_SYN_REPLY if isinstance(frame, SynReply) else _TYPE_HEADERS
    return _control(frame_type, frame.flags, _U32.pack(_stream_id(frame.stream_id)) + block)


class FrameParser:
    """Turns a byte stream into frames, whatever the chunking of the input.

    Owns the connection's incoming :class:`HeaderDecompressor`, because header blocks must be
    decompressed in the order they arrive. Unknown control frame types are skipped, as the
    draft asks; a frame longer than ``max_frame_size`` is refused before it is buffered.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self._buffer = bytearray()
        self._max_frame_size = max_frame_size
        self._decompressor = HeaderDecompressor()

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame now complete, in order."""
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= 8:
            first, flags, raw_length = _HEADER.unpack_from(self._buffer, 0)
            length = int.from_bytes(raw_length, "big")
            if length > self._max_frame_size:
                raise SpdyProtocolError(
                    f"frame of {length} bytes exceeds the limit of {self._max_frame_size}"
                )
            if len(self._buffer) < 8 + length:
                break
            payload = bytes(self._buffer[8 : 8 + length])
            del self._buffer[: 8 + length]
            frame = self._decode(first, flags, payload)
            if frame is not None:
                frames.append(frame)
        return frames

    def _decode(self, first: int, flags: int, payload: bytes) -> Frame | None:
        if not first & 0x80000000:
            return Data(first & _STREAM_ID_MASK, payload, flags)
        version = (first >> 16) & 0x7FFF
        frame_type = first & 0xFFFF
        if version != SPDY_VERSION:
            raise SpdyProtocolError(f"unsupported SPDY version {version}")
        if frame_type == _TYPE_SYN_STREAM:
            if len(payload) < 10:
                raise SpdyProtocolError("SYN_STREAM too short")
            stream_id, associated, priority, slot = struct.unpack_from(">IIBB", payload)
            return SynStream(
                stream_id=stream_id & _STREAM_ID_MASK,
                headers=self._decompressor.decompress(payload[10:]),
                associated_stream_id=associated & _STREAM_ID_MASK,
                priority=priority >> 5,
                slot=slot,
                flags=flags,
            )
        if frame_type in (_TYPE_SYN_REPLY, _TYPE_HEADERS):
            if len(payload) < 4:
                raise SpdyProtocolError("SYN_REPLY/HEADERS too short")
            (stream_id,) = _U32.unpack_from(payload)
            headers = self._decompressor.decompress(payload[4:])
            cls = SynReply if frame_type == _TYPE_SYN_REPLY else Headers
            return cls(stream_id & _STREAM_ID_MASK, headers, flags)
        if frame_type == _TYPE_RST_STREAM:
            stream_id, status = self._two_words(payload, "RST_STREAM")
            return RstStream(stream_id & _STREAM_ID_MASK, status)
        if frame_type == _TYPE_SETTINGS:
            return self._settings(flags, payload)
        if frame_type == _TYPE_PING:
            if len(payload) != 4:
                raise SpdyProtocolError("PING payload must be 4 bytes")
            return Ping(_U32.unpack(payload)[0])
        if frame_type == _TYPE_GOAWAY:
            last, status = self._two_words(payload, "GOAWAY")
            return GoAway(last & _STREAM_ID_MASK, status)
        if frame_type == _TYPE_WINDOW_UPDATE:
            stream_id, delta = self._two_words(payload, "WINDOW_UPDATE")
            delta &= _STREAM_ID_MASK
            if delta == 0:
                raise SpdyProtocolError(
                    "WINDOW_UPDATE with a zero delta", stream_id=stream_id & _STREAM_ID_MASK
                )
            return WindowUpdate(stream_id & _STREAM_ID_MASK, delta)
        return None

    @staticmethod
    def _two_words(payload: bytes, name: str) -> tuple[int, int]:
        if len(payload) != 8:
            raise SpdyProtocolError(f"{name} payload must be 8 bytes, got {len(payload)}")
        first, second = struct.unpack(">II", payload)
        return first, second

    @staticmethod
    def _settings(flags: int, payload: bytes) -> Settings:
        if len(payload) < 4:
            raise SpdyProtocolError("SETTINGS too short")
        (count,) = _U32.unpack_from(payload)
        if len(payload) != 4 + 8 * count:
            raise SpdyProtocolError(f"SETTINGS length does not match its {count} entries")
        entries = []
        for i in range(count):
            word, value = struct.unpack_from(">II", payload, 4 + 8 * i)
            entries.append(SettingsEntry(id=word & 0xFFFFFF, value=value, flags=word >> 24))
        return Settings(tuple(entries), flags)
