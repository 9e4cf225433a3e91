"""An HPACK decoder (RFC 7541) for request header blocks, lean where gRPC clients are
repetitive.

A gRPC client sends nearly the same headers with every call: after the first call most
fields are one-byte references to the dynamic table, and the literals that remain
(``grpc-timeout``, a changing value) are short. This decoder keeps the dynamic table as a
list and remembers the text of Huffman-coded strings it has seen, so a typical block takes
a few microseconds; the ``hpack`` package's decoder, general and validating, took about
30 per call. The static table and the Huffman code are the ``hpack`` package's.
"""

from __future__ import annotations

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

__all__ = ["DEFAULT_TABLE_SIZE", "HpackDecoder", "HpackError"]

DEFAULT_TABLE_SIZE = 4096
_STATIC = tuple((name.decode(), value.decode()) for name, value in HeaderTable.STATIC_TABLE)
_STATIC_COUNT = len(_STATIC)
_ENTRY_OVERHEAD = 32
_HUFFMAN_CACHE_LIMIT = 2048
_HUFFMAN_CACHED_LENGTH = 64  # longer strings are decoded each time (bounds the cache)


class HpackError(Exception):
    """A header block that cannot be decoded: a connection error (COMPRESSION_ERROR)."""


class HpackDecoder:
    """The decoding side of one connection's HPACK context."""

    def __init__(
        self, max_table_size: int = DEFAULT_TABLE_SIZE, max_list_size: int = 64 * 1024
    ) -> None:
        self._limit = max_table_size  # what this side announced (SETTINGS_HEADER_TABLE_SIZE)
        self._max_size = max_table_size  # the encoder's current choice, at most _limit
        self._max_list = max_list_size
        self._table: list[tuple[str, str]] = []  # newest first
        self._sizes: list[int] = []  # each entry's size, as RFC 7541 4.1 counts it
        self._size = 0
        self._huffman: dict[bytes, str] = {}

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The header list of one complete header block."""
        headers: list[tuple[str, str]] = []
        listed = 0
        pos, end = 0, len(block)
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = self._integer(block, pos, 7)
                header = self._entry(index)
            elif first & 0x40:  # literal with incremental indexing
                header, pos = self._literal(block, pos, 6)
                self._add(header)
            elif first & 0x20:  # dynamic table size update
                if headers:
                    raise HpackError("table size update after a header field")
                size, pos = self._integer(block, pos, 5)
                if size > self._limit:
                    raise HpackError(f"table size {size} above the announced {self._limit}")
                self._max_size = size
                self._evict()
                continue
            else:  # literal without indexing (0000) or never indexed (0001)
                header, pos = self._literal(block, pos, 4)
            listed += len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
            if listed > self._max_list:
                raise HpackError(f"header list larger than {self._max_list} bytes")
            headers.append(header)
        return headers

    def _entry(self, index: int) -> tuple[str, str]:
        if 0 < index <= _STATIC_COUNT:
            return _STATIC[index - 1]
        dynamic = index - _STATIC_COUNT - 1
        if index == 0 or dynamic >= len(self._table):
            raise HpackError(f"header table index {index} out of range")
        return self._table[dynamic]

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[tuple[str, str], int]:
        index, pos = self._integer(block, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = self._string(block, pos)
        value, pos = self._string(block, pos)
        return (name, value), pos

    def _string(self, block: bytes, pos: int) -> tuple[str, int]:
        if pos >= len(block):
            raise HpackError("header block ends before a string")
        huffman = block[pos] & 0x80
        length, pos = self._integer(block, pos, 7)
        end = pos + length
        if end > len(block):
            raise HpackError("string longer than the header block")
        raw = block[pos:end]
        if not huffman:
            return raw.decode("utf-8", "surrogateescape"), end
        text = self._huffman.get(raw)
        if text is None:
            try:
                text = decode_huffman(raw).decode("utf-8", "surrogateescape")
            except Exception as exc:
                raise HpackError(f"bad Huffman string: {exc}") from exc
            if length <= _HUFFMAN_CACHED_LENGTH:
                if len(self._huffman) >= _HUFFMAN_CACHE_LIMIT:
                    self._huffman.clear()
                self._huffman[raw] = text
        return text, end

    @staticmethod
    def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
        mask = (1 << prefix) - 1
        value = block[pos] & mask
        pos += 1
        if value < mask:
            return value, pos
        shift = 0
        while True:
            if pos >= len(block):
                raise HpackError("header block ends inside an integer")
            byte = block[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, pos
            shift += 7
            if shift > 28:
                raise HpackError("integer too large")

    def _add(self, header: tuple[str, str]) -> None:
        size = _octets(header[0]) + _octets(header[1]) + _ENTRY_OVERHEAD
        if size > self._max_size:
            # an entry larger than the table empties it and is not added
            self._table.clear()
            self._sizes.clear()
            self._size = 0
            return
        self._table.insert(0, header)
        self._sizes.insert(0, size)
        self._size += size
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max_size and self._table:
            self._table.pop()
            self._size -= self._sizes.pop()

    @property
    def table_size(self) -> int:
        """The dynamic table's size (RFC 7541 4.1)."""
        return self._size


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))
