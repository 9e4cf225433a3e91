"""End to end: a node of a real cluster switched from containerd to crishim by the DaemonSet
of ``docker/deploy/crishim-install.yaml``, and back by ``crishim-uninstall.yaml``.

The control plane runs on the host (``tests/rig/cluster.py``), the node is the booted
systemd bed with containerd and a real kubelet (``tests/e2e/node.py``), the crishim image is
built by the image rig (``docker/build.sh``) and pushed to the rig's loopback registry, and
the manifests are applied with the image's reference in place of their placeholder.

Opt-in: it needs the Kubernetes binaries built outside the repository
(``CRISHIM_TEST_KUBE_BIN_DIR`` or the single-binary variables of ``tests/rig/cluster.py``)
and skips, saying so, without them. It starts pods: run it under the pod lock. It prints a
transcript of the kubectl commands it ran, with their outputs and times.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.bench.runtimes import Images, push_images
from tests.e2e.node import CRISHIM_ENDPOINT, KubeNode
from tests.image.rig import BuiltImage, built_image_fixture  # noqa: F401 - ``built_image``
from tests.rig.cluster import ControlPlane, kube_binaries
from tests.rig.fixtures import require_busybox
from tests.rig.registry import Registry
from tests.systemd.rig import _bed_wanted
from tests.systemd.rootfs import REPO

pytestmark = pytest.mark.root

PLACEHOLDER = "registry.example.com/crishim/crishim:0.1.0"
DEPLOY = REPO / "docker" / "deploy"
NAMESPACE = "crishim-system"


class Transcript:
    """kubectl through the control plane, each command and its output recorded with times."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.started = time.monotonic()
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        clock = datetime.now(UTC).strftime("%H:%M:%S")
        self.lines.append(f"[{clock} +{time.monotonic() - self.started:6.1f}s] {text}")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        shown = " ".join(args)
        if input is not None:
            shown += " <<manifest>>"
        self.note(f"$ kubectl {shown}")
        began = time.monotonic()
        try:
            out = self.plane.kubectl(*args, input=input, check=check)
        except RuntimeError as exc:
            self.lines.append(f"    ! {exc}")
            raise
        self.lines.extend(f"    {line}" for line in out.rstrip("\n").splitlines())
        self.lines.append(f"    ({time.monotonic() - began:.1f}s)")
        return out

    def text(self) -> str:
        return "\n".join(self.lines)


def idle_pod(name: str, image: str) -> dict[str, object]:
    """An idle busybox pod that stops at once on SIGTERM."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"e2e": "crishim"}},
        "spec": {
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "idle",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"],
                }
            ],
        },
    }


def manifest(name: str, image: str) -> str:
    return (DEPLOY / name).read_text().replace(PLACEHOLDER, image)


@pytest.fixture(name="plane")
def plane_fixture(tmp_path: Path) -> Iterator[ControlPlane]:
    binaries, why = kube_binaries()
    if why:
        pytest.skip(why)
    _bed_wanted()
    require_busybox()
    control_plane = ControlPlane(tmp_path / "plane", binaries)
    control_plane.start()
    try:
        yield control_plane
    finally:
        control_plane.stop()


def wait_runtime(transcript: Transcript, node: KubeNode, prefix: str, timeout: float) -> str:
    """Until the node is Ready and reports a runtime version starting with ``prefix``."""
    deadline = time.monotonic() + timeout
    transcript.note(f"waiting for node localhost Ready on {prefix}")
    while True:
        node.plane.check_alive()
        found = json.loads(node.plane.kubectl("get", "node", "-o", "json"))["items"]
        version = ready = ""
        for item in found:
            status = item.get("status", {})
            version = status.get("nodeInfo", {}).get("containerRuntimeVersion", "")
            conditions = status.get("conditions") or []
            ready = next((c["status"] for c in conditions if c["type"] == "Ready"), "")
        if version.startswith(prefix) and ready == "True":
            transcript.kubectl(
                "get", "node", "localhost", "-o",
                "jsonpath={.status.nodeInfo.containerRuntimeVersion}{'\\n'}",
            )  # fmt: skip
            return version
        if time.monotonic() > deadline:
            raise AssertionError(
                f"node not Ready on {prefix} after {timeout}s: runtime {version!r}, "
                f"Ready {ready!r}\n{node.bed.journal('kubelet', 80)}\n{node.bed.journal()}"
            )
        time.sleep(1)


def diagnose(transcript: Transcript, node: KubeNode) -> None:
    """What the cluster and the node say, into the transcript, after a failure."""
    transcript.note("--- after the failure ---")
    for args in (
        ("get", "pods", "-A", "-o", "wide"),
        ("-n", NAMESPACE, "describe", "pods"),
        (
            "-n",
            NAMESPACE,
            "logs",
            "--all-containers",
            "--prefix",
            "-l",
            "app.kubernetes.io/part-of=crishim",
        ),
    ):
        with contextlib.suppress(Exception):
            transcript.kubectl(*args, check=False)
    if node.bed.pid1:
        for unit in ("kubelet", "crishim", "crishim-rootfs", "containerd"):
            transcript.lines.append(f"--- journal of {unit} (the node) ---")
            transcript.lines.append(node.bed.journal(unit, 40))


def processes(node: KubeNode) -> list[str]:
    """The command names of the node's processes."""
    out = node.bed.run("sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null; true")
    return out.split()


def run_test_pod(transcript: Transcript, name: str, image: str) -> None:
    """A test pod Ready, and kubectl exec into it."""
    transcript.kubectl("apply", "-f", "-", input=json.dumps(idle_pod(name, image)))
    transcript.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "--timeout=180s")
    transcript.kubectl("get", "pod", name, "-o", "wide")
    out = transcript.kubectl("exec", name, "--", "sh", "-c", f"echo hello from {name}")
    assert out == f"hello from {name}\n"


def test_daemonset_switches_the_node_to_crishim_and_back(
    plane: ControlPlane, registry: Registry, built_image: BuiltImage, tmp_path: Path
) -> None:
    binaries, _ = kube_binaries()
    images: Images = push_images(registry)
    node = KubeNode(tmp_path / "node", plane, registry.host)
    transcript = Transcript(plane)
    try:
        transcript.note(f"crishim image {built_image.pushed}; booting the node (containerd)")
        node.start(binaries["kubelet"], images.pause)
        assert wait_runtime(transcript, node, "containerd://", 180)
        transcript.kubectl("get", "nodes", "-o", "wide")
        run_test_pod(transcript, "on-containerd", images.busybox)

        transcript.kubectl("label", "node", "localhost", "crishim.io/runtime=crishim")
        transcript.kubectl(
            "apply", "-f", "-", input=manifest("crishim-install.yaml", built_image.pushed)
        )
        wait_runtime(transcript, node, "crishim://", 420)
        assert node.kubelet_config_text().count(CRISHIM_ENDPOINT) == 1
        transcript.kubectl(
            "-n", NAMESPACE, "rollout", "status", "daemonset/crishim-install", "--timeout=180s"
        )
        transcript.kubectl("-n", NAMESPACE, "get", "pods", "-o", "wide")

        # Its pod runs again on crishim: the install finds the node done (read through /host).
        def reinstalled() -> bool:
            logs = transcript.plane.kubectl(
                "-n", NAMESPACE, "logs", "-l", "app.kubernetes.io/name=crishim-install",
                check=False,
            )  # fmt: skip
            return "kubelet already uses" in logs

        deadline = time.monotonic() + 180
        while not reinstalled():
            assert time.monotonic() < deadline, "the installer's pod never ran again on crishim"
            time.sleep(2)
        transcript.kubectl("-n", NAMESPACE, "logs", "-l", "app.kubernetes.io/name=crishim-install")
        transcript.lines.append("--- journal of crishim-node (the install handed off) ---")
        transcript.lines.append(node.bed.journal("crishim-node", 40))
        # containerd's pods were removed at the switch; kubelet runs them again on crishim
        transcript.kubectl("wait", "--for=condition=Ready", "pod/on-containerd", "--timeout=180s")
        assert "conmon" in processes(node), "no pod of the node runs on crishim"
        run_test_pod(transcript, "on-crishim", images.busybox)
        transcript.kubectl("get", "pods", "-o", "wide")

        transcript.kubectl(
            "delete", "-f", "-", "--wait=true", "--timeout=120s",
            input=manifest("crishim-install.yaml", built_image.pushed),
        )  # fmt: skip
        transcript.kubectl(
            "apply", "-f", "-", input=manifest("crishim-uninstall.yaml", built_image.pushed)
        )
        wait_runtime(transcript, node, "containerd://", 420)
        transcript.kubectl(
            "-n", NAMESPACE, "rollout", "status", "daemonset/crishim-uninstall", "--timeout=300s"
        )
        transcript.lines.append("--- journal of crishim-node (the uninstall handed off) ---")
        transcript.lines.append(node.bed.journal("crishim-node", 60))
        run_test_pod(transcript, "back-on-containerd", images.busybox)
        transcript.kubectl("wait", "--for=condition=Ready", "pod/on-crishim", "--timeout=180s")
        transcript.kubectl("get", "pods", "-A", "-o", "wide")
        assert CRISHIM_ENDPOINT not in node.kubelet_config_text()
        # nothing of crishim is left running: its pods were removed, the service is gone
        # (the DaemonSet's pod on containerd may still be finishing its own run)
        deadline = time.monotonic() + 60
        while {"conmon", "crishim"} & set(processes(node)) and time.monotonic() < deadline:
            time.sleep(1)
        assert not {"conmon", "crishim"} & set(processes(node)), processes(node)
        # what the installer put there is gone (the node image keeps its own venv in
        # /opt/crishim), and so are its mounts and crishim's kept mount namespace
        opt = node.bed.root / "opt/crishim"
        left = [n for n in ("rootfs", "install.json", "installed", "saved") if (opt / n).exists()]
        assert left == [], left
        assert "crishim-rootfs" not in node.bed.run("ls", "/run").split()
        mounts = node.bed.read("/proc/1/mountinfo")
        assert "/opt/crishim" not in mounts, mounts
        transcript.kubectl(
            "delete", "-f", "-", "--wait=true", "--timeout=120s",
            input=manifest("crishim-uninstall.yaml", built_image.pushed),
        )  # fmt: skip
    except BaseException:
        diagnose(transcript, node)
        raise
    finally:
        print("\n--- transcript ---\n" + transcript.text())
        if os.environ.get("CRISHIM_E2E_TRANSCRIPT"):
            Path(os.environ["CRISHIM_E2E_TRANSCRIPT"]).write_text(transcript.text() + "\n")
        node.stop()
