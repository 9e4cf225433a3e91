"""Pods through crishim's CRI socket, on runc and on crun (root): their lifecycle, network,
namespaces, restarts of crishim, events, resources and metrics (containers: see
test_containers.py).

Every test runs against one crishim per runtime (``pod_rig``, module scope) with its own
CNI network (bridge ``crishim-pt0``, 10.88.215.0/24) and the rig's busybox images. The
``rig`` fixture removes every pod after each test and fails the test if a pod, container,
conmon, lease, mount or iptables rule of it is left.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from pathlib import Path

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from crishim.api import v1
from tests.rig.checks import (
    HOST_PORT,
    SLEEP,
    TICKER,
    container_pid,
    containers_matching,
    grpc_error,
    has_lines,
    ids_matching,
    texts,
)
from tests.rig.host import iptables_rules, run
from tests.rig.pods import (
    BRIDGE,
    SUBNET,
    PodRig,
    leases,
    pod_rig_fixture,  # noqa: F401 - the module-scoped fixture ``pod_rig``
    rig_fixture,  # noqa: F401 - the per-test fixture ``rig``
)

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

# ---- pods ----------------------------------------------------------------------------------


async def test_pod_run_status_list_files_stop_remove(rig: PodRig) -> None:
    pod = await rig.run_pod(
        "web",
        port_mappings=[
            v1.PortMapping(protocol=v1.Protocol.TCP, container_port=80, host_port=HOST_PORT)
        ],
        labels={"app": "web", "tier": "front"},
    )
    status = await rig.pod_status(pod)
    assert status.state == v1.PodSandboxState.SANDBOX_READY, rig.log_tail()
    assert status.id == pod
    assert status.metadata is not None
    assert status.metadata.name == "web"
    assert status.metadata.namespace == "crishim-test"
    assert status.network is not None
    ip = status.network.ip
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(SUBNET), f"ip {ip!r}{rig.log_tail()}"
    assert ip != "10.88.215.1"  # the bridge's gateway address
    assert status.labels == {"app": "web", "tier": "front"}
    assert status.linux is not None
    assert status.linux.namespaces is not None
    assert status.linux.namespaces.options == v1.NamespaceOption(
        network=v1.NamespaceMode.POD, pid=v1.NamespaceMode.CONTAINER, ipc=v1.NamespaceMode.POD
    )
    assert leases(rig.ipam_dir) == [ip]
    dnat = [r for r in iptables_rules("nat") if f"{ip}:80" in r and str(HOST_PORT) in r]
    assert len(dnat) == 1, iptables_rules("nat")

    other = await rig.run_pod("other", labels={"app": "other"})
    other_ip = (await rig.pod_status(other)).network.ip  # type: ignore[union-attr]
    assert other_ip != ip
    assert leases(rig.ipam_dir) == sorted([ip, other_ip])
    ready = v1.PodSandboxStateValue(state=v1.PodSandboxState.SANDBOX_READY)
    notready = v1.PodSandboxStateValue(state=v1.PodSandboxState.SANDBOX_NOTREADY)
    assert await ids_matching(rig, v1.PodSandboxFilter(id=pod)) == {pod}
    assert await ids_matching(rig, v1.PodSandboxFilter(state=ready)) == {pod, other}
    assert await ids_matching(rig, v1.PodSandboxFilter(state=notready)) == set()
    assert await ids_matching(rig, v1.PodSandboxFilter(label_selector={"app": "web"})) == {pod}
    assert (
        await ids_matching(rig, v1.PodSandboxFilter(label_selector={"app": "web", "tier": "back"}))
        == set()
    )
    assert (
        await ids_matching(rig, v1.PodSandboxFilter(id=other, label_selector={"app": "web"}))
        == set()
    )

    cid = await rig.start_container(pod, "main", SLEEP)
    assert (await rig.exec_out(cid, "hostname")) == "web\n"
    assert (await rig.exec_out(cid, "cat", "/etc/hostname")) == "web\n"
    assert (await rig.exec_out(cid, "cat", "/etc/resolv.conf")) == (
        "nameserver 10.96.0.10\n"
        "search crishim-test.svc.cluster.local svc.cluster.local\n"
        "options ndots:5\n"
    )
    hosts = (await rig.exec_out(cid, "cat", "/etc/hosts")).splitlines()
    assert f"{ip}\tweb" in hosts
    assert "127.0.0.1\tlocalhost" in hosts
    addresses = await rig.exec_out(cid, "cat", "/proc/net/fib_trie")
    assert ip in addresses

    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    stopped = await rig.pod_status(pod)
    assert stopped.state == v1.PodSandboxState.SANDBOX_NOTREADY, rig.log_tail()
    assert stopped.network is not None
    assert stopped.network.ip == ""
    assert leases(rig.ipam_dir) == [other_ip], "the stopped pod's address was not released"
    assert [r for r in iptables_rules("nat") if str(HOST_PORT) in r] == []
    container = await rig.status(cid)
    assert container.state == v1.ContainerState.CONTAINER_EXITED
    assert await ids_matching(rig, v1.PodSandboxFilter(state=notready)) == {pod}
    assert await ids_matching(rig, v1.PodSandboxFilter(state=ready)) == {other}

    await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))
    await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))
    assert await ids_matching(rig, v1.PodSandboxFilter(id=pod)) == set()
    assert await containers_matching(rig, v1.ContainerFilter(pod_sandbox_id=pod)) == set()
    missing = await grpc_error(
        rig, rig.runtime.pod_sandbox_status(v1.PodSandboxStatusRequest(pod_sandbox_id=pod))
    )
    assert missing.status is Status.NOT_FOUND
    assert pod in (missing.message or "")

    absent = "0" * 64
    await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=absent))
    await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=absent))
    missing = await grpc_error(
        rig, rig.runtime.pod_sandbox_status(v1.PodSandboxStatusRequest(pod_sandbox_id=absent))
    )
    assert missing.status is Status.NOT_FOUND


async def test_run_pod_without_metadata_is_invalid(rig: PodRig) -> None:
    error = await grpc_error(
        rig,
        rig.runtime.run_pod_sandbox(
            v1.RunPodSandboxRequest(config=v1.PodSandboxConfig(hostname="nometa"))
        ),
    )
    assert error.status is Status.INVALID_ARGUMENT
    assert "metadata" in (error.message or "")


async def test_host_network_pod(rig: PodRig) -> None:
    before = leases(rig.ipam_dir)
    # kubelet sends no hostname for host-network pods.
    pod = await rig.run_pod("hostnet", network=v1.NamespaceMode.NODE, hostname="")
    status = await rig.pod_status(pod)
    assert status.state == v1.PodSandboxState.SANDBOX_READY
    assert status.network is not None
    assert status.network.ip == ""
    assert status.network.additional_ips == []
    assert status.linux.namespaces.options.network == v1.NamespaceMode.NODE  # type: ignore[union-attr]
    assert leases(rig.ipam_dir) == before
    cid = await rig.start_container(pod, "main", SLEEP)
    assert (await rig.exec_out(cid, "hostname")) == os.uname().nodename + "\n"
    # The node's interfaces, the rig's bridge among them.
    assert BRIDGE in await rig.exec_out(cid, "cat", "/proc/net/dev")
    assert (await rig.exec_out(cid, "cat", "/etc/hosts")) == Path("/etc/hosts").read_text()


async def test_shared_pid_namespace(rig: PodRig) -> None:
    pod = await rig.run_pod("shared", pid=v1.NamespaceMode.POD)
    status = await rig.pod_status(pod)
    assert status.linux.namespaces.options.pid == v1.NamespaceMode.POD  # type: ignore[union-attr]
    first = await rig.start_container(pod, "first", ["sleep", "3001"])
    second = await rig.start_container(pod, "second", ["sleep", "3002"])

    async def sees_both(cid: str) -> bool:
        seen = await rig.exec_out(cid, "ps", "-o", "pid,args")
        return "sleep 3001" in seen and "sleep 3002" in seen

    # StartContainer returns once runc released the init, which execs the command a moment
    # later: until then ps shows it as "runc init".
    await rig.until(lambda: sees_both(first), "both sleeps in the first container's ps")
    await rig.until(lambda: sees_both(second), "both sleeps in the second container's ps")
    init = await rig.exec_out(first, "cat", "/proc/1/cmdline")
    assert "catatonit" in init, f"pid 1 is {init!r}"
    assert (await rig.exec_out(second, "cat", "/proc/1/cmdline")) == init

    # A pod without a shared PID namespace: each container is its own pid 1.
    alone = await rig.run_pod("unshared")
    lone = await rig.start_container(alone, "lone", ["sleep", "3003"])
    assert (await rig.exec_out(lone, "cat", "/proc/1/cmdline")) == "sleep\x003003\x00"
    assert "sleep 3001" not in await rig.exec_out(lone, "ps", "-o", "pid,args")


# ---- restarts ------------------------------------------------------------------------------


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_container_survives_a_crishim_restart(rig: PodRig, kill: bool) -> None:
    pod = await rig.run_pod("survivor")
    cid = await rig.start_container(pod, "ticker", TICKER)
    log_path = Path((await rig.status(cid)).log_path)
    await rig.until(lambda: has_lines(log_path, 2), "ticks")
    pid = await container_pid(rig, cid)
    await rig.restart(kill=kill)
    before = len(texts(log_path))
    status = await rig.status(cid)
    assert status.state == v1.ContainerState.CONTAINER_RUNNING, rig.log_tail()
    assert await container_pid(rig, cid) == pid
    assert (await rig.pod_status(pod)).state == v1.PodSandboxState.SANDBOX_READY
    await rig.until(lambda: has_lines(log_path, before + 3), "more ticks after the restart")
    assert (await rig.exec_out(cid, "echo", "alive")) == "alive\n"
    await rig.runtime.stop_container(v1.StopContainerRequest(container_id=cid, timeout=1))
    status = await rig.status(cid)
    assert (status.state, status.exit_code) == (v1.ContainerState.CONTAINER_EXITED, 137)
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=cid))
    assert await containers_matching(rig, v1.ContainerFilter(pod_sandbox_id=pod)) == set()


async def test_exit_while_crishim_is_down(rig: PodRig) -> None:
    pod = await rig.run_pod("downtime")
    early = await rig.start_container(pod, "early", ["sh", "-c", "sleep 2; exit 7"])
    late = await rig.start_container(pod, "late", ["sh", "-c", "sleep 5; exit 5"])
    await rig.restart(down_seconds=3)
    status = await rig.status(early)
    assert status.state == v1.ContainerState.CONTAINER_EXITED, rig.log_tail()
    assert (status.exit_code, status.reason) == (7, "Error")
    assert status.started_at <= status.finished_at
    # Exits after the restart are noticed too.
    status = await rig.wait_state(late, v1.ContainerState.CONTAINER_EXITED, timeout=5)
    assert (status.exit_code, status.reason) == (5, "Error")


async def test_runtime_handler_chooses_the_runtime(rig: PodRig) -> None:
    other = "crun" if rig.runtime_name == "runc" else "runc"
    config = rig.sandbox_config("handler")
    reply = await rig.runtime.run_pod_sandbox(
        v1.RunPodSandboxRequest(config=config, runtime_handler=other)
    )
    rig.created.add(reply.pod_sandbox_id)
    assert (await rig.pod_status(reply.pod_sandbox_id)).runtime_handler == other
    cid = await rig.start_container(reply.pod_sandbox_id, "on-other", ["sleep", "100"])
    listed = run(other, "--root", str(rig.proc.state / "runtimes" / other), "list")
    assert cid in listed, f"{cid} not in {other}'s list:\n{listed}{rig.log_tail()}"
    error = await grpc_error(
        rig,
        rig.runtime.run_pod_sandbox(
            v1.RunPodSandboxRequest(config=rig.sandbox_config("nohandler"), runtime_handler="kata")
        ),
    )
    assert error.status is Status.INVALID_ARGUMENT
    assert "runtime handler 'kata' is not configured" in (error.message or "")


async def _logged_within(rig: PodRig, offset: int, text: str, seconds: float) -> bool:
    give_up = time.monotonic() + seconds
    while text not in rig.proc.log()[offset:]:
        if time.monotonic() > give_up:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_a_create_that_outlives_the_deadline_is_handed_to_the_retry(rig: PodRig) -> None:
    pod_id = await rig.run_pod("retry")
    pod = await rig.pod_status(pod_id)
    assert pod.linux is not None
    assert pod.linux.namespaces is not None
    config = rig.container_config("slowpoke", ["sleep", "100"], pod.linux.namespaces.options)
    request = v1.CreateContainerRequest(pod_sandbox_id=pod_id, config=config)
    # Deadlines far below what a create takes (about 15-40 ms), so the deadline passes
    # mid-create. On a loaded machine the shortest may expire in the client before the
    # request leaves it; crishim then never sees the call, and a longer one is tried.
    for timeout in (0.001, 0.002, 0.004, 0.008):
        offset = len(rig.proc.log())
        with pytest.raises((GRPCError, asyncio.TimeoutError)):
            await rig.runtime.create_container(request, timeout=timeout)
        if await _logged_within(rig, offset, "CreateContainer failed: CANCELLED", 1.0):
            break
    else:
        pytest.fail("crishim never saw a create whose deadline passed" + rig.log_tail())
    await asyncio.sleep(3)  # the create goes on after its caller gave up
    retried = await rig.runtime.create_container(request)
    rig.created.add(retried.container_id)
    listed = await rig.runtime.list_containers(
        v1.ListContainersRequest(filter=v1.ContainerFilter(pod_sandbox_id=pod_id))
    )
    assert [c.id for c in listed.containers] == [retried.container_id], rig.log_tail()
    again = await grpc_error(rig, rig.runtime.create_container(request))
    assert again.status is Status.ALREADY_EXISTS


async def test_container_events_follow_the_lifecycle_in_order(rig: PodRig) -> None:
    events: list[v1.ContainerEventResponse] = []

    async def listen() -> None:
        async for event in rig.runtime.get_container_events(v1.GetEventsRequest()):
            events.append(event)

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.2)
    try:
        pod_id = await rig.run_pod("events")
        cid = await rig.start_container(pod_id, "short", ["sh", "-c", "exit 0"])
        await rig.wait_state(cid, v1.ContainerState.CONTAINER_EXITED)
        await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=cid))
        await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

        async def eight() -> bool:
            return len(events) >= 8

        await rig.until(eight, "eight events")
    finally:
        listener.cancel()
    kinds = v1.ContainerEventType
    seen = [(e.container_id, e.container_event_type) for e in events]
    assert [k for c, k in seen if c == cid] == [
        kinds.CONTAINER_CREATED_EVENT,
        kinds.CONTAINER_STARTED_EVENT,
        kinds.CONTAINER_STOPPED_EVENT,
        kinds.CONTAINER_DELETED_EVENT,
    ], rig.log_tail()
    assert [k for c, k in seen if c == pod_id] == [
        kinds.CONTAINER_CREATED_EVENT,
        kinds.CONTAINER_STARTED_EVENT,
        kinds.CONTAINER_STOPPED_EVENT,
        kinds.CONTAINER_DELETED_EVENT,
    ], rig.log_tail()
    started = next(
        e
        for e in events
        if e.container_id == cid and e.container_event_type is kinds.CONTAINER_STARTED_EVENT
    )
    assert started.pod_sandbox_status is not None
    assert started.pod_sandbox_status.id == pod_id
    assert [s.id for s in started.containers_statuses] == [cid]
    # Each event shows the pod as it was when it happened; the pod's removal still carries
    # the pod's status (kubelet drops the pod from its cache on that, and only with it).
    assert started.containers_statuses[0].state is v1.ContainerState.CONTAINER_RUNNING
    deleted = [e for e in events if e.container_event_type is kinds.CONTAINER_DELETED_EVENT]
    assert [e.pod_sandbox_status.id for e in deleted if e.pod_sandbox_status] == [pod_id, pod_id]


async def test_pod_resources_reach_the_pod_cgroup(rig: PodRig) -> None:
    parent = f"/crishim-test-pod-{rig.runtime_name}"
    cpu_dir = Path("/sys/fs/cgroup/cpu") / parent.strip("/")
    if not Path("/sys/fs/cgroup/cpu/cpu.shares").exists():
        pytest.skip("no cgroup v1 cpu controller at /sys/fs/cgroup/cpu on this host")
    cpu_dir.mkdir(exist_ok=True)
    try:
        config = rig.sandbox_config("podres")
        assert config.linux is not None
        config.linux.cgroup_parent = parent
        reply = await rig.runtime.run_pod_sandbox(v1.RunPodSandboxRequest(config=config))
        rig.created.add(reply.pod_sandbox_id)
        await rig.runtime.update_pod_sandbox_resources(
            v1.UpdatePodSandboxResourcesRequest(
                pod_sandbox_id=reply.pod_sandbox_id,
                resources=v1.LinuxContainerResources(cpu_shares=512),
            )
        )
        assert (cpu_dir / "cpu.shares").read_text().strip() == "512"
        await rig.runtime.remove_pod_sandbox(
            v1.RemovePodSandboxRequest(pod_sandbox_id=reply.pod_sandbox_id)
        )
    finally:
        for child in sorted(cpu_dir.glob("**/"), reverse=True):
            child.rmdir()


async def test_pod_metrics_and_container_filesystem(rig: PodRig) -> None:
    pod = await rig.run_pod("metrics")
    await rig.start_container(pod, "app", ["sh", "-c", "echo data > /written; sleep 300"])
    await asyncio.sleep(0.5)
    descriptors = await rig.runtime.list_metric_descriptors(v1.ListMetricDescriptorsRequest())
    names = {d.name for d in descriptors.descriptors}
    assert "container_cpu_usage_seconds_total" in names
    assert "container_memory_working_set_bytes" in names
    metrics = await rig.runtime.list_pod_sandbox_metrics(v1.ListPodSandboxMetricsRequest())
    (mine,) = [m for m in metrics.pod_metrics if m.pod_sandbox_id == pod]
    assert len(mine.container_metrics) == 1
    assert {m.name for m in mine.container_metrics[0].metrics} <= names
    fs = await rig.images.image_fs_info(v1.ImageFsInfoRequest())
    (writable,) = fs.container_filesystems
    assert writable.used_bytes is not None
    assert writable.used_bytes.value > 0
