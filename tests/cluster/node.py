"""One node of the rig's cluster: a runtime (crishim or containerd) and a kubelet on it.

:class:`ClusterNode` starts the runtime (``tests/bench/runtimes.py``: private root, state,
socket, own bridge and subnet), pulls the images the pods need through the CRI (so no pull
is timed), then a kubelet registered with the control plane as node ``localhost``, and waits
until the node is Ready on that runtime. Several nodes may be made on one control plane, one
per runtime, but only one may run at a time: they register under the same name, and the
newest kubelet takes the node over.

``stop`` stops kubelet first (it leaves pods running), then removes every pod sandbox left
through the CRI and stops the runtime; :meth:`leftovers` says what the runtime still has.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from grpclib.client import Channel

from crishim.api import v1
from tests.bench.runtimes import Containerd, Crishim
from tests.rig.cluster import ControlPlane
from tests.rig.kubelet import KubeletProcess

Runtime = Crishim | Containerd


async def _cri(socket: Path, work: str, images: tuple[str, ...] = ()) -> list[str]:
    channel = Channel(path=str(socket))
    runtime = v1.RuntimeServiceStub(channel)
    try:
        if work == "pull":
            image_service = v1.ImageServiceStub(channel)
            for image in images:
                await image_service.pull_image(v1.PullImageRequest(image=v1.ImageSpec(image=image)))
            return []
        sandboxes = (await runtime.list_pod_sandbox(v1.ListPodSandboxRequest())).items
        containers = (await runtime.list_containers(v1.ListContainersRequest())).containers
        if work == "running":
            ready = v1.PodSandboxState.SANDBOX_READY
            running = v1.ContainerState.CONTAINER_RUNNING
            return [f"sandbox {s.id[:12]}" for s in sandboxes if s.state == ready] + [
                f"container {c.id[:12]}" for c in containers if c.state == running
            ]
        if work == "remove":
            for sandbox in sandboxes:
                await runtime.remove_pod_sandbox(
                    v1.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id)
                )
            return []
        return [f"sandbox {s.id[:12]}" for s in sandboxes] + [
            f"container {c.id[:12]}" for c in containers
        ]
    finally:
        channel.close()


class ClusterNode:
    """A runtime with a kubelet on it, joined to a control plane."""

    def __init__(
        self, plane: ControlPlane, runtime: Runtime, base: Path, images: tuple[str, ...]
    ) -> None:
        self.plane = plane
        self.runtime = runtime
        self.images = images
        self.kubelet: KubeletProcess = plane.kubelet(base, f"unix://{runtime.socket}")

    @property
    def name(self) -> str:
        return self.runtime.name

    def start(self) -> ClusterNode:
        """Runtime up, images pulled, kubelet up and the node Ready on this runtime."""
        self.runtime.start()
        try:
            asyncio.run(_cri(self.runtime.socket, "pull", self.images))
            self.kubelet.start()
            self.plane.wait_node_ready(self.kubelet, f"{self.runtime.name}://")
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> list[str]:
        """Ready sandboxes and running containers the runtime has."""
        return asyncio.run(_cri(self.runtime.socket, "running"))

    def leftovers(self) -> list[str]:
        """Every sandbox and container the runtime still has, in any state."""
        return asyncio.run(_cri(self.runtime.socket, "list"))

    def remove_all(self) -> None:
        """Remove every pod sandbox through the CRI (kubelet's GC would, a minute later)."""
        asyncio.run(_cri(self.runtime.socket, "remove"))

    def stop(self) -> list[str]:
        """Stop kubelet, remove what pods are left, stop the runtime; what could not go."""
        self.kubelet.stop()
        left: list[str] = []
        try:
            self.remove_all()
            left = self.leftovers()
        except Exception as exc:  # a runtime that died: its processes go below
            left = [f"runtime did not answer: {exc}"]
        finally:
            self.runtime.stop()
        return left
