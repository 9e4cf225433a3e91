"""Switching kubelet between runtimes with ``crishim node install|uninstall``: the pods of
the runtime kubelet leaves, the hand-off of a DaemonSet's run to the host's systemd, and
the lock that keeps two runs apart (on the fake host of :mod:`tests.unit.node_fakes`)."""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from crishim.node.install import InstallFailed, install, uninstall
from tests.unit.node_fakes import (
    CONTAINERD,
    CRISHIM,
    EXECUTABLE,
    KUBELET_CONFIG,
    Rig,
    make_rig,
    snapshot,
)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return make_rig(tmp_path)


def test_the_pods_of_the_runtime_kubelet_leaves_are_removed_each_way(rig: Rig) -> None:
    rig.host.pods["containerd.sock"] = ["web", "dns"]
    install(rig.node())
    assert any("removed its 2 pod(s) on /run/containerd/containerd.sock" in x for x in rig.lines)
    rig.host.pods["crishim.sock"] = ["web"]
    uninstall(rig.node())
    assert any("removed its 1 pod(s) on /run/crishim/crishim.sock" in x for x in rig.lines)
    assert rig.host.pods == {}


def test_a_runtime_whose_pods_cannot_be_removed_does_not_stop_the_switch(rig: Rig) -> None:
    rig.host.fail = "remove_pods"
    install(rig.node())
    assert any(
        "WARNING: its pods on /run/containerd/containerd.sock not removed" in x for x in rig.lines
    )
    assert rig.read("/var/lib/kubelet/config.yaml") == KUBELET_CONFIG.replace(CONTAINERD, CRISHIM)


def test_kubelet_is_started_again_when_its_config_cannot_be_written(rig: Rig) -> None:
    config = rig.host_root / "var/lib/kubelet/config.yaml"
    (rig.host_root / "var/lib/kubelet").chmod(0o500)  # the new config cannot be renamed in
    try:
        if os.access(config.parent, os.W_OK):  # root ignores modes: make the rename fail
            config.with_name("config.yaml.crishim-new").mkdir()
        with pytest.raises(InstallFailed):
            install(rig.node())
    finally:
        (rig.host_root / "var/lib/kubelet").chmod(0o755)
    stop = rig.host.calls.index("systemctl stop kubelet.service")
    assert "systemctl restart kubelet.service" in rig.host.calls[stop:]
    assert "kubelet.service" in rig.host.active
    assert config.read_text() == KUBELET_CONFIG


def _as_the_hosts_unit(rig: Rig) -> Callable[[list[str]], None]:
    """The host's transient unit: the handed-off command, run on the host (on_host)."""

    def run(argv: list[str]) -> None:
        assert argv[:5] == ["nsenter", f"--target={os.getpid()}", "--mount", "--", EXECUTABLE]
        args = argv[5:]
        assert args[:2] == ["node", "install"] or args[:2] == ["node", "uninstall"]
        assert args[-3:] == ["--host-root", str(rig.host_root), "--on-host"]
        node = rig.node()
        node.on_host = True
        if args[1] == "install":
            assert args[2:4] == ["--image-root", str(rig.image_root)]
            install(node)
        else:
            uninstall(node, purge="--purge" in args)

    return run


def test_a_daemonsets_install_hands_the_switch_to_the_host(rig: Rig) -> None:
    rig.host.container = True
    rig.host.on_transient = _as_the_hosts_unit(rig)
    install(rig.node())
    assert rig.host.calls[0] == "start_transient crishim-node.service"
    assert "remove_pods containerd.sock" in rig.host.calls
    assert rig.read("/opt/crishim/installed") == "0.1.0\n"
    assert any("handed to the host's crishim-node.service" in x for x in rig.lines)
    # kubelet starts the DaemonSet's pod again, on crishim: nothing left to hand off
    rig.host.calls.clear()
    install(rig.node())
    assert not any(c.startswith("start_transient") for c in rig.host.calls)
    assert "systemctl stop kubelet.service" not in rig.host.calls


def test_a_daemonsets_uninstall_is_handed_to_the_host(rig: Rig) -> None:
    before = snapshot(rig.host_root)
    install(rig.node())
    rig.host.container = True
    rig.host.on_transient = _as_the_hosts_unit(rig)
    uninstall(rig.node(), purge=True)
    assert rig.host.transient[-1][-4:] == [
        "--purge",
        "--host-root",
        str(rig.host_root),
        "--on-host",
    ]
    assert snapshot(rig.host_root) == before
    # the pod again, now on containerd: nothing installed, nothing handed off
    rig.host.calls.clear()
    uninstall(rig.node())
    assert rig.host.calls == []
    assert "not installed" in rig.lines[-1]


def test_a_hand_off_that_leaves_the_work_undone_fails_and_says_where_to_look(rig: Rig) -> None:
    rig.host.container = True
    with pytest.raises(InstallFailed, match=re.escape("journalctl -u crishim-node.service")):
        install(rig.node())
    assert not rig.exists("/opt/crishim/installed")


def test_an_install_waits_for_the_one_already_running(rig: Rig) -> None:
    fd = os.open(rig.host_root, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    release = threading.Timer(0.3, os.close, [fd])
    release.start()
    began = time.monotonic()
    install(rig.node())
    assert time.monotonic() - began >= 0.25
    assert rig.lines[0] == "waiting for the install or uninstall already running on this node"
