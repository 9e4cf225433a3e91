"""The cluster rig works: a Deployment on a crishim node, kubectl exec and logs through the
API server, and a deletion that leaves nothing on the node."""

from __future__ import annotations

import json
import time

from tests.bench.runtimes import Images
from tests.cluster.node import ClusterNode
from tests.rig.cluster import ControlPlane, deployment

NAME = "rig-check"
SELECTOR = f"app={NAME}"


def test_deployment_runs_execs_logs_and_leaves_nothing(
    plane: ControlPlane, crishim_node: ClusterNode, images: Images
) -> None:
    manifest = deployment(NAME, 3, images.busybox)
    plane.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    plane.kubectl("rollout", "status", f"deployment/{NAME}", "--timeout=120s")
    pods = json.loads(plane.kubectl("get", "pods", "-l", SELECTOR, "-o", "json"))["items"]
    assert len(pods) == 3, [p["metadata"]["name"] for p in pods]
    assert {p["spec"]["nodeName"] for p in pods} == {crishim_node.kubelet.node_name}
    assert len(crishim_node.running()) == 6, crishim_node.running()  # 3 sandboxes, 3 containers

    pod = pods[0]["metadata"]["name"]
    out = plane.kubectl("exec", pod, "--", "sh", "-c", "echo out-$((6*7)); echo err >&2")
    assert out == "out-42\n"
    assert plane.kubectl("logs", pod) == "started\n"

    plane.kubectl("delete", "deployment", NAME, "--wait=true")
    plane.kubectl("wait", "--for=delete", "pod", "-l", SELECTOR, "--timeout=120s")
    assert plane.kubectl("get", "pods", "-l", SELECTOR, "-o", "name") == ""
    deadline = time.monotonic() + 60
    while crishim_node.running():
        assert time.monotonic() < deadline, f"still running: {crishim_node.running()}"
        time.sleep(0.5)
    crishim_node.kubelet.stop()
    crishim_node.remove_all()
    assert crishim_node.leftovers() == []
