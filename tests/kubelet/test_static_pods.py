"""Static pods of a real kubelet (v1.36) on crishim, with kubelet's EventedPLEG on and off.

Runs only when ``CRISHIM_TEST_KUBELET`` names a kubelet binary (this repository does not
build one; see README "Test it"); otherwise the module is skipped and says why. Needs root
and the host tools of the pod tests (runc, conmon, CNI plugins, docker-registry,
busybox-static), plus util-linux ``unshare``.

Each test writes a static pod manifest into kubelet's ``staticPodPath`` and reads the
outcome from both sides: kubelet's pod status (``/pods`` on the read-only port; without an
API server there are no mirror pods) and crishim's CRI. Every test fails if crishim logged
a failed RunPodSandbox, CreateContainer, StartContainer or RemoveContainer meanwhile.

What kubelet needs on this (hybrid cgroup v1/v2) host, and how the suite provides it
without touching anything outside its tmp dir (details in ``tests/rig/kubelet.py``):

* cgroups: ``failCgroupV1: false`` (kubelet refuses cgroup v1 otherwise),
  ``cgroupsPerQOS: false`` and ``enforceNodeAllocatable: []`` (no kubepods hierarchy is
  made), ``cgroupDriver: cgroupfs`` like crishim's default; no cgroup has to exist first;
* ``/var/lib/kubelet`` (kubelet's device manager always uses
  ``/var/lib/kubelet/device-plugins``) and ``/var/log/containers`` need not exist: kubelet
  runs in a private mount namespace where ``/var/lib`` and ``/var/log`` are directories of
  the tmp dir, and so are ``--root-dir``, ``--cert-dir``, ``--volume-plugin-dir`` and
  ``podLogsDir``;
* kernel tunables kubelet would set (``vm.overcommit_memory``, ``kernel.panic``,
  ``kernel.panic_on_oops``) are shown to it, in that namespace only, with its values;
* no iptables chains (``makeIPTablesUtilChains: false``), no ``--kubeconfig``, swap
  allowed (``failSwapOn: false``), image GC and eviction thresholds out of reach, ports
  picked free on 127.0.0.1 (healthz off), crash-loop back-off capped at 4 s for speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from crishim.api import v1
from tests.kubelet.conftest import (
    SUBNET,
    TIMINGS,
    KubeletNode,
    conmons_naming,
    leases,
    until,
)
from tests.kubelet.manifests import (
    CRASH_EXIT_CODE,
    SHELL_GREETING,
    WEB_PORT,
    WEB_TEXT,
    crash_pod,
    shell_pod,
    web_pod,
)
from tests.rig.host import cgroups_of, mounts_under
from tests.rig.kubelet import KUBELET_ENV, kubelet_binary

if kubelet_binary() is None:
    pytest.skip(
        f"kubelet suite skipped: {KUBELET_ENV} is not set. It runs a real kubelet; "
        f"set {KUBELET_ENV}=/path/to/kubelet (v1.36) to run it.",
        allow_module_level=True,
    )

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

EXEC_PROTOCOLS = [Subprotocol("v5.channel.k8s.io"), Subprotocol("v4.channel.k8s.io")]


def statuses(pod: dict[str, Any], kind: str = "containerStatuses") -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in pod.get("status", {}).get(kind) or []}


def all_ready(pod: dict[str, Any]) -> bool:
    found = statuses(pod)
    return len(found) == len(pod["spec"]["containers"]) and all(
        s.get("ready") for s in found.values()
    )


def running(pod: dict[str, Any]) -> bool:
    found = statuses(pod)
    return bool(found) and all("running" in s.get("state", {}) for s in found.values())


async def watch_container_ids(
    node: KubeletNode, pod_name: str, container: str, seen: set[str]
) -> None:
    """Collect the id of every container of this name in the pod that crishim ever lists."""
    selector = {"io.kubernetes.pod.name": pod_name, "io.kubernetes.container.name": container}
    request = v1.ListContainersRequest(filter=v1.ContainerFilter(label_selector=selector))
    while True:
        listed = await node.cri.runtime.list_containers(request)
        seen.update(c.id for c in listed.containers)
        await asyncio.sleep(0.05)


async def test_init_container_runs_once_and_every_container_gets_ready(node: KubeletNode) -> None:
    """The EventedPLEG regression: kubelet must see the init container that ran and go on,
    not create it again and again (issue 9)."""
    init_ids: set[str] = set()
    watcher = asyncio.create_task(watch_container_ids(node, "web-crishim-kl", "init", init_ids))
    started = time.monotonic()
    node.add_pod(web_pod(node.image))
    try:
        pod, ready = await node.poll_pod("web", all_ready, timeout=60)
        ready_after = time.monotonic() - started
        await asyncio.sleep(3)  # a create loop would add more init containers by now
    finally:
        watcher.cancel()
    assert len(init_ids) == 1, (
        f"{node.gate}: the init container was created {len(init_ids)} times, not once"
        f"{node.diagnostics()}"
    )
    assert ready, f"{node.gate}: not all ready: {pod and pod['status']}"
    TIMINGS.append(f"{node.gate}: web pod all containers ready {ready_after:.1f}s after manifest")
    pod = await node.pod("web")
    assert pod is not None
    init = statuses(pod, "initContainerStatuses")["init"]
    assert init["restartCount"] == 0
    assert init["state"]["terminated"]["exitCode"] == 0
    assert init["state"]["terminated"]["reason"] == "Completed"
    assert all(s["restartCount"] == 0 for s in statuses(pod).values()), statuses(pod)
    pod_ip = pod["status"]["podIP"]
    assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(SUBNET)
    async with httpx.AsyncClient(trust_env=False) as client:
        page = await client.get(f"http://{pod_ip}:{WEB_PORT}/index.html", timeout=5)
    assert page.text.strip() == WEB_TEXT

    # crishim's side: one sandbox; init exited 0, the others running, every one attempt 0.
    uid = pod["metadata"]["uid"]
    (sandbox,) = await node.sandboxes(uid)
    assert sandbox.state == v1.PodSandboxState.SANDBOX_READY
    listed = {c.metadata.name: c for c in await node.containers(uid) if c.metadata}
    assert set(listed) == {"init", "web", "probed", "plain"}
    assert listed["init"].state == v1.ContainerState.CONTAINER_EXITED
    assert all(c.metadata and c.metadata.attempt == 0 for c in listed.values())
    reply = await node.cri.runtime.pod_sandbox_status(
        v1.PodSandboxStatusRequest(pod_sandbox_id=sandbox.id)
    )
    assert {s.id for s in reply.containers_statuses} == {c.id for c in listed.values()}
    await node.delete_pod("web")


async def test_a_crash_looping_container_restarts_with_back_off(node: KubeletNode) -> None:
    node.add_pod(crash_pod(node.image))
    backing_off, _ = await node.poll_pod(
        "crash",
        lambda p: (
            statuses(p).get("crash", {}).get("state", {}).get("waiting", {}).get("reason")
            == "CrashLoopBackOff"
        ),
        timeout=60,
    )
    pod = await node.wait_pod(
        "crash",
        lambda p: statuses(p).get("crash", {}).get("restartCount", 0) >= 3,
        "the crashing container restarted three times",
        timeout=90,
    )
    assert backing_off is not None
    waiting = statuses(backing_off)["crash"]["state"]["waiting"]
    assert waiting["reason"] == "CrashLoopBackOff", waiting
    assert "back-off" in waiting["message"], waiting
    last = statuses(pod)["crash"]["lastState"]["terminated"]
    assert last["exitCode"] == CRASH_EXIT_CODE
    assert last["reason"] == "Error"
    # crishim holds the dead attempts kubelet keeps, numbered as kubelet counts restarts.
    attempts = sorted(
        c.metadata.attempt for c in await node.containers(pod["metadata"]["uid"]) if c.metadata
    )
    assert attempts, "no container of the crashing pod left in crishim"
    assert attempts[-1] >= 2, attempts
    await node.delete_pod("crash")


async def test_run_exec_and_container_logs_through_kubelet(node: KubeletNode) -> None:
    node.add_pod(shell_pod(node.image))
    await node.wait_pod("shell", running, "the shell container running")

    # kubelet splits cmd at white space (no shell) and runs it with ExecSync.
    ran = await node.run_in("shell", "shell", "echo ran-by-kubelet")
    assert ran.status_code == 200, ran.text
    assert ran.text == "ran-by-kubelet\n"
    failed = await node.run_in("shell", "shell", "test -d /nowhere")
    assert failed.status_code == 500, failed.text
    assert "exited with 1" in failed.text

    url = node.exec_url("shell", "shell", ["sh", "-c", "echo out; echo err >&2; exit 7"])
    channels: dict[int, bytes] = {}
    async with connect(
        url, ssl=node.kubelet.tls_context(), subprotocols=EXEC_PROTOCOLS, proxy=None
    ) as ws:
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                assert isinstance(message, bytes)
                channels[message[0]] = channels.get(message[0], b"") + message[1:]
    assert channels.get(1) == b"out\n", channels
    assert channels.get(2) == b"err\n", channels
    status = json.loads(channels[3])
    assert status["reason"] == "NonZeroExitCode", status
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]

    logs = await node.container_logs("shell", "shell")
    assert logs.status_code == 200, logs.text
    assert logs.text.splitlines()[0] == SHELL_GREETING
    stamped = await node.container_logs("shell", "shell", timestamps="true", tailLines="1")
    assert re.match(r"^\d{4}-\d\d-\d\dT\S+Z \S", stamped.text), stamped.text
    await node.delete_pod("shell")


async def test_stats_summary_has_the_pod_and_its_container(node: KubeletNode) -> None:
    node.add_pod(shell_pod(node.image, "stats"))
    pod = await node.wait_pod("stats", running, "the stats pod running")
    uid = pod["metadata"]["uid"]

    async def summary_of_pod() -> dict[str, Any] | None:
        for item in (await node.stats_summary()).get("pods") or []:
            if item["podRef"]["uid"] == uid:
                return dict(item)
        return None

    found: dict[str, Any] | None = None

    async def complete() -> bool:
        nonlocal found
        found = await summary_of_pod()
        if found is None or not found.get("containers"):
            return False
        container = found["containers"][0]
        return all(
            block.get("cpu", {}).get("usageNanoCores") is not None for block in (found, container)
        )

    assert await until(complete, 45), f"{node.gate}: incomplete summary {found}"
    assert found is not None
    (container,) = found["containers"]
    assert container["name"] == "shell"
    for where, block in (("pod", found), ("container", container)):
        assert block["cpu"]["usageCoreNanoSeconds"] > 0, (where, block["cpu"])
        assert block["memory"]["workingSetBytes"] > 0, (where, block["memory"])
        assert block["memory"]["usageBytes"] > 0, (where, block["memory"])
    await node.delete_pod("stats")


async def test_deleting_the_manifest_removes_the_pod_from_crishim(node: KubeletNode) -> None:
    node.add_pod(shell_pod(node.image, "doomed"))
    pod = await node.wait_pod("doomed", running, "the doomed pod running")
    uid = pod["metadata"]["uid"]
    (sandbox,) = await node.sandboxes(uid)
    ids = {sandbox.id} | {c.id for c in await node.containers(uid)}
    started = time.monotonic()
    await node.delete_pod("doomed")

    async def gone() -> bool:
        return not await node.sandboxes(uid) and not await node.containers(uid)

    # Containers go when kubelet kills the pod; the sandbox at its next garbage collection
    # (every minute).
    assert await until(gone, 90), f"{node.gate}: pod {uid} still in crishim{node.diagnostics()}"
    TIMINGS.append(f"{node.gate}: deleted pod gone from crishim {time.monotonic() - started:.1f}s")
    state = node.crishim.state
    assert [m for m in mounts_under(state) if any(i in m for i in ids)] == []
    assert not any((state / d / i).exists() for d in ("containers", "sandboxes") for i in ids)
    assert conmons_naming(ids) == []
    assert cgroups_of(ids) == []
    assert not (set(leases(node.ipam_dir)) & {pod["status"]["podIP"]})


async def test_kubelet_kept_the_pleg_it_was_given(node: KubeletNode) -> None:
    """With the gate on, kubelet used crishim's event stream throughout: one connection, no
    errors (five would make it fall back to relisting), events received."""
    metrics = await node.metrics()

    def value(name: str) -> float:
        found = re.search(rf"^kubelet_{name} (\S+)$", metrics, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    connections = value("evented_pleg_connection_success_count")
    errors = value("evented_pleg_connection_error_count")
    events = value("evented_pleg_connection_latency_seconds_count")
    if node.evented_pleg:
        assert (connections, errors) == (1, 0), metrics
        assert events > 0
    else:
        assert (connections, events) == (0, 0)
