"""The ``node`` fixture of the kubelet suite: crishim, its CNI network and a real kubelet.

One node per EventedPLEG setting (module scope, parametrised): crishim on runc with its
own bridge ``crishim-kl0`` on 10.88.217.0/24 (host-local leases in the tmp dir, then
loopback; no port mappings, so no iptables rules), the rig's busybox image pulled, and a
standalone kubelet (``tests/rig/kubelet.py``) whose static pods run on it. Teardown stops
kubelet, removes every pod through the CRI and fails if a conmon, mount, lease, cgroup or the
bridge is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from grpclib.client import Channel

from crishim.api import v1
from tests.kubelet.manifests import NAMESPACE
from tests.rig.cni import bridge_conflist
from tests.rig.crishim_fixtures import CriClient
from tests.rig.crishim_proc import CrishimProcess
from tests.rig.fixtures import PushedImage, require_busybox
from tests.rig.host import cgroups_of, conmons_of, mounts_under, run
from tests.rig.kubelet import KUBELET_ENV, KubeletProcess, kubelet_binary, static_pod_name

CNI_BIN = "/usr/lib/cni"
BRIDGE = "crishim-kl0"
BRIDGE_MAC = "02:00:0a:58:d9:01"
SUBNET = "10.88.217.0/24"
SUBNET_PREFIX = "10.88.217."
NETWORK = "crishim-kl0-net"
POD_UID_LABEL = "io.kubernetes.pod.uid"
# name: kubelet's feature gate EventedPLEG on / off
GATES = {"EventedPLEG=true": True, "EventedPLEG=false": False}
#: timings the tests measured, printed at the end of the run
TIMINGS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS:
        terminalreporter.section("kubelet suite timings")
        for line in TIMINGS:
            terminalreporter.write_line(line)


@dataclass
class KubeletNode:
    """crishim and kubelet on one EventedPLEG setting, with helpers to look at both."""

    evented_pleg: bool
    kubelet: KubeletProcess
    crishim: CrishimProcess
    cri: CriClient
    http: httpx.AsyncClient
    image: str
    ipam_dir: Path
    manifests: set[str] = field(default_factory=set)

    @property
    def gate(self) -> str:
        return f"EventedPLEG={'true' if self.evented_pleg else 'false'}"

    def diagnostics(self) -> str:
        """Log tails of both, for assertion messages."""
        return self.kubelet.log_tail() + "\n--- crishim log tail ---\n" + self.crishim.log()[-3000:]

    # -- static pods --

    def add_pod(self, manifest: dict[str, Any]) -> None:
        name = manifest["metadata"]["name"]
        self.manifests.add(name)
        self.kubelet.add_manifest(name, manifest)

    async def pods(self) -> list[dict[str, Any]]:
        """kubelet's pods (read-only port /pods), static pods with their status."""
        reply = await self.http.get(f"{self.kubelet.read_only_url}/pods")
        reply.raise_for_status()
        items: list[dict[str, Any]] = reply.json()["items"] or []
        return items

    async def pod(self, name: str) -> dict[str, Any] | None:
        wanted = static_pod_name(name)
        return next((p for p in await self.pods() if p["metadata"]["name"] == wanted), None)

    async def poll_pod(
        self, name: str, check: Callable[[dict[str, Any]], bool], timeout: float
    ) -> tuple[dict[str, Any] | None, bool]:
        """Poll /pods until ``check`` holds for the pod: (last seen pod, whether it held)."""
        deadline = time.monotonic() + timeout
        while True:
            pod = await self.pod(name)
            if pod is not None and check(pod):
                return pod, True
            if time.monotonic() > deadline:
                return pod, False
            await asyncio.sleep(0.2)

    async def wait_pod(
        self, name: str, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60
    ) -> dict[str, Any]:
        pod, held = await self.poll_pod(name, check, timeout)
        if not held or pod is None:
            status = json.dumps(pod["status"] if pod else None, indent=1)[:3000]
            pytest.fail(f"{self.gate}: {what}: not after {timeout}s; status:\n{status}")
        return pod

    async def delete_pod(self, name: str, timeout: float = 30) -> None:
        """Remove the manifest and wait until kubelet forgets the pod."""
        self.kubelet.remove_manifest(name)
        self.manifests.discard(name)
        deadline = time.monotonic() + timeout
        while await self.pod(name) is not None:
            if time.monotonic() > deadline:
                pytest.fail(f"{self.gate}: pod {name} still in /pods {timeout}s after removal")
            await asyncio.sleep(0.2)

    # -- crishim's view --

    async def sandboxes(self, uid: str) -> list[v1.PodSandbox]:
        selector = {POD_UID_LABEL: uid}
        request = v1.ListPodSandboxRequest(filter=v1.PodSandboxFilter(label_selector=selector))
        return list((await self.cri.runtime.list_pod_sandbox(request)).items)

    async def containers(self, uid: str, name: str = "") -> list[v1.Container]:
        selector = {POD_UID_LABEL: uid}
        if name:
            selector["io.kubernetes.container.name"] = name
        request = v1.ListContainersRequest(filter=v1.ContainerFilter(label_selector=selector))
        return list((await self.cri.runtime.list_containers(request)).containers)

    # -- kubelet's secure port --

    def _path(self, kind: str, pod: str, container: str) -> str:
        return f"{self.kubelet.secure_url}/{kind}/{NAMESPACE}/{static_pod_name(pod)}/{container}"

    async def run_in(self, pod: str, container: str, cmd: str) -> httpx.Response:
        """POST /run/<ns>/<pod>/<container>?cmd=... (kubelet runs it with ExecSync)."""
        return await self.http.post(self._path("run", pod, container), params={"cmd": cmd})

    async def container_logs(self, pod: str, container: str, **params: str) -> httpx.Response:
        return await self.http.get(self._path("containerLogs", pod, container), params=params)

    def exec_url(self, pod: str, container: str, cmd: list[str]) -> str:
        pairs: list[tuple[str, str | int | float | bool | None]] = [("command", c) for c in cmd]
        query = httpx.QueryParams([*pairs, ("output", "1"), ("error", "1")])
        return self._path("exec", pod, container).replace("https://", "wss://") + f"?{query}"

    async def stats_summary(self) -> dict[str, Any]:
        reply = await self.http.get(f"{self.kubelet.read_only_url}/stats/summary")
        reply.raise_for_status()
        summary: dict[str, Any] = reply.json()
        return summary

    async def metrics(self) -> str:
        reply = await self.http.get(f"{self.kubelet.read_only_url}/metrics")
        reply.raise_for_status()
        return reply.text


# Calls kubelet makes that must not fail when crishim keeps kubelet's view right (a failed
# create is how a stale view shows: kubelet creating an attempt that already exists).
MUST_NOT_FAIL = ("RunPodSandbox", "CreateContainer", "StartContainer", "RemoveContainer")


@pytest.fixture(autouse=True)
def no_failed_calls(node: KubeletNode) -> Iterator[None]:
    """Fails a test during which crishim logged a failed call of MUST_NOT_FAIL."""
    offset = len(node.crishim.log())
    yield
    failed = [
        line
        for line in node.crishim.log()[offset:].splitlines()
        if any(f"crishim.rpc: {name} failed:" in line for name in MUST_NOT_FAIL)
    ]
    assert failed == [], f"{node.gate}: crishim logged failed calls:\n" + "\n".join(failed)


# ---- host checks ---------------------------------------------------------------------------


def leases(ipam_dir: Path) -> list[str]:
    directory = ipam_dir / NETWORK
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(SUBNET_PREFIX))


def conmons_naming(ids: set[str]) -> list[int]:
    """Pids of conmon processes whose command line names one of these ids (or paths)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes()
            if argv.split(b"\0")[0].endswith(b"conmon") and any(i.encode() in argv for i in ids):
                found.append(int(entry.name))
    return found


def subnet_rules() -> list[str]:
    return [
        f"{table}: {rule}"
        for table in ("nat", "filter")
        for rule in run("iptables", "-t", table, "-S").splitlines()
        if SUBNET_PREFIX in rule
    ]


def write_conflist(proc: CrishimProcess, ipam_dir: Path) -> None:
    proc.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    conflist = bridge_conflist(NETWORK, BRIDGE, SUBNET, ipam_dir)
    (proc.cni_conf_dir / "10-crishim-kubelet.conflist").write_text(conflist)


def require_host() -> str:
    """The kubelet binary; skips with the reason when this host cannot run the suite."""
    binary = kubelet_binary()
    if binary is None:
        pytest.skip(f"{KUBELET_ENV} is not set: no kubelet binary to run")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{KUBELET_ENV}={binary} is not an executable file")
    if os.geteuid() != 0:
        pytest.skip("kubelet and pods need root")
    for tool in ("conmon", "runc", "unshare", "iptables"):
        if not any(os.access(f"{d}/{tool}", os.X_OK) for d in os.get_exec_path()):
            pytest.skip(f"{tool} not found on PATH")
    if not os.access(f"{CNI_BIN}/bridge", os.X_OK):
        pytest.skip("CNI plugins missing: install the Debian package containernetworking-plugins")
    require_busybox()
    if run("ip", "route", "show", SUBNET).strip() or run("ip", "link", "show", BRIDGE, check=False):
        pytest.skip(f"{SUBNET} or bridge {BRIDGE} is already in use on this host")
    return binary


def force_cleanup(proc: CrishimProcess) -> None:
    """After a failed teardown: kill this instance's conmons, delete its runc containers."""
    for pid in conmons_of(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    runtime_root = proc.state / "runtimes" / "runc"
    if runtime_root.is_dir():
        for entry in runtime_root.iterdir():
            run("runc", "--root", str(runtime_root), "delete", "--force", entry.name, check=False)


async def record_ids(cri: CriClient, ids: set[str]) -> None:
    async for event in cri.runtime.get_container_events(v1.GetEventsRequest()):
        ids.add(event.container_id)


async def remove_all_pods(cri: CriClient) -> None:
    listed = await cri.runtime.list_pod_sandbox(v1.ListPodSandboxRequest())
    for item in listed.items:
        await cri.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=item.id))


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


@pytest_asyncio.fixture(
    name="node", scope="module", loop_scope="module", params=list(GATES), ids=list(GATES)
)
async def node_fixture(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    busybox_pushed: PushedImage,
) -> AsyncIterator[KubeletNode]:
    """crishim with its network and a standalone kubelet on it, EventedPLEG on or off."""
    binary = require_host()
    evented = GATES[request.param]
    base = tmp_path_factory.mktemp("kubelet-evented" if evented else "kubelet-generic")
    proc = CrishimProcess(
        base / "crishim", config=f'default_runtime = "runc"\n\n[cni]\nbin_dirs = ["{CNI_BIN}"]\n'
    )
    kubelet = KubeletProcess(binary, base / "kubelet", proc.endpoint, {"EventedPLEG": evented})
    channel: Channel | None = None
    cri: CriClient | None = None
    http = kubelet.client()
    ids: set[str] = set()  # every pod and container crishim makes, from its events
    recorder: asyncio.Task[None] | None = None
    try:
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "link", "set", BRIDGE, "address", BRIDGE_MAC)
        run("ip", "link", "set", BRIDGE, "up")
        write_conflist(proc, base / "ipam")
        await asyncio.to_thread(proc.start)
        channel = Channel(path=str(proc.socket))
        cri = CriClient(channel, v1.RuntimeServiceStub(channel), v1.ImageServiceStub(channel))
        image = v1.ImageSpec(image=busybox_pushed.ref)
        await cri.images.pull_image(v1.PullImageRequest(image=image))
        recorder = asyncio.create_task(record_ids(cri, ids))
        kubelet.start()  # in the main thread: kubelet dies with the test process
        yield KubeletNode(evented, kubelet, proc, cri, http, busybox_pushed.ref, base / "ipam")
    finally:
        kubelet.stop()
        if recorder is not None:
            recorder.cancel()
        await http.aclose()
        if cri is not None and proc.proc is not None and proc.proc.poll() is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(remove_all_pods(cri), 60)
        left = [f"conmon pid {pid}" for pid in conmons_of(proc)]
        left += [f"lease {ip}" for ip in leases(base / "ipam")]
        left += [
            f"mount {m}"
            for m in mounts_under(proc.state)
            if m != str(proc.state / "ns")  # crishim's own private mount for the pins
        ]
        if channel is not None:
            channel.close()
        proc.kill()
        force_cleanup(proc)
        run("ip", "link", "del", BRIDGE, check=False)
        for point in mounts_under(base):
            run("umount", "-l", point, check=False)
    left += [f"cgroup {c}" for c in cgroups_of(ids)]
    assert left == [], f"left behind after removing every pod: {left}"
    assert subnet_rules() == [], subnet_rules()
    assert mounts_under(base) == [], mounts_under(base)
