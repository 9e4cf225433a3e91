"""Property tests of the SPDY/3.1 frame codec: any bytes, in any chunking, give frames or
SpdyProtocolError; valid frames survive encode then decode; a declared length or a header
block bomb never makes the parser allocate what it declares or wait for it.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence

from hypothesis import example, given
from hypothesis import strategies as st

from crishim.streaming import spdy
from tests.rig.bounds import allocation_peak, outcome, time_limit

SECONDS = 2.0

_u31 = st.integers(0, 0x7FFFFFFF)
_u32 = st.integers(0, 0xFFFFFFFF)
_flags = st.integers(0, 0xFF)
_header_name = st.text(st.characters(exclude_categories=["Cs", "Lu", "Lt"]), min_size=1).filter(
    lambda name: name.lower() == name
)
_header_value = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
_header_list = st.dictionaries(_header_name, _header_value, max_size=5).map(
    lambda headers: tuple(headers.items())
)

frames: st.SearchStrategy[spdy.Frame] = st.one_of(
    st.builds(spdy.Data, _u31, st.binary(max_size=300), _flags),
    st.builds(spdy.SynStream, _u31, _header_list, _u31, st.integers(0, 7), _flags, _flags),
    st.builds(spdy.SynReply, _u31, _header_list, _flags),
    st.builds(spdy.Headers, _u31, _header_list, _flags),
    st.builds(spdy.RstStream, _u31, _u32),
    st.builds(
        spdy.Settings,
        st.lists(st.builds(spdy.SettingsEntry, st.integers(0, 0xFFFFFF), _u32, _flags)).map(tuple),
        _flags,
    ),
    st.builds(spdy.Ping, _u32),
    st.builds(spdy.GoAway, _u31, _u32),
    st.builds(spdy.WindowUpdate, _u31, st.integers(1, spdy.MAX_WINDOW)),
)


def _unknown_control(frame_type: int, payload: bytes) -> bytes:
    first = 0x80000000 | (spdy.SPDY_VERSION << 16) | frame_type
    return struct.pack(">IB", first, 0) + len(payload).to_bytes(3, "big") + payload


@st.composite
def wire_streams(draw: st.DrawFn) -> bytes:
    """Encoded frames (one compression context), with garbage and bit flips mixed in."""
    compressor = spdy.HeaderCompressor()
    parts = [spdy.encode(frame, compressor) for frame in draw(st.lists(frames, max_size=6))]
    if draw(st.booleans()):
        parts.insert(
            draw(st.integers(0, len(parts))),
            draw(
                st.one_of(
                    st.binary(max_size=40),
                    st.builds(_unknown_control, st.integers(0, 0xFFFF), st.binary(max_size=20)),
                )
            ),
        )
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 3))):
        if data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


def _cuts(data: bytes, points: Sequence[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _parse(chunks: Sequence[bytes]) -> list[spdy.Frame]:
    parser = spdy.FrameParser()
    return [frame for chunk in chunks for frame in parser.feed(chunk)]


@given(st.one_of(st.binary(max_size=400), wire_streams()), st.lists(st.integers(0, 1 << 16)))
@example(bytes.fromhex("80030001 00000010") + b"\0" * 16, [])
@example(bytes.fromhex("80030004 00000004 ffffffff"), [1, 2, 3])
def test_any_bytes_in_any_chunking_give_frames_or_protocol_error(
    data: bytes, points: list[int]
) -> None:
    whole = outcome(lambda: _parse([data]), spdy.SpdyProtocolError, SECONDS)
    chunked = outcome(lambda: _parse(_cuts(data, points)), spdy.SpdyProtocolError, SECONDS)
    if isinstance(whole, spdy.SpdyProtocolError):
        assert isinstance(chunked, spdy.SpdyProtocolError)
    else:
        assert chunked == whole


@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 1 << 16)), st.data())
def test_valid_frames_round_trip_in_any_chunking(
    sent: list[spdy.Frame], points: list[int], data: st.DataObject
) -> None:
    compressor = spdy.HeaderCompressor()
    wire = [spdy.encode(frame, compressor) for frame in sent]
    # Unknown control frames between them are skipped, as the draft asks.
    for _ in range(data.draw(st.integers(0, 2))):
        unknown = data.draw(st.sampled_from([5, 10, 0x7FFF, 0xFFFF]))
        wire.insert(data.draw(st.integers(0, len(wire))), _unknown_control(unknown, b"x"))
    with time_limit(SECONDS):
        assert _parse(_cuts(b"".join(wire), points)) == sent


@given(
    st.integers(0, 0xFFFFFF),
    st.integers(1024, spdy.DEFAULT_MAX_FRAME_SIZE * 2),
    st.booleans(),
    st.integers(0, 2000),
)
@example(0xFFFFFF, spdy.DEFAULT_MAX_FRAME_SIZE, True, 0)
@example(spdy.DEFAULT_MAX_FRAME_SIZE, spdy.DEFAULT_MAX_FRAME_SIZE, False, 100)
def test_a_declared_length_is_neither_allocated_nor_waited_for(
    length: int, max_frame_size: int, control: bool, sent: int
) -> None:
    first = 0x80030001 if control else 0x00000001
    header = struct.pack(">IB", first, 0) + length.to_bytes(3, "big")
    parser = spdy.FrameParser(max_frame_size=max_frame_size)
    with allocation_peak() as peak:
        result = outcome(
            lambda: parser.feed(header + b"\0" * min(sent, max(length - 1, 0))),
            spdy.SpdyProtocolError,
            SECONDS,
        )
    if length > max_frame_size:
        assert isinstance(result, spdy.SpdyProtocolError)
    elif sent < length:
        assert result == []  # returns at once, waiting for the rest
    assert peak.bytes < 64 * 1024, peak.bytes


@given(st.sampled_from([1, 16, 64]), st.sampled_from([b"\0", b"a: b\n", bytes(range(256))]))
def test_header_block_bombs_are_refused_without_inflating_them(
    mebibytes: int, pattern: bytes
) -> None:
    deflate = zlib.compressobj(
        1, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, spdy.SPDY_DICTIONARY
    )
    plain = struct.pack(">I", 1) + struct.pack(">I", 1) + b"a" + struct.pack(">I", mebibytes << 20)
    chunk = pattern * ((1 << 20) // len(pattern))
    block = [deflate.compress(plain)]
    block += [deflate.compress(chunk) for _ in range(mebibytes)]
    block.append(deflate.flush(zlib.Z_SYNC_FLUSH))
    payload = struct.pack(">IIBB", 1, 0, 0, 0) + b"".join(block)
    frame = _unknown_control(1, payload)
    parser = spdy.FrameParser(max_frame_size=len(frame))
    with allocation_peak() as peak:
        result = outcome(lambda: parser.feed(frame), spdy.SpdyProtocolError, SECONDS)
    assert isinstance(result, spdy.SpdyProtocolError)
    # Copies of the frame and zlib's output buffers, never the size the block inflates to.
    assert peak.bytes < 5 * len(frame) + 4 * spdy.MAX_HEADER_BLOCK, peak.bytes
