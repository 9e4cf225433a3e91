"""The SPDY/3.1 codec: byte-exact frames, header blocks, incremental parsing, errors."""

from __future__ import annotations

import hashlib
import random
import zlib

import pytest

from crishim.streaming import spdy


def parse_one(data: bytes) -> spdy.Frame:
    frames = spdy.FrameParser().feed(data)
    assert len(frames) == 1
    return frames[0]


# --- byte-exact frames ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (spdy.Ping(4), "80030006 00000004 00000004"),
        (spdy.Data(1, b"hi", spdy.FLAG_FIN), "00000001 01000002 6869"),
        (spdy.Data(0x7FFFFFFF, b""), "7fffffff 00000000"),
        (spdy.WindowUpdate(5, 0x10000), "80030009 00000008 00000005 00010000"),
        (spdy.WindowUpdate(0, 983040), "80030009 00000008 00000000 000f0000"),
        (spdy.RstStream(3, spdy.RstStatus.CANCEL), "80030003 00000008 00000003 00000005"),
        (spdy.GoAway(7, spdy.GoAwayStatus.OK), "80030007 00000008 00000007 00000000"),
        (
            # What spdy-transport sends first: INITIAL_WINDOW_SIZE = 1 MiB, flag "persist".
            spdy.Settings((spdy.SettingsEntry(spdy.SettingsId.INITIAL_WINDOW_SIZE, 1 << 20, 1),)),
            "80030004 0000000c 00000001 01000007 00100000",
        ),
    ],
    ids=["ping", "data-fin", "data-max-id", "window", "window-conn", "rst", "goaway", "settings"],
)
def test_frame_bytes_match_the_spec(frame: spdy.Frame, wire: str) -> None:
    raw = bytes.fromhex(wire)
    assert spdy.encode(frame) == raw
    assert parse_one(raw) == frame


def test_syn_stream_layout() -> None:
    frame = spdy.SynStream(3, (("streamtype", "stdin"),), priority=3, flags=spdy.FLAG_FIN)
    raw = spdy.encode(frame, spdy.HeaderCompressor())
    # control bit + version 3, type 1, FIN flag, 24-bit length, stream 3, associated 0,
    # priority 3 in the top three bits, slot 0, then the compressed header block.
    assert raw[:4] == bytes.fromhex("80030001")
    assert raw[4] == spdy.FLAG_FIN
    assert int.from_bytes(raw[5:8], "big") == len(raw) - 8
    assert raw[8:18] == bytes.fromhex("00000003 00000000 6000")
    assert parse_one(raw) == frame


def test_syn_reply_and_headers_round_trip() -> None:
    compressor = spdy.HeaderCompressor()
    parser = spdy.FrameParser()
    frames: list[spdy.Frame] = [
        spdy.SynReply(1, ((":status", "200"), (":version", "HTTP/1.1"))),
        spdy.Headers(1, (("x-extra", "a\x00b"),), spdy.FLAG_FIN),
    ]
    wire = b"".join(spdy.encode(frame, compressor) for frame in frames)
    assert wire[:4] == bytes.fromhex("80030002")
    assert parser.feed(wire) == frames


def test_header_frames_need_a_compressor() -> None:
    with pytest.raises(ValueError, match="compressor"):
        spdy.encode(spdy.SynReply(1))


def test_unknown_control_frames_are_skipped() -> None:
    # Type 10 (CREDENTIAL) is ignored; the PING after it still comes out.
    raw = bytes.fromhex("8003000a 00000002 abcd") + spdy.encode(spdy.Ping(1))
    assert spdy.FrameParser().feed(raw) == [spdy.Ping(1)]


# --- header blocks -------------------------------------------------------------------------


def test_dictionary_is_the_spdy3_one() -> None:
    assert len(spdy.SPDY_DICTIONARY) == 1423
    assert spdy.SPDY_DICTIONARY.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert spdy.SPDY_DICTIONARY.endswith(b",utf-,*,enq=0.")
    assert (
        hashlib.sha256(spdy.SPDY_DICTIONARY).hexdigest()
        == "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02"
    )


def test_header_blocks_share_one_context_per_direction() -> None:
    compressor, decompressor = spdy.HeaderCompressor(), spdy.HeaderDecompressor()
    blocks = [
        (("streamtype", "error"), (":method", "POST")),
        (("streamtype", "stdout"), (":method", "POST")),
        (("port", "8080"), ("requestid", "0"), ("streamtype", "data")),
    ]
    encoded = [compressor.compress(block) for block in blocks]
    assert [decompressor.decompress(block) for block in encoded] == blocks
    # The later blocks reuse the context: decoding one alone cannot work.
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.HeaderDecompressor().decompress(encoded[1])


def test_header_block_from_an_independent_compressor() -> None:
    plain = (
        bytes.fromhex("00000001 0000000a") + b"streamtype" + bytes.fromhex("00000005") + b"stdin"
    )
    other = zlib.compressobj(zdict=spdy.SPDY_DICTIONARY)
    block = other.compress(plain) + other.flush(zlib.Z_SYNC_FLUSH)
    assert spdy.HeaderDecompressor().decompress(block) == (("streamtype", "stdin"),)


def test_header_names_are_lower_cased() -> None:
    block = spdy.HeaderCompressor().compress((("StreamType", "error"),))
    assert spdy.HeaderDecompressor().decompress(block) == (("streamtype", "error"),)


@pytest.mark.parametrize(
    "plain",
    [
        bytes.fromhex("00000002 00000001 61 00000001 62 00000001 61 00000001 63"),  # duplicate
        bytes.fromhex("00000001 00000000 00000001 62"),  # empty name
        bytes.fromhex("00000001 00000005 61"),  # truncated
        bytes.fromhex("00000000 ff"),  # trailing bytes
        bytes.fromhex("0000"),  # no pair count
    ],
    ids=["duplicate", "empty-name", "truncated", "trailing", "short"],
)
def test_bad_header_blocks_are_refused(plain: bytes) -> None:
    compressor = zlib.compressobj(zdict=spdy.SPDY_DICTIONARY)
    block = compressor.compress(plain) + compressor.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(spdy.SpdyProtocolError):
        spdy.HeaderDecompressor().decompress(block)


def test_header_block_bomb_is_refused() -> None:
    compressor = zlib.compressobj(zdict=spdy.SPDY_DICTIONARY)
    block = compressor.compress(b"\x00" * (2 * spdy.MAX_HEADER_BLOCK))
    block += compressor.flush(zlib.Z_SYNC_FLUSH)
    with pytest.raises(spdy.SpdyProtocolError, match="larger than"):
        spdy.HeaderDecompressor().decompress(block)


def test_garbage_header_block_is_refused() -> None:
    raw = bytes.fromhex("80030002 0000000a 00000001") + b"\xff\xfe\xfd\xfc\xfb\xfa"
    with pytest.raises(spdy.SpdyProtocolError, match="compression"):
        spdy.FrameParser().feed(raw)


# --- incremental parsing ----------------------------------------------------------------


def sample_frames() -> list[spdy.Frame]:
    return [
        spdy.Settings((spdy.SettingsEntry(7, 1 << 20),)),
        spdy.SynStream(1, (("streamtype", "error"),)),
        spdy.SynStream(3, (("streamtype", "stdin"),), priority=2),
        spdy.Data(3, bytes(range(256)) * 300),
        spdy.Data(3, b"", spdy.FLAG_FIN),
        spdy.WindowUpdate(0, 1234),
        spdy.Ping(1),
        spdy.Headers(1, (("a", "b"),)),
        spdy.RstStream(3, spdy.RstStatus.CANCEL),
        spdy.GoAway(3),
    ]


def encoded_sample() -> bytes:
    compressor = spdy.HeaderCompressor()
    return b"".join(spdy.encode(frame, compressor) for frame in sample_frames())


def test_frames_split_byte_by_byte() -> None:
    parser = spdy.FrameParser()
    frames: list[spdy.Frame] = []
    for byte in encoded_sample():
        frames += parser.feed(bytes([byte]))
    assert frames == sample_frames()


@pytest.mark.parametrize("seed", range(20))
def test_frames_split_at_random_boundaries(seed: int) -> None:
    wire = encoded_sample()
    rng = random.Random(seed)  # noqa: S311 - reproducible cut points, not secrets
    cuts = sorted(rng.sample(range(1, len(wire)), 12))
    parser = spdy.FrameParser()
    frames: list[spdy.Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        frames += parser.feed(wire[start:end])
    assert frames == sample_frames()


# --- malformed frames -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        ("80020006 00000004 00000001", "version 2"),
        ("80030006 00000005 0000000102", "PING"),
        ("80030003 00000004 00000001", "RST_STREAM"),
        ("80030007 00000004 00000001", "GOAWAY"),
        ("80030009 00000008 00000001 00000000", "zero delta"),
        ("80030004 00000008 00000002 01000007", "SETTINGS"),
        ("80030001 00000004 00000001", "SYN_STREAM"),
        ("80030002 00000002 0000", "SYN_REPLY"),
    ],
    ids=["version", "ping", "rst", "goaway", "window", "settings", "syn-stream", "syn-reply"],
)
def test_malformed_frames_raise(wire: str, message: str) -> None:
    with pytest.raises(spdy.SpdyProtocolError, match=message):
        spdy.FrameParser().feed(bytes.fromhex(wire))


def test_frame_over_the_size_limit_is_refused_before_buffering() -> None:
    parser = spdy.FrameParser(max_frame_size=1024)
    with pytest.raises(spdy.SpdyProtocolError, match="exceeds"):
        parser.feed(bytes.fromhex("00000001 00000401"))  # header only: 1025 bytes announced


def test_zero_window_delta_names_the_stream() -> None:
    with pytest.raises(spdy.SpdyProtocolError) as caught:
        spdy.FrameParser().feed(bytes.fromhex("80030009 00000008 00000005 00000000"))
    assert caught.value.stream_id == 5


@pytest.mark.parametrize(
    "frame",
    [spdy.WindowUpdate(1, 0), spdy.Data(-1), spdy.SynStream(1, (), priority=8)],
    ids=["zero-delta", "negative-id", "priority"],
)
def test_invalid_frames_are_not_encoded(frame: spdy.Frame) -> None:
    with pytest.raises(ValueError, match="range"):
        spdy.encode(frame, spdy.HeaderCompressor())
