"""Property tests of the WebSocket codec: any bytes, in any chunking, give frames and
messages or WebSocketProtocolError; valid frames and fragmented messages survive encode then
decode; a declared length is neither allocated nor waited for; close frames round-trip.
"""

from __future__ import annotations

import base64
import itertools
import struct
from collections.abc import Sequence

from hypothesis import example, given
from hypothesis import strategies as st

from crishim.streaming import websocket as ws
from tests.rig.bounds import allocation_peak, outcome, time_limit

SECONDS = 2.0
MAX_PAYLOAD = 4096

_data_opcodes = st.sampled_from([ws.Opcode.TEXT, ws.Opcode.BINARY])
_control_opcodes = st.sampled_from([ws.Opcode.CLOSE, ws.Opcode.PING, ws.Opcode.PONG])
_mask = st.binary(min_size=4, max_size=4)


@st.composite
def client_frames(draw: st.DrawFn) -> ws.WebSocketFrame:
    """A frame a client may send: any data frame, or a short unfragmented control frame."""
    if draw(st.booleans()):
        opcode = draw(st.sampled_from([*ws.Opcode]))
        if opcode < ws.Opcode.CLOSE:
            return ws.WebSocketFrame(opcode, draw(st.binary(max_size=300)), draw(st.booleans()))
    opcode = draw(_control_opcodes)
    return ws.WebSocketFrame(opcode, draw(st.binary(max_size=125)), True)


def _wire(frame: ws.WebSocketFrame, mask: bytes | None) -> bytes:
    return ws.encode_frame(ws.Opcode(frame.opcode), frame.payload, fin=frame.fin, mask=mask)


@st.composite
def wire_streams(draw: st.DrawFn) -> bytes:
    """Masked client frames, with garbage and bit flips mixed in."""
    parts = [_wire(frame, draw(_mask)) for frame in draw(st.lists(client_frames(), max_size=6))]
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), draw(st.binary(max_size=30)))
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


def _cuts(data: bytes, points: Sequence[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _receive(chunks: Sequence[bytes]) -> list[ws.Message]:
    """What the connection loop does: parse frames, assemble messages."""
    parser = ws.WebSocketFrameParser(max_payload=MAX_PAYLOAD)
    assembler = ws.MessageAssembler(max_message=MAX_PAYLOAD)
    messages = []
    for chunk in chunks:
        for frame in parser.feed(chunk):
            message = assembler.add(frame)
            if message is not None:
                messages.append(message)
                if message.opcode == ws.Opcode.CLOSE:
                    ws.parse_close(message.data)
    return messages


@given(st.one_of(st.binary(max_size=400), wire_streams()), st.lists(st.integers(0, 1 << 16)))
@example(bytes.fromhex("81ff") + b"\xff" * 8, [])
@example(bytes.fromhex("8f80") + b"\0" * 4, [1])
@example(bytes.fromhex("8882") + b"\0" * 4 + b"\x03\xe8", [])
def test_any_bytes_in_any_chunking_give_messages_or_protocol_error(
    data: bytes, points: list[int]
) -> None:
    whole = outcome(lambda: _receive([data]), ws.WebSocketProtocolError, SECONDS)
    chunked = outcome(lambda: _receive(_cuts(data, points)), ws.WebSocketProtocolError, SECONDS)
    if isinstance(whole, ws.WebSocketProtocolError):
        assert isinstance(chunked, ws.WebSocketProtocolError)
        assert 1000 <= whole.code < 5000
    else:
        assert chunked == whole


@given(st.lists(client_frames(), max_size=8), st.lists(st.integers(0, 1 << 16)), _mask)
def test_frames_round_trip_in_any_chunking(
    frames: list[ws.WebSocketFrame], points: list[int], mask: bytes
) -> None:
    wire = b"".join(_wire(frame, mask) for frame in frames)
    parser = ws.WebSocketFrameParser()
    with time_limit(SECONDS):
        assert [f for chunk in _cuts(wire, points) for f in parser.feed(chunk)] == frames


@given(
    _data_opcodes,
    st.lists(st.binary(max_size=100), min_size=1, max_size=5),
    st.lists(st.tuples(st.integers(0, 4), _control_opcodes, st.binary(max_size=125)), max_size=3),
)
def test_fragmented_messages_are_joined_around_control_frames(
    opcode: ws.Opcode,
    fragments: list[bytes],
    controls: list[tuple[int, ws.Opcode, bytes]],
) -> None:
    if opcode == ws.Opcode.TEXT:
        text = b"".join(fragments).decode("utf-8", "replace").encode()
        fragments = [text[: len(text) // 2], text[len(text) // 2 :]]
    frames = [
        ws.WebSocketFrame(
            opcode if i == 0 else ws.Opcode.CONTINUATION, part, fin=i == len(fragments) - 1
        )
        for i, part in enumerate(fragments)
    ]
    for at, control, payload in controls:
        frames.insert(min(at, len(frames) - 1), ws.WebSocketFrame(control, payload))
    assembler = ws.MessageAssembler()
    with time_limit(SECONDS):
        got = [m for m in map(assembler.add, frames) if m is not None]
    # Control frames come out at once, in order; the message when its last fragment arrives.
    expected = [ws.Message(ws.Opcode(f.opcode), f.payload) for f in frames[:-1] if f.opcode >= 8]
    assert got == [*expected, ws.Message(opcode, b"".join(fragments))]


@given(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([7, 16, 64]),
    st.booleans(),
    st.integers(0, 2000),
)
@example((1 << 64) - 1, 64, True, 0)
@example(ws.DEFAULT_MAX_MESSAGE, 64, True, 100)
def test_a_declared_length_is_neither_allocated_nor_waited_for(
    length: int, width: int, masked: bool, sent: int
) -> None:
    mask_bit = 0x80 if masked else 0
    if width == 7 or length < 126:
        length %= 126
        header = struct.pack(">BB", 0x82, mask_bit | length)
    elif width == 16:
        length %= 1 << 16
        header = struct.pack(">BBH", 0x82, mask_bit | 126, length)
    else:
        header = struct.pack(">BBQ", 0x82, mask_bit | 127, length)
    header += b"\x01\x02\x03\x04" if masked else b""
    parser = ws.WebSocketFrameParser(require_mask=False)
    with allocation_peak() as peak:
        result = outcome(
            lambda: parser.feed(header + b"\0" * min(sent, max(length - 1, 0))),
            ws.WebSocketProtocolError,
            SECONDS,
        )
    if length > ws.DEFAULT_MAX_MESSAGE:
        assert isinstance(result, ws.WebSocketProtocolError)
        assert result.code == ws.CloseCode.TOO_BIG
    elif sent < length:
        assert result == []  # returns at once, waiting for the rest
    assert peak.bytes < 64 * 1024, peak.bytes


_close_codes = st.one_of(
    st.sampled_from([*ws.CloseCode]),
    st.integers(1000, 1003),
    st.integers(1007, 1014),
    st.integers(3000, 4999),
)


@given(_close_codes, st.text(st.characters(exclude_categories=["Cs"]), max_size=130))
@example(1000, "\u00e9" * 62)
def test_close_frames_round_trip(code: int, reason: str) -> None:
    frame = ws.encode_close(code, reason)
    (parsed,) = ws.WebSocketFrameParser(require_mask=False).feed(frame)
    got_code, got_reason = ws.parse_close(parsed.payload)
    assert got_code == code
    assert reason.startswith(got_reason)
    assert len(got_reason.encode()) > 123 - 4 or got_reason == reason


@given(st.binary(max_size=130))
def test_any_close_payload_parses_or_is_a_protocol_error(payload: bytes) -> None:
    result = outcome(lambda: ws.parse_close(payload), ws.WebSocketProtocolError, SECONDS)
    if not isinstance(result, ws.WebSocketProtocolError):
        code, reason = result
        assert 1000 <= code < 5000
        assert reason.encode() == payload[2:]


@given(
    st.one_of(
        st.text(max_size=40),
        st.binary(min_size=16, max_size=16).map(lambda raw: base64.b64encode(raw).decode()),
    )
)
def test_any_client_key_gives_an_accept_key_or_protocol_error(key: str) -> None:
    result = outcome(lambda: ws.accept_key(key), ws.WebSocketProtocolError, SECONDS)
    if isinstance(result, str):
        assert len(result) == 28
