"""The fake host of the installer's unit tests: a host root and an image root in a
temporary directory, with real files, and :class:`FakeHost` recording what the installer
asks of the host's systemd and kubelet (a real systemd is not what those tests are about:
tests/e2e runs the installer on a booted one)."""

from __future__ import annotations

import configparser
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from crishim.errors import DeadlineExceeded, FailedPrecondition
from crishim.node.steps import Node
from crishim.node.unit import unit_path

CRISHIM = "unix:///run/crishim/crishim.sock"
CONTAINERD = "unix:///run/containerd/containerd.sock"
EXECUTABLE = "/opt/venv/bin/crishim"

KUBELET_CONFIG = f"""\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# kubeadm's
cgroupDriver: systemd
containerRuntimeEndpoint: {CONTAINERD}
staticPodPath: /etc/kubernetes/manifests
"""
KUBEADM_FLAGS = (
    f'KUBELET_KUBEADM_ARGS="--container-runtime-endpoint={CONTAINERD} '
    '--pod-infra-container-image=registry.k8s.io/pause:3.9"\n'
)


@dataclass
class FakeHost:
    """The host's systemd and kubelet: records calls, fails the first one that starts
    with ``fail`` (once: the undo's own call of it succeeds)."""

    kubelet: list[str] | None = field(default_factory=lambda: ["/usr/bin/kubelet"])
    fail: str | None = None
    calls: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    enabled: set[str] = field(default_factory=set)
    #: pod names by the name of the CRI socket they run on
    pods: dict[str, list[str]] = field(default_factory=dict)
    #: this process runs in a container (a DaemonSet's pod)
    container: bool = False
    transient: list[list[str]] = field(default_factory=list)
    #: what the host's transient unit does (the test runs the handed-off command)
    on_transient: Callable[[list[str]], None] | None = None

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self.fail is not None and what.startswith(self.fail):
            self.fail = None
            raise FailedPrecondition(f"{what}: injected failure")

    def systemctl(self, *args: str) -> None:
        self._call("systemctl " + " ".join(args))
        verb, units = args[0], [a for a in args[1:] if not a.startswith("--")]
        if verb == "enable":
            self.enabled.update(units)
        elif verb == "restart":
            self.active.update(units)
        elif verb in ("stop", "disable"):
            self.enabled.difference_update(units)
            if verb == "stop" or "--now" in args:
                self.active.difference_update(units)

    def unit_active(self, unit: str) -> bool:
        return unit in self.active

    def kubelet_args(self) -> list[str] | None:
        return self.kubelet

    def wait_cri(self, socket: Path, timeout: float) -> str:
        self._call(f"wait_cri {socket.name}")
        if "crishim.service" not in self.active:
            raise DeadlineExceeded("crishim is not running")
        return "crishim 0.1.0"

    def wait_kubelet(self, port: int, timeout: float) -> None:
        self._call(f"wait_kubelet {port}")

    def remove_pods(self, socket: Path, timeout: float) -> int:
        self._call(f"remove_pods {socket.name}")
        return len(self.pods.pop(socket.name, []))

    def in_container(self) -> bool:
        return self.container

    def start_transient(self, unit: str, argv: list[str]) -> None:
        self._call(f"start_transient {unit}")
        self.transient.append(argv)
        if self.on_transient is not None:
            self.on_transient(argv)


def make_image(root: Path) -> None:
    """A small image root: crishim in a venv, a library, links, a file mounted in."""
    (root / "opt/venv/bin").mkdir(parents=True)
    (root / "opt/venv/bin/crishim").write_text("#!/opt/venv/bin/python\n")
    (root / "opt/venv/bin/crishim").chmod(0o755)
    (root / "opt/venv/bin/python").symlink_to("/usr/bin/python3")
    (root / "usr/lib/cni").mkdir(parents=True)
    (root / "usr/lib/cni/bridge").write_bytes(b"\x7fELF" + bytes(range(256)))
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/conmon").write_bytes(b"\x7fELF conmon")
    (root / "lib").symlink_to("usr/lib")
    (root / "etc").mkdir()
    (root / "etc/os-release").write_text("ID=debian\n")
    (root / "etc/resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    (root / "var/lib/dpkg").mkdir(parents=True)
    for excluded in ("proc/1", "run/secrets", "tmp/junk"):
        (root / excluded).mkdir(parents=True)


def make_host(root: Path, *, flags: bool = False) -> None:
    for tool in ("usr/bin/mount", "usr/bin/umount", "usr/bin/rm", "usr/sbin/chroot"):
        (root / tool).parent.mkdir(parents=True, exist_ok=True)
        (root / tool).write_text("#!/bin/sh\n")
        (root / tool).chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/resolv.conf").write_text("nameserver 192.0.2.53\n")
    (root / "var/lib/kubelet").mkdir(parents=True)
    (root / "var/lib/kubelet/config.yaml").write_text(
        KUBELET_CONFIG.replace(f"containerRuntimeEndpoint: {CONTAINERD}\n", "")
        if flags
        else KUBELET_CONFIG
    )
    (root / "var/lib/kubelet/config.yaml").chmod(0o600)
    if flags:
        (root / "var/lib/kubelet/kubeadm-flags.env").write_text(KUBEADM_FLAGS)
    (root / "run").mkdir()
    (root / "etc/cni/net.d").mkdir(parents=True)


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """Every path below ``root``: its kind, mode and content (link target)."""
    found: dict[str, tuple[str, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", 0, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
        else:
            found[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return found


@dataclass
class Rig:
    host_root: Path
    image_root: Path
    host: FakeHost
    lines: list[str]

    def node(self) -> Node:
        return Node(
            host_root=self.host_root,
            image_root=self.image_root,
            host=self.host,
            executable=EXECUTABLE,
            shipped_unit=unit_path().read_text(),
            say=self.lines.append,
        )

    def read(self, path: str) -> str:
        return (self.host_root / path.lstrip("/")).read_text()

    def exists(self, path: str) -> bool:
        return (self.host_root / path.lstrip("/")).exists()


def make_rig(tmp_path: Path) -> Rig:
    host_root, image_root = tmp_path / "host", tmp_path / "image"
    make_host(host_root)
    make_image(image_root)
    return Rig(host_root, image_root, FakeHost(), [])


def service_of(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser
