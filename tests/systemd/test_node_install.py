"""``crishim node install|uninstall`` on a booted systemd: crishim from its rootfs, for real.

The bed plays a node with no crishim service and a stand-in kubelet (a unit that sleeps,
and kubelet's config file with containerd's endpoint). The image root is a plain bind of
the bed's own root at ``/srv/image`` (Debian, the runtimes, crishim in its venv), so the
installer copies it to ``/opt/crishim/rootfs`` and runs crishim there as the root of its own
mount namespace (``crishim node enter``). The tests check what the unit tests cannot: that
it runs pods from the rootfs, that exec lands in the container's file system, that a
restart of crishim finds its pods' namespaces again (mounts made under the rootfs reach the
host), and that uninstall leaves no mount.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from crishim.api import v1
from tests.rig.fixtures import PushedImage
from tests.systemd.bed import Bed
from tests.systemd.rig import SystemdRig, _bed_wanted
from tests.systemd.rootfs import VENV

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

CONTAINERD = "unix:///run/containerd/containerd.sock"
KUBELET_CONFIG = f"""\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
containerRuntimeEndpoint: {CONTAINERD}
healthzPort: 0
"""
KUBELET_UNIT = "[Service]\nExecStart=/bin/sleep infinity\n\n[Install]\nWantedBy=multi-user.target\n"
ROOTFS = "/opt/crishim/rootfs"


def _write(bed: Bed, path: str, text: str) -> None:
    target = bed.root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


@pytest_asyncio.fixture(name="node", scope="module", loop_scope="module")
async def node_fixture(
    tmp_path_factory: pytest.TempPathFactory, busybox_pushed: PushedImage
) -> AsyncIterator[Bed]:
    """A booted bed made into a node without crishim: its crishim.service removed, a
    stand-in kubelet, and the image root at /srv/image."""
    _bed_wanted()
    bed = Bed(tmp_path_factory.mktemp("node-install-bed"))
    try:
        await asyncio.to_thread(bed.start)
        bed.systemctl("disable", "--now", "crishim.service")
        bed.run("rm", "/etc/systemd/system/crishim.service")
        _write(bed, "/var/lib/kubelet/config.yaml", KUBELET_CONFIG)
        _write(bed, "/etc/systemd/system/kubelet.service", KUBELET_UNIT)
        bed.systemctl("daemon-reload")
        bed.systemctl("enable", "--now", "kubelet.service")
        bed.run("mkdir", "-p", "/srv/image")
        bed.run("mount", "--bind", "/", "/srv/image")
        yield bed
    finally:
        await asyncio.to_thread(bed.stop)


def _crishim_node(bed: Bed, *args: str) -> str:
    try:
        return bed.run(f"{VENV}/bin/crishim", "node", *args, "--host-root", "/", timeout=600)
    except AssertionError as exc:
        journal = bed.journal("crishim", 40)
        raise AssertionError(f"{exc}\n--- journal of crishim.service ---\n{journal}") from None


def _mounts(bed: Bed, pid: str = "1") -> list[str]:
    return [line.split()[4] for line in bed.read(f"/proc/{pid}/mountinfo").splitlines()]


async def test_install_runs_pods_from_the_rootfs_and_uninstall_leaves_the_node_as_it_was(
    node: Bed, busybox_pushed: PushedImage
) -> None:
    out = _crishim_node(node, "install", "--image-root", "/srv/image")
    assert "crishim installed" in out, out
    assert node.read("/var/lib/kubelet/config.yaml") == KUBELET_CONFIG.replace(
        CONTAINERD, "unix:///run/crishim-cri/crishim.sock"
    )
    pid = node.show("crishim.service", "MainPID")["MainPID"]
    # Its own mount namespace, whose root is the rootfs (with the node's root at /host).
    assert node.run("readlink", f"/proc/{pid}/ns/mnt") != node.run("readlink", "/proc/1/ns/mnt")
    joined = node.run("nsenter", "-t", pid, "-m", "cat", "/host/opt/crishim/installed")
    assert joined.strip() == "0.1.0"
    assert f"{ROOTFS}/var/lib/kubelet" in _mounts(node)

    rig = SystemdRig(node, busybox_pushed.ref)
    try:
        pulled = await rig.cri.images.pull_image(
            v1.PullImageRequest(image=v1.ImageSpec(image=busybox_pushed.ref))
        )
        assert pulled.image_ref, rig.journal()
        pod, _ = await rig.run_pod("installed", "runc")
        cid = await rig.start_container(pod, "app", ["sleep", "1000"])
        assert (await rig.exec_out(cid, "echo", "from the rootfs")).strip() == "from the rootfs"
        # exec runs in the container's file system (busybox's), not the node's (with /srv).
        listing = (await rig.exec_out(cid, "ls", "/")).split()
        assert "bin" in listing, listing
        assert "srv" not in listing, listing
        # The node's root as the DaemonSet mounts it (hostPath /), and a node path outside
        # the bound directories: the container's process sees the node's files, not the
        # rootfs's, both to the container's own process and to exec.
        _write(node, "/etc/crishim-test-node-file", "the node's\n")
        reader = "cat /host/opt/crishim/installed /host/etc/crishim-test-node-file"
        reader += " /node-etc/crishim-test-node-file; sleep 1000"
        reader_id = await rig.start_container(
            pod,
            "node-root",
            ["sh", "-c", reader],
            mounts=[
                v1.Mount(
                    container_path="/host",
                    host_path="/",
                    propagation=v1.MountPropagation.PROPAGATION_HOST_TO_CONTAINER,
                ),
                v1.Mount(container_path="/node-etc", host_path="/etc", readonly=True),
            ],
        )
        sandbox = await rig.runtime.pod_sandbox_status(
            v1.PodSandboxStatusRequest(pod_sandbox_id=pod)
        )
        assert sandbox.status is not None
        assert sandbox.status.metadata is not None
        log = rig.log_file("installed", sandbox.status.metadata.uid, "node-root")

        async def three_lines() -> bool:
            return log.exists() and log.read_text().count("\n") >= 3

        await rig.until(three_lines, "the node's files in the container's log")
        seen = [line.split(" ", 3)[-1] for line in log.read_text().splitlines()]
        assert seen == ["0.1.0", "the node's", "the node's"], seen
        exec_seen = await rig.exec_out(
            reader_id, "cat", "/host/opt/crishim/installed", "/node-etc/crishim-test-node-file"
        )
        assert exec_seen.split("\n")[:2] == ["0.1.0", "the node's"], exec_seen
        node.run("rm", "/etc/crishim-test-node-file")
        # crishim's private mounts (the pod's namespace pins) are in its mount namespace...
        namespace = node.run("readlink", f"/proc/{pid}/ns/mnt")
        pins = [m for m in _mounts(node, pid) if m.startswith("/run/crishim/ns/")]
        assert pins, _mounts(node, pid)
        # ...which is kept: a restarted crishim joins it again and finds them.
        node.systemctl("restart", "crishim.service")
        await rig.wait_serving()
        pid = node.show("crishim.service", "MainPID")["MainPID"]
        assert node.run("readlink", f"/proc/{pid}/ns/mnt") == namespace
        status = await rig.runtime.pod_sandbox_status(
            v1.PodSandboxStatusRequest(pod_sandbox_id=pod)
        )
        assert status.status is not None
        assert status.status.state == v1.PodSandboxState.SANDBOX_READY
        assert (await rig.exec_out(cid, "echo", "after a restart")).strip() == "after a restart"
        await rig.remove_all_pods()
        await asyncio.to_thread(rig.remove_slices)
    finally:
        rig.close()

    again = _crishim_node(node, "install", "--image-root", "/srv/image")
    assert "kubelet already uses" in again, again

    out = _crishim_node(node, "uninstall")
    assert "crishim uninstalled" in out, out
    assert node.read("/var/lib/kubelet/config.yaml") == KUBELET_CONFIG
    assert [m for m in _mounts(node) if m.startswith(("/opt/crishim", "/run/crishim-rootfs"))] == []
    assert node.run("ls", "/run").split().count("crishim-rootfs") == 0
    assert node.run("ls", "/opt/crishim").split().count("rootfs") == 0
    # (list-unit-files exits 1 when it lists none)
    units = node.systemctl("list-unit-files", "--no-legend", "crishim*", check=False)
    assert units.strip() == ""
    assert node.systemctl("is-active", "kubelet.service").strip() == "active"
