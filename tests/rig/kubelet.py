"""A real kubelet on a private corner of the host: standalone (static pods) or in a cluster.

:class:`KubeletProcess` writes a KubeletConfiguration for a CRI endpoint and starts the
binary the environment names (``CRISHIM_TEST_KUBELET``). Everything kubelet owns lives under
the given base directory: its root dir, certificates (it makes a self-signed serving pair),
static pod manifests, pod logs and flex-volume dir. Its ports are free ones picked at start,
bound to 127.0.0.1 (the secure port for /run, /exec, /containerLogs; the read-only port for
/pods and /stats/summary); the healthz port is off.

What kubelet would otherwise change on the host, and how it is kept private:

* kubelet runs in its own mount namespace (``unshare --mount``, private propagation), so
  the bind mount it makes of its root dir to make it rshared dies with it;
* in that namespace ``/var/lib`` and ``/var/log`` are covered by directories of the base:
  kubelet's device manager creates and empties ``/var/lib/kubelet/device-plugins/`` whatever
  ``--root-dir`` says, and it keeps symlinks to container logs in ``/var/log/containers``;
* kubelet sets kernel tunables it wants (``vm.overcommit_memory=1``, ``kernel.panic=10``,
  ``kernel.panic_on_oops=1``, ...) unless they already hold; in its namespace the ones that
  differ are covered by files holding kubelet's values, so the host keeps its own;
* ``makeIPTablesUtilChains: false``: no KUBE-FIREWALL or canary chains in the host's
  iptables; ``cgroupsPerQOS: false`` and ``enforceNodeAllocatable: []``: no kubepods
  cgroups; no ``--kubeconfig`` (unless a cluster rig gives one): no node object anywhere.

Given a ``kubeconfig`` (``tests/rig/cluster.py``), kubelet registers itself as node
``node_name`` with the API server and runs the pods scheduled to it; the API server reaches
its secure port by the node's Hostname address, so a name that resolves to 127.0.0.1
(``localhost``) keeps that traffic on loopback.

crishim runs in the host's mount namespace and never sees kubelet's mounts, so pods that
need kubelet-made mounts (memory-backed emptyDir, secrets, projected volumes) would not
work here; disk-backed emptyDir volumes are plain directories and do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

KUBELET_ENV = "CRISHIM_TEST_KUBELET"
START_TIMEOUT = 60.0
NODE_NAME = "crishim-kl"
# The kernel tunables kubelet's container manager enforces (cm/container_manager_linux.go).
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": 1,
    "vm/panic_on_oom": 0,
    "kernel/panic": 10,
    "kernel/panic_on_oops": 1,
    "kernel/keys/root_maxkeys": 1000000,
    "kernel/keys/root_maxbytes": 25000000,
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class KubeletProcess:
    """One standalone kubelet with its own directories, ports and feature gates."""

    def __init__(
        self,
        binary: str,
        base: Path,
        runtime_endpoint: str,
        feature_gates: dict[str, bool],
        *,
        kubeconfig: Path | None = None,
        node_name: str = NODE_NAME,
    ) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig
        self.node_name = node_name
        self.base = base
        self.runtime_endpoint = runtime_endpoint
        self.feature_gates = feature_gates
        self.root_dir = base / "root"
        self.manifests = base / "manifests"
        self.pod_logs = base / "pod-logs"
        self.config_file = base / "kubelet.yaml"
        self.log_file = base / "kubelet.log"
        self.port = 0
        self.read_only_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- configuration ------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The KubeletConfiguration (JSON is YAML)."""
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.port,
            "readOnlyPort": self.read_only_port,
            "healthzPort": 0,
            "staticPodPath": str(self.manifests),
            "fileCheckFrequency": "1s",
            "containerRuntimeEndpoint": self.runtime_endpoint,
            "imageServiceEndpoint": self.runtime_endpoint,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failCgroupV1": False,
            "failSwapOn": False,
            "makeIPTablesUtilChains": False,
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "podLogsDir": str(self.pod_logs),
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "crashLoopBackOff": {"maxContainerRestartPeriod": "4s"},
            "serializeImagePulls": False,
            "featureGates": self.feature_gates,
        }

    def command(self) -> list[str]:
        """kubelet's argv, run under ``unshare`` by a shell that first sets up the masks."""
        kubelet = [
            self.binary,
            f"--config={self.config_file}",
            f"--root-dir={self.root_dir}",
            f"--cert-dir={self.base / 'pki'}",
            f"--volume-plugin-dir={self.base / 'volume-plugins'}",
            f"--hostname-override={self.node_name}",
            "--v=2",
        ]
        if self.kubeconfig is not None:
            kubelet.append(f"--kubeconfig={self.kubeconfig}")
        masks = [(self.base / "host-var-lib", "/var/lib"), (self.base / "host-var-log", "/var/log")]
        for name, wanted in KUBELET_SYSCTLS.items():
            target = Path("/proc/sys") / name
            if int(target.read_text().split()[0]) != wanted:
                cover = self.base / "sysctl" / name.replace("/", ".")
                cover.parent.mkdir(parents=True, exist_ok=True)
                cover.write_text(f"{wanted}\n")
                masks.append((cover, str(target)))
        for directory, _ in masks[:2]:
            directory.mkdir(parents=True, exist_ok=True)
        script = "set -e; " + "".join(
            f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}; " for src, dst in masks
        )
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c"]
        argv += [script + 'exec "$@"', "kubelet", *kubelet]
        # The kernel SIGKILLs kubelet if the test process dies without stopping it (the
        # parent-death signal follows the thread that forked: only the main thread's).
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        return argv

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> KubeletProcess:
        """Start kubelet and wait until its read-only port answers /pods."""
        for directory in (self.root_dir, self.manifests, self.pod_logs):
            directory.mkdir(parents=True, exist_ok=True)
        self.port, self.read_only_port = free_port(), free_port()
        self.config_file.write_text(json.dumps(self.config(), indent=2))
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kubelet exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.read_only_url}/pods", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kubelet did not answer in {START_TIMEOUT}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (kubelet leaves its pods running), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def log_tail(self, chars: int = 4000) -> str:
        return "\n--- kubelet log tail ---\n" + self.log()[-chars:]

    # ---- static pods --------------------------------------------------------------------

    def add_manifest(self, name: str, pod: dict[str, Any]) -> None:
        """Write a static pod manifest (atomically: kubelet watches the directory)."""
        temporary = self.manifests / f".{name}.tmp"
        temporary.write_text(json.dumps(pod, indent=2))
        temporary.rename(self.manifests / f"{name}.json")

    def remove_manifest(self, name: str) -> None:
        (self.manifests / f"{name}.json").unlink(missing_ok=True)

    # ---- HTTP ---------------------------------------------------------------------------

    @property
    def read_only_url(self) -> str:
        return f"http://127.0.0.1:{self.read_only_port}"

    @property
    def secure_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @staticmethod
    def tls_context() -> ssl.SSLContext:
        """For kubelet's self-signed serving certificate: no verification."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def client(self) -> httpx.AsyncClient:
        """An HTTP client for both ports (no proxies from the environment)."""
        return httpx.AsyncClient(verify=self.tls_context(), timeout=30, trust_env=False)


def static_pod_name(name: str) -> str:
    """The name kubelet gives the static pod of manifest ``name``."""
    return f"{name}-{NODE_NAME}"


def kubelet_binary() -> str | None:
    """The kubelet the environment names, or None."""
    return os.environ.get(KUBELET_ENV) or None
