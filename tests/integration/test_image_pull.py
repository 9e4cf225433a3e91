"""Pulling images from a real registry: formats, layers, whiteouts, hostile content, faults."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from crishim.errors import DataLoss, InvalidArgument, NotFound, Unauthenticated
from crishim.images.auth import Credentials
from crishim.images.manifest import host_platform
from tests.rig.image_env import image_env, mounted, snapshotter_kinds
from tests.rig.oci_image import Image, Index, LayerBuilder, busybox_image, push
from tests.rig.registry import Registry
from tests.rig.registry_proxy import Fault, RegistryProxy

ANON = Credentials()


def three_layer_image() -> Image:
    """Layers in gzip, zstd and plain tar, with a whiteout and an opaque dir across them."""
    base = (
        LayerBuilder()
        .dir("etc")
        .file("etc/keep", b"keep\n")
        .file("etc/gone", b"gone\n")
        .dir("data")
        .file("data/old-a", b"a")
        .file("data/old-b", b"b")
        .file("bin/tool", b"#!/bin/sh\n", mode=0o4755)
        .symlink("bin/link", "tool")
        .hardlink("bin/hard", "bin/tool")
        .build("gzip")
    )
    middle = LayerBuilder().file("etc/middle", b"m\n", uid=1000, gid=1000).build("zstd")
    top = LayerBuilder().whiteout("etc/gone").opaque("data").file("data/new", b"n").build("none")
    return Image([base, middle, top], user="1000:1000")


@pytest.mark.parametrize("kind", snapshotter_kinds())
async def test_layers_whiteouts_and_opaque_dirs_across_compressions(
    registry: Registry, tmp_path: Path, kind: str
) -> None:
    digest = push(registry.url, "test/layers", "v1", three_layer_image())
    async with image_env(tmp_path, kind) as env:
        image = await env.service.pull(f"{registry.host}/test/layers:v1", ANON)
        assert image.repo_tags == [f"{registry.host}/test/layers:v1"]
        assert image.repo_digests == [f"{registry.host}/test/layers@{digest}"]
        assert image.uid_and_username() == (1000, "")
        assert len(image.layers) == 3
        with mounted(env.snapshotter.view("check", image.top_chain_id)) as rootfs:
            assert (rootfs / "etc/keep").read_text() == "keep\n"
            assert (rootfs / "etc/middle").stat().st_uid == 1000
            assert not (rootfs / "etc/gone").exists()
            assert sorted(os.listdir(rootfs / "data")) == ["new"]
            tool = (rootfs / "bin/tool").stat()
            assert tool.st_mode & 0o7777 == 0o4755
            assert os.readlink(rootfs / "bin/link") == "tool"
            assert (rootfs / "bin/hard").stat().st_ino == tool.st_ino
        env.snapshotter.remove("check")


async def test_multi_platform_index_picks_this_host(registry: Registry, tmp_path: Path) -> None:
    here = host_platform()
    other = "arm64" if here.architecture != "arm64" else "amd64"
    native = busybox_image(architecture=here.architecture, variant=here.variant or None)
    foreign = busybox_image(architecture=other, labels={"foreign": "yes"})
    push(registry.url, "test/multi", "v1", Index([foreign, native]))
    async with image_env(tmp_path) as env:
        image = await env.service.pull(f"{registry.host}/test/multi:v1", ANON)
        assert image.id == native.config_digest
        assert image.manifest_digest == native.digest


async def test_index_without_this_platform_is_refused(registry: Registry, tmp_path: Path) -> None:
    push(registry.url, "test/alien", "v1", Index([busybox_image(architecture="s390x")]))
    async with image_env(tmp_path) as env:
        with pytest.raises(InvalidArgument, match="no manifest for linux/"):
            await env.service.pull(f"{registry.host}/test/alien:v1", ANON)
        assert env.store.list() == []


async def test_missing_image_is_not_found(registry: Registry, tmp_path: Path) -> None:
    async with image_env(tmp_path) as env:
        with pytest.raises(NotFound, match="not found"):
            await env.service.pull(f"{registry.host}/test/absent:v1", ANON)


HOSTILE = {
    "dotdot": lambda: LayerBuilder().raw("../escape", "file", data=b"x"),
    "symlink-out": lambda: (
        LayerBuilder(sort=False)
        .raw("evil", "symlink", linkname="/")
        .raw("evil/tmp/crishim-pwned", "file", data=b"x")
    ),
    "symlink-up": lambda: (
        LayerBuilder(sort=False)
        .raw("up", "symlink", linkname="../../../../..")
        .raw("up/crishim-pwned", "file", data=b"x")
    ),
    "hardlink-out": lambda: LayerBuilder().raw("passwd", "hardlink", linkname="../../etc/passwd"),
}


# Hostile layers whose writes are confined to the snapshot (where they land), not refused.
CONFINED = {"symlink-out": "tmp/crishim-pwned", "symlink-up": "crishim-pwned"}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_layers_write_nothing_outside_the_store(
    registry: Registry, tmp_path: Path, name: str
) -> None:
    layer = HOSTILE[name]().build("gzip")
    push(registry.url, f"test/hostile-{name}", "v1", Image([layer]))
    async with image_env(tmp_path / "base") as env:
        outside_before = env.files_outside_store()
        ref = f"{registry.host}/test/hostile-{name}:v1"
        if name in CONFINED:
            # Symlinks in parent paths resolve inside the snapshot, as if it were "/".
            image = await env.service.pull(ref, ANON)
            with mounted(env.snapshotter.view("v", image.top_chain_id)) as rootfs:
                assert (rootfs / CONFINED[name]).read_bytes() == b"x"
            env.snapshotter.remove("v")
        else:
            with pytest.raises(InvalidArgument, match=r'layer entry ".*"'):
                await env.service.pull(ref, ANON)
            assert env.store.list() == []
            assert env.snapshotter.layers() == set()
        assert env.files_outside_store() == outside_before
    assert not Path("/tmp/crishim-pwned").exists()
    assert not (tmp_path / "escape").exists()


async def test_diff_id_mismatch_is_refused_and_nothing_kept(
    registry: Registry, tmp_path: Path
) -> None:
    good = LayerBuilder().file("a", b"a").build("gzip")
    image = Image(
        [good], top_extra={"rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}
    )
    push(registry.url, "test/baddiff", "v1", image)
    async with image_env(tmp_path) as env:
        with pytest.raises(InvalidArgument, match="diff_id"):
            await env.service.pull(f"{registry.host}/test/baddiff:v1", ANON)
        assert env.snapshotter.layers() == set()
        assert env.store.list() == []


async def test_corrupt_and_truncated_blobs_are_fetched_again(
    registry: Registry, tmp_path: Path
) -> None:
    image = busybox_image()
    push(registry.url, "test/flaky", "v1", image)
    layer = image.layers[0].digest
    with RegistryProxy(registry.url) as proxy:
        proxy.add_fault(Fault(path_regex=f"/blobs/{layer}", corrupt=True))
        proxy.add_fault(Fault(path_regex=f"/blobs/{layer}", truncate_to=1000))
        proxy.add_fault(Fault(path_regex="/manifests/v1", status=503, times=2))
        async with image_env(tmp_path) as env:
            pulled = await env.service.pull(f"{proxy.host}/test/flaky:v1", ANON)
            assert pulled.id == image.config_digest
        assert proxy.count("GET", f"/blobs/{layer}") == 3


async def test_a_blob_that_stays_corrupt_fails_with_data_loss(
    registry: Registry, tmp_path: Path
) -> None:
    image = busybox_image(labels={"v": "corrupt"})
    push(registry.url, "test/corrupt", "v1", image)
    with RegistryProxy(registry.url) as proxy:
        proxy.add_fault(
            Fault(path_regex=f"/blobs/{image.layers[0].digest}", corrupt=True, times=-1)
        )
        async with image_env(tmp_path) as env:
            with pytest.raises(DataLoss, match="content has digest"):
                await env.service.pull(f"{proxy.host}/test/corrupt:v1", ANON)
            assert env.content.digests() <= {image.digest, image.config_digest}
            assert list((env.root / "content" / "ingest").iterdir()) == []


async def test_dropped_connections_are_retried(registry: Registry, tmp_path: Path) -> None:
    image = busybox_image(labels={"v": "drop"})
    push(registry.url, "test/drop", "v1", image)
    with RegistryProxy(registry.url) as proxy:
        proxy.add_fault(Fault(path_regex=f"/blobs/{image.layers[0].digest}", drop_after=4096))
        async with image_env(tmp_path) as env:
            assert (
                await env.service.pull(f"{proxy.host}/test/drop:v1", ANON)
            ).id == image.config_digest


async def test_a_layer_is_unpacked_while_it_downloads(registry: Registry, tmp_path: Path) -> None:
    layer = (
        LayerBuilder(sort=False)
        .file("first", b"first")
        .file("big", os.urandom(1 << 20))
        .build("none")
    )
    image = Image([layer], labels={"v": "streamed"})
    push(registry.url, "test/streamed", "v1", image)
    with RegistryProxy(registry.url) as proxy:
        # About 16 chunks of 64 KiB, 0.1 s apart: the download takes over a second.
        proxy.add_fault(Fault(path_regex=f"/blobs/{layer.digest}", delay_per_chunk=0.1))
        async with image_env(tmp_path) as env:
            pull = asyncio.create_task(env.service.pull(f"{proxy.host}/test/streamed:v1", ANON))
            work = env.root / "snapshots" / "overlayfs" / "tmp"
            while not any(work.glob("layer-*/fs/first")):
                assert not pull.done(), pull
                await asyncio.sleep(0.01)
            assert not env.content.has(layer.digest)  # the first file is out already
            assert (await pull).id == image.config_digest
            assert env.content.has(layer.digest)


@pytest.mark.parametrize("kind", snapshotter_kinds())
async def test_layers_unpacked_side_by_side_end_as_on_the_layers_below(
    registry: Registry, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="crishim.services.pull_layers")
    base = (
        LayerBuilder()
        .dir("srv", mode=0o750, uid=7, gid=8)
        .dir("usr/lib")
        .symlink("lib", "usr/lib")
        .file("big", os.urandom(1 << 20))
        .build("gzip")
    )
    # No entries for the parents: they come from the layers below, and "lib" is a link.
    top = LayerBuilder(sort=False).raw("srv/app/conf", data="c").raw("lib/mod", data="m")
    image = Image([base, top.build("zstd")], labels={"v": "ahead"})
    push(registry.url, "test/ahead", "v1", image)
    async with image_env(tmp_path, kind) as env:
        pulled = await env.service.pull(f"{registry.host}/test/ahead:v1", ANON)
        with mounted(env.snapshotter.view("check", pulled.top_chain_id)) as rootfs:
            srv = os.lstat(rootfs / "srv")
            assert (srv.st_mode & 0o7777, srv.st_uid, srv.st_gid) == (0o750, 7, 8)
            assert (rootfs / "srv/app/conf").read_text() == "c"
            assert (rootfs / "usr/lib/mod").read_text() == "m"
            assert os.readlink(rootfs / "lib") == "usr/lib"
        assert os.listdir(env.root / "snapshots" / env.snapshotter.name / "tmp") == []
    if env.snapshotter.unpacks_ahead:  # the top layer was unpacked ahead, then again
        assert "unpacking it on top of the layers below" in caplog.text


async def test_concurrent_pulls_fetch_each_blob_once(registry: Registry, tmp_path: Path) -> None:
    image = busybox_image(
        labels={"v": "concurrent"},
        extra_layers=[LayerBuilder().file("x", b"x" * 100000).build("gzip")],
    )
    push(registry.url, "test/conc", "a", image)
    push(registry.url, "test/conc", "b", image)
    with RegistryProxy(registry.url) as proxy:
        proxy.add_fault(Fault(path_regex="/blobs/", delay_per_chunk=0.05, times=-1))
        async with image_env(tmp_path) as env:
            results = await asyncio.gather(
                env.service.pull(f"{proxy.host}/test/conc:a", ANON),
                env.service.pull(f"{proxy.host}/test/conc:a", ANON),
                env.service.pull(f"{proxy.host}/test/conc:b", ANON),
            )
            assert {r.id for r in results} == {image.config_digest}
            final = env.service.status(f"{proxy.host}/test/conc:b")
            assert final is not None
            assert sorted(final.repo_tags) == [
                f"{proxy.host}/test/conc:a",
                f"{proxy.host}/test/conc:b",
            ]
        for blob in [image.config_digest, *(layer.digest for layer in image.layers)]:
            assert proxy.count("GET", f"/blobs/{blob}") == 1, blob


async def test_basic_auth(registry: Registry, tmp_path: Path) -> None:
    push(registry.url, "test/basic", "v1", busybox_image(labels={"v": "basic"}))
    with RegistryProxy(registry.url, auth="basic", users={"alice": "secret"}) as proxy:
        ref = f"{proxy.host}/test/basic:v1"
        async with image_env(tmp_path) as env:
            with pytest.raises(Unauthenticated, match="requires credentials"):
                await env.service.pull(ref, ANON)
            with pytest.raises(Unauthenticated, match="refused the credentials"):
                await env.service.pull(ref, Credentials(username="alice", password="wrong"))
            await env.service.pull(ref, Credentials(username="alice", password="secret"))
            assert env.service.status(ref) is not None


async def test_bearer_tokens_are_fetched_once_and_reused(
    registry: Registry, tmp_path: Path
) -> None:
    image = busybox_image(labels={"v": "bearer"})
    push(registry.url, "test/bearer", "v1", image)
    with RegistryProxy(registry.url, auth="bearer", users={"bob": "pw"}) as proxy:
        ref = f"{proxy.host}/test/bearer:v1"
        async with image_env(tmp_path) as env:
            with pytest.raises(Unauthenticated, match="token server"):
                await env.service.pull(ref, ANON)
            await env.service.pull(ref, Credentials(username="bob", password="pw"))
        granted = [t for t in proxy.tokens_issued if t.username == "bob"]
        assert len(granted) == 1
        assert "repository:test/bearer:pull" in granted[0].scopes[0]


async def test_bearer_anonymous_identity_and_registry_tokens(
    registry: Registry, tmp_path: Path
) -> None:
    push(registry.url, "test/tokens", "v1", busybox_image(labels={"v": "tokens"}))
    with RegistryProxy(
        registry.url, auth="bearer", users={"carol": "pw"}, anonymous_pull=True
    ) as proxy:
        ref = f"{proxy.host}/test/tokens:v1"
        async with image_env(tmp_path / "anon") as env:
            await env.service.pull(ref, ANON)
        refresh = proxy.issue_refresh_token("carol")
        async with image_env(tmp_path / "identity") as env:
            await env.service.pull(ref, Credentials(identity_token=refresh))
        proxy.grant_static_token("static-token", ["repository:test/tokens:pull"], 600)
        async with image_env(tmp_path / "static") as env:
            await env.service.pull(ref, Credentials(registry_token="static-token"))
        async with image_env(tmp_path / "badstatic") as env:
            with pytest.raises(Unauthenticated, match="registry token"):
                await env.service.pull(ref, Credentials(registry_token="wrong"))


async def test_mirror_from_hosts_toml(registry: Registry, tmp_path: Path) -> None:
    image = busybox_image(labels={"v": "mirror"})
    push(registry.url, "library/mirrored", "1.0", image)
    async with image_env(tmp_path) as env:
        host_dir = env.certs_d / "docker.io"
        host_dir.mkdir()
        (host_dir / "hosts.toml").write_text(
            f'server = "https://registry-1.docker.io"\n\n[host."http://{registry.host}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        pulled = await env.service.pull("mirrored:1.0", ANON)
        assert pulled.repo_tags == ["docker.io/library/mirrored:1.0"]
        assert env.service.status("docker.io/library/mirrored:1.0") is not None
        assert env.service.status("mirrored:1.0") is not None


async def test_remove_by_tag_keeps_other_tags_then_collects_garbage(
    registry: Registry, tmp_path: Path
) -> None:
    image = busybox_image(labels={"v": "gc"})
    push(registry.url, "test/gc", "one", image)
    push(registry.url, "test/gc", "two", image)
    async with image_env(tmp_path) as env:
        await env.service.pull(f"{registry.host}/test/gc:one", ANON)
        await env.service.pull(f"{registry.host}/test/gc:two", ANON)
        assert len(env.store.list()) == 1
        await env.service.remove(f"{registry.host}/test/gc:one")
        left = env.service.status(f"{registry.host}/test/gc:two")
        assert left is not None
        assert left.repo_tags == [f"{registry.host}/test/gc:two"]
        assert env.snapshotter.layers()
        await env.service.remove(f"{registry.host}/test/gc:two")
        assert env.store.list() == []
        assert env.content.digests() == set()
        assert env.snapshotter.layers() == set()
        await env.service.remove(f"{registry.host}/test/gc:two")  # gone already: no error


async def test_invalid_reference_is_refused_with_the_problem(tmp_path: Path) -> None:
    async with image_env(tmp_path) as env:
        with pytest.raises(InvalidArgument, match="must be lowercase"):
            await env.service.pull("Busybox", ANON)


async def test_pull_metrics_and_progress_log(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image = busybox_image(labels={"v": "metrics"})
    push(registry.url, "test/metrics", "v1", image)
    caplog.set_level("INFO", logger="crishim.services")  # images and pull_progress
    async with image_env(tmp_path) as env:
        await env.service.pull(f"{registry.host}/test/metrics:v1", ANON)
        with pytest.raises(NotFound):
            await env.service.pull(f"{registry.host}/test/metrics:absent", ANON)
        metrics = env.service.metrics
        assert metrics.pulls_total == 2
        assert metrics.failures_total == 1
        assert metrics.bytes_total == sum(layer.size for layer in image.layers)
        assert metrics.duration_buckets[600] == 2
    progress = [r.getMessage() for r in caplog.records if "layers," in r.getMessage()]
    assert progress
    assert progress[-1].startswith(f"pulling {registry.host}/test/metrics:v1: 1/1 layers")
