"""Property tests of layer unpacking: any blob unpacks inside the target or fails with
UnpackError, quickly, and nothing outside the target changes.

Archives are written here byte by byte (tarfile's writer refuses most of what a hostile
layer holds): entries of every type with names and link targets built from ``..``, ``.``,
absolute paths into the test's own directory, whiteout prefixes and links planted in the
target beforehand; PAX records (sparse maps, times, sizes, xattrs, bad lengths), GNU long
names and links, GNU sparse headers, header fields in base-256, bad checksums; then bit
flips and cuts, and compression with gzip or zstd under a right, wrong or unknown media
type. Each example runs in a fresh directory: a canary directory and a lower layer beside
the target, links out of the target planted inside it; afterwards everything but the
target must be exactly as it was, no descriptor may be left open, the call must have
ended within the time limit, and an error's message must be short and valid UTF-8 (it
goes to kubelet over gRPC). Huge extended headers are also checked for the memory they
make the unpacker hold.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import pytest
import zstandard
from hypothesis import event, example, given
from hypothesis import strategies as st

from crishim.images.unpack import (
    LayerResult,
    UnpackError,
    WhiteoutStyle,
    apply_layer,
    apply_layer_ahead,
    settle_parents,
)
from tests.rig.bounds import allocation_peak, outcome
from tests.rig.tar_bytes import Member, pax_record, sparse_extension, sparse_tail, tar

SECONDS = 10.0
T = TypeVar("T")
#: stands for the absolute path of the example's directory in names and link targets
OUT = b"@OUT@"


# --- archive strategies -------------------------------------------------------------------

_pieces = st.sampled_from(
    [
        b"a",
        b"b",
        b"dir",
        b"..",
        b".",
        b"",
        b".wh.a",
        b".wh..",
        b".wh...",
        b".wh..wh..opq",
        b".wh..wh.plnk",
        b"up",
        b"abs",
        b"esc",
        b"etc",
        b"passwd",
        b"lower",
        b"canary",
        b"secret.txt",
        b"pwned",
    ]
)
_prefixes = st.sampled_from(
    [b"", b"", b"", b"/", b"./", OUT + b"/", OUT + b"/canary/", b"../", OUT + b"/../"]
)


def _mostly(common: st.SearchStrategy[T], rare: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``common`` nine times in ten: hostile values in every field at once would stop
    nearly every archive at its first entry, before entries can interact."""
    return st.integers(0, 9).flatmap(lambda n: rare if n == 0 else common)


names = _mostly(
    st.builds(lambda p, parts: p + b"/".join(parts), _prefixes, st.lists(_pieces, max_size=4)),
    st.one_of(st.binary(max_size=40), st.integers(1, 300).map(lambda n: b"d/" * n + b"f")),
)
_big = st.sampled_from([2**33 - 1, 2**33, 2**40, 2**62, 2**63 - 1])
_modes = _mostly(
    st.sampled_from([0o644, 0o755, 0o4755, 0o1777, 0o000, 0o600]),
    st.one_of(st.integers(0, 0o7777), st.just(0o7777777)),
)
_ids = _mostly(
    st.sampled_from([0, 1000]), st.sampled_from([65534, 2**21 - 1, 2**32 - 1, 2**40, -1])
)
_times = _mostly(st.sampled_from([0, 946684800]), st.sampled_from([-1, 2**33, 2**62, -(2**62)]))
_devices = _mostly(st.sampled_from([0, 1, 5, 8]), st.sampled_from([4095, 2**20, 2**32, 2**40]))

_pax_keys = st.one_of(
    st.sampled_from(
        [
            b"path",
            b"linkpath",
            b"size",
            b"mtime",
            b"atime",
            b"uid",
            b"gid",
            b"uname",
            b"hdrcharset",
            b"GNU.sparse.map",
            b"GNU.sparse.size",
            b"GNU.sparse.major",
            b"GNU.sparse.minor",
            b"GNU.sparse.name",
            b"GNU.sparse.realsize",
            b"GNU.sparse.offset",
            b"GNU.sparse.numbytes",
            b"SCHILY.xattr.user.x",
            b"SCHILY.xattr.trusted.overlay.opaque",
            b"SCHILY.xattr.security.capability",
            b"comment",
        ]
    ),
    st.binary(min_size=1, max_size=12).filter(lambda key: b"=" not in key),
)
_pax_values = st.one_of(
    st.sampled_from(
        [
            b"0",
            b"1",
            b"-1",
            b"1.5",
            b"1e999999",
            b"1e99990",
            b"-1e99990",
            b"nan",
            b"inf",
            b"99999999999999999999999",
            b"9" * 5000,
            b"abc",
            b"",
            b"1,2,3,4",
            b"0,1,x",
            b"\xff\xfe",
            b"BINARY",
        ]
    ),
    names,
    st.binary(max_size=30),
)
_pax_records = st.lists(
    st.builds(pax_record, _pax_keys, _pax_values, st.sampled_from([0, 0, 0, -1, 1, 10**6])),
    max_size=4,
).map(b"".join)

_types = _mostly(
    st.sampled_from([b"0", b"5", b"2", b"1", b"3", b"4", b"6", b"0", b"5", b"2"]),
    st.one_of(
        st.sampled_from([b"\0", b"7", b"V", b"M", b"D", b"N"]),
        st.binary(min_size=1, max_size=1),
    ),
)
_flag = st.integers(0, 29).map(lambda n: n == 0)  # one time in thirty


@st.composite
def members(draw: st.DrawFn) -> list[Member]:
    """One entry: a plain header, or one preceded by the headers that extend it."""
    kind = draw(_mostly(st.just("plain"), st.sampled_from(["pax", "long", "sparse", "raw"])))
    if draw(st.integers(0, 4)) == 0:
        kind = draw(st.sampled_from(["pax", "long"]))  # extended headers are common in layers
    typeflag = draw(_types)
    entry = Member(
        typeflag=typeflag,
        name=draw(names),
        # Only regular files (and unknown types) carry data; links, directories and
        # devices with data blocks are mostly misread headers after them.
        data=b"" if typeflag in b"123456" and not draw(_flag) else draw(st.binary(max_size=300)),
        size=draw(st.one_of(st.integers(0, 2000), _big)) if draw(_flag) else None,
        linkname=draw(names),
        mode=draw(_modes),
        uid=draw(_ids),
        gid=draw(_ids),
        mtime=draw(_times),
        devmajor=draw(_devices),
        devminor=draw(_devices),
        bad_checksum=draw(_flag),
    )
    if kind == "pax":
        flag = draw(_mostly(st.just(b"x"), st.sampled_from([b"g", b"X"])))
        records = draw(_pax_records)
        header = Member(flag, b"PaxHeader", records, size=draw(_big) if draw(_flag) else None)
        return [header, entry]
    if kind == "long":
        flag = draw(st.sampled_from([b"L", b"K"]))
        payload = draw(st.one_of(names, st.binary(max_size=300))) + b"\0"
        header = Member(flag, b"././@LongLink", payload, size=draw(_big) if draw(_flag) else None)
        return [header, entry]
    if kind == "sparse":
        structs = draw(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**40))))
        extended = draw(st.booleans())
        extensions = b""
        if extended:
            more = draw(st.lists(st.booleans(), min_size=1, max_size=3))
            extensions = b"".join(
                sparse_extension(structs, flag) for flag in [*more[1:], False][: len(more)]
            )
        realsize = draw(st.one_of(st.integers(0, 4096), _big))
        tail = sparse_tail(structs, extended, realsize)
        return [replace(entry, typeflag=b"S", tail=tail, data=extensions + entry.data)]
    if kind == "raw":
        return [replace(entry, tail=draw(st.binary(max_size=155)))]
    return [entry]


@dataclass(frozen=True)
class Archive:
    """A layer blob before the example's directory is known (``@OUT@`` still in it)."""

    members: tuple[Member, ...]
    end: bytes
    flips: tuple[tuple[int, int], ...]
    cut: int | None
    compression: str  # none, gzip, zstd
    media_type: str
    compressed_cut: int | None

    def blob(self, out: bytes) -> bytes:
        tar = bytearray(
            b"".join(m.encode(lambda raw: raw.replace(OUT, out)) for m in self.members) + self.end
        )
        for at, bit in self.flips:
            if tar:
                tar[at % len(tar)] ^= 1 << bit
        raw = bytes(tar if self.cut is None else tar[: self.cut % (len(tar) + 1)])
        if self.compression == "gzip":
            raw = gzip.compress(raw, mtime=0)
        elif self.compression == "zstd":
            raw = zstandard.ZstdCompressor().compress(raw)
        if self.compressed_cut is not None:
            raw = raw[: self.compressed_cut % (len(raw) + 1)]
        return raw


_MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@st.composite
def archives(draw: st.DrawFn) -> Archive:
    entries = [m for group in draw(st.lists(members(), min_size=1, max_size=8)) for m in group]
    compression = draw(st.sampled_from(["none", "gzip", "zstd"]))
    media_type = draw(
        _mostly(
            st.just(_MEDIA_TYPES[compression]),
            st.sampled_from([*_MEDIA_TYPES.values(), "application/octet-stream", ""]),
        )
    )
    few = st.integers(0, 9).map(lambda n: n == 0)
    return Archive(
        members=tuple(entries),
        end=draw(_mostly(st.just(b"\0" * 1024), st.sampled_from([b"", b"\0" * 512, b"junk"]))),
        flips=tuple(
            draw(
                _mostly(
                    st.just([]),
                    st.lists(st.tuples(st.integers(0), st.integers(0, 7)), min_size=1, max_size=2),
                )
            )
        ),
        cut=draw(st.integers(0)) if draw(few) else None,
        compression=compression,
        media_type=media_type,
        compressed_cut=draw(st.integers(0)) if draw(few) else None,
    )


# --- the sandbox ------------------------------------------------------------------------

Listing = dict[str, tuple[int, int, int, int, int, bytes]]


def _listing(top: Path, skip: Path) -> Listing:
    """Every path below ``top`` but ``skip``: type and mode, owner, size, links, mtime, data."""
    out: Listing = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            path = here / name
            st_ = os.lstat(path)
            data = path.read_bytes() if stat.S_ISREG(st_.st_mode) else b""
            if stat.S_ISLNK(st_.st_mode):
                data = os.fsencode(os.readlink(path))
            out[str(path.relative_to(top))] = (
                st_.st_mode,
                st_.st_uid,
                st_.st_size,
                st_.st_nlink,
                st_.st_mtime_ns,
                data,
            )
    return out


@dataclass
class Sandbox:
    """One example's directory: the target, a lower layer and a canary beside it."""

    out: Path
    target: Path
    lower: Path
    blob: Path


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("unpack-prop")
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _make_sandbox(base: Path) -> Sandbox:
    out = Path(tempfile.mkdtemp(dir=base))
    canary = out / "canary"
    (canary / "sub").mkdir(parents=True)
    (canary / "secret.txt").write_text("host data\n")
    (canary / "link").symlink_to("secret.txt")
    lower = out / "lower"
    (lower / "a" / "dir").mkdir(parents=True)
    (lower / "f").write_text("lower file\n")
    (lower / "l").symlink_to("../canary")
    (lower / "abs").symlink_to(out / "canary")
    target = out / "rootfs"
    _plant_target(out, target)
    return Sandbox(out, target, lower, out / "blob")


def _plant_target(out: Path, target: Path) -> None:
    """A target with a file and links out of it, all of the same times."""
    (target / "etc").mkdir(parents=True)
    (target / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (target / "up").symlink_to("../..")
    (target / "esc").symlink_to("../canary")
    (target / "abs").symlink_to(out)
    (target / "canary").symlink_to(out / "canary" / "secret.txt")
    for path in (*target.iterdir(), target / "etc" / "passwd"):
        os.utime(path, ns=(0, 0), follow_symlinks=False)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def unpack_in_sandbox(
    base: Path, blob_of: Archive, style: WhiteoutStyle, with_lower: bool
) -> LayerResult | UnpackError:
    """Apply the archive in a fresh sandbox and check everything around the target."""
    box = _make_sandbox(base)
    try:
        box.blob.write_bytes(blob_of.blob(str(box.out).encode()))
        before = _listing(box.out, skip=box.target)
        around = set(os.listdir(base))
        fds = _open_fds()
        result = outcome(
            lambda: apply_layer(
                box.blob,
                blob_of.media_type,
                box.target,
                lowers=[box.lower] if with_lower else [],
                whiteouts=style,
            ),
            UnpackError,
            SECONDS,
        )
        assert _listing(box.out, skip=box.target) == before
        assert set(os.listdir(base)) == around
        assert _open_fds() == fds
        if isinstance(result, LayerResult):
            assert result.size >= 0
            assert result.diff_id.startswith("sha256:")
            event(f"unpacked {min(result.entries, 3)}+ entries")
        else:
            message = str(result)
            assert 0 < len(message) < 1100, message
            message.encode("utf-8")  # as gRPC sends it
            # The problem without the names: what the examples reached (in the statistics).
            event("refused: " + re.sub(r'"[^"]*"|\([^)]*\)', "…", message)[:100])
        return result
    finally:
        shutil.rmtree(box.out)


# --- properties ---------------------------------------------------------------------------

_styles = st.sampled_from([WhiteoutStyle.DELETE, WhiteoutStyle.OVERLAY])


def _one(*members: Member, compression: str = "none") -> Archive:
    return Archive(members, b"\0" * 1024, (), None, compression, _MEDIA_TYPES[compression], None)


def _file(name: bytes) -> Member:
    return Member(b"0", name, b"x")


# The bugs these tests found, kept as examples (the plain tests in test_unpack.py too).
BAD_HDRCHARSET = _one(Member(b"x", b"P", pax_record(b"hdrcharset", b"\xff")), _file(b"f"))
SPARSE_HUGE_HOLE = _one(Member(b"S", b"f", tail=sparse_tail([(2**40, 1)], False, 2**40 + 1)))
SPARSE_CUT_EXTENSION = _one(Member(b"S", b"f", tail=sparse_tail([(0, 1)], True, 1)))
PAX_MTIME_OVERFLOW = _one(Member(b"x", b"P", pax_record(b"mtime", b"1e999999")), _file(b"f"))
LONG_NAME_2MIB = _one(Member(b"L", b"L", b"a" * (2 << 20)), _file(b"f"), compression="zstd")
DEEP_NAME = _one(Member(b"L", b"L", b"d/" * 5000 + b"\0"), _file(b"f"))
NOT_UTF8_NAMES = _one(Member(b"1", b"bad\xff", linkname=b"missing\xfe"))
SKIPPED_HUGE_WHITEOUT = _one(Member(b"0", b"x/.wh.gone", size=2**62))
GLOBAL_PAX_FLOOD = _one(
    Member(b"g", b"G", b"".join(pax_record(b"k%d" % i, b"") for i in range(90_000))),
    *(Member(b"5", b"d%d" % i) for i in range(300)),
    compression="zstd",
)
# Escapes that the plain tests cover, in this test's terms.
LINK_OUT_THEN_FILE = _one(
    Member(b"2", b"evil", linkname=OUT + b"/canary"), _file(b"evil/secret.txt")
)
HARDLINK_THROUGH_PLANTED_LINK = _one(Member(b"1", b"h", linkname=b"esc/secret.txt"))
CLIMB_OUT = _one(_file(b"up/pwned"), _file(b"../../pwned"), _file(OUT + b"/../pwned"))
WHITEOUTS_THROUGH_LINKS = _one(_file(b"esc/.wh.secret.txt"), _file(b"abs/canary/.wh..wh..opq"))

_DELETE = WhiteoutStyle.DELETE
_OVERLAY = WhiteoutStyle.OVERLAY


@given(archives(), _styles, st.booleans())
@example(BAD_HDRCHARSET, _DELETE, False)
@example(SPARSE_HUGE_HOLE, _DELETE, False)
@example(SPARSE_CUT_EXTENSION, _DELETE, False)
@example(PAX_MTIME_OVERFLOW, _DELETE, False)
@example(LONG_NAME_2MIB, _DELETE, False)
@example(DEEP_NAME, _DELETE, True)
@example(NOT_UTF8_NAMES, _DELETE, False)
@example(SKIPPED_HUGE_WHITEOUT, _OVERLAY, False)
@example(GLOBAL_PAX_FLOOD, _DELETE, False)
@example(LINK_OUT_THEN_FILE, _DELETE, False)
@example(HARDLINK_THROUGH_PLANTED_LINK, _DELETE, False)
@example(CLIMB_OUT, _OVERLAY, True)
@example(WHITEOUTS_THROUGH_LINKS, _DELETE, True)
@example(WHITEOUTS_THROUGH_LINKS, _OVERLAY, True)
def test_any_archive_unpacks_inside_the_target_or_fails_cleanly(
    sandboxes: Path, archive: Archive, style: WhiteoutStyle, with_lower: bool
) -> None:
    unpack_in_sandbox(sandboxes, archive, style, with_lower)


@given(
    st.lists(st.sampled_from([b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\0", b"ustar"]), max_size=3),
    st.binary(max_size=3000),
    st.sampled_from([*_MEDIA_TYPES.values(), "application/octet-stream"]),
    _styles,
)
def test_garbage_fails_cleanly_whatever_its_media_type(
    sandboxes: Path, magic: list[bytes], junk: bytes, media_type: str, style: WhiteoutStyle
) -> None:
    raw = Archive((), b"".join(magic) + junk, (), None, "none", media_type, None)
    unpack_in_sandbox(sandboxes, raw, style, with_lower=False)


def _tree(top: Path) -> dict[str, tuple[object, ...]]:
    """What an unpack made: the listing with the times of directories and whiteouts left
    out (they get the time they were made), and every entry's xattrs."""
    tree: dict[str, tuple[object, ...]] = {}
    for name, (mode, uid, size, links, mtime, data) in _listing(top, skip=top / "-").items():
        path = top / name
        st_ = os.lstat(path)
        xattrs = {}
        if not stat.S_ISLNK(mode):
            for attr in os.listxattr(path, follow_symlinks=False):
                xattrs[attr] = os.getxattr(path, attr, follow_symlinks=False)
        made_here = stat.S_ISDIR(mode) or (stat.S_ISCHR(mode) and st_.st_rdev == 0)
        when = 0 if made_here else mtime
        tree[name] = (mode, uid, st_.st_gid, size, links, when, data, xattrs)
    return tree


@given(archives())
@example(_one(_file(b"a/new/f"), _file(b"f/x")))
@example(_one(_file(b"l/x")))
@example(_one(_file(b"a/dir/x"), Member(b"5", b"a", mode=0o700)))
def test_a_layer_unpacked_ahead_and_settled_equals_one_unpacked_on_its_lowers(
    sandboxes: Path, archive: Archive
) -> None:
    """Unpacked before the layers below are there, a layer either ends as it would on
    them, or is refused or found to differ (then the pull unpacks it again on them)."""
    box = _make_sandbox(sandboxes)
    try:
        box.blob.write_bytes(archive.blob(str(box.out).encode()))
        on_lowers = outcome(
            lambda: apply_layer(
                box.blob, archive.media_type, box.target, lowers=[box.lower], whiteouts=_OVERLAY
            ),
            UnpackError,
            SECONDS,
        )
        ahead_target = box.out / "ahead"
        _plant_target(box.out, ahead_target)
        ahead = outcome(
            lambda: apply_layer_ahead(box.blob, archive.media_type, ahead_target),
            UnpackError,
            SECONDS,
        )
        if isinstance(ahead, UnpackError):
            event("ahead: refused")
            return
        result, guesses = ahead
        if not settle_parents(ahead_target, guesses, [box.lower]):
            event("ahead: the lowers differ")
            return
        event(f"ahead: settled {min(len(guesses.made), 3)}+ guesses")
        assert result == on_lowers
        assert _tree(ahead_target) == _tree(box.target)
    finally:
        shutil.rmtree(box.out)


_MIB = 1 << 20


@functools.cache
def _compressed(data: bytes, compression: str) -> bytes:
    """One gzip member or zstd frame; a layer may be several of them back to back."""
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    return zstandard.ZstdCompressor().compress(data)


def _bomb(flag: bytes, mebibytes: int, compression: str) -> bytes:
    """An extended header of ``mebibytes`` MiB of "a" and a file after it, compressed as
    concatenated members (or frames) so a big one is built from one compressed MiB."""
    size = mebibytes * _MIB
    if flag in (b"x", b"g"):  # a single record: "<size> path=aaa...\n"
        head, tail = f"{size} path=".encode(), b"\n"
    else:  # a long name or link, NUL-terminated
        head, tail = b"", b"\0"
    body = size - len(head) - len(tail)
    pieces = [Member(flag, b"././@LongLink", size=size).encode() + head]
    pieces += [b"a" * _MIB] * (body // _MIB)
    pieces.append(b"a" * (body % _MIB) + tail + b"\0" * (-size % 512))
    pieces.append(tar([Member(b"0", b"f", b"data")]))
    return b"".join(_compressed(piece, compression) for piece in pieces)


@given(
    st.sampled_from([b"L", b"K", b"x", b"g"]),
    st.sampled_from([2, 64]),
    st.sampled_from(["gzip", "zstd"]),
)
def test_huge_extended_headers_are_refused_without_buffering_them(
    sandboxes: Path, flag: bytes, mebibytes: int, compression: str
) -> None:
    box = _make_sandbox(sandboxes)
    try:
        box.blob.write_bytes(_bomb(flag, mebibytes, compression))
        with allocation_peak() as peak:
            result = outcome(
                lambda: apply_layer(
                    box.blob, _MEDIA_TYPES[compression], box.target, whiteouts=WhiteoutStyle.DELETE
                ),
                UnpackError,
                SECONDS,
            )
    finally:
        shutil.rmtree(box.out)
    assert isinstance(result, UnpackError), result
    assert "extended header" in str(result), str(result)
    # The zstd reader may hold ~32 MiB decoded from 1 KiB of RLE blocks (its documented
    # bound); the header itself, up to 64 MiB, must never be buffered.
    assert peak.bytes < 48 * _MIB, peak.bytes
