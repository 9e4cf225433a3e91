"""The kind node image (docker/kind/Containerfile), built on a stand-in base and booted.

See :mod:`tests.kind.node` for how it is built without kindest/node and an image builder.
Checked: containerd is masked and crishim.service is active on the systemd driver; the
images preloaded into containerd's store are crishim's after the first boot; kind's calls
inside a node (``containerd config dump``, then ``ctr`` import and tag) work; an image
loaded that way runs in a pod under a kubelet-made slice.

Running: as the systemd suite (root, debootstrap, systemd-nspawn; ``CRISHIM_SYSTEMD_TESTS=0``
skips both), plus Debian's containerd and skopeo.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib.client import Channel

from crishim.api import v1
from tests.kind.node import KindNode
from tests.rig.containerd import require_containerd
from tests.rig.crishim_fixtures import CriClient
from tests.rig.fixtures import require_busybox
from tests.rig.oci_image import Image, busybox_image, write_oci_layout
from tests.systemd.rig import SystemdRig

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

PRELOADED = "registry.k8s.io/preloaded:stand-in"
LOADED = "docker.io/kind/app:dev"


def wanted() -> None:
    if os.environ.get("CRISHIM_SYSTEMD_TESTS", "1") == "0":
        pytest.skip("the systemd suite is off (CRISHIM_SYSTEMD_TESTS=0)")
    if os.geteuid() != 0:
        pytest.skip("the node needs root")
    for tool, package in (
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("skopeo", "skopeo"),
    ):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: apt-get install {package}")
    require_containerd()
    require_busybox()


@pytest_asyncio.fixture(name="node", scope="module", loop_scope="module")
async def node_fixture(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KindNode]:
    wanted()
    node = KindNode(
        tmp_path_factory.mktemp("kind-node"),
        {PRELOADED: busybox_image(labels={"kind": "preloaded"})},
    )
    try:
        await asyncio.to_thread(node.start)
        await asyncio.to_thread(node.wait_crishim)
        yield node
    finally:
        await asyncio.to_thread(node.stop)


async def cri(node: KindNode) -> CriClient:
    channel = Channel(path=str(node.socket))
    return CriClient(channel, v1.RuntimeServiceStub(channel), v1.ImageServiceStub(channel))


async def tags(client: CriClient) -> dict[str, list[str]]:
    listed = await client.images.list_images(v1.ListImagesRequest())
    return {image.id: sorted(image.repo_tags) for image in listed.images}


async def test_containerd_is_masked_and_crishim_serves_on_the_systemd_driver(
    node: KindNode,
) -> None:
    assert node.systemctl("is-enabled", "containerd", check=False).strip() == "masked"
    assert node.systemctl("is-active", "containerd", check=False).strip() == "inactive"
    service = node.show("crishim", "ActiveState", "Type")
    assert service == {"ActiveState": "active", "Type": "notify"}
    client = await cri(node)
    try:
        reply = await client.runtime.runtime_config(v1.RuntimeConfigRequest())
        assert reply.linux is not None
        assert reply.linux.cgroup_driver is v1.CgroupDriver.SYSTEMD
    finally:
        client.channel.close()
    assert (
        node.read("/etc/crishim/crishim.toml")
        == (Path(__file__).parents[2] / "docker" / "kind" / "crishim.toml").read_text()
    )


async def test_preloaded_images_are_crishims_after_the_first_boot(node: KindNode) -> None:
    preload = node.show("crishim-kind-preload", "ActiveState", "Result")
    assert preload == {"ActiveState": "active", "Result": "success"}, node.journal(
        "crishim-kind-preload"
    )
    assert (node.state / "kind-preload.done").exists()
    client = await cri(node)
    try:
        found = await tags(client)
    finally:
        client.channel.close()
    assert found[node.preloaded[PRELOADED].config_digest] == [PRELOADED]


def skopeo_docker_archive(tmp_path: Path, image: Image, name: str) -> bytes:
    layout = write_oci_layout(tmp_path / "layout", image, tag="src")
    target = tmp_path / "app.tar"
    subprocess.run(
        ["skopeo", "copy", "-q", f"oci:{layout}:src", f"docker-archive:{target}:{name}"],
        check=True,
        capture_output=True,
    )
    return target.read_bytes()


async def test_kind_load_then_a_pod_runs_it_under_a_kubelet_slice(
    node: KindNode, tmp_path: Path
) -> None:
    # What `kind load docker-image` runs in the node, in order.
    dump = node.run("containerd", "config", "dump")
    assert 'snapshotter = "overlayfs"' in dump
    image = busybox_image(labels={"kind": "loaded"})
    archive = node.root / "root" / "app.tar"  # (the container has its own /tmp)
    archive.write_bytes(skopeo_docker_archive(tmp_path, image, "kind/app:dev"))
    node.run(
        "sh",
        "-c",
        "ctr --namespace=k8s.io images import --all-platforms --digests "
        "--snapshotter=overlayfs - < /root/app.tar",
    )
    retag = ("images", "tag", "--force", image.config_digest, "kind/app:v2")
    node.run("ctr", "--namespace=k8s.io", *retag)
    rig = SystemdRig(node, "kind/app:v2")
    try:
        assert (await tags(rig.cri))[image.config_digest] == [LOADED, "docker.io/kind/app:v2"]
        cid, pod = await host_network_container(rig)
        try:
            assert await rig.exec_out(cid, "echo", "loaded") == "loaded\n"
            (pod_slice,) = rig.slices
            scope = node.show(f"crishim-{cid}.scope", "ActiveState", "Slice")
            assert scope == {"ActiveState": "active", "Slice": pod_slice}
        finally:
            await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))
    finally:
        rig.remove_slices()
        rig.close()


async def host_network_container(rig: SystemdRig) -> tuple[str, str]:
    """A pod on the host's network in a kubelet-made slice, running the rig's image; the
    container's and the pod's ids (the node has no pod network: kindnetd would bring it)."""
    uid = str(uuid.uuid4())
    config = rig.sandbox_config("loaded", rig.make_slice(uid), uid)
    namespaces = v1.NamespaceOption(
        network=v1.NamespaceMode.NODE, pid=v1.NamespaceMode.CONTAINER, ipc=v1.NamespaceMode.POD
    )
    assert config.linux is not None
    config.linux.security_context = v1.LinuxSandboxSecurityContext(namespace_options=namespaces)
    pod = (await rig.runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))).pod_sandbox_id
    container = v1.ContainerConfig(
        metadata=v1.ContainerMetadata(name="main"),
        image=v1.ImageSpec(image=rig.image),
        command=["sleep", "1000"],
        log_path="main/0.log",
        linux=v1.LinuxContainerConfig(
            resources=v1.LinuxContainerResources(cpu_shares=2),
            security_context=v1.LinuxContainerSecurityContext(namespace_options=namespaces),
        ),
    )
    created = await rig.runtime.create_container(
        v1.CreateContainerRequest(pod_sandbox_id=pod, config=container, sandbox_config=config)
    )
    await rig.runtime.start_container(v1.StartContainerRequest(container_id=created.container_id))
    return created.container_id, pod
