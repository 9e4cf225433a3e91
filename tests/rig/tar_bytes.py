"""A byte-level tar writer for hostile layers.

``tarfile`` refuses to write most of what a hostile layer holds: sizes that disagree
with the data, PAX records with wrong lengths or bytes that are not UTF-8, GNU sparse
headers, bad checksums. :class:`Member` writes one ustar header and its data exactly as
given; :func:`pax_record`, :func:`sparse_tail` and :func:`sparse_extension` build the
pieces of PAX and GNU extended headers. Join members with :func:`tar` (two zero blocks
end the archive).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["BLOCK", "Member", "number", "pax_record", "sparse_extension", "sparse_tail", "tar"]

BLOCK = 512
EPOCH_2000 = 946684800


def number(value: int, width: int) -> bytes:
    """A numeric header field: octal when it fits, else GNU base-256 (negative too)."""
    if 0 <= value < 1 << (3 * (width - 1)):
        return f"{value:0{width - 1}o}".encode() + b"\0"
    span = 1 << (8 * (width - 1))
    if value >= 0:
        return b"\x80" + (value % span).to_bytes(width - 1, "big")
    return b"\xff" + ((span + value) % span).to_bytes(width - 1, "big")


def _same(raw: bytes) -> bytes:
    return raw


@dataclass(frozen=True)
class Member:
    """One tar header and its data blocks, every field as given."""

    typeflag: bytes
    name: bytes
    data: bytes = b""
    size: int | None = None  # the header's size field; None: len(data)
    linkname: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = EPOCH_2000
    devmajor: int = 0
    devminor: int = 0
    tail: bytes = b""  # raw bytes over the ustar prefix field (GNU sparse data lives there)
    bad_checksum: bool = False

    def encode(self, expand: Callable[[bytes], bytes] = _same) -> bytes:
        """The header block and the data padded to whole blocks; ``expand`` rewrites the
        name, link name and data first (to put in paths known only at run time)."""
        header = bytearray(BLOCK)

        def put(offset: int, field: bytes) -> None:
            header[offset : offset + len(field)] = field

        data = expand(self.data)
        put(0, expand(self.name)[:100])
        put(100, number(self.mode, 8))
        put(108, number(self.uid, 8))
        put(116, number(self.gid, 8))
        put(124, number(len(data) if self.size is None else self.size, 12))
        put(136, number(self.mtime, 12))
        put(156, self.typeflag[:1])
        put(157, expand(self.linkname)[:100])
        put(257, b"ustar\x0000")
        put(329, number(self.devmajor, 8))
        put(337, number(self.devminor, 8))
        put(345, self.tail[:155])
        header[148:156] = b" " * 8
        checksum = sum(header) + (1 if self.bad_checksum else 0)
        header[148:156] = f"{checksum:06o}".encode() + b"\0 "
        return bytes(header) + data + b"\0" * (-len(data) % BLOCK)


def tar(members: Iterable[Member], end: bytes = b"\0" * 2 * BLOCK) -> bytes:
    """The members one after the other, then ``end`` (by default the end-of-archive)."""
    return b"".join(member.encode() for member in members) + end


def pax_record(key: bytes, value: bytes, length_error: int = 0) -> bytes:
    """``"<length> key=value\\n"``, the length counting its own digits (plus an error)."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(max(length + length_error, 0)).encode() + body


def sparse_tail(structs: list[tuple[int, int]], extended: bool, realsize: int) -> bytes:
    """The old GNU sparse header part: 4 (offset, numbytes) pairs from byte 386, the
    "extension follows" flag at 482, the real size at 483 (``Member.tail`` starts at 345)."""
    pairs = b"".join(number(o, 12) + number(n, 12) for o, n in structs[:4])
    return b"\0" * 41 + pairs.ljust(96, b"\0") + bytes([extended]) + number(realsize, 12)


def sparse_extension(structs: list[tuple[int, int]], extended: bool) -> bytes:
    """A GNU sparse extension block: 21 pairs, then the "another follows" flag at 504."""
    pairs = b"".join(number(o, 12) + number(n, 12) for o, n in structs[:21])
    return pairs.ljust(504, b"\0") + bytes([extended]) + b"\0" * 7
