"""A Kubernetes node in the systemd test bed: containerd (Debian's package) and a real kubelet.

:class:`KubeNode` boots a :class:`~tests.systemd.bed.Bed` (the host's network namespace,
so kubelet reaches the rig's API server and registry on 127.0.0.1, and the API server
reaches kubelet there), removes the bed's own crishim.service (the node starts without
crishim, as a node of a real cluster does) and then, inside the bed:

- installs containerd from Debian's ``.deb`` (downloaded once into the test cache) and
  configures its CRI plugin: the rig's pause image, the bed's CNI network, plain HTTP to
  the rig's registry (``certs.d/<host>/hosts.toml``). ``/var/lib/containerd`` is a bind
  from the test's directory: its overlayfs snapshots cannot live on the bed's overlay;
- writes crishim's config for the installer to find (socket, cgroup driver, the same
  registry as plain HTTP), which ``crishim node install`` keeps, as it keeps any config;
- copies the kubelet binary in and runs it as ``kubelet.service`` with a config file
  (``/var/lib/kubelet/config.yaml``, ``containerRuntimeEndpoint`` on containerd: what
  the installer edits) and a kubeconfig with the node's client certificate, registered as
  node ``localhost`` (see ``tests/rig/cluster.py``).

kubelet sets kernel tunables it wants; in the bed they are files bound over ``/proc/sys``
entries (the bed's mount namespace only), so the host's own values stay.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.rig.cluster import ControlPlane, kubeconfig
from tests.rig.kubelet import KUBELET_SYSCTLS, free_port
from tests.rig.pki import KeyPair
from tests.systemd.bed import SOCKET, Bed
from tests.systemd.rootfs import cache_dir

__all__ = ["CONTAINERD_ENDPOINT", "CRISHIM_ENDPOINT", "KubeNode"]

CONTAINERD_ENDPOINT = "unix:///run/containerd/containerd.sock"
CRISHIM_ENDPOINT = f"unix://{SOCKET}"
KUBELET_CONFIG = "/var/lib/kubelet/config.yaml"
KUBE_DIR = "/etc/kubernetes"
KUBELET_UNIT = f"""[Unit]
Description=kubelet (crishim's end-to-end test)
After=containerd.service

[Service]
ExecStart=/usr/local/bin/kubelet --config={KUBELET_CONFIG} \\
  --kubeconfig={KUBE_DIR}/kubelet.conf --cert-dir=/var/lib/kubelet/pki \\
  --hostname-override=localhost --v=2
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def containerd_deb() -> Path:
    """Debian's containerd package, downloaded once into the test cache."""
    directory = cache_dir() / "debs"
    directory.mkdir(parents=True, exist_ok=True)
    found = sorted(directory.glob("containerd_*.deb"))
    if not found:
        subprocess.run(
            ["apt-get", "download", "containerd"],
            cwd=directory,
            capture_output=True,
            check=True,
        )
        found = sorted(directory.glob("containerd_*.deb"))
    return found[-1]


def containerd_config(pause_image: str) -> str:
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    return (
        "version = 2\n"
        f'{cri}\n  sandbox_image = "{pause_image}"\n'
        # No CAP_SYS_RESOURCE here: oom_score_adj may not go below containerd's own.
        "  restrict_oom_score_adj = true\n"
        f'{cri[:-1]}.cni]\n  bin_dir = "/usr/lib/cni"\n  conf_dir = "/etc/cni/net.d"\n'
        f'{cri[:-1]}.registry]\n  config_path = "/etc/containerd/certs.d"\n'
    )


def kubelet_config(port: int, read_only_port: int) -> dict[str, object]:
    """kubelet's config file: containerd's endpoint, loopback ports, lenient eviction."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": CONTAINERD_ENDPOINT,
        "address": "127.0.0.1",
        "port": port,
        "readOnlyPort": read_only_port,
        "healthzPort": 0,
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failCgroupV1": False,
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "serializeImagePulls": False,
    }


class KubeNode:
    """The bed as a cluster node on containerd."""

    def __init__(self, base: Path, plane: ControlPlane, registry_host: str) -> None:
        self.plane = plane
        self.registry_host = registry_host
        self.bed = Bed(
            base,
            crishim_config=(
                # hosts.toml below; the installer keeps a config it finds
                '\n[registry]\nconfig_path = "/etc/crishim/certs.d"\n'
            ),
            binds=("/var/lib/containerd",),
        )

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.bed.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def start(self, kubelet_binary: str, pause_image: str) -> None:
        """Boot, containerd up, kubelet up; the node is Ready on containerd."""
        self.bed.start()
        bed = self.bed
        bed.systemctl("disable", "--now", "crishim.service")
        bed.run("rm", "/etc/systemd/system/crishim.service")
        bed.systemctl("daemon-reload")
        config = (bed.root / "etc/crishim/crishim.toml").read_text()
        self.write(
            "/etc/crishim/crishim.toml",
            config.replace('cgroup_driver = "systemd"', 'cgroup_driver = "cgroupfs"'),
        )
        hosts = f'server = "http://{self.registry_host}"\n'
        self.write(f"/etc/crishim/certs.d/{self.registry_host}/hosts.toml", hosts)
        self._containerd(pause_image)
        self._kubelet(kubelet_binary)

    def _containerd(self, pause_image: str) -> None:
        deb = containerd_deb()
        shutil.copy2(deb, self.bed.root / "root" / deb.name)
        self.write("/etc/containerd/config.toml", containerd_config(pause_image))
        hosts = f'server = "http://{self.registry_host}"\n'
        self.write(f"/etc/containerd/certs.d/{self.registry_host}/hosts.toml", hosts)
        self.bed.run(
            "env", "DEBIAN_FRONTEND=noninteractive", "dpkg", "--force-confold", "-i",
            f"/root/{deb.name}", timeout=300,
        )  # fmt: skip
        self.bed.systemctl("restart", "containerd.service")

    def _kubelet(self, binary: str) -> None:
        bed = self.bed
        target = bed.root / "usr/local/bin/kubelet"
        shutil.copy2(binary, target)
        target.chmod(0o755)
        pki = self.plane.pki
        client = pki.issue("node-localhost", "system:node:localhost", "system:nodes")
        inside = KeyPair(Path(f"{KUBE_DIR}/pki/node.crt"), Path(f"{KUBE_DIR}/pki/node.key"))
        ca = Path(f"{KUBE_DIR}/pki/ca.crt")
        self.write(str(inside.cert), client.cert.read_text())
        self.write(str(inside.key), client.key.read_text(), 0o600)
        self.write(str(ca), pki.ca.cert.read_text())
        self.write(
            f"{KUBE_DIR}/kubelet.conf", json.dumps(kubeconfig(self.plane.server, ca, inside))
        )
        self.write(KUBELET_CONFIG, json.dumps(kubelet_config(free_port(), free_port()), indent=1))
        for name, wanted in KUBELET_SYSCTLS.items():
            cover = f"/etc/kubelet-sysctl/{name.replace('/', '.')}"
            self.write(cover, f"{wanted}\n")
            bed.run("mount", "--bind", cover, f"/proc/sys/{name}")
        # kubelet's OOM watcher reads the kernel log; nspawn gives no /dev/kmsg (kind's
        # nodes link the console there too).
        bed.run("ln", "-sf", "/dev/console", "/dev/kmsg")
        self.write("/etc/systemd/system/kubelet.service", KUBELET_UNIT)
        bed.systemctl("daemon-reload")
        bed.systemctl("enable", "--now", "kubelet.service")

    def node(self) -> dict[str, object]:
        return json.loads(self.plane.kubectl("get", "node", "localhost", "-o", "json"))  # type: ignore[no-any-return]

    def runtime_version(self) -> str:
        return self.plane.kubectl(
            "get", "node", "localhost", "-o", "jsonpath={.status.nodeInfo.containerRuntimeVersion}",
            check=False,
        )  # fmt: skip

    def kubelet_config_text(self) -> str:
        return self.bed.read(KUBELET_CONFIG)

    def stop(self) -> None:
        """kubelet first (pods stay), then the bed powers off and is removed."""
        try:
            self.bed.systemctl("stop", "kubelet.service", check=False)
        finally:
            self.bed.stop()
