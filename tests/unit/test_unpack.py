"""apply_layer on real directories: entry kinds and metadata, compression, whiteouts in both
styles, replacement rules, and hostile layers that must change nothing outside the target.

Hostile layers run in a "host" directory that holds the target next to sentinel files;
every hostile test checks the tree around the target is exactly as it was before.
"""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from crishim.images.unpack import LayerResult, UnpackError, WhiteoutStyle, apply_layer
from tests.rig.bounds import time_limit
from tests.rig.oci_image import (
    DEFAULT_MTIME,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
    DOCKER_LAYER_ZSTD,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    Compression,
    Layer,
    LayerBuilder,
)
from tests.rig.tar_bytes import Member, pax_record, sparse_tail, tar

DELETE = WhiteoutStyle.DELETE
OVERLAY = WhiteoutStyle.OVERLAY
NS = 1_000_000_000

Listing = dict[str, tuple[int, int, int, int, int, bytes]]


@dataclass
class Box:
    """A target directory inside a "host" directory full of sentinels."""

    outside: Path  # the test's tmp dir: everything here but blobs/ and the target is watched
    host: Path  # holds the target and the sentinels
    target: Path
    blobs: Path
    before: Listing

    def apply(
        self,
        layer: LayerBuilder | Layer,
        *,
        style: WhiteoutStyle = DELETE,
        compression: Compression = "gzip",
        media_type: str | None = None,
        target: Path | None = None,
        lowers: Sequence[Path] = (),
    ) -> LayerResult:
        built = layer.build(compression) if isinstance(layer, LayerBuilder) else layer
        blob = self.blobs / uuid.uuid4().hex
        blob.write_bytes(built.blob)
        return apply_layer(
            blob,
            media_type or built.media_type_for("oci"),
            target or self.target,
            lowers=lowers,
            whiteouts=style,
        )

    def listing(self) -> Listing:
        return _listing(self.outside, skip={self.blobs, self.target})

    def assert_outside_untouched(self) -> None:
        assert self.listing() == self.before


def _listing(top: Path, skip: set[Path]) -> Listing:
    """Every path below ``top`` with its type, mode, owner, size, link count and content."""
    out: Listing = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            path = here / name
            st = os.lstat(path)
            data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(path.relative_to(top))] = (
                st.st_mode,
                st.st_uid,
                st.st_size,
                st.st_nlink,
                st.st_mtime_ns,
                data,
            )
    return out


@pytest.fixture
def box(tmp_path: Path) -> Box:
    host = tmp_path / "host"
    target = host / "rootfs"
    blobs = tmp_path / "blobs"
    for directory in (host / "etc", target, blobs):
        directory.mkdir(parents=True)
    (host / "sentinel.txt").write_text("host data\n")
    (host / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    result = Box(tmp_path, host, target, blobs, {})
    result.before = result.listing()
    return result


# --- entry kinds and metadata -------------------------------------------------------------


def test_entry_kinds_and_metadata_are_preserved(box: Box) -> None:
    layer = (
        LayerBuilder()
        .dir("srv", mode=0o1777, uid=7, gid=8, mtime=1_000_000)
        .file("srv/tool", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=2000, mtime=2_000_000)
        .file("srv/sgid", b"x", mode=0o2750, uid=5, gid=6)
        .symlink("srv/link", "/does/not/exist", uid=11, gid=12, mtime=3_000_000)
        .hardlink("srv/hard", "srv/tool", mode=0o4755, uid=1000, gid=2000)
        .char_device("dev/null", 1, 3, mode=0o666)
        .block_device("dev/loop0", 7, 0, mode=0o660, gid=6)
        .fifo("run/pipe", mode=0o620, uid=3)
    )
    result = box.apply(layer)
    assert result.entries == len(layer.entries)

    srv = os.lstat(box.target / "srv")
    assert (stat.S_IMODE(srv.st_mode), srv.st_uid, srv.st_gid) == (0o1777, 7, 8)
    # The directory's contents were written after it: its mtime is restored at the end.
    assert srv.st_mtime_ns == 1_000_000 * NS

    tool = os.lstat(box.target / "srv" / "tool")
    assert stat.S_ISREG(tool.st_mode)
    assert (stat.S_IMODE(tool.st_mode), tool.st_uid, tool.st_gid) == (0o4755, 1000, 2000)
    assert (tool.st_mtime_ns, tool.st_atime_ns) == (2_000_000 * NS, 2_000_000 * NS)
    assert (box.target / "srv" / "tool").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(os.lstat(box.target / "srv" / "sgid").st_mode) == 0o2750

    link = os.lstat(box.target / "srv" / "link")
    assert stat.S_ISLNK(link.st_mode)
    assert os.readlink(box.target / "srv" / "link") == "/does/not/exist"
    assert (link.st_uid, link.st_gid, link.st_mtime_ns) == (11, 12, 3_000_000 * NS)

    hard = os.lstat(box.target / "srv" / "hard")
    assert (hard.st_ino, hard.st_nlink) == (tool.st_ino, 2)

    null = os.lstat(box.target / "dev" / "null")
    assert stat.S_ISCHR(null.st_mode)
    assert os.major(null.st_rdev) == 1
    assert (os.minor(null.st_rdev), stat.S_IMODE(null.st_mode)) == (3, 0o666)
    loop = os.lstat(box.target / "dev" / "loop0")
    assert stat.S_ISBLK(loop.st_mode)
    assert loop.st_rdev == os.makedev(7, 0)
    assert (stat.S_IMODE(loop.st_mode), loop.st_gid) == (0o660, 6)
    pipe = os.lstat(box.target / "run" / "pipe")
    assert stat.S_ISFIFO(pipe.st_mode)
    assert (stat.S_IMODE(pipe.st_mode), pipe.st_uid, pipe.st_mtime_ns) == (
        0o620,
        3,
        DEFAULT_MTIME * NS,
    )
    # Parents the layer did not list are made like mkdir -p: 0755 root.
    dev = os.lstat(box.target / "dev")
    assert (stat.S_IMODE(dev.st_mode), dev.st_uid, dev.st_gid) == (0o755, 0, 0)


def test_xattrs_are_set_and_overlay_ones_from_the_image_dropped(box: Box) -> None:
    layer = (
        LayerBuilder()
        .dir("d", xattrs={"trusted.note": b"dir", "trusted.overlay.opaque": b"y"})
        .file("d/f", b"data", xattrs={"user.mime": "text/plain", "trusted.bin": b"\x00\xff"})
    )
    box.apply(layer)
    assert os.getxattr(box.target / "d", "trusted.note") == b"dir"
    assert "trusted.overlay.opaque" not in os.listxattr(box.target / "d")
    assert os.getxattr(box.target / "d" / "f", "user.mime") == b"text/plain"
    assert os.getxattr(box.target / "d" / "f", "trusted.bin") == b"\x00\xff"


def test_pax_times_keep_nanoseconds_and_atime(box: Box) -> None:
    layer = LayerBuilder().raw(
        "f", data="x", pax={"mtime": "1234567890.123456789", "atime": "1300000000.5"}
    )
    box.apply(layer)
    st = os.lstat(box.target / "f")
    assert st.st_mtime_ns == 1_234_567_890_123_456_789
    assert st.st_atime_ns == 1_300_000_000_500_000_000


@pytest.mark.parametrize("mtime", ["1e999999", "1e999990", "-1e999990"])
def test_pax_times_out_of_range_are_refused_at_once(box: Box, mtime: str) -> None:
    with time_limit(5):
        refused(box, LayerBuilder().raw("f", data="x", pax={"mtime": mtime}), '"f": ')


def test_pax_atime_out_of_range_falls_back_to_mtime(box: Box) -> None:
    with time_limit(5):
        box.apply(LayerBuilder().raw("f", data="x", pax={"mtime": "5", "atime": "1e999990"}))
    st = os.lstat(box.target / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (5 * NS, 5 * NS)


def test_setuid_survives_ownership_change(box: Box) -> None:
    # chown clears setuid: the mode must be set after the owner.
    box.apply(LayerBuilder().file("su", b"x", mode=0o6755, uid=1, gid=1))
    assert stat.S_IMODE(os.lstat(box.target / "su").st_mode) == 0o6755


# --- compression and digest ---------------------------------------------------------------


SAMPLE = LayerBuilder().dir("etc").file("etc/hostname", "box\n").symlink("etc/mtab", "/proc/mounts")


@pytest.mark.parametrize(
    ("compression", "media_type"),
    [
        ("gzip", OCI_LAYER_GZIP),
        ("zstd", OCI_LAYER_ZSTD),
        ("none", OCI_LAYER_TAR),
        ("gzip", DOCKER_LAYER_GZIP),
        ("zstd", DOCKER_LAYER_ZSTD),
        ("none", DOCKER_LAYER_TAR),
        ("gzip", "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
        ("gzip", "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"),
        # Unknown media types: the magic bytes decide.
        ("gzip", "application/octet-stream"),
        ("zstd", "application/octet-stream"),
        ("none", "application/octet-stream"),
    ],
)
def test_every_compression_gives_the_same_diff_id(
    box: Box, compression: Compression, media_type: str
) -> None:
    layer = SAMPLE.build(compression)
    result = box.apply(layer, media_type=media_type)
    assert result.diff_id == SAMPLE.build("none").diff_id == layer.diff_id
    assert result.size == len(layer.tar)
    assert result.entries == 3
    assert (box.target / "etc" / "hostname").read_text() == "box\n"


def test_digest_covers_padding_after_the_end_of_archive(box: Box) -> None:
    tar = SAMPLE.tar_bytes() + bytes(64 * 1024)
    result = box.apply(Layer.from_tar(tar, "zstd"))
    assert result.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert result.size == len(tar)


def test_zstd_stream_of_several_frames(box: Box) -> None:
    tar = SAMPLE.tar_bytes()
    first = Layer.from_tar(tar[:3000], "zstd").blob
    rest = Layer.from_tar(tar[3000:], "zstd").blob
    blob = Layer(tar=tar, blob=first + rest, compression="zstd")
    assert box.apply(blob).diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_gzip_stream_of_several_members_with_zero_padding(box: Box) -> None:
    tar = SAMPLE.tar_bytes()
    first = Layer.from_tar(tar[:3000], "gzip").blob
    rest = Layer.from_tar(tar[3000:], "gzip").blob
    blob = Layer(tar=tar, blob=first + rest + b"\0" * 1024, compression="gzip")
    assert box.apply(blob).diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_garbage_after_the_last_gzip_member_is_refused(box: Box) -> None:
    blob = SAMPLE.build("gzip").blob
    refused(box, Layer(b"", blob + b"garbage", "gzip"), "not a valid tar/gzip/zstd stream")


# --- whiteouts ----------------------------------------------------------------------------


BASE = (
    LayerBuilder()
    .dir("etc")
    .file("etc/keep", "keep")
    .file("etc/gone", "gone")
    .dir("var/cache", mode=0o750, uid=4, gid=5)
    .file("var/cache/old", "old")
    .dir("var/cache/sub")
    .file("var/cache/sub/older", "older")
    .dir("home")
    .dir("home/user")
    .file("home/user/file", "x")
)

WHITEOUTS = (
    LayerBuilder()
    .whiteout("etc/gone")
    .whiteout("home")
    .opaque("var/cache")
    .file("var/cache/-early", "sorts before the opaque marker")
    .dir("var/cache/sub")
    .file("var/cache/sub/new", "new")
    .raw("etc/.wh..wh.plnk", data="aufs bookkeeping")
)


def test_delete_style_whiteouts_remove_lower_content(box: Box) -> None:
    box.apply(BASE)
    box.apply(WHITEOUTS, style=DELETE)
    assert sorted(os.listdir(box.target / "etc")) == ["keep"]
    assert not (box.target / "home").exists()
    # The opaque dir keeps only what this layer put there, whatever the tar order.
    assert sorted(os.listdir(box.target / "var" / "cache")) == ["-early", "sub"]
    assert os.listdir(box.target / "var" / "cache" / "sub") == ["new"]
    assert not list(box.target.rglob(".wh.*"))


def test_overlay_style_whiteouts_become_devices_and_xattrs(box: Box) -> None:
    lower = box.outside / "lower"
    lower.mkdir()
    box.apply(BASE, target=lower)
    result = box.apply(WHITEOUTS, style=OVERLAY, lowers=[lower])
    assert result.entries == len(WHITEOUTS.entries)
    for hidden in ("etc/gone", "home"):
        st = os.lstat(box.target / hidden)
        assert stat.S_ISCHR(st.st_mode)
        assert st.st_rdev == 0
    assert os.getxattr(box.target / "var" / "cache", "trusted.overlay.opaque") == b"y"
    # Parents that exist only below are made with the lower's mode and owner.
    cache = os.lstat(box.target / "var" / "cache")
    assert (stat.S_IMODE(cache.st_mode), cache.st_uid, cache.st_gid) == (0o750, 4, 5)
    assert sorted(os.listdir(box.target / "var" / "cache")) == ["-early", "sub"]
    assert not list(box.target.rglob(".wh.*"))


def test_overlay_parents_follow_the_merged_lowers(box: Box) -> None:
    bottom, top = box.outside / "bottom", box.outside / "top"
    bottom.mkdir()
    top.mkdir()
    box.apply(
        LayerBuilder()
        .dir("data", mode=0o700, uid=9, gid=9)
        .dir("old", mode=0o711)
        .dir("opq", mode=0o700)
        .dir("opq/inner", mode=0o701),
        target=bottom,
    )
    # The top lower links "lnk" to /data, deletes "old", and makes "opq" opaque.
    box.apply(
        LayerBuilder().symlink("lnk", "/data").whiteout("old").dir("opq").opaque("opq"),
        target=top,
        style=OVERLAY,
        lowers=[bottom],
    )
    layer = LayerBuilder(sort=False).raw("lnk/f", data="via link").raw("old/f").raw("opq/inner/f")
    box.apply(layer, style=OVERLAY, lowers=[top, bottom])
    assert (box.target / "data" / "f").read_text() == "via link"
    data = os.lstat(box.target / "data")
    assert (stat.S_IMODE(data.st_mode), data.st_uid) == (0o700, 9)
    # Hidden by the whiteout and by the opaque dir above: made fresh, 0755 root.
    assert stat.S_IMODE(os.lstat(box.target / "old").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(box.target / "opq" / "inner").st_mode) == 0o755


# --- replacing entries --------------------------------------------------------------------


def test_later_entries_replace_earlier_ones(box: Box) -> None:
    box.apply(
        LayerBuilder()
        .dir("a")
        .file("a/child", "c")
        .file("b", "file")
        .dir("c", mode=0o755)
        .file("c/kept", "kept")
        .file("d", "file")
        .symlink("e", "d")
    )
    box.apply(
        LayerBuilder()
        .file("a", "file over dir")
        .dir("b", mode=0o700)
        .dir("c", mode=0o700, uid=3)
        .symlink("d", "a")
        .file("e", "file over symlink")
    )
    assert (box.target / "a").read_text() == "file over dir"
    assert stat.S_ISDIR(os.lstat(box.target / "b").st_mode)
    c = os.lstat(box.target / "c")
    assert (stat.S_IMODE(c.st_mode), c.st_uid) == (0o700, 3)
    assert (box.target / "c" / "kept").read_text() == "kept"
    assert os.readlink(box.target / "d") == "a"
    assert not stat.S_ISLNK(os.lstat(box.target / "e").st_mode)
    assert (box.target / "d").read_text() == "file over dir"


def test_names_are_normalised_inside_the_root(box: Box) -> None:
    box.apply(LayerBuilder(sort=False).raw("/abs/path", data="a").raw("./x/../y", data="y"))
    assert (box.target / "abs" / "path").read_text() == "a"
    assert (box.target / "y").read_text() == "y"
    box.assert_outside_untouched()


# --- hostile layers -----------------------------------------------------------------------


def refused(box: Box, layer: LayerBuilder | Layer, match: str) -> None:
    with pytest.raises(UnpackError, match=match):
        box.apply(layer)
    box.assert_outside_untouched()


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "../../../../../../etc/x"])
def test_names_that_climb_out_are_refused(box: Box, name: str) -> None:
    refused(box, LayerBuilder(sort=False).raw(name, data="x"), f'"{name}": path escapes')


def test_absolute_symlink_in_a_parent_is_confined(box: Box) -> None:
    pwned = f"pwned-{uuid.uuid4().hex}"
    layer = (
        LayerBuilder(sort=False)
        .raw("evil", "symlink", linkname="/")
        .raw(f"evil/tmp/{pwned}", data="owned")
        .raw("host", "symlink", linkname=str(box.host))
        .raw("host/sentinel.txt", data="overwritten")
        .raw("host/dev0", "char", devmajor=1, devminor=3)
    )
    box.apply(layer)
    assert not Path("/tmp", pwned).exists()
    assert (box.target / "tmp" / pwned).read_text() == "owned"
    inside = box.target / str(box.host).lstrip("/")
    assert (inside / "sentinel.txt").read_text() == "overwritten"
    assert stat.S_ISCHR(os.lstat(inside / "dev0").st_mode)
    box.assert_outside_untouched()


def test_relative_symlink_climbing_out_is_clamped_at_the_root(box: Box) -> None:
    x, y = (f"{name}-{uuid.uuid4().hex}" for name in "xy")
    layer = (
        LayerBuilder(sort=False)
        .raw("up", "symlink", linkname="../../..")
        .raw(f"up/{x}", data="x")
        .raw("deep", "dir")
        .raw("deep/up", "symlink", linkname="../" * 40)
        .raw(f"deep/up/{y}", data="y")
    )
    box.apply(layer)
    assert (box.target / x).read_text() == "x"
    assert (box.target / y).read_text() == "y"
    # Where the links would have led on the host.
    assert not (box.target.parent.parent.parent / x).exists()
    assert not (Path("/") / y).exists()
    box.assert_outside_untouched()


def test_existing_symlinks_in_the_target_are_not_written_through(box: Box) -> None:
    (box.target / "f").symlink_to(box.host / "sentinel.txt")
    (box.target / "d").symlink_to(box.host)
    box.apply(
        LayerBuilder(sort=False)
        .raw("f", data="replaces the link")
        .raw("d/sentinel.txt", data="confined")
        .raw("d/.wh.passwd")
        .raw("d/etc/.wh..wh..opq")
    )
    assert (box.target / "f").read_text() == "replaces the link"
    assert not (box.target / "f").is_symlink()
    box.assert_outside_untouched()


def test_whiteouts_through_symlinks_stay_inside(box: Box) -> None:
    layer = (
        LayerBuilder(sort=False)
        .raw("evil", "symlink", linkname=str(box.host))
        .raw("evil/.wh.sentinel.txt")
        .raw("evil/etc/.wh..wh..opq")
    )
    box.apply(layer, style=DELETE)
    box.assert_outside_untouched()
    box.apply(layer, style=OVERLAY)
    inside = box.target / str(box.host).lstrip("/")
    assert stat.S_ISCHR(os.lstat(inside / "sentinel.txt").st_mode)
    box.assert_outside_untouched()


def test_hardlink_out_of_the_root_is_refused(box: Box) -> None:
    passwd_links = os.lstat("/etc/passwd").st_nlink
    layer = LayerBuilder(sort=False).raw("pw", "hardlink", linkname="../../etc/passwd")
    refused(box, layer, '"pw": hardlink target escapes the root')
    assert os.lstat("/etc/passwd").st_nlink == passwd_links


def test_hardlink_through_a_symlink_is_refused(box: Box) -> None:
    layer = (
        LayerBuilder(sort=False)
        .raw("out", "symlink", linkname=str(box.host))
        .raw("h", "hardlink", linkname="out/sentinel.txt")
    )
    refused(box, layer, '"h": path passes through symlink "out"')
    inner = (
        LayerBuilder(sort=False)
        .raw("real", "dir")
        .raw("real/f", data="f")
        .raw("alias", "symlink", linkname="real")
        .raw("h", "hardlink", linkname="alias/f")
    )
    refused(box, inner, "passes through symlink")


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (LayerBuilder().dir("d").hardlink("h", "d"), "hardlink target is a directory"),
        (LayerBuilder(sort=False).raw("h", "hardlink", linkname="/"), "is a directory"),
        (LayerBuilder(sort=False).raw("h", "hardlink", linkname="nope"), "not found"),
    ],
)
def test_bad_hardlinks_are_refused(box: Box, layer: LayerBuilder, match: str) -> None:
    refused(box, layer, match)


def test_hardlink_to_a_symlink_links_the_symlink_itself(box: Box) -> None:
    layer = (
        LayerBuilder(sort=False)
        .raw("s", "symlink", linkname=str(box.host / "sentinel.txt"))
        .raw("h", "hardlink", linkname="s")
    )
    box.apply(layer)
    assert os.lstat(box.target / "h").st_ino == os.lstat(box.target / "s").st_ino
    assert stat.S_ISLNK(os.lstat(box.target / "h").st_mode)
    box.assert_outside_untouched()


def test_symlink_loop_is_refused(box: Box) -> None:
    layer = (
        LayerBuilder(sort=False)
        .raw("a", "symlink", linkname="b")
        .raw("b", "symlink", linkname="/a")
        .raw("a/x", data="x")
    )
    refused(box, layer, '"a/x": too many levels of symbolic links')


@pytest.mark.parametrize(
    "layer",
    [
        LayerBuilder(sort=False).raw("a/" * 300 + "f", data="x"),
        LayerBuilder(sort=False).raw("s", "symlink", linkname="d/" * 200).raw("s/" + "e/" * 100),
    ],
    ids=["deep-name", "deep-through-a-symlink"],
)
def test_paths_nested_too_deep_are_refused(box: Box, layer: LayerBuilder) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    refused(box, layer, "path is nested deeper than 256 directories")
    assert len(os.listdir("/proc/self/fd")) == fds


def test_file_as_a_parent_is_refused(box: Box) -> None:
    refused(box, LayerBuilder(sort=False).raw("f").raw("f/g"), '"f" is not a directory')


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (LayerBuilder(sort=False).raw("x/.wh."), "whiteout names no file"),
        (LayerBuilder(sort=False).raw("dev", kind=b"Z"), "unsupported tar entry type"),
    ],
)
def test_odd_entries_are_refused(box: Box, layer: LayerBuilder, match: str) -> None:
    refused(box, layer, match)


def test_truncated_gzip_is_refused(box: Box) -> None:
    blob = BASE.build("gzip").blob
    refused(box, Layer(b"", blob[: len(blob) // 2], "gzip"), "not a valid tar/gzip/zstd stream")


def test_truncated_zstd_is_refused(box: Box) -> None:
    blob = BASE.build("zstd").blob
    refused(box, Layer(b"", blob[:-4], "zstd"), "zstd stream ends inside a frame")


def test_corrupt_zstd_is_refused(box: Box) -> None:
    blob = bytearray(BASE.build("zstd").blob)
    blob[4:12] = b"\xff" * 8  # the frame header
    refused(box, Layer(b"", bytes(blob), "zstd"), "not a valid tar/gzip/zstd stream")


def test_damaged_tar_header_is_refused(box: Box) -> None:
    layer = BASE.build("none")
    header = layer.members()[3].offset  # a header after the first entries
    tar = bytearray(layer.tar)
    tar[header : header + 512] = b"garbage!" * 64
    refused(box, Layer.from_tar(bytes(tar), "none"), "bad tar header")


def test_cut_short_file_data_is_refused(box: Box) -> None:
    tar = LayerBuilder().file("big", b"x" * 100_000).tar_bytes()
    refused(box, Layer.from_tar(tar[:50_000], "gzip"), "not a valid tar/gzip/zstd stream")


@pytest.mark.parametrize(
    "records",
    [
        pax_record(b"hdrcharset", b"\xff\xfe"),
        b"9" * 5000 + b" path=x\n",  # more digits than int() takes
    ],
    ids=["hdrcharset-not-utf8", "record-length-of-5000-digits"],
)
def test_damaged_pax_headers_are_refused(box: Box, records: bytes) -> None:
    layer = tar([Member(b"x", b"PaxHeader", records), Member(b"0", b"f", b"data")])
    refused(box, Layer.from_tar(layer, "none"), "bad extended tar header")


@pytest.mark.parametrize(
    "layer",
    [
        tar([Member(b"L", b"././@LongLink", b"a" * (2 << 20)), Member(b"0", b"f", b"x")]),
        tar([Member(b"K", b"././@LongLink", b"a" * 10, size=2**33), Member(b"0", b"f")]),
        tar([Member(b"x", b"PaxHeader", pax_record(b"path", b"a" * (2 << 20)))]),
        tar([Member(b"g", b"PaxHeader", b"", size=2**62)]),
    ],
    ids=["gnu-longname-2MiB", "gnu-longlink-8GiB-declared", "pax-2MiB", "pax-global-huge"],
)
def test_extended_headers_larger_than_1mib_are_refused(box: Box, layer: bytes) -> None:
    refused(box, Layer.from_tar(layer, "zstd"), "tar extended header of [0-9]+ bytes")


def test_error_messages_stay_short_for_long_names(box: Box) -> None:
    name = b"a" * 1_000_000
    layer = tar([Member(b"L", b"././@LongLink", name + b"\0"), Member(b"0", b"x", b"data")])
    with pytest.raises(UnpackError) as info:
        box.apply(Layer.from_tar(layer, "zstd"))
    message = str(info.value)
    assert len(message) < 1100
    assert message.startswith('layer entry "aaa')


def test_error_messages_spell_out_names_that_are_not_utf8(box: Box) -> None:
    layer = tar([Member(b"1", b"bad\xff", linkname=b"missing\xfe")])
    with pytest.raises(UnpackError) as info:
        box.apply(Layer.from_tar(layer, "none"))
    message = str(info.value)
    message.encode("utf-8")  # what gRPC does with it
    assert message == 'layer entry "bad\\udcff": hardlink target "missing\\udcfe" not found'


@pytest.mark.parametrize("name", [b"", b"./", b"x/.wh.gone", b"x/.wh..wh..opq"])
def test_skipped_entries_declaring_huge_data_fail_at_once(box: Box, name: bytes) -> None:
    # Not extracted, so tarfile would seek over 2**62 bytes, block by block, past the end.
    layer = tar([Member(b"0", name, size=2**62)])
    with time_limit(10):
        refused(box, Layer.from_tar(layer, "gzip"), "unexpected end of data")


def test_data_of_skipped_entries_is_read_past(box: Box) -> None:
    layer = tar(
        [
            Member(b"0", b"./", b"a" * 3000),
            Member(b"0", b".wh.x", b"b" * 700),
            Member(b"0", b"f", b"c"),
        ]
    )
    box.apply(Layer.from_tar(layer, "gzip"))
    assert (box.target / "f").read_text() == "c"


def test_a_global_pax_header_of_many_records_is_refused_at_once(box: Box) -> None:
    # Applied to every later entry, 90,000 records made each entry cost ~40 ms.
    records = b"".join(pax_record(b"k%d" % i, b"") for i in range(90_000))
    layer = tar([Member(b"g", b"G", records), *(Member(b"5", b"d%d" % i) for i in range(300))])
    with time_limit(10):
        refused(box, Layer.from_tar(layer, "zstd"), "layer holds 90000 global PAX records")


def test_a_global_pax_comment_applies(box: Box) -> None:
    layer = tar([Member(b"g", b"G", pax_record(b"comment", b"git commit")), Member(b"0", b"f")])
    assert box.apply(Layer.from_tar(layer, "none")).entries == 1


def _pax_sparse(records: bytes, data: bytes = b"") -> bytes:
    return tar([Member(b"x", b"PaxHeader", records), Member(b"0", b"GNUSparseFile.0/f", data)])


@pytest.mark.parametrize(
    "layer",
    [
        # Old GNU form: a hole of a TiB would be written out as zeros.
        tar([Member(b"S", b"f", b"x", tail=sparse_tail([(2**40, 1)], False, 2**40 + 1))]),
        # Old GNU form, an extension block announced and the stream ending there.
        Member(b"S", b"f", tail=sparse_tail([(0, 1)], True, 1)).encode(),
        # PAX forms 0.0 and 0.1: the map in the header.
        _pax_sparse(pax_record(b"GNU.sparse.size", b"1") + pax_record(b"GNU.sparse.offset", b"0")),
        _pax_sparse(pax_record(b"GNU.sparse.map", b"0,1") + pax_record(b"GNU.sparse.size", b"1")),
        # PAX form 1.0: a billion map entries announced, read from the data one by one.
        _pax_sparse(
            pax_record(b"GNU.sparse.major", b"1") + pax_record(b"GNU.sparse.minor", b"0"),
            b"1000000000\n" + b"0\n" * 100_000,
        ),
    ],
    ids=["old-huge-hole", "old-cut-extension", "pax-0.0", "pax-0.1", "pax-1.0-endless-map"],
)
def test_sparse_files_are_refused(box: Box, layer: bytes) -> None:
    with time_limit(10):
        refused(box, Layer.from_tar(layer, "zstd"), "sparse files are not supported")
