"""``crishim images import``, the ``ctr`` stand-in and the kind node's image preload against
a running crishim (root).

One crishim (runc, no CNI network: its pods use the host's) serves the module. Archives are
made by skopeo from OCI layouts the rig writes: a ``docker-archive:`` and an
``oci-archive:``. They reach crishim through the command line, from a file and from
standard input, and through ``ctr`` as kind invokes it; the images must then be listed with
their tags and run in a host-network pod.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from crishim.api import v1
from tests.rig.archives import ArchiveMember, docker_archive, tar_bytes
from tests.rig.containerd import containerd, require_containerd
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.fixtures import require_busybox
from tests.rig.host import mounts_under, run
from tests.rig.oci_image import Image, busybox_image, write_oci_layout
from tests.rig.pods import PodRig, force_cleanup

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

RUNTIME = "runc"
DOCKER_TAG = "example.test/tools/busybox:docker"
OCI_TAG = "docker.io/library/busybox:oci"
PRELOAD = Path(__file__).resolve().parents[2] / "docker" / "kind" / "crishim-kind-preload"


@dataclass
class Node:
    """The module's crishim, a pod rig over it and the archives made for it."""

    proc: CrishimProcess
    rig: PodRig
    docker_archive: Path
    docker_image: Image
    oci_archive: Path
    oci_image: Image

    def crishim(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """``crishim images ARGS`` against this instance."""
        command, *rest = args
        config = ["--config", str(self.proc.config_file)]
        return subprocess.run(
            [sys.executable, "-m", "crishim.cli", "images", command, *config, *rest],
            input=stdin,
            capture_output=True,
            timeout=120,
            check=False,
        )

    def ctr(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """The ``ctr`` stand-in, told this instance's socket as ctr is told an address."""
        env = dict(os.environ, CONTAINERD_ADDRESS=str(self.proc.socket))
        return subprocess.run(
            [sys.executable, "-m", "crishim.ctr", *args],
            input=stdin,
            capture_output=True,
            timeout=120,
            check=False,
            env=env,
        )

    async def tags(self) -> dict[str, list[str]]:
        listed = await self.rig.images.list_images(v1.ListImagesRequest())
        return {image.id: sorted(image.repo_tags) for image in listed.images}


def skopeo(image: Image, layout: Path, destination: str) -> None:
    write_oci_layout(layout, image, tag="src")
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{layout}:src", destination], check=True, capture_output=True
    )


@pytest_asyncio.fixture(name="node", scope="module", loop_scope="module")
async def node_fixture(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("pods need root")
    for tool in ("conmon", RUNTIME, "skopeo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found on PATH")
    require_busybox()
    base = tmp_path_factory.mktemp("import-node")
    docker_image = busybox_image(labels={"archive": "docker"})
    oci_image = busybox_image(labels={"archive": "oci"})
    docker_tar, oci_tar = base / "docker.tar", base / "oci.tar"
    skopeo(docker_image, base / "layout-docker", f"docker-archive:{docker_tar}:{DOCKER_TAG}")
    skopeo(oci_image, base / "layout-oci", f"oci-archive:{oci_tar}:busybox:oci")
    proc = CrishimProcess(base / "crishim", config=f'default_runtime = "{RUNTIME}"\n')
    rig: PodRig | None = None
    try:
        await asyncio.to_thread(proc.start)
        rig = PodRig(RUNTIME, proc, base, "", "", "", "", "")
        yield Node(proc, rig, docker_tar, docker_image, oci_tar, oci_image)
    finally:
        try:
            if rig is not None and proc.proc is not None and proc.proc.poll() is None:
                await asyncio.wait_for(rig.remove_all_pods(), 60)
        finally:
            if rig is not None:
                rig.close()
            proc.kill()
            force_cleanup(proc, RUNTIME)
            for point in mounts_under(base):
                run("umount", "-R", "-l", point, check=False)


async def run_in_host_network_pod(node: Node, image: str, name: str) -> str:
    """Start a container of ``image`` in a new host-network pod; what it says, then gone."""
    rig = node.rig
    pod = await rig.run_pod(name, network=v1.NamespaceMode.NODE, hostname="")
    try:
        cid = await rig.start_container(
            pod,
            "main",
            ["sleep", "1000"],
            image=v1.ImageSpec(image=image, user_specified_image=image),
        )
        status = await rig.wait_state(cid, v1.ContainerState.CONTAINER_RUNNING)
        assert "@sha256:" in status.image_ref
        return await rig.exec_out(cid, "cat", "/etc/passwd")
    finally:
        await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))


async def test_docker_archive_from_a_file(node: Node) -> None:
    out = node.crishim("import", str(node.docker_archive))
    assert out.returncode == 0, out.stderr.decode() + node.rig.log_tail()
    image_id = node.docker_image.config_digest
    assert out.stdout.decode() == f"imported {image_id} {DOCKER_TAG}\n"
    assert (await node.tags())[image_id] == [DOCKER_TAG]
    reply = await node.rig.images.image_status(
        v1.ImageStatusRequest(image=v1.ImageSpec(image=DOCKER_TAG))
    )
    assert reply.image is not None
    assert reply.image.id == image_id
    assert reply.image.repo_digests[0].startswith("example.test/tools/busybox@sha256:")


async def test_oci_archive_from_standard_input(node: Node) -> None:
    out = node.crishim("import", "-", stdin=node.oci_archive.read_bytes())
    assert out.returncode == 0, out.stderr.decode() + node.rig.log_tail()
    assert (await node.tags())[node.oci_image.config_digest] == [OCI_TAG]


@pytest.mark.parametrize("tag", [DOCKER_TAG, OCI_TAG])
async def test_imported_images_run_in_a_host_network_pod(node: Node, tag: str) -> None:
    passwd = await run_in_host_network_pod(node, tag, f"imported-{tag.rpartition(':')[2]}")
    assert passwd.startswith("root:x:0:0:")
    await node.rig.assert_nothing_left()


async def test_reimport_is_idempotent(node: Node) -> None:
    before = await node.tags()
    for archive in (node.docker_archive, node.oci_archive):
        out = node.crishim("import", str(archive))
        assert out.returncode == 0, out.stderr.decode()
    assert await node.tags() == before
    assert list((node.proc.root / "images" / "content" / "ingest").iterdir()) == []


async def test_a_corrupt_archive_is_refused_and_changes_nothing(node: Node, tmp_path: Path) -> None:
    data = bytearray(node.oci_archive.read_bytes())
    layer = node.oci_image.layers[0].digest.removeprefix("sha256:")
    start = data.index(f"blobs/sha256/{layer}".encode()) + 512 + 1000  # inside its data
    data[start] ^= 0xFF
    before = await node.tags()
    out = node.crishim("import", "-", stdin=bytes(data))
    assert out.returncode == 2
    assert out.stderr.decode().startswith(
        f'crishim: archive member "blobs/sha256/{layer}": its content has digest sha256:'
    )
    assert await node.tags() == before
    assert list((node.proc.root / "images" / "content" / "ingest").iterdir()) == []


async def test_not_an_archive_is_refused(node: Node) -> None:
    out = node.crishim("import", "-", stdin=b"hello\n" * 1000)
    assert out.returncode == 2
    assert "not a readable tar archive" in out.stderr.decode()
    missing = node.crishim("import", "/nonexistent/archive.tar")
    assert missing.returncode == 2
    assert missing.stderr == b"crishim: /nonexistent/archive.tar: No such file or directory\n"


async def test_refusal_before_the_end_of_the_archive_reports_why(node: Node) -> None:
    """crishim refuses a hostile first member while the client still has 64 MiB to send:
    the client stops sending and reports crishim's answer."""
    hostile = ArchiveMember("../escape", b"x")
    data = tar_bytes([hostile, ArchiveMember("padding", os.urandom(64 * 1024 * 1024))])
    for _ in range(3):
        out = await asyncio.to_thread(node.crishim, "import", "-", stdin=data)
        assert out.returncode == 2
        assert out.stderr.decode() == (
            'crishim: archive member "../escape": the name climbs out of the archive\n'
        )


async def test_tag_and_list(node: Node) -> None:
    out = node.crishim("tag", DOCKER_TAG, "local/retagged:1")
    assert out.returncode == 0, out.stderr.decode()
    listed = node.crishim("list", "--quiet")
    assert "docker.io/local/retagged:1" in listed.stdout.decode().splitlines()
    table = node.crishim("list").stdout.decode()
    assert f"{node.docker_image.config_digest}  " in table


async def test_ctr_as_kind_load_runs_it(node: Node) -> None:
    retagged = busybox_image(labels={"archive": "kind-load"})
    base = node.docker_archive.parent
    archive = base / "kind-load.tar"
    skopeo(retagged, base / "layout-kind", f"docker-archive:{archive}:kind/app:dev")
    out = node.ctr(
        "--namespace=k8s.io",
        "images",
        "import",
        "--all-platforms",
        "--digests",
        "--snapshotter=overlayfs",
        "-",
        stdin=archive.read_bytes(),
    )
    assert out.returncode == 0, out.stderr.decode() + node.rig.log_tail()
    assert (await node.tags())[retagged.config_digest] == ["docker.io/kind/app:dev"]
    # kind re-tags an image the node already has under another name by its ID.
    tag = node.ctr(
        "--namespace=k8s.io", "images", "tag", "--force", retagged.config_digest, "kind/app:v2"
    )
    assert tag.returncode == 0, tag.stderr.decode()
    assert (await node.tags())[retagged.config_digest] == [
        "docker.io/kind/app:dev",
        "docker.io/kind/app:v2",
    ]
    passwd = await run_in_host_network_pod(node, "kind/app:v2", "kind-load")
    assert passwd.startswith("root:")
    listed = node.ctr("-n", "k8s.io", "images", "ls", "-q")
    assert "docker.io/kind/app:v2" in listed.stdout.decode().splitlines()
    refused = node.ctr("-n", "k8s.io", "images", "rm", "kind/app:v2")
    assert refused.returncode == 1
    assert b"is not supported on this node" in refused.stderr


async def test_kind_preload_moves_containerds_images_to_crishim(node: Node, tmp_path: Path) -> None:
    """docker/kind/crishim-kind-preload on a containerd store filled as kind's node image
    builder fills it (import --all-platforms --no-unpack --digests)."""
    require_containerd()
    preloaded = busybox_image(labels={"archive": "preloaded"})
    store = tmp_path / "containerd"
    with containerd(store) as ctrd:
        ctrd.ctr(
            "images",
            "import",
            "--all-platforms",
            "--no-unpack",
            "--digests",
            "-",
            stdin=tar_bytes(docker_archive([(preloaded, ["registry.k8s.io/preloaded:v1"])])),
        )
    marker = tmp_path / "kind-preload.done"
    env = dict(
        os.environ,
        CONTAINERD_ROOT=str(store / "root"),
        CTR="ctr",
        CRISHIM=f"{sys.executable} -m crishim.cli",
        CRISHIM_CONFIG=str(node.proc.config_file),
        MARKER=str(marker),
        TMPDIR=str(tmp_path),
    )
    out = await asyncio.to_thread(
        subprocess.run, [str(PRELOAD)], env=env, capture_output=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr.decode()
    assert b"moving 1 image(s)" in out.stdout
    assert marker.exists()
    assert (await node.tags())[preloaded.config_digest] == ["registry.k8s.io/preloaded:v1"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("crishim-kind")] == []
