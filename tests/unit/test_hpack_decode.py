"""crishim's HPACK decoder against the hpack package's encoder (another implementation):
the same header lists come out, across many blocks sharing one dynamic table."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crishim.api.hpack_decode import HpackDecoder, HpackError

NAMES = st.sampled_from(
    [":method", ":path", ":authority", "content-type", "grpc-timeout", "user-agent", "te"]
) | st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
VALUES = st.text(max_size=60) | st.sampled_from(["POST", "/runtime.v1.RuntimeService/Version"])
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=12)


@given(st.lists(HEADERS, min_size=1, max_size=8), st.booleans())
def test_blocks_decode_to_what_was_encoded(
    blocks: list[list[tuple[str, str]]], huffman: bool
) -> None:
    encoder = hpack.Encoder()
    decoder = HpackDecoder()
    for headers in blocks:
        block = encoder.encode(headers, huffman=huffman)
        assert decoder.decode(block) == headers


@given(st.lists(HEADERS, min_size=1, max_size=6))
def test_sensitive_fields_and_a_smaller_table(blocks: list[list[tuple[str, str]]]) -> None:
    encoder = hpack.Encoder()
    encoder.header_table_size = 256  # emits a table size update, then evicts often
    decoder = HpackDecoder()
    for headers in blocks:
        marked = [hpack.NeverIndexedHeaderTuple(n, v) for n, v in headers[:1]] + headers[1:]
        assert decoder.decode(encoder.encode(marked)) == headers
    assert decoder.table_size <= 256


def test_a_grpc_go_like_sequence_keeps_its_table_small() -> None:
    encoder = hpack.Encoder()
    decoder = HpackDecoder()
    for n in range(2000):
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/runtime.v1.RuntimeService/ContainerStatus"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("user-agent", "grpc-go/1.70.0"),
            ("te", "trailers"),
            ("grpc-timeout", f"{119_999_000 - n}u"),
        ]
        assert decoder.decode(encoder.encode(headers)) == headers
    assert decoder.table_size <= 4096


@pytest.mark.parametrize(
    ("block", "problem"),
    [
        (b"\xff\x80\x80\x80\x80\x80\x01", "integer too large"),
        (b"\xbf", "index"),  # dynamic index 62 of an empty table
        (b"\x80", "index 0"),
        (b"\x40\x05ab", "longer than"),
        (b"\x3f\xe2\x1f", "table size"),  # an update to 4097, above 4096
        (b"\x82\x20", "after a header field"),
        (b"\x40", "ends before a string"),
    ],
)
def test_malformed_blocks_name_the_problem(block: bytes, problem: str) -> None:
    with pytest.raises(HpackError, match=problem):
        HpackDecoder().decode(block)


def test_a_header_list_over_the_limit_is_refused() -> None:
    block = hpack.Encoder().encode([("x-big", "v" * 3000)])
    with pytest.raises(HpackError, match="larger than"):
        HpackDecoder(max_list_size=1024).decode(block)
