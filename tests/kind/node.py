"""docker/kind/Containerfile built on a stand-in for the kind node image, and booted.

No registry here serves ``kindest/node``, and no image builder runs here, so the test builds
the node image its own way:

- the base is the systemd test bed's Debian root (:mod:`tests.systemd.bed`, an overlay over
  the cached rootfs) given kind's layout where crishim's image depends on it: containerd and
  its ``ctr`` in ``/usr/local/bin`` (the host's, Debian's containerd), containerd's config
  and unit, a kubelet unit that waits for kubeadm's config as kind's does, kind's
  ``/etc/default/kubelet`` and ``/etc/crictl.yaml``, the CNI plugins in ``/opt/cni/bin``, a
  ``clean-install`` that checks instead of downloading (the rootfs has the packages), and
  images preloaded into containerd's store as kind's node image builder preloads them;
- the Containerfile's instructions are then applied to it: ``COPY`` from the checkout,
  ``RUN`` in a chroot (pip offline: crishim's dependencies are in the rootfs's venv); any
  other instruction fails the build, so a new one cannot go untested;
- a drop-in moves crishim's socket to the directory the bed binds out to the host, and its
  metrics to a free port (the container shares the host's network).

Booting is the bed's (systemd-nspawn). The node has no pod network (kindnetd would bring
it): pods in its tests use the host's.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from tests.rig.archives import docker_archive, tar_bytes
from tests.rig.containerd import containerd
from tests.rig.oci_image import Image
from tests.systemd.bed import CRI_DIR, Bed
from tests.systemd.rootfs import REPO

__all__ = ["CONTAINERFILE", "KindNode", "containerfile_instructions"]

CONTAINERFILE = REPO / "docker" / "kind" / "Containerfile"
_BUILD_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    # Offline: crishim's dependencies, setuptools among them, are in the rootfs's venv.
    "PIP_NO_INDEX": "1",
    "PIP_NO_BUILD_ISOLATION": "0",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}
_CNI_PLUGINS = ("host-local", "loopback", "ptp", "portmap")
_CLEAN_INSTALL = """#!/bin/sh
# kind's clean-install (apt-get install), offline: the stand-in base has every package.
for package in "$@"; do
    if [ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" != "install ok installed" ]; then
        echo "clean-install (stand-in): $package is not in the base and this build is offline" >&2
        exit 1
    fi
done
"""
_CONTAINERD_CONFIG = """version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
"""
_CONTAINERD_UNIT = """[Unit]
Description=containerd container runtime (kind's unit, stand-in)
[Service]
ExecStart=/usr/local/bin/containerd
Type=notify
[Install]
WantedBy=multi-user.target
"""
_KUBELET_UNIT = """[Unit]
Description=kubelet (kind's unit, stand-in: kind starts it once kubeadm wrote its config)
ConditionPathExists=/var/lib/kubelet/config.yaml
[Service]
ExecStart=/bin/true
[Install]
WantedBy=multi-user.target
"""
_TEST_DROP_IN = f"""# The test's: the socket where the bed binds it out, metrics on any free port.
socket = "{CRI_DIR}/crishim.sock"
log_level = "debug"
[metrics]
address = "127.0.0.1:0"
"""


def containerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Containerfile, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


class KindNode(Bed):
    """The node image built on the stand-in base, booted; ``preloaded`` are the images
    kind's builder would have put in containerd's store, by the name to give them."""

    def __init__(self, base: Path, preloaded: dict[str, Image]) -> None:
        super().__init__(base, pod_network=False)
        self.name = f"crishim-kind-{os.getpid()}"
        self.preloaded = preloaded
        self.build_log = base / "build.log"

    def _install(self) -> None:
        self._kind_layout()
        self._preload()
        for keyword, arguments in containerfile_instructions(CONTAINERFILE.read_text()):
            if keyword in ("ARG", "FROM"):
                continue  # the stand-in is the base
            if keyword == "COPY":
                self._copy(*shlex.split(arguments))
            elif keyword == "RUN":
                self._build_step(arguments)
            else:
                raise AssertionError(f"the stand-in build does not know {keyword} yet")
        drop_in = self.root / "etc" / "crishim" / "crishim.d" / "90-test.toml"
        drop_in.parent.mkdir(parents=True, exist_ok=True)
        drop_in.write_text(_TEST_DROP_IN)

    def _kind_layout(self) -> None:
        local_bin = self.root / "usr" / "local" / "bin"
        for tool in ("containerd", "ctr"):
            found = shutil.which(tool)
            assert found, f"{tool} missing: install the Debian package 'containerd'"
            shutil.copy2(found, local_bin / tool)
        _write(local_bin / "clean-install", _CLEAN_INSTALL, mode=0o755)
        _write(self.root / "etc" / "containerd" / "config.toml", _CONTAINERD_CONFIG)
        systemd = self.root / "etc" / "systemd" / "system"
        _write(systemd / "containerd.service", _CONTAINERD_UNIT)
        _write(systemd / "kubelet.service", _KUBELET_UNIT)
        (systemd / "kubelet.service.d").mkdir(exist_ok=True)
        _write(
            self.root / "etc" / "default" / "kubelet",
            "KUBELET_EXTRA_ARGS=--runtime-cgroups=/system.slice/containerd.service\n",
        )
        _write(
            self.root / "etc" / "crictl.yaml",
            "runtime-endpoint: unix:///run/containerd/containerd.sock\n",
        )
        cni = self.root / "opt" / "cni" / "bin"
        cni.mkdir(parents=True, exist_ok=True)
        for plugin in _CNI_PLUGINS:
            shutil.copy2(self.root / "usr" / "lib" / "cni" / plugin, cni / plugin)
        self._build_step("systemctl enable containerd.service kubelet.service")

    def _preload(self) -> None:
        """Fill containerd's store as kind's node image builder does."""
        with containerd(self.base / "preload") as ctrd:
            for name, image in self.preloaded.items():
                archive = tar_bytes(docker_archive([(image, [name])]))
                ctrd.ctr(
                    "images", "import", "--all-platforms", "--no-unpack", "--digests", "-",
                    stdin=archive,
                )  # fmt: skip
        shutil.copytree(
            self.base / "preload" / "root", self.root / "var" / "lib" / "containerd", symlinks=True
        )

    def _copy(self, *arguments: str) -> None:
        *sources, destination = arguments
        target = self.root / destination.lstrip("/")
        for source in sources:
            src = REPO / source
            if src.is_dir():
                shutil.copytree(
                    src,
                    target,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"),
                )
            else:
                into = target / src.name if destination.endswith("/") else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, into)

    def _build_step(self, command: str) -> None:
        with self.build_log.open("a") as log:
            log.write(f"\n$ {command}\n")
            log.flush()
            done = subprocess.run(
                ["chroot", str(self.root), "/bin/sh", "-c", command],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_BUILD_ENV,
                check=False,
            )
        if done.returncode != 0:
            tail = self.build_log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"build step failed ({done.returncode}): {command}\n{tail}")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
