"""Fixtures of the cluster suite: a control plane on loopback and a crishim node in it.

Opt-in: it runs only when named (``pytest tests/cluster``) and skips, saying which
variables to set, unless the control-plane binaries are named (``tests/rig/cluster.py``).
It starts pods: run it under the pod lock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.runtimes import Crishim, Images, push_images
from tests.cluster.node import ClusterNode
from tests.rig.cluster import ControlPlane, kube_binaries
from tests.rig.fixtures import require_busybox, require_docker_registry
from tests.rig.host import conmons_of, mounts_under
from tests.rig.registry import Registry


@pytest.fixture(scope="module")
def images() -> Iterator[Images]:
    """The pods' busybox (and containerd's pause) image in a registry of the suite's own."""
    require_docker_registry()
    require_busybox()
    with Registry() as registry:
        yield push_images(registry)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    binaries, why = kube_binaries()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("kubelet and pods need root")
    control_plane = ControlPlane(tmp_path_factory.mktemp("plane"), binaries)
    control_plane.start()
    try:
        yield control_plane
    finally:
        control_plane.stop()


@pytest.fixture(scope="module")
def crishim_node(
    plane: ControlPlane, images: Images, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterNode]:
    """crishim with a kubelet joined to the control plane; teardown checks nothing is left."""
    base: Path = tmp_path_factory.mktemp("crishim-node")
    runtime = Crishim(base)
    node = ClusterNode(plane, runtime, base / "kubelet", (images.busybox,))
    node.start()
    try:
        yield node
    finally:
        left = node.stop()
        left += [f"conmon pid {pid}" for pid in conmons_of(runtime.proc)]
        left += [f"mount {m}" for m in mounts_under(base)]
        assert left == [], f"left behind after the node stopped: {left}"
