"""Unit tests for the pure parts of tests.rig.oci_image: no root, no registry."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Literal

import pytest

from tests.rig.oci_image import (
    DEFAULT_MTIME,
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
    DOCKER_LAYER_ZSTD,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Compression,
    Flavor,
    Image,
    Index,
    Layer,
    LayerBuilder,
    busybox_image,
    decompress,
    opaque_name,
    sha256_digest,
    whiteout_name,
    write_oci_layout,
)

ROOT = Path(__file__).resolve().parents[2]


def _sample_layer(compression: Compression = "gzip") -> Layer:
    return (
        LayerBuilder()
        .dir("etc")
        .file("etc/hello", b"hello\n", mode=0o640, uid=7, gid=8, mtime=1234)
        .symlink("etc/link", "hello")
        .build(compression)
    )


def _members(layer: Layer) -> dict[str, tarfile.TarInfo]:
    return {m.name: m for m in layer.members()}


# --- digests and compression ------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_diff_id_is_sha256_of_uncompressed_tar(compression: Compression) -> None:
    layer = _sample_layer(compression)
    assert layer.diff_id == "sha256:" + hashlib.sha256(layer.tar).hexdigest()
    assert layer.digest == "sha256:" + hashlib.sha256(layer.blob).hexdigest()
    assert layer.size == len(layer.blob)
    assert decompress(layer.blob, compression) == layer.tar
    assert decompress(layer.blob, layer.media_type_for("oci")) == layer.tar
    if compression == "none":
        assert layer.digest == layer.diff_id
    else:
        assert layer.digest != layer.diff_id


@pytest.mark.parametrize(
    ("flavor", "compression", "media_type"),
    [
        ("oci", "gzip", OCI_LAYER_GZIP),
        ("oci", "zstd", OCI_LAYER_ZSTD),
        ("oci", "none", OCI_LAYER_TAR),
        ("docker", "gzip", DOCKER_LAYER_GZIP),
        ("docker", "zstd", DOCKER_LAYER_ZSTD),
        ("docker", "none", DOCKER_LAYER_TAR),
    ],
)
def test_layer_media_types(flavor: Flavor, compression: Compression, media_type: str) -> None:
    layer = _sample_layer(compression)
    assert layer.descriptor(flavor) == {
        "mediaType": media_type,
        "digest": layer.digest,
        "size": layer.size,
    }


def test_media_type_override() -> None:
    layer = LayerBuilder().file("a").build("gzip", media_type="application/x-weird")
    assert layer.descriptor("oci")["mediaType"] == "application/x-weird"


def test_gzip_header_has_no_timestamp() -> None:
    blob = _sample_layer("gzip").blob
    assert blob[:2] == b"\x1f\x8b"
    assert blob[4:8] == b"\0\0\0\0"


def test_zstd_magic() -> None:
    assert _sample_layer("zstd").blob[:4] == b"\x28\xb5\x2f\xfd"


# --- determinism -------------------------------------------------------------


def test_layer_output_is_deterministic() -> None:
    a, b = _sample_layer("gzip"), _sample_layer("gzip")
    assert a.blob == b.blob
    assert a.digest == b.digest


def test_sort_makes_insertion_order_irrelevant() -> None:
    one = LayerBuilder().file("b").dir("a").file("a/x").build("none")
    two = LayerBuilder().file("a/x").file("b").dir("a").build("none")
    assert one.digest == two.digest
    assert [m.name for m in one.members()] == ["a", "a/x", "b"]


def test_hardlink_is_written_after_its_target_when_sorted() -> None:
    layer = LayerBuilder().file("z/target", b"x").hardlink("a/link", "z/target").build("none")
    assert [m.name for m in layer.members()] == ["z/target", "a/link"]


def test_unsorted_builder_keeps_insertion_order() -> None:
    layer = LayerBuilder(sort=False).file("b").file("a").build("none")
    assert [m.name for m in layer.members()] == ["b", "a"]


def test_digests_stable_across_processes() -> None:
    # A fresh interpreter (new hash seed, new clock) must produce the same digests.
    code = (
        "from tests.rig.oci_image import LayerBuilder, Image\n"
        "l = LayerBuilder().dir('etc').file('etc/x', b'1').build('gzip')\n"
        "z = LayerBuilder().file('y', b'2').build('zstd')\n"
        "print(Image(layers=[l, z], cmd=['sh']).digest)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "random"}
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        ).stdout.strip()
        for _ in range(2)
    }
    layer = LayerBuilder().dir("etc").file("etc/x", b"1").build("gzip")
    z = LayerBuilder().file("y", b"2").build("zstd")
    assert runs == {Image(layers=[layer, z], cmd=["sh"]).digest}


# --- entry kinds ---------------------------------------------------------------


def test_entry_kinds_round_trip_through_tarfile() -> None:
    layer = (
        LayerBuilder()
        .dir("d", mode=0o750, uid=1, gid=2)
        .file("d/f", b"data", mode=0o4755, uid=3, gid=4, mtime=42)
        .symlink("d/s", "/absolute/target")
        .hardlink("d/h", "d/f")
        .char_device("dev/null", 1, 3)
        .block_device("dev/loop0", 7, 0)
        .fifo("d/p", mode=0o600)
        .build("none")
    )
    m = _members(layer)
    assert m["d"].isdir()
    assert m["d"].mode == 0o750
    assert (m["d"].uid, m["d"].gid) == (1, 2)
    f = m["d/f"]
    assert f.isreg()
    assert f.mode == 0o4755
    assert (f.uid, f.gid, f.mtime, f.size) == (3, 4, 42, 4)
    assert m["d"].mtime == DEFAULT_MTIME
    assert m["d/s"].issym()
    assert m["d/s"].linkname == "/absolute/target"
    assert m["d/h"].islnk()
    assert m["d/h"].linkname == "d/f"
    assert m["dev/null"].ischr()
    assert (m["dev/null"].devmajor, m["dev/null"].devminor) == (1, 3)
    assert m["dev/loop0"].isblk()
    assert m["dev/loop0"].devmajor == 7
    assert m["d/p"].isfifo()
    assert m["d/p"].mode == 0o600
    assert all(x.uname == "" and x.gname == "" for x in m.values())
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tf:
        fobj = tf.extractfile("d/f")
        assert fobj is not None
        assert fobj.read() == b"data"


def test_xattrs_are_pax_schily_records() -> None:
    cap = b"\x01\x00\x00\x02\xff\xfe\x00\x00"  # not valid UTF-8, like real capabilities
    layer = (
        LayerBuilder()
        .file("bin/x", b"", xattrs={"user.comment": "hi", "security.capability": cap})
        .build("none")
    )
    # Read the PAX records back as raw bytes, as a Go/C extractor would.
    with tarfile.open(
        fileobj=io.BytesIO(layer.tar), encoding="utf-8", errors="surrogateescape"
    ) as tf:
        (ti,) = tf.getmembers()
    assert ti.pax_headers["SCHILY.xattr.user.comment"] == "hi"
    raw = ti.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape")
    assert raw == cap


def test_path_normalisation_and_refusal_of_dotdot() -> None:
    layer = LayerBuilder().file("/etc/./x").file("./y").build("none")
    assert sorted(m.name for m in layer.members()) == ["etc/x", "y"]
    with pytest.raises(ValueError, match="raw"):
        LayerBuilder().file("../escape")
    with pytest.raises(ValueError, match="raw"):
        LayerBuilder().hardlink("x", "../../etc/passwd")


def test_raw_entries_are_written_verbatim() -> None:
    layer = (
        LayerBuilder(sort=False)
        .raw("../escape", data="out")
        .raw("/abs", data="abs")
        .raw("evil", "symlink", linkname="/")
        .raw("evil/etc/owned", data="through the link")
        .raw("pw", "hardlink", linkname="../../etc/passwd")
        .build("gzip")
    )
    names = [m.name for m in layer.members()]
    assert names == ["../escape", "/abs", "evil", "evil/etc/owned", "pw"]
    m = _members(layer)
    assert m["evil"].issym()
    assert m["evil"].linkname == "/"
    assert m["pw"].islnk()
    assert m["pw"].linkname == "../../etc/passwd"


# --- whiteouts ---------------------------------------------------------------------


def test_whiteout_names() -> None:
    assert whiteout_name("etc/foo") == "etc/.wh.foo"
    assert whiteout_name("/top") == ".wh.top"
    assert whiteout_name("a/b/c/") == "a/b/.wh.c"
    assert opaque_name("var/lib") == "var/lib/.wh..wh..opq"
    assert opaque_name("/opt/") == "opt/.wh..wh..opq"
    layer = LayerBuilder().whiteout("etc/passwd").opaque("var").build("none")
    m = _members(layer)
    assert set(m) == {"etc/.wh.passwd", "var/.wh..wh..opq"}
    assert all(x.isreg() and x.size == 0 for x in m.values())


# --- config, manifest, index ---------------------------------------------------------


def test_image_config_fields() -> None:
    l1, l2 = _sample_layer("gzip"), _sample_layer("zstd")
    img = Image(
        layers=[l1, l2],
        architecture="arm64",
        variant="v8",
        user="33:33",
        env=["A=1"],
        entrypoint=["/bin/sh", "-c"],
        cmd=["echo hi"],
        working_dir="/work",
        labels={"k": "v"},
        stop_signal="SIGQUIT",
        exposed_ports=["80/tcp", "53/udp"],
        volumes=["/data"],
    )
    cfg = json.loads(img.config_bytes)
    assert cfg["architecture"] == "arm64"
    assert cfg["os"] == "linux"
    assert cfg["variant"] == "v8"
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [l1.diff_id, l2.diff_id]}
    assert cfg["config"] == {
        "User": "33:33",
        "Env": ["A=1"],
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo hi"],
        "WorkingDir": "/work",
        "Labels": {"k": "v"},
        "StopSignal": "SIGQUIT",
        "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
        "Volumes": {"/data": {}},
    }
    assert len(cfg["history"]) == 2
    assert img.config_digest == sha256_digest(img.config_bytes)


def test_unset_config_fields_are_omitted() -> None:
    cfg = json.loads(Image(layers=[]).config_bytes)
    assert cfg["config"] == {}
    assert "variant" not in cfg


@pytest.mark.parametrize(
    ("flavor", "manifest_type", "config_type", "layer_type"),
    [
        ("oci", OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
        ("docker", DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP),
    ],
)
def test_manifest(flavor: Flavor, manifest_type: str, config_type: str, layer_type: str) -> None:
    layer = _sample_layer("gzip")
    img = Image(layers=[layer], flavor=flavor)
    doc = json.loads(img.manifest_bytes)
    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == manifest_type == img.media_type
    assert doc["config"] == {
        "mediaType": config_type,
        "digest": sha256_digest(img.config_bytes),
        "size": len(img.config_bytes),
    }
    assert doc["layers"] == [{"mediaType": layer_type, "digest": layer.digest, "size": layer.size}]
    assert img.digest == sha256_digest(img.manifest_bytes)
    assert list(img.blobs()) == [img.config_digest, layer.digest]


@pytest.mark.parametrize(
    ("flavor", "media_type"), [("oci", OCI_INDEX), ("docker", DOCKER_MANIFEST_LIST)]
)
def test_index(flavor: Flavor, media_type: str) -> None:
    layer = _sample_layer()
    amd = Image(layers=[layer], architecture="amd64", flavor=flavor)
    arm = Image(layers=[layer], architecture="arm64", variant="v8", flavor=flavor)
    idx = Index(manifests=[amd, arm], flavor=flavor)
    doc = json.loads(idx.manifest_bytes)
    assert doc["mediaType"] == media_type
    assert [m["platform"] for m in doc["manifests"]] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    assert [m["digest"] for m in doc["manifests"]] == [amd.digest, arm.digest]
    assert [m["size"] for m in doc["manifests"]] == [
        len(amd.manifest_bytes),
        len(arm.manifest_bytes),
    ]
    assert idx.digest == sha256_digest(idx.manifest_bytes)
    # The shared layer is listed once.
    assert set(idx.blobs()) == {amd.config_digest, arm.config_digest, layer.digest}


# --- busybox and layout ---------------------------------------------------------------


@pytest.mark.skipif(
    not os.path.exists("/bin/busybox"), reason="install busybox-static for /bin/busybox"
)
@pytest.mark.parametrize("links", ["symlink", "hardlink"])
def test_busybox_image_contents(links: Literal["symlink", "hardlink"]) -> None:
    img = busybox_image(links=links)
    (layer,) = img.layers
    m = _members(layer)
    bb = m["bin/busybox"]
    assert bb.isreg()
    assert bb.mode == 0o755
    assert bb.size == os.path.getsize("/bin/busybox")
    for applet in ("sh", "ls", "cat", "echo", "sleep", "id", "env", "top"):
        entry = m[f"bin/{applet}"]
        if links == "symlink":
            assert entry.issym()
            assert entry.linkname == "busybox"
        else:
            assert entry.islnk()
            assert entry.linkname == "bin/busybox"
    assert m["tmp"].isdir()
    assert m["tmp"].mode == 0o1777
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tf:
        passwd_f = tf.extractfile("etc/passwd")
        group_f = tf.extractfile("etc/group")
        assert passwd_f is not None
        assert group_f is not None
        passwd = passwd_f.read().decode()
        group = group_f.read().decode()
    assert "root:x:0:0:" in passwd
    assert "nobody:x:65534:65534:" in passwd
    assert "www-data:x:33:33:" in passwd
    assert "root:x:0:" in group
    assert "www-data:x:33:" in group
    assert "nobody:x:65534:" in group
    cfg = json.loads(img.config_bytes)
    assert cfg["config"]["Cmd"] == ["sh"]
    assert busybox_image(links=links).digest == img.digest


def test_write_oci_layout(tmp_path: Path) -> None:
    img = Image(layers=[_sample_layer("gzip")])
    idx = Index(manifests=[img])
    root = write_oci_layout(tmp_path / "layout", idx, tag="v1")
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    top = json.loads((root / "index.json").read_text())
    (desc,) = top["manifests"]
    assert desc["digest"] == idx.digest
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    for blob in (root / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    stored = {p.name for p in (root / "blobs" / "sha256").iterdir()}
    wanted = {d.split(":")[1] for d in [idx.digest, img.digest, *img.blobs()]}
    assert stored == wanted


def test_gzip_blob_decompresses_with_stdlib() -> None:
    layer = _sample_layer("gzip")
    assert gzip.decompress(layer.blob) == layer.tar
