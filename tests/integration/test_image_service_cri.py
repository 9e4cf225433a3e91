"""The ImageService over crishim's socket: pulls with CRI auth, restarts, kill -9, mirrors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import StreamTerminatedError

from crishim.api import v1
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.oci_image import LayerBuilder, busybox_image, push
from tests.rig.registry import Registry
from tests.rig.registry_proxy import Fault, RegistryProxy

CONFORMANCE_CERTS_D = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "certs.d"


def spec(ref: str) -> v1.ImageSpec:
    return v1.ImageSpec(image=ref)


async def with_client(proc: CrishimProcess) -> tuple[Channel, v1.ImageServiceStub]:
    channel = Channel(path=str(proc.socket))
    return channel, v1.ImageServiceStub(channel)


def blobs_are_intact(root: Path) -> None:
    """Every blob under its final name has exactly the content its name says."""
    for blob in (root / "images" / "content" / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


async def test_pull_status_list_fsinfo_survive_a_restart_then_remove(
    registry: Registry, tmp_path: Path
) -> None:
    image = busybox_image(labels={"v": "cri"}, user="www-data")
    push(registry.url, "test/cri", "v1", image)
    ref = f"{registry.host}/test/cri:v1"
    with RegistryProxy(registry.url, auth="basic", users={"dave": "pw"}) as proxy:
        proxied = f"{proxy.host}/test/cri:v1"
        proc = CrishimProcess(tmp_path).start()
        channel, images = await with_client(proc)
        try:
            with pytest.raises(GRPCError) as info:
                await images.pull_image(v1.PullImageRequest(image=spec(proxied)))
            assert info.value.status is Status.UNAUTHENTICATED
            auth = base64.b64encode(b"dave:pw").decode()
            pulled = await images.pull_image(
                v1.PullImageRequest(image=spec(proxied), auth=v1.AuthConfig(auth=auth))
            )
            assert pulled.image_ref == image.config_digest
            await images.pull_image(v1.PullImageRequest(image=spec(ref)))
            status = await images.image_status(v1.ImageStatusRequest(image=spec(ref), verbose=True))
            assert status.image is not None
            assert status.image.id == image.config_digest
            assert sorted(status.image.repo_tags) == sorted([ref, proxied])
            assert status.image.username == "www-data"
            assert status.image.uid is None
            assert status.image.size > 0
            info_doc = json.loads(status.info["info"])
            assert info_doc["imageSpec"]["config"]["Labels"] == {"v": "cri"}
            listed = await images.list_images(v1.ListImagesRequest())
            assert [i.id for i in listed.images] == [image.config_digest]
            filtered = await images.list_images(
                v1.ListImagesRequest(filter=v1.ImageFilter(image=spec("nothing:here")))
            )
            assert filtered.images == []
            fs = await images.image_fs_info(v1.ImageFsInfoRequest())
            (usage,) = fs.image_filesystems
            assert usage.used_bytes is not None
            assert usage.used_bytes.value > 1_000_000
            assert usage.inodes_used is not None
            assert usage.inodes_used.value > 10
            assert usage.fs_id is not None
            assert usage.fs_id.mountpoint.startswith(str(proc.root))
            missing = await images.image_status(v1.ImageStatusRequest(image=spec("no/such:img")))
            assert missing.image is None
        finally:
            channel.close()
        assert proc.terminate() == 0

    proc.start()
    channel, images = await with_client(proc)
    try:
        again = await images.image_status(v1.ImageStatusRequest(image=spec(image.config_digest)))
        assert again.image is not None
        assert sorted(again.image.repo_tags) == sorted([ref, proxied])
        await images.remove_image(v1.RemoveImageRequest(image=spec(image.config_digest)))
        assert (await images.list_images(v1.ListImagesRequest())).images == []
        await images.remove_image(v1.RemoveImageRequest(image=spec(image.config_digest)))
    finally:
        channel.close()
        proc.kill()
    assert list((proc.root / "images" / "content" / "blobs" / "sha256").iterdir()) == []
    assert "pulling " in proc.log()
    assert f"pulled {proxied} as {image.config_digest}" in proc.log()


async def test_kill_9_in_the_middle_of_a_pull_then_restart(
    registry: Registry, tmp_path: Path
) -> None:
    big = LayerBuilder().file("big", hashlib.sha256(b"seed").digest() * 200_000).build("none")
    image = busybox_image(labels={"v": "kill"}, extra_layers=[big])
    push(registry.url, "test/kill", "v1", image)
    with RegistryProxy(registry.url) as proxy:
        proxy.add_fault(Fault(path_regex=f"/blobs/{big.digest}", delay_per_chunk=0.05))
        ref = f"{proxy.host}/test/kill:v1"
        proc = CrishimProcess(tmp_path).start()
        channel, images = await with_client(proc)
        pull = asyncio.create_task(images.pull_image(v1.PullImageRequest(image=spec(ref))))
        deadline = time.monotonic() + 20
        while not any(r.bytes_sent > 256 * 1024 and big.digest in r.path for r in proxy.requests):
            assert time.monotonic() < deadline, "the slow blob never started"
            await asyncio.sleep(0.05)
        proc.kill()
        with pytest.raises((GRPCError, StreamTerminatedError, ConnectionError)):
            await pull
        channel.close()
        ingest = proc.root / "images" / "content" / "ingest"
        assert any(ingest.iterdir()), "a partial download should be in ingest/"
        blobs_are_intact(proc.root)
        assert not (proc.root / "images" / "content" / "blobs" / "sha256" / big.digest[7:]).exists()
        # The layer is unpacked while it downloads: half of it is in the snapshotter's tmp/.
        (snapshots,) = (proc.root / "images" / "snapshots").iterdir()
        assert any(p.name.startswith("layer-") for p in (snapshots / "tmp").iterdir())

        proc.start()
        assert list(ingest.iterdir()) == []
        assert list((snapshots / "tmp").iterdir()) == []
        channel, images = await with_client(proc)
        try:
            assert (await images.list_images(v1.ListImagesRequest())).images == []
            pulled = await images.pull_image(v1.PullImageRequest(image=spec(ref)))
            assert pulled.image_ref == image.config_digest
        finally:
            channel.close()
            proc.kill()
    blobs_are_intact(proc.root)


def port_5000_free() -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", 5000)) != 0


async def test_the_conformance_certs_d_works_as_is(tmp_path: Path) -> None:
    if not CONFORMANCE_CERTS_D.is_dir():
        pytest.skip(f"{CONFORMANCE_CERTS_D} not found (it ships in the shared/ folder)")
    if not port_5000_free():
        pytest.skip("127.0.0.1:5000 is taken; the conformance mirrors point there")
    certs_d = tmp_path / "certs.d"
    shutil.copytree(CONFORMANCE_CERTS_D, certs_d)
    with Registry(port=5000) as registry:
        image = busybox_image(labels={"v": "conformance"})
        push(registry.url, "e2e-test-images/busybox", "1.29-2", image)
        push(registry.url, "docker/library/busybox", "1.28", image)
        proc = CrishimProcess(tmp_path, config=f'\n[registry]\nconfig_path = "{certs_d}"\n').start()
        channel, images = await with_client(proc)
        try:
            for ref in (
                "registry.k8s.io/e2e-test-images/busybox:1.29-2",
                "public.ecr.aws/docker/library/busybox:1.28",
            ):
                pulled = await images.pull_image(v1.PullImageRequest(image=spec(ref)))
                assert pulled.image_ref == image.config_digest
            status = await images.image_status(
                v1.ImageStatusRequest(image=spec("registry.k8s.io/e2e-test-images/busybox:1.29-2"))
            )
            assert status.image is not None
            assert "public.ecr.aws/docker/library/busybox:1.28" in status.image.repo_tags
        finally:
            channel.close()
            proc.kill()
