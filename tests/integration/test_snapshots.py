"""Both snapshotters on a real file system, with real mounts (root).

A three-layer image (layer 3 deletes a file of layer 1 and makes a directory opaque) is
unpacked, a container snapshot is prepared and mounted with the options the snapshotter
returns, and the merged view is checked and written to. The same behaviour is asked of the
overlay and the copying snapshotter.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from crishim.errors import AlreadyExists, FailedPrecondition, NotFound
from crishim.images.snapshots.base import Mount, Snapshotter
from crishim.images.snapshots.copy import CopySnapshotter
from crishim.images.snapshots.overlay import OverlaySnapshotter, overlay_supported
from crishim.images.unpack import LayerResult, UnpackError
from tests.rig.oci_image import OCI_LAYER_GZIP, Layer, LayerBuilder

pytestmark = pytest.mark.root

LAYERS = [
    LayerBuilder()
    .dir("etc")
    .file("etc/keep", "keep\n")
    .file("etc/gone", "gone\n")
    .dir("opq")
    .file("opq/old", "old\n")
    .dir("bin")
    .file("bin/tool", "#!/bin/sh\n", mode=0o755)
    .build("gzip"),
    LayerBuilder()
    .file("etc/extra", "extra\n")
    .file("opq/mid", "mid\n")
    .symlink("bin/link", "tool")
    .build("zstd"),
    LayerBuilder().whiteout("etc/gone").opaque("opq").file("opq/new", "new\n").build("none"),
]


def chain_ids(layers: list[Layer]) -> list[str]:
    """OCI chain IDs: the first diff ID, then sha256 of "<parent chain ID> <diff ID>"."""
    ids = [layers[0].diff_id]
    for layer in layers[1:]:
        ids.append("sha256:" + hashlib.sha256(f"{ids[-1]} {layer.diff_id}".encode()).hexdigest())
    return ids


CHAIN = chain_ids(LAYERS)


@pytest.fixture(params=["overlayfs", "native"])
def snapshotter(request: pytest.FixtureRequest, tmp_path: Path) -> Snapshotter:
    if os.geteuid() != 0:
        pytest.skip("snapshot tests mount file systems: run as root")
    if request.param == "overlayfs":
        if not overlay_supported():
            pytest.skip("the kernel does not list overlay in /proc/filesystems")
        return OverlaySnapshotter(tmp_path / "snapshots")
    return CopySnapshotter(tmp_path / "snapshots")


@pytest.fixture
def blobs(tmp_path: Path) -> list[Path]:
    paths = []
    for index, layer in enumerate(LAYERS):
        path = tmp_path / f"layer{index}"
        path.write_bytes(layer.blob)
        paths.append(path)
    return paths


def unpack_all(snapshotter: Snapshotter, blobs: list[Path]) -> list[LayerResult]:
    results = []
    for index, layer in enumerate(LAYERS):
        parent = CHAIN[index - 1] if index else None
        results.append(
            snapshotter.unpack_layer(
                CHAIN[index], parent, blobs[index], layer.media_type_for("oci"), layer.diff_id
            )
        )
    return results


@contextmanager
def mounted(mounts: list[Mount], where: Path) -> Iterator[Path]:
    (mount,) = mounts
    where.mkdir(exist_ok=True)
    argv = ["mount", "-t", mount.type, "-o", ",".join(mount.options), mount.source, str(where)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def listing(snapshotter: Snapshotter, part: str) -> list[str]:
    return sorted(os.listdir(snapshotter.root / part))


def test_prepared_snapshot_mounts_the_merged_layers(
    snapshotter: Snapshotter, blobs: list[Path], tmp_path: Path
) -> None:
    results = unpack_all(snapshotter, blobs)
    assert [r.diff_id for r in results] == [layer.diff_id for layer in LAYERS]
    assert snapshotter.layers() == set(CHAIN)
    assert snapshotter.has_layer(CHAIN[2])

    mounts = snapshotter.prepare("container-1", CHAIN[2])
    assert snapshotter.mounts("container-1") == mounts
    assert snapshotter.active() == {"container-1": CHAIN[2]}
    with mounted(mounts, tmp_path / "rootfs") as rootfs:
        assert sorted(os.listdir(rootfs / "etc")) == ["extra", "keep"]
        assert os.listdir(rootfs / "opq") == ["new"]
        assert (rootfs / "bin" / "link").read_text() == "#!/bin/sh\n"
        assert os.access(rootfs / "bin" / "tool", os.X_OK)
        (rootfs / "etc" / "written").write_text("by the container\n")
        (rootfs / "etc" / "keep").unlink()
        assert sorted(os.listdir(rootfs / "etc")) == ["extra", "written"]

    # The layers did not change: a second container sees the image as it was.
    with mounted(snapshotter.prepare("container-2", CHAIN[2]), tmp_path / "rootfs2") as rootfs:
        assert sorted(os.listdir(rootfs / "etc")) == ["extra", "keep"]

    snapshotter.remove("container-1")
    snapshotter.remove("container-1")  # idempotent
    assert snapshotter.active() == {"container-2": CHAIN[2]}
    with pytest.raises(NotFound, match="container-1"):
        snapshotter.mounts("container-1")


def test_views_are_read_only(snapshotter: Snapshotter, blobs: list[Path], tmp_path: Path) -> None:
    unpack_all(snapshotter, blobs)
    for key, parent in (("view-chain", CHAIN[2]), ("view-bottom", CHAIN[0])):
        with mounted(snapshotter.view(key, parent), tmp_path / key) as rootfs:
            assert (rootfs / "etc" / "keep").read_text() == "keep\n"
            with pytest.raises(OSError, match="Read-only file system") as info:
                (rootfs / "etc" / "new").write_text("x")
            assert info.value.errno == errno.EROFS
    assert snapshotter.active() == {"view-chain": CHAIN[2], "view-bottom": CHAIN[0]}


def test_snapshot_from_scratch_is_an_empty_writable_root(
    snapshotter: Snapshotter, tmp_path: Path
) -> None:
    with mounted(snapshotter.prepare("scratch", None), tmp_path / "rootfs") as rootfs:
        assert os.listdir(rootfs) == []
        (rootfs / "f").write_text("x")


def test_layers_in_use_cannot_be_removed(snapshotter: Snapshotter, blobs: list[Path]) -> None:
    unpack_all(snapshotter, blobs)
    snapshotter.prepare("container", CHAIN[2])
    with pytest.raises(FailedPrecondition, match=f"layer {CHAIN[0]} is in use: parent of layer"):
        snapshotter.remove_layer(CHAIN[0])
    with pytest.raises(FailedPrecondition, match="in use: parent of snapshot container"):
        snapshotter.remove_layer(CHAIN[2])
    assert snapshotter.layers() == set(CHAIN)

    snapshotter.remove("container")
    for chain_id in reversed(CHAIN):
        snapshotter.remove_layer(chain_id)
    snapshotter.remove_layer(CHAIN[0])  # idempotent
    assert snapshotter.layers() == set()
    assert listing(snapshotter, "snapshots") == []
    assert listing(snapshotter, "tmp") == []


def test_diff_id_mismatch_leaves_nothing(snapshotter: Snapshotter, blobs: list[Path]) -> None:
    wrong = "sha256:" + "0" * 64
    with pytest.raises(UnpackError, match=f"diff_id mismatch: layer {CHAIN[0]} .* gives "):
        snapshotter.unpack_layer(CHAIN[0], None, blobs[0], OCI_LAYER_GZIP, wrong)
    assert not snapshotter.has_layer(CHAIN[0])
    assert listing(snapshotter, "snapshots") == []
    assert listing(snapshotter, "tmp") == []


def test_hostile_layer_leaves_nothing(snapshotter: Snapshotter, tmp_path: Path) -> None:
    layer = LayerBuilder(sort=False).raw("ok", data="x").raw("../escape", data="x").build()
    blob = tmp_path / "hostile"
    blob.write_bytes(layer.blob)
    with pytest.raises(UnpackError, match=re.escape('"../escape": path escapes the root')):
        snapshotter.unpack_layer(layer.diff_id, None, blob, OCI_LAYER_GZIP, layer.diff_id)
    assert not (tmp_path / "escape").exists()
    assert listing(snapshotter, "snapshots") == []
    assert listing(snapshotter, "tmp") == []


def test_unknown_parent_and_taken_keys(snapshotter: Snapshotter, blobs: list[Path]) -> None:
    with pytest.raises(NotFound, match=f"parent layer {CHAIN[0]} is not unpacked"):
        snapshotter.unpack_layer(CHAIN[1], CHAIN[0], blobs[1], OCI_LAYER_GZIP, LAYERS[1].diff_id)
    with pytest.raises(NotFound, match="is not unpacked"):
        snapshotter.prepare("c", CHAIN[0])
    snapshotter.prepare("c", None)
    with pytest.raises(AlreadyExists, match="snapshot c already exists"):
        snapshotter.view("c", None)


def test_concurrent_unpacks_of_one_layer_commit_once(
    snapshotter: Snapshotter, blobs: list[Path]
) -> None:
    start = threading.Barrier(2)
    results: list[LayerResult] = []
    errors: list[BaseException] = []

    def unpack() -> None:
        start.wait()
        try:
            results.append(
                snapshotter.unpack_layer(
                    CHAIN[0], None, blobs[0], OCI_LAYER_GZIP, LAYERS[0].diff_id
                )
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=unpack) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [r.diff_id for r in results] == [LAYERS[0].diff_id] * 2
    assert snapshotter.layers() == {CHAIN[0]}
    assert len(listing(snapshotter, "snapshots")) == 1
    assert listing(snapshotter, "tmp") == []


def test_reopening_recovers_metadata_and_drops_leftovers(
    snapshotter: Snapshotter, blobs: list[Path], tmp_path: Path
) -> None:
    unpack_all(snapshotter, blobs)
    mounts = snapshotter.prepare("container", CHAIN[2])
    # What a crash mid-unpack leaves behind.
    leftover = snapshotter.root / "tmp" / f"layer-{uuid.uuid4().hex}"
    (leftover / "fs").mkdir(parents=True)
    (leftover / "fs" / "half").write_text("x")

    reopened = type(snapshotter)(snapshotter.root)
    assert reopened.layers() == set(CHAIN)
    assert reopened.active() == {"container": CHAIN[2]}
    assert reopened.mounts("container") == mounts
    assert listing(reopened, "tmp") == []
    # Committed before the restart: not unpacked again, the recorded result comes back.
    again = reopened.unpack_layer(CHAIN[0], None, blobs[0], OCI_LAYER_GZIP, LAYERS[0].diff_id)
    assert again == LayerResult(LAYERS[0].diff_id, len(LAYERS[0].tar), len(LAYERS[0].members()))
    with mounted(reopened.prepare("after", CHAIN[2]), tmp_path / "rootfs") as rootfs:
        assert os.listdir(rootfs / "opq") == ["new"]


def test_usage_counts_hardlinked_inodes_once(snapshotter: Snapshotter, tmp_path: Path) -> None:
    bytes_before, inodes_before = snapshotter.usage()
    payload = os.urandom(1 << 20)
    layer = (
        LayerBuilder().file("big", payload).hardlink("big2", "big").hardlink("big3", "big").build()
    )
    blob = tmp_path / "big-layer"
    blob.write_bytes(layer.blob)
    snapshotter.unpack_layer(layer.diff_id, None, blob, OCI_LAYER_GZIP, layer.diff_id)
    used, inodes = snapshotter.usage()
    # One file of 1 MiB plus the snapshot's dirs and metadata: not three copies.
    assert (1 << 20) <= used - bytes_before < (1 << 20) + (256 << 10)
    assert inodes - inodes_before == 4  # <id>/, <id>/fs/, meta.json, the file
    assert snapshotter.mountpoint() == str(snapshotter.root)


def test_overlay_mounts_name_short_snapshot_dirs(blobs: list[Path], tmp_path: Path) -> None:
    if os.geteuid() != 0 or not overlay_supported():
        pytest.skip("needs root and overlayfs")
    snapshotter = OverlaySnapshotter(tmp_path / "o")
    unpack_all(snapshotter, blobs)
    (mount,) = snapshotter.prepare("c", CHAIN[2])
    root = tmp_path / "o" / "snapshots"
    assert mount == Mount(
        "overlay",
        "overlay",
        (
            f"lowerdir={root}/3/fs:{root}/2/fs:{root}/1/fs",
            f"upperdir={root}/4/fs",
            f"workdir={root}/4/work",
        ),
    )
    assert snapshotter.view("v", CHAIN[0]) == [Mount("bind", f"{root}/1/fs", ("rbind", "ro"))]
    assert snapshotter.view("v2", CHAIN[1]) == [
        Mount("overlay", "overlay", (f"lowerdir={root}/2/fs:{root}/1/fs",))
    ]


def overlay(tmp_path: Path) -> OverlaySnapshotter:
    if os.geteuid() != 0:
        pytest.skip("snapshot tests mount file systems: run as root")
    if not overlay_supported():
        pytest.skip("the kernel does not list overlay in /proc/filesystems")
    return OverlaySnapshotter(tmp_path / "snapshots")


def test_layers_staged_ahead_commit_parent_first(blobs: list[Path], tmp_path: Path) -> None:
    snapshotter = overlay(tmp_path)
    assert snapshotter.unpacks_ahead
    # Top layer first: none of the layers below it is there yet.
    staged = [
        snapshotter.stage_layer(
            CHAIN[i], blobs[i], LAYERS[i].media_type_for("oci"), LAYERS[i].diff_id
        )
        for i in reversed(range(len(LAYERS)))
    ][::-1]
    assert snapshotter.layers() == set()
    assert len(listing(snapshotter, "tmp")) == len(LAYERS)
    with pytest.raises(NotFound, match="parent layer"):
        snapshotter.commit_staged(staged[1], CHAIN[1], CHAIN[0])
    assert listing(snapshotter, "tmp") == sorted(s.work.name for s in (staged[0], staged[2]))
    assert snapshotter.commit_staged(staged[0], CHAIN[0], None)
    assert snapshotter.commit_staged(
        snapshotter.stage_layer(
            CHAIN[1], blobs[1], LAYERS[1].media_type_for("oci"), LAYERS[1].diff_id
        ),
        CHAIN[1],
        CHAIN[0],
    )
    assert snapshotter.commit_staged(staged[2], CHAIN[2], CHAIN[1])
    assert snapshotter.layers() == set(CHAIN)
    assert listing(snapshotter, "tmp") == []
    with mounted(snapshotter.prepare("c", CHAIN[2]), tmp_path / "rootfs") as rootfs:
        assert sorted(os.listdir(rootfs / "etc")) == ["extra", "keep"]
        assert os.listdir(rootfs / "opq") == ["new"]
        assert (rootfs / "bin" / "link").read_text() == "#!/bin/sh\n"


def test_a_staged_layer_takes_parents_from_the_layers_below(tmp_path: Path) -> None:
    snapshotter = overlay(tmp_path)
    base = (
        LayerBuilder().dir("srv", mode=0o750, uid=7, gid=8).dir("usr/lib").symlink("lib", "usr/lib")
    )
    top = LayerBuilder(sort=False).raw("srv/app/conf", data="c").build("none")
    via_link = LayerBuilder(sort=False).raw("lib/mod", data="m").build("none")
    base_blob, top_blob, link_blob = tmp_path / "base", tmp_path / "top", tmp_path / "link"
    built = base.build("none")
    base_blob.write_bytes(built.blob)
    top_blob.write_bytes(top.blob)
    link_blob.write_bytes(via_link.blob)
    kind = built.media_type_for("oci")
    top_staged = snapshotter.stage_layer("top", top_blob, kind, top.diff_id)
    link_staged = snapshotter.stage_layer("link", link_blob, kind, via_link.diff_id)
    snapshotter.unpack_layer("base", None, base_blob, kind, built.diff_id)
    assert snapshotter.commit_staged(top_staged, "top", "base")
    # "lib" is a symlink below: the layer unpacked ahead made a directory there instead.
    assert not snapshotter.commit_staged(link_staged, "link", "base")
    assert listing(snapshotter, "tmp") == []
    assert not snapshotter.has_layer("link")
    snapshotter.unpack_layer("link", "base", link_blob, kind, via_link.diff_id)
    with mounted(snapshotter.view("v", "top"), tmp_path / "top-view") as rootfs:
        srv = os.lstat(rootfs / "srv")
        assert (stat.S_IMODE(srv.st_mode), srv.st_uid, srv.st_gid) == (0o750, 7, 8)
    with mounted(snapshotter.prepare("c", "link"), tmp_path / "link-view") as rootfs:
        assert (rootfs / "usr" / "lib" / "mod").read_text() == "m"
        assert os.path.islink(rootfs / "lib")
