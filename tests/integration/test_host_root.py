"""Volumes by node path when crishim does not run on the node's root (``host_root``; root).

Installed from its image, crishim runs chrooted in /opt/crishim/rootfs with the node's root
bound at /host (see crishim.node.layout). Here the "node" is a directory of the test,
``host_root`` names it, and a real crishim runs pods with hostPath-like mounts: a path
only the node has, an absolute symlink of the node's, a directory crishim has too but with
other content, and a directory crishim sees at its own path (a bind of the node's, as the
installer binds /var/lib/kubelet). Each container must see the node's file; the bundle
shows which path the runtime was given; ContainerStatus keeps kubelet's path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from grpclib import GRPCError
from grpclib.const import Status

from crishim.api import v1
from crishim.node.host import RealHost
from tests.rig.faults import HOST_NETWORK, require_host_tools, start_rig, stop_rig
from tests.rig.fixtures import PushedImage
from tests.rig.host import run
from tests.rig.pods import PodRig

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

ONLY_ON_NODE = "/etc/crishim-test-node-only"
NODE_LINK = "/etc/crishim-test-node-link"


@dataclass
class Node:
    rig: PodRig
    root: Path
    #: a directory crishim has too, with other content than the node's
    differs: Path
    #: a directory crishim sees at its own path (bound into the node's root)
    shared: Path


@pytest_asyncio.fixture(name="node", loop_scope="module")
async def node_fixture(tmp_path: Path, busybox_pushed: PushedImage) -> AsyncIterator[Node]:
    require_host_tools()
    root = tmp_path / "node"

    def node_path(path: Path | str) -> Path:
        return root / str(path).lstrip("/")

    node_path(ONLY_ON_NODE).mkdir(parents=True)
    node_path(ONLY_ON_NODE).joinpath("probe").write_text("only the node has this\n")
    node_path(NODE_LINK).symlink_to(ONLY_ON_NODE)  # absolute: the node's /etc, not crishim's
    differs = tmp_path / "differs"
    differs.mkdir()
    (differs / "probe").write_text("crishim's own, not the node's\n")
    node_path(differs).mkdir(parents=True)
    node_path(differs).joinpath("probe").write_text("the node's\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "probe").write_text("seen by both\n")
    node_path(shared).mkdir(parents=True)
    run("mount", "--bind", str(shared), str(node_path(shared)))
    rig = await start_rig(tmp_path / "crishim", f'host_root = "{root}"\n', busybox_pushed.ref)
    try:
        await rig.images.pull_image(v1.PullImageRequest(image=v1.ImageSpec(image=rig.image)))
        yield Node(rig, root, differs, shared)
    finally:
        await stop_rig(rig)
        run("umount", str(node_path(shared)))


def mount(host_path: str, container_path: str) -> v1.Mount:
    return v1.Mount(container_path=container_path, host_path=host_path, readonly=True)


def bundle_sources(rig: PodRig, container_id: str) -> dict[str, str]:
    """Destination -> source of the container's bind mounts, as the runtime got them."""
    config = rig.proc.state / "containers" / container_id / "bundle" / "config.json"
    spec = json.loads(config.read_text())
    return {m["destination"]: m["source"] for m in spec["mounts"] if m.get("type") == "bind"}


async def test_volumes_are_the_nodes_files_even_under_concurrent_creates(node: Node) -> None:
    rig = node.rig
    pod_id = await rig.run_pod("host-root", network=HOST_NETWORK)
    mounts = [
        mount(ONLY_ON_NODE, "/only"),
        mount(NODE_LINK, "/link"),
        mount(str(node.differs), "/differs"),
        mount(str(node.shared), "/shared"),
    ]
    names = [f"reader-{n}" for n in range(4)]
    started = await asyncio.gather(
        *(rig.start_container(pod_id, name, ["sleep", "1000"], mounts=mounts) for name in names)
    )
    for container_id in started:
        reply = await rig.exec(
            container_id, "cat", "/only/probe", "/link/probe", "/differs/probe", "/shared/probe"
        )
        assert reply.exit_code == 0, reply.stderr
        assert reply.stdout.decode().splitlines() == [
            "only the node has this",
            "only the node has this",
            "the node's",
            "seen by both",
        ]
        sources = bundle_sources(rig, container_id)
        assert sources["/only"] == f"{node.root}{ONLY_ON_NODE}"
        assert sources["/link"] == f"{node.root}{ONLY_ON_NODE}"  # resolved in the node's root
        assert sources["/differs"] == f"{node.root}{node.differs}"
        assert sources["/shared"] == str(node.shared)  # its own path: propagation both ways
        status = await rig.runtime.container_status(
            v1.ContainerStatusRequest(container_id=container_id)
        )
        assert status.status is not None
        assert {m.container_path: m.host_path for m in status.status.mounts} == {
            "/only": ONLY_ON_NODE,
            "/link": NODE_LINK,
            "/differs": str(node.differs),
            "/shared": str(node.shared),
        }


async def test_a_symlink_loop_on_the_node_is_a_clear_invalid_argument(node: Node) -> None:
    rig = node.rig
    loop = node.root / "etc" / "crishim-test-loop"
    loop.symlink_to("/etc/crishim-test-loop")
    pod_id = await rig.run_pod("host-root-loop", network=HOST_NETWORK)
    with pytest.raises(GRPCError) as raised:
        await rig.start_container(
            pod_id, "loop", ["sleep", "1000"], mounts=[mount("/etc/crishim-test-loop", "/x")]
        )
    assert raised.value.status is Status.INVALID_ARGUMENT
    assert raised.value.message == (
        "host path /etc/crishim-test-loop: too many levels of symbolic links"
    )


async def test_the_installer_removes_every_pod_of_the_runtime_kubelet_leaves(node: Node) -> None:
    """What `crishim node install|uninstall` does to the runtime kubelet leaves, through
    RealHost against this real crishim: every pod stopped and removed, containers too."""
    rig = node.rig
    pods = [await rig.run_pod(f"leaving-{n}", network=HOST_NETWORK) for n in range(3)]
    await rig.start_container(pods[0], "app", ["sleep", "1000"])
    removed = await asyncio.to_thread(RealHost().remove_pods, rig.proc.socket, 30.0)
    assert removed >= len(pods)
    listed = await rig.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())
    assert listed.items == []
    containers = await rig.runtime.list_containers(v1.ListContainersRequest())
    assert containers.containers == []
    # a runtime whose socket is gone has no pods to remove
    assert await asyncio.to_thread(RealHost().remove_pods, rig.proc.socket.with_name("x"), 1.0) == 0
