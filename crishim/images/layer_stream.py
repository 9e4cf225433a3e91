"""Reading a layer: decompression, the diff ID, and the tar entries, for ``unpack``.

The layer is treated as hostile here as in ``unpack``:

- :class:`LayerStream` decompresses (gzip, zstd or none) in bounded steps and hashes every
  decompressed byte: the diff ID covers the whole stream, trailing padding included. A
  stream that is damaged or ends inside a gzip member or zstd frame is :class:`CorruptStream`.
- :class:`TarReader` hands out entries as ``tarfile`` parses their headers, and their data
  as views of the decompressed chunks (nothing copied on the way to the file). It is the
  forward-only file ``tarfile`` reads from: tarfile's own stream mode copies its whole
  buffer on every read, which made it the costliest part of a pull.
- Headers are checked on the way (:class:`_StrictTarInfo`): a damaged header is not taken
  for the end of the archive, extended headers (long names, PAX records) over 1 MiB and
  GNU sparse files are refused before tarfile reads them, and so are layers with too many
  global PAX records.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from collections import deque
from collections.abc import Iterator
from enum import Enum
from typing import Any, NoReturn, Protocol, Self

import zstandard

from crishim.errors import InvalidArgument

__all__ = ["CorruptStream", "LayerStream", "Readable", "TarReader", "UnpackError"]

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: compressed bytes read from the blob at once
_INPUT_CHUNK = 1 << 20
#: decompressed bytes handed on at once (at most, for gzip; at least, for zstd)
_OUTPUT_CHUNK = 1 << 20
#: zstd input fed per call: one call's output is at most ~32x this many KiB even for a
#: crafted stream of tiny RLE blocks, so the decompressed layer is never held in memory
_ZSTD_INPUT_CHUNK = 1024
# zlib's wbits for "gzip header and trailer".
_GZIP_WBITS = 16 + zlib.MAX_WBITS
#: headers that hold the next entry's long name or link, or PAX records; Go's archive/tar
#: (containerd's reader) refuses them past 1 MiB too
_EXTENDED_HEADER_TYPES = frozenset(
    (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    )
)
_EXTENDED_HEADER_MAX = 1 << 20
#: global PAX records a layer may set (``git archive`` writes one); each costs time on
#: every later entry
_GLOBAL_PAX_RECORDS_MAX = 128
#: error messages are cut to about this many characters
_MESSAGE_MAX = 1000


class UnpackError(InvalidArgument):
    """The layer is damaged or hostile; the message names the entry and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(readable(message))


def readable(message: str) -> str:
    """A message quoting entry names, made fit to send: names come from the layer.

    A name may be a MiB long (both ends are kept: the start of the name and the problem),
    and its bytes that are not UTF-8 are surrogate escapes, which gRPC cannot encode
    (they are spelled out as ``\\udcNN``).
    """
    if len(message) > _MESSAGE_MAX:
        half = _MESSAGE_MAX // 2
        message = f"{message[:half]}...{message[-half:]}"
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


class CorruptStream(Exception):
    """The compressed stream or the tar headers are damaged (not an OSError on purpose:
    errors of the target file system are reported per entry, these for the whole layer)."""


class Readable(Protocol):
    """Where compressed bytes come from: a blob file, or a download still arriving."""

    def read(self, size: int, /) -> bytes: ...


# --- decompression and digest -------------------------------------------------------------


class _Compression(Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_MEDIA_TYPES: dict[str, _Compression] = {
    "application/vnd.oci.image.layer.v1.tar": _Compression.NONE,
    "application/vnd.oci.image.layer.v1.tar+gzip": _Compression.GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": _Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": _Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": _Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": _Compression.ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar": _Compression.NONE,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": _Compression.GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": _Compression.ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar": _Compression.NONE,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": _Compression.GZIP,
}


def _compression_of(media_type: str, head: bytes) -> _Compression:
    """By media type; for an unknown one, by the stream's magic bytes."""
    known = _MEDIA_TYPES.get(media_type.split(";", 1)[0].strip().lower())
    if known is not None:
        return known
    if head.startswith(_GZIP_MAGIC):
        return _Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return _Compression.ZSTD
    return _Compression.NONE


class _Decoder(Protocol):
    def chunk(self) -> bytes: ...


class _Plain:
    def __init__(self, source: Readable, head: bytes) -> None:
        self._source = source
        self._head = head

    def chunk(self) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            return data
        return self._source.read(_INPUT_CHUNK)


class _Gzip:
    """A gzip stream decoder on zlib directly: header, CRC and length are checked in C.
    Concatenated members are decoded in turn, zero padding after the last one is allowed,
    a stream that ends inside a member is an error. Output per step is capped, so a
    crafted stream cannot make one step balloon in memory."""

    def __init__(self, source: Readable, head: bytes) -> None:
        self._source = source
        self._member: Any = None  # zlib's decompress object of the current member
        self._input = head

    def chunk(self) -> bytes:
        while True:
            if not self._input:
                self._input = self._source.read(_INPUT_CHUNK)
                if not self._input:
                    if self._member is not None:
                        raise EOFError("gzip stream ends inside a member")
                    return b""
            if self._member is None:
                if not self._input.strip(b"\0"):
                    self._input = b""  # padding between or after members
                    continue
                self._member = zlib.decompressobj(_GZIP_WBITS)
            out: bytes = self._member.decompress(self._input, _OUTPUT_CHUNK)
            self._input = self._member.unconsumed_tail
            if self._member.eof:
                self._input = self._member.unused_data
                self._member = None
            if out:
                return out


class _Zstd:
    """A zstd stream decoder that, unlike ``ZstdDecompressor.stream_reader``, reports a
    stream that ends inside a frame instead of returning the part it could decode. Its
    small outputs are gathered into chunks of about ``_OUTPUT_CHUNK``; a large one (up to
    ~32 MiB from 1 KiB of input) is handed on alone, never copied."""

    def __init__(self, source: Readable, head: bytes) -> None:
        self._source = source
        self._head = head
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._decoded: deque[bytes] = deque()

    def chunk(self) -> bytes:
        out: list[bytes] = []
        size = 0
        while size < _OUTPUT_CHUNK:
            if not self._decoded:
                data, self._head = self._head or self._source.read(_ZSTD_INPUT_CHUNK), b""
                if not data:
                    if self._in_frame:
                        raise EOFError("zstd stream ends inside a frame")
                    break
                self._decode(data)
                continue
            if size and size + len(self._decoded[0]) > _OUTPUT_CHUNK:
                break
            piece = self._decoded.popleft()
            if not piece:
                continue
            out.append(piece)
            size += len(piece)
        return out[0] if len(out) == 1 else b"".join(out)

    def _decode(self, data: bytes) -> None:
        while data:
            self._decoded.append(self._frame.decompress(data))
            self._in_frame = not self._frame.eof
            if self._in_frame:
                return
            # A layer may be several concatenated frames: start a new one on the rest.
            data = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()


class LayerStream:
    """The decompressed bytes of a layer in chunks, hashed and counted as they come."""

    def __init__(self, source: Readable, media_type: str) -> None:
        head = b""
        while len(head) < len(_ZSTD_MAGIC) and (more := source.read(len(_ZSTD_MAGIC) - len(head))):
            head += more
        compression = _compression_of(media_type, head)
        decoder: _Decoder
        if compression is _Compression.GZIP:
            decoder = _Gzip(source, head)
        elif compression is _Compression.ZSTD:
            decoder = _Zstd(source, head)
        else:
            decoder = _Plain(source, head)
        self._decoder = decoder
        self._sha256 = hashlib.sha256()
        self.size = 0

    def chunk(self) -> bytes:
        """The next chunk; b"" at the end."""
        try:
            data = self._decoder.chunk()
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise CorruptStream(str(exc) or type(exc).__name__) from exc
        self._sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read to the end: padding after the end-of-archive marker is part of the diff ID."""
        while self.chunk():
            pass

    @property
    def digest(self) -> str:
        """The diff ID of what was read so far."""
        return "sha256:" + self._sha256.hexdigest()


# --- tar entries ----------------------------------------------------------------------------


class TarReader:
    """The entries of the tar stream in ``stream``, in order.

    Also the file object that ``tarfile`` reads headers from: ``read``, ``tell`` and a
    ``seek`` that only goes forward (reading past data not wanted) and stops at the end
    of the stream, so an entry that declares more data than the stream holds fails at
    once instead of skipping block after block.
    """

    def __init__(self, stream: LayerStream) -> None:
        self._stream = stream
        self._chunk = b""
        self._offset = 0  # into _chunk
        self._position = 0  # in the stream

    # -- what tarfile uses --

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        if whence != io.SEEK_SET or position < self._position:
            raise tarfile.StreamError("seeking backwards is not allowed")
        remaining = position - self._position
        while remaining and self._fill():
            step = min(remaining, len(self._chunk) - self._offset)
            self._advance(step)
            remaining -= step
        return self._position

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise tarfile.StreamError("reading to the end is not supported")
        if not self._fill():
            return b""
        if self._offset + size <= len(self._chunk):
            data = self._chunk[self._offset : self._offset + size]
            self._advance(size)
            return data
        parts = []
        while size and self._fill():
            step = min(size, len(self._chunk) - self._offset)
            parts.append(self._chunk[self._offset : self._offset + step])
            self._advance(step)
            size -= step
        return b"".join(parts)

    # -- entries --

    def entries(self) -> Iterator[tarfile.TarInfo]:
        """Each entry's header; read or skip its data before asking for the next."""
        tar = tarfile.TarFile(fileobj=self, mode="r", tarinfo=_StrictTarInfo)  # type: ignore[arg-type]
        while (member := tar.next()) is not None:
            # tarfile applies every global PAX record to every later entry, one by one.
            if len(tar.pax_headers) > _GLOBAL_PAX_RECORDS_MAX:
                raise UnpackError(
                    f"layer holds {len(tar.pax_headers)} global PAX records "
                    f"(at most {_GLOBAL_PAX_RECORDS_MAX})"
                )
            # tarfile keeps every header it read (an attribute typeshed does not list);
            # nothing here needs them, and a layer may hold 100k entries.
            tar.members.clear()  # type: ignore[attr-defined]
            yield member

    def data(self, member: tarfile.TarInfo) -> Iterator[memoryview]:
        """The data of a regular entry, as views valid until the next step."""
        self.seek(member.offset_data)
        remaining = member.size
        while remaining:
            if not self._fill():
                raise tarfile.ReadError("unexpected end of data")
            step = min(remaining, len(self._chunk) - self._offset)
            view = memoryview(self._chunk)[self._offset : self._offset + step]
            self._advance(step)
            remaining -= step
            yield view

    def skip(self, member: tarfile.TarInfo) -> None:
        """Read past the data of a regular entry that is not extracted; a stream that ends
        before it does is an error at once."""
        if member.isreg() and member.size:
            for _ in self.data(member):
                pass

    def _fill(self) -> bool:
        """Make sure unread bytes are at hand; False at the end of the stream."""
        while self._offset == len(self._chunk):
            self._chunk = b""  # not held while the next one is made
            self._chunk = self._stream.chunk()
            self._offset = 0
            if not self._chunk:
                return False
        return True

    def _advance(self, count: int) -> None:
        self._offset += count
        self._position += count


class _StrictTarInfo(tarfile.TarInfo):
    """Tells a damaged header from the end of the archive.

    ``TarFile.next()`` takes any bad header after the first one for the end of the
    archive; only an empty read or a zero block really is one. And tarfile lets the
    ValueErrors of parsing a damaged PAX header escape as they are (a ``hdrcharset`` that
    is not UTF-8, a record length of thousands of digits): those are damage too.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        try:
            info = super().frombuf(buf, encoding, errors)
        except tarfile.HeaderError as exc:
            if buf.count(0) == len(buf):
                raise  # nothing, or zeros: the end of the archive
            raise CorruptStream(f"bad tar header: {exc}") from exc
        if info.type == tarfile.GNUTYPE_SPARSE:
            _refuse_sparse(info)
        # tarfile reads an extended header whole into memory, whatever size it declares.
        if info.type in _EXTENDED_HEADER_TYPES and info.size > _EXTENDED_HEADER_MAX:
            raise UnpackError(
                f"layer holds a tar extended header of {info.size} bytes "
                f"(at most {_EXTENDED_HEADER_MAX} are read)"
            )
        return info

    # tarfile's hooks for the PAX forms of GNU sparse files (formats 0.0, 0.1 and 1.0),
    # called with the entry the PAX header describes, before 1.0 reads its map.
    def _proc_gnusparse_00(self, entry: tarfile.TarInfo, *rest: object) -> None:
        _refuse_sparse(entry)

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(archive)
        except ValueError as exc:  # UnicodeDecodeError is one too
            raise CorruptStream(f"bad extended tar header: {exc}") from exc


def _refuse_sparse(entry: tarfile.TarInfo) -> NoReturn:
    # OCI asks images not to use them. tarfile reads a sparse map with no bound on its
    # length (a small compressed layer can hold billions of entries) and writes the holes
    # out as zeros (a "file" of terabytes), so they are refused before either happens.
    raise UnpackError(f'layer entry "{entry.name}": sparse files are not supported')
