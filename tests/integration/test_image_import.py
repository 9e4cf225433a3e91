"""Importing archives into the image service: the same store and snapshots as pulls.

Archives come from the test rig (written in memory) and from skopeo (``docker-archive:``
and ``oci-archive:`` made from an OCI layout), and reach the service as a stream of chunks,
as they do over the admin RPC.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from crishim.errors import DataLoss, InvalidArgument, NotFound
from crishim.images.auth import Credentials
from crishim.images.content import ContentStore
from crishim.images.manifest import host_platform
from tests.rig.archives import (
    IMAGE_NAME,
    REF_NAME,
    ArchiveMember,
    docker_archive,
    oci_archive,
    tar_bytes,
)
from tests.rig.containerd import containerd, require_containerd
from tests.rig.fixtures import require_busybox
from tests.rig.image_env import ImageEnv, image_env, mounted, snapshotter_kinds
from tests.rig.oci_image import Image, LayerBuilder, busybox_image, push, write_oci_layout
from tests.rig.registry import Registry

CHUNK = 64 * 1024


async def chunks_of(data: bytes, size: int = CHUNK) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)


async def chunks_from(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk


def layered_image(label: str = "x") -> Image:
    base = LayerBuilder().dir("etc").file("etc/keep", b"keep\n").file("etc/gone", b"gone\n")
    top = LayerBuilder().whiteout("etc/gone").file("etc/label", label.encode())
    return Image([base.build("gzip"), top.build("zstd")], user="1000")


def ingest(content: ContentStore) -> list[Path]:
    return list((content.root / "ingest").iterdir())


def blob_files(env: ImageEnv) -> set[str]:
    return {p.name for p in (env.content.root / "blobs" / "sha256").iterdir()}


@pytest.mark.parametrize("kind", snapshotter_kinds())
@pytest.mark.parametrize("layout", ["docker", "oci"])
async def test_imported_image_is_stored_like_a_pulled_one(
    tmp_path: Path, kind: str, layout: str
) -> None:
    image = layered_image()
    members = (
        docker_archive([(image, ["app:v1"])])
        if layout == "docker"
        else oci_archive([(image, {REF_NAME: "app:v1"})])
    )
    async with image_env(tmp_path, kind) as env:
        result = await env.service.import_archive(chunks_of(tar_bytes(members)))
        (stored,) = result.images
        assert stored.id == image.config_digest
        assert stored.repo_tags == ["docker.io/library/app:v1"]
        assert stored.repo_digests == [f"docker.io/library/app@{stored.manifest_digest}"]
        assert stored.uid_and_username() == (1000, "")
        assert env.service.status("app:v1") == stored
        assert env.service.status(image.config_digest) == stored
        assert stored.blobs() <= env.content.digests()
        assert env.service.config(stored)["rootfs"] == {
            "type": "layers",
            "diff_ids": [layer.diff_id for layer in image.layers],
        }
        with mounted(env.snapshotter.view("check", stored.top_chain_id)) as rootfs:
            assert (rootfs / "etc/keep").read_text() == "keep\n"
            assert (rootfs / "etc/label").read_text() == "x"
            assert not (rootfs / "etc/gone").exists()
        env.snapshotter.remove("check")
        assert ingest(env.content) == []


async def test_reimport_is_idempotent(tmp_path: Path) -> None:
    data = tar_bytes(oci_archive([(layered_image(), {IMAGE_NAME: "registry.test/app:1"})]))
    async with image_env(tmp_path) as env:
        first = (await env.service.import_archive(chunks_of(data))).images[0]
        blobs, layers = blob_files(env), env.snapshotter.layers()
        second = (await env.service.import_archive(chunks_of(data))).images[0]
        same = {"pulled_at": 0, "revision": 0}
        assert second.model_copy(update=same) == first.model_copy(update=same)
        assert [i.id for i in env.store.list()] == [first.id]
        assert blob_files(env) == blobs
        assert env.snapshotter.layers() == layers
        assert ingest(env.content) == []


async def test_tags_move_to_the_imported_image_and_tag_adds_one(tmp_path: Path) -> None:
    old, new = layered_image("old"), layered_image("new")
    async with image_env(tmp_path) as env:
        await env.service.import_archive(chunks_of(tar_bytes(docker_archive([(old, ["app:1"])]))))
        await env.service.import_archive(chunks_of(tar_bytes(docker_archive([(new, ["app:1"])]))))
        assert env.service.status("app:1").id == new.config_digest  # type: ignore[union-attr]
        assert env.service.status(old.config_digest).repo_tags == []  # type: ignore[union-attr]
        tagged = await env.service.tag(old.config_digest, "example.com/kept:old")
        assert tagged.repo_tags == ["example.com/kept:old"]
        tagged = await env.service.tag("app:1", "example.com/kept:old")
        assert tagged.id == new.config_digest
        assert sorted(tagged.repo_tags) == ["docker.io/library/app:1", "example.com/kept:old"]
        assert env.service.status(old.config_digest).repo_tags == []  # type: ignore[union-attr]
        with pytest.raises(NotFound, match="'absent:1' not found"):
            await env.service.tag("absent:1", "x:1")
        with pytest.raises(InvalidArgument, match="not a tag"):
            await env.service.tag("app:1", f"x@{new.config_digest}")


async def test_garbage_collection_keeps_imported_content_until_removed(tmp_path: Path) -> None:
    image = layered_image()
    async with image_env(tmp_path) as env:
        await env.service.import_archive(chunks_of(tar_bytes(docker_archive([(image, ["a:1"])]))))
        stored = env.service.status("a:1")
        assert stored is not None
        await env.service.collect_garbage()
        assert stored.blobs() <= env.content.digests()
        await env.service.remove("a:1")
        assert env.content.digests() == set()
        assert env.snapshotter.layers() == set()


async def test_corrupt_blob_leaves_no_record_and_nothing_staged(tmp_path: Path) -> None:
    image = layered_image()
    target = f"blobs/sha256/{image.layers[1].digest.removeprefix('sha256:')}"
    members = [
        ArchiveMember(m.name, m.data[:-1] + bytes([m.data[-1] ^ 1])) if m.name == target else m
        for m in oci_archive([(image, {REF_NAME: "a:1"})])
    ]
    async with image_env(tmp_path / "base") as env:
        outside = env.files_outside_store()
        with pytest.raises(DataLoss, match=f'archive member "{target}"'):
            await env.service.import_archive(chunks_of(tar_bytes(members)))
        assert env.store.list() == []
        assert env.content.digests() == set()
        assert ingest(env.content) == []
        assert env.files_outside_store() == outside


async def test_hostile_layer_in_an_archive_is_refused_like_a_pulled_one(tmp_path: Path) -> None:
    hostile = LayerBuilder().raw("../../escape", "file", data=b"x").build("gzip")
    image = Image([hostile])
    async with image_env(tmp_path / "base") as env:
        outside = env.files_outside_store()
        with pytest.raises(
            InvalidArgument,
            match=r'manifest\.json entry 0 .*, layer 0 .*: layer entry "\.\./\.\./escape"',
        ):
            await env.service.import_archive(
                chunks_of(tar_bytes(docker_archive([(image, ["h:1"])], compressed_layers=True)))
            )
        assert env.store.list() == []
        assert env.snapshotter.layers() == set()
        assert ingest(env.content) == []
        assert env.files_outside_store() == outside
    assert not (tmp_path / "escape").exists()


async def test_client_going_away_mid_archive_leaves_nothing_staged(tmp_path: Path) -> None:
    data = tar_bytes(docker_archive([(layered_image(), ["a:1"])]))

    async def broken() -> AsyncIterator[bytes]:
        yield data[: len(data) // 2]
        raise ConnectionResetError("client went away")

    async with image_env(tmp_path) as env:
        with pytest.raises(ConnectionResetError):
            await env.service.import_archive(broken())
        assert env.store.list() == []
        assert ingest(env.content) == []


async def test_import_and_pull_share_blobs_and_layers(registry: Registry, tmp_path: Path) -> None:
    image = layered_image("shared")
    push(registry.url, "test/shared", "v1", image)
    async with image_env(tmp_path) as env:
        pulled = await env.service.pull(f"{registry.host}/test/shared:v1", Credentials())
        layers = env.snapshotter.layers()
        data = tar_bytes(oci_archive([(image, {REF_NAME: "local/shared:v1"})]))
        imported = (await env.service.import_archive(chunks_of(data))).images[0]
        assert imported.id == pulled.id
        assert env.snapshotter.layers() == layers
        assert imported.repo_tags == [
            f"{registry.host}/test/shared:v1",
            "docker.io/local/shared:v1",
        ]


def skopeo_archive(tmp_path: Path, image: Image, transport: str, name: str) -> Path:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo missing: install the Debian package 'skopeo'")
    layout = write_oci_layout(tmp_path / "layout", image, tag="src")
    target = tmp_path / f"{transport}.tar"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{layout}:src", f"{transport}:{target}:{name}"],
        check=True,
        capture_output=True,
    )
    return target


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive"])
async def test_skopeo_archives(tmp_path: Path, transport: str) -> None:
    require_busybox()
    image = busybox_image(labels={"made-by": transport})
    archive = skopeo_archive(tmp_path, image, transport, "example.com/tools/busybox:1.0")
    async with image_env(tmp_path / "env") as env:
        result = await env.service.import_archive(chunks_from(archive))
        (stored,) = result.images
        assert stored.id == image.config_digest
        assert stored.repo_tags == ["example.com/tools/busybox:1.0"]
        with mounted(env.snapshotter.view("check", stored.top_chain_id)) as rootfs:
            assert (rootfs / "bin/busybox").stat().st_size > 0
        env.snapshotter.remove("check")


async def test_archives_exported_by_containerd(tmp_path: Path) -> None:
    """``ctr images export`` (how a kind node's preloaded images leave containerd): an OCI
    layout with containerd's name annotations, a manifest.json, and the docker manifests
    with uncompressed layers containerd makes of imported docker archives."""
    require_containerd()
    require_busybox()
    docker = busybox_image(labels={"from": "docker-archive"})
    oci = busybox_image(labels={"from": "oci-archive"})
    docker_tar = tar_bytes(docker_archive([(docker, ["kind/a:1"])]))
    oci_tar = tar_bytes(oci_archive([(oci, {REF_NAME: "registry.test/b:2"})]))
    with containerd(tmp_path / "containerd") as ctrd:
        # as kind's node image build imports its images
        load = ("images", "import", "--all-platforms", "--no-unpack", "--digests", "-")
        for data in (docker_tar, oci_tar):
            ctrd.ctr(*load, stdin=data)
        names = ["docker.io/kind/a:1", "registry.test/b:2"]
        platform = str(host_platform())
        exported = ctrd.ctr("images", "export", "--platform", platform, "-", *names)
    async with image_env(tmp_path / "env") as env:
        result = await env.service.import_archive(chunks_of(exported))
        assert [(i.id, i.repo_tags) for i in result.images] == [
            (docker.config_digest, ["docker.io/kind/a:1"]),
            (oci.config_digest, ["registry.test/b:2"]),
        ]
        uncompressed = "application/vnd.docker.image.rootfs.diff.tar"
        assert result.images[0].layers[0].media_type == uncompressed


async def test_one_image_under_two_entries_is_reported_once(tmp_path: Path) -> None:
    image = layered_image()
    members = oci_archive([(image, {REF_NAME: "a:1"}), (image, {REF_NAME: "a:2"})])
    async with image_env(tmp_path) as env:
        result = await env.service.import_archive(chunks_of(tar_bytes(members)))
        (stored,) = result.images
        assert stored.repo_tags == ["docker.io/library/a:1", "docker.io/library/a:2"]
