"""The RFC 6455 server-side codec: handshake key, frames, fragmentation, control frames."""

from __future__ import annotations

import pytest

from crishim.streaming import websocket as ws

KEY = bytes.fromhex("37fa213d")


def feed(data: bytes, max_payload: int = ws.DEFAULT_MAX_MESSAGE) -> list[ws.WebSocketFrame]:
    return ws.WebSocketFrameParser(max_payload=max_payload).feed(data)


def test_accept_key_of_rfc_example() -> None:
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("key", ["not base64!", "c2hvcnQ="], ids=["not-base64", "short"])
def test_bad_client_keys_are_refused(key: str) -> None:
    with pytest.raises(ws.WebSocketProtocolError):
        ws.accept_key(key)


def test_masked_client_frame_of_rfc_example() -> None:
    (frame,) = feed(bytes.fromhex("818537fa213d7f9f4d5158"))
    assert frame == ws.WebSocketFrame(ws.Opcode.TEXT, b"Hello", fin=True)


def test_server_frames_are_unmasked() -> None:
    assert ws.encode_frame(ws.Opcode.TEXT, b"Hello") == bytes.fromhex("810548656c6c6f")
    assert ws.encode_frame(ws.Opcode.PING, b"Hello") == bytes.fromhex("890548656c6c6f")


def test_client_side_masking_matches_rfc_example() -> None:
    wire = ws.encode_frame(ws.Opcode.TEXT, b"Hello", mask=KEY)
    assert wire == bytes.fromhex("818537fa213d7f9f4d5158")


@pytest.mark.parametrize(
    ("size", "header"),
    [(125, "827d"), (126, "827e007e"), (256, "827e0100"), (65536, "827f0000000000010000")],
)
def test_payload_length_encodings(size: int, header: str) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = ws.encode_frame(ws.Opcode.BINARY, payload)
    assert wire.startswith(bytes.fromhex(header))
    (frame,) = feed(ws.encode_frame(ws.Opcode.BINARY, payload, mask=KEY))
    assert frame.payload == payload


def test_frames_split_across_chunks() -> None:
    wire = b"".join(
        ws.encode_frame(ws.Opcode.BINARY, bytes([n]) * (n * 100), mask=KEY) for n in range(1, 6)
    )
    parser = ws.WebSocketFrameParser()
    frames: list[ws.WebSocketFrame] = []
    for i in range(0, len(wire), 7):
        frames += parser.feed(wire[i : i + 7])
    assert [f.payload for f in frames] == [bytes([n]) * (n * 100) for n in range(1, 6)]


def test_fragmented_message_with_a_ping_in_between() -> None:
    assembler = ws.MessageAssembler()
    wire = (
        ws.encode_frame(ws.Opcode.TEXT, b"Hel", fin=False, mask=KEY)
        + ws.encode_frame(ws.Opcode.PING, b"!", mask=KEY)
        + ws.encode_frame(ws.Opcode.CONTINUATION, b"lo", mask=KEY)
    )
    messages = [assembler.add(frame) for frame in feed(wire)]
    assert messages == [
        None,
        ws.Message(ws.Opcode.PING, b"!"),
        ws.Message(ws.Opcode.TEXT, b"Hello"),
    ]


def test_close_frame_with_code() -> None:
    assert ws.encode_close(1000) == bytes.fromhex("880203e8")
    wire = ws.encode_close(1002, "bad")
    assert ws.parse_close(wire[2:]) == (1002, "bad")
    assert ws.parse_close(b"") == (1005, "")
    assert ws.parse_close(b"\x0b\xb8") == (3000, "")  # registered range


def test_long_close_reason_is_cut_at_a_character_boundary() -> None:
    wire = ws.encode_close(1011, "\u00e9" * 100)
    assert len(wire) == 2 + 2 + 122
    assert ws.parse_close(wire[2:]) == (1011, "\u00e9" * 61)


@pytest.mark.parametrize(
    "payload",
    [b"\x03", b"\x03\xed", b"\x03\xeefoo", b"\x03\xe7", b"\x03\xe8\xff"],
    ids=["one-byte", "1005", "1006", "999", "bad-utf8"],
)
def test_invalid_close_payloads(payload: bytes) -> None:
    with pytest.raises(ws.WebSocketProtocolError):
        ws.parse_close(payload)


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes.fromhex("810548656c6c6f"), ws.CloseCode.PROTOCOL_ERROR),  # unmasked
        (bytes.fromhex("c18037fa213d"), ws.CloseCode.PROTOCOL_ERROR),  # RSV1 set
        (bytes.fromhex("838037fa213d"), ws.CloseCode.PROTOCOL_ERROR),  # opcode 3
        (bytes.fromhex("89fe007e37fa213d"), ws.CloseCode.PROTOCOL_ERROR),  # long ping
        (bytes.fromhex("098037fa213d"), ws.CloseCode.PROTOCOL_ERROR),  # fragmented ping
    ],
    ids=["unmasked", "reserved-bits", "unknown-opcode", "long-control", "fragmented-control"],
)
def test_malformed_frames_raise_with_a_close_code(wire: bytes, code: int) -> None:
    with pytest.raises(ws.WebSocketProtocolError) as caught:
        feed(wire)
    assert caught.value.code == code


def test_oversized_frame_is_refused_from_its_header() -> None:
    with pytest.raises(ws.WebSocketProtocolError) as caught:
        feed(bytes.fromhex("82ff0000000100000000"), max_payload=1024)
    assert caught.value.code == ws.CloseCode.TOO_BIG


def test_oversized_fragmented_message_is_refused() -> None:
    assembler = ws.MessageAssembler(max_message=10)
    assembler.add(ws.WebSocketFrame(ws.Opcode.BINARY, b"123456", fin=False))
    with pytest.raises(ws.WebSocketProtocolError) as caught:
        assembler.add(ws.WebSocketFrame(ws.Opcode.CONTINUATION, b"789012"))
    assert caught.value.code == ws.CloseCode.TOO_BIG


def test_continuation_without_a_message_is_refused() -> None:
    with pytest.raises(ws.WebSocketProtocolError, match="continuation"):
        ws.MessageAssembler().add(ws.WebSocketFrame(ws.Opcode.CONTINUATION, b"x"))


def test_new_message_inside_a_fragmented_one_is_refused() -> None:
    assembler = ws.MessageAssembler()
    assembler.add(ws.WebSocketFrame(ws.Opcode.TEXT, b"a", fin=False))
    with pytest.raises(ws.WebSocketProtocolError, match="before the last one finished"):
        assembler.add(ws.WebSocketFrame(ws.Opcode.BINARY, b"b"))


def test_invalid_utf8_text_is_refused() -> None:
    with pytest.raises(ws.WebSocketProtocolError) as caught:
        ws.MessageAssembler().add(ws.WebSocketFrame(ws.Opcode.TEXT, b"\xff"))
    assert caught.value.code == ws.CloseCode.INVALID_DATA


def test_control_frames_cannot_be_encoded_too_long() -> None:
    with pytest.raises(ValueError, match="125"):
        ws.encode_frame(ws.Opcode.PING, bytes(126))
