"""Pod and container lifecycle through crishim's CRI socket, on runc and on crun (root).

Every test runs against one crishim per runtime (``pod_rig``, module scope) with its own
CNI network (bridge ``crishim-pt0``, 10.88.215.0/24) and the rig's busybox images. The
``rig`` fixture removes every pod after each test and fails the test if a pod, container,
conmon, lease, mount or iptables rule of it is left.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import re
import time
from collections.abc import Awaitable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from crishim.api import v1
from tests.rig.host import iptables_rules, run
from tests.rig.pods import (
    BRIDGE,
    CONFIGURED_WORKDIR,
    SUBNET,
    PodRig,
    leases,
    pod_rig_fixture,  # noqa: F401 - the module-scoped fixture ``pod_rig``
    rig_fixture,  # noqa: F401 - the per-test fixture ``rig``
)

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

HOST_PORT = 38215
# A CRI log line: RFC3339Nano time, stream, P(artial) or F(ull), the text.
LOG_LINE = re.compile(r"^(\S+) (stdout|stderr) (P|F) (.*)$")
SLEEP = ["sleep", "1000"]
TICKER = ["sh", "-c", "i=0; while :; do echo tick$i; i=$((i+1)); sleep 0.2; done"]
UNLIMITED_V1 = 9223372036854771712


def container_linux(**security: Any) -> v1.LinuxContainerConfig:
    """A container's linux config as kubelet sends it, with security context fields (the
    rig fills in the pod's namespace options)."""
    return v1.LinuxContainerConfig(
        resources=v1.LinuxContainerResources(cpu_shares=2, oom_score_adj=1000),
        security_context=v1.LinuxContainerSecurityContext(**security),
    )


async def grpc_error(rig: PodRig, call: Awaitable[object]) -> GRPCError:
    """The GRPCError a pending call raises (fails if it succeeds)."""
    try:
        result = await call
    except GRPCError as exc:
        return exc
    pytest.fail(f"expected a gRPC error, got {result!r}{rig.log_tail()}")


def log_lines(path: Path) -> list[tuple[str, str, str, str]]:
    """The CRI log file's lines as (time, stream, tag, text)."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        match = LOG_LINE.match(line)
        assert match, f"not a CRI log line: {line!r}"
        found.append((match[1], match[2], match[3], match[4]))
    return found


def texts(path: Path) -> list[str]:
    return [text for _, _, _, text in log_lines(path)]


async def _has(path: Path, text: str) -> bool:
    return text in texts(path)


async def _count(path: Path, n: int) -> bool:
    return len(texts(path)) >= n


async def ids_matching(rig: PodRig, flt: v1.PodSandboxFilter) -> set[str]:
    reply = await rig.runtime.list_pod_sandbox(v1.ListPodSandboxRequest(filter=flt))
    return {item.id for item in reply.items}


async def containers_matching(rig: PodRig, flt: v1.ContainerFilter) -> set[str]:
    reply = await rig.runtime.list_containers(v1.ListContainersRequest(filter=flt))
    return {item.id for item in reply.containers}


def host_cgroup_file(pid: int, controller: str, name: str) -> Path:
    """A cgroup v1 file of the process ``pid`` as the host sees it."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/") / name
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


async def container_pid(rig: PodRig, cid: str) -> int:
    reply = await rig.runtime.container_status(
        v1.ContainerStatusRequest(container_id=cid, verbose=True)
    )
    pid = json.loads(reply.info["info"])["pid"]
    assert isinstance(pid, int)
    assert pid > 0
    return pid


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


# ---- containers ----------------------------------------------------------------------------


async def test_container_create_start_logs_status_list(rig: PodRig, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "greeting").write_text("hi from the host\n")
    pod = await rig.run_pod("logs")
    command = ["sh", "-c", "echo hello; echo oops >&2; cat /data/greeting; sleep 1000"]
    cid = await rig.create_container(
        pod,
        "main",
        command,
        labels={"io.kubernetes.container.name": "main", "role": "logger"},
        annotations={"note": "kept"},
        mounts=[v1.Mount(container_path="/data", host_path=str(data), readonly=True)],
    )
    created = await rig.status(cid)
    assert created.state == v1.ContainerState.CONTAINER_CREATED, rig.log_tail()
    assert created.created_at > 0
    assert created.started_at == 0
    assert created.finished_at == 0
    created_state = v1.ContainerStateValue(state=v1.ContainerState.CONTAINER_CREATED)
    running_state = v1.ContainerStateValue(state=v1.ContainerState.CONTAINER_RUNNING)
    assert await containers_matching(rig, v1.ContainerFilter(state=created_state)) == {cid}

    await rig.runtime.start_container(v1.StartContainerRequest(container_id=cid))
    status = await rig.status(cid)
    assert status.state == v1.ContainerState.CONTAINER_RUNNING, rig.log_tail()
    assert status.metadata == v1.ContainerMetadata(name="main", attempt=0)
    assert status.image is not None
    assert status.image.image == rig.image_id
    assert status.image.user_specified_image == rig.image
    assert status.image_ref == rig.image_digest_ref
    assert status.image_id == rig.image_id
    assert status.labels == {"io.kubernetes.container.name": "main", "role": "logger"}
    assert status.annotations == {"note": "kept"}
    assert status.mounts == [v1.Mount(container_path="/data", host_path=str(data), readonly=True)]
    pod_status = await rig.pod_status(pod)
    assert pod_status.metadata is not None
    log_dir = rig.log_dir / f"crishim-test_logs_{pod_status.metadata.uid}"
    log_path = log_dir / "main" / "0.log"
    assert status.log_path == str(log_path)
    assert 0 < status.created_at <= status.started_at <= time.time_ns()
    assert status.finished_at == 0
    assert status.exit_code == 0

    await rig.until(lambda: _has(log_path, "hi from the host"), "the container's output")
    lines = log_lines(log_path)
    stdout = [(tag, text) for _, stream, tag, text in lines if stream == "stdout"]
    stderr = [(tag, text) for _, stream, tag, text in lines if stream == "stderr"]
    assert stdout == [("F", "hello"), ("F", "hi from the host")], lines
    assert stderr == [("F", "oops")], lines
    for stamp, _, _, _ in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{1,9}(Z|[+-]\d\d:\d\d)", stamp)
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        assert abs(when - time.time()) < 60, stamp
    assert (await rig.exec(cid, "touch", "/data/x")).exit_code != 0  # mounted read-only

    # ListContainers filters.
    other = await rig.start_container(pod, "other", SLEEP, labels={"role": "other"})
    other_pod = await rig.run_pod("logs-other")
    elsewhere = await rig.create_container(other_pod, "elsewhere", SLEEP)
    assert await containers_matching(rig, v1.ContainerFilter(id=cid)) == {cid}
    assert await containers_matching(rig, v1.ContainerFilter(pod_sandbox_id=pod)) == {cid, other}
    assert await containers_matching(rig, v1.ContainerFilter(pod_sandbox_id=other_pod)) == {
        elsewhere
    }
    assert await containers_matching(rig, v1.ContainerFilter(state=running_state)) == {
        cid,
        other,
    }
    assert await containers_matching(rig, v1.ContainerFilter(state=created_state)) == {elsewhere}
    assert await containers_matching(
        rig, v1.ContainerFilter(label_selector={"role": "logger"})
    ) == {cid}
    assert (
        await containers_matching(
            rig, v1.ContainerFilter(pod_sandbox_id=other_pod, label_selector={"role": "logger"})
        )
        == set()
    )
    listed = await rig.runtime.list_containers(
        v1.ListContainersRequest(filter=v1.ContainerFilter(id=cid))
    )
    (item,) = listed.containers
    assert item.pod_sandbox_id == pod
    assert item.state == v1.ContainerState.CONTAINER_RUNNING
    assert item.image_ref == rig.image_digest_ref
    assert item.labels == {"io.kubernetes.container.name": "main", "role": "logger"}


async def test_exec_sync_output_exit_code_and_timeout(rig: PodRig) -> None:
    pod = await rig.run_pod("exec")
    cid = await rig.start_container(pod, "main", SLEEP)
    reply = await rig.exec(cid, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"out\n", b"err\n", 3)
    reply = await rig.exec(cid, "true")
    assert (reply.stdout, reply.stderr, reply.exit_code) == (b"", b"", 0)

    started = time.monotonic()
    error = await grpc_error(rig, rig.exec(cid, "sleep", "99", timeout=1))
    elapsed = time.monotonic() - started
    assert error.status is Status.DEADLINE_EXCEEDED, rig.log_tail()
    assert elapsed < 4, f"ExecSync with timeout 1 took {elapsed:.1f}s"
    processes = await rig.exec_out(cid, "ps", "-o", "args")
    assert "sleep 99" not in processes.splitlines(), f"the timed-out exec still runs:\n{processes}"

    missing = await grpc_error(rig, rig.exec("0" * 64, "true"))
    assert missing.status is Status.NOT_FOUND


async def test_stop_after_timeout_kills(rig: PodRig) -> None:
    pod = await rig.run_pod("stop")
    trapping = ["sh", "-c", "trap 'echo got-term' TERM; echo trapping; while :; do sleep 0.1; done"]
    cid = await rig.start_container(pod, "main", trapping)
    # A SIGTERM that came before the shell set its trap would be ignored (it is pid 1).
    log_path = Path((await rig.status(cid)).log_path)
    await rig.until(lambda: _count(log_path, 1), "the trap to be set")
    started = time.monotonic()
    await rig.runtime.stop_container(v1.StopContainerRequest(container_id=cid, timeout=2))
    elapsed = time.monotonic() - started
    assert 1.8 <= elapsed < 5, f"StopContainer with timeout 2 took {elapsed:.1f}s"
    status = await rig.status(cid)
    assert status.state == v1.ContainerState.CONTAINER_EXITED, rig.log_tail()
    assert status.exit_code == 137
    assert status.reason == "Error"
    assert 0 < status.started_at <= status.finished_at
    assert "got-term" in texts(Path(status.log_path)), "SIGTERM was not sent first"

    started = time.monotonic()
    await rig.runtime.stop_container(v1.StopContainerRequest(container_id=cid, timeout=2))
    assert time.monotonic() - started < 1, "stopping a stopped container waited"
    assert (await rig.status(cid)).exit_code == 137
    await rig.runtime.stop_container(v1.StopContainerRequest(container_id="0" * 64, timeout=2))


async def test_exits_by_itself(rig: PodRig) -> None:
    pod = await rig.run_pod("exits")
    done = await rig.start_container(pod, "done", ["sh", "-c", "echo bye; exit 0"])
    failed = await rig.start_container(pod, "failed", ["sh", "-c", "exit 3"])
    status = await rig.wait_state(done, v1.ContainerState.CONTAINER_EXITED, timeout=2)
    assert (status.exit_code, status.reason) == (0, "Completed")
    assert 0 < status.created_at <= status.started_at <= status.finished_at <= time.time_ns()
    assert texts(Path(status.log_path)) == ["bye"]
    status = await rig.wait_state(failed, v1.ContainerState.CONTAINER_EXITED, timeout=2)
    assert (status.exit_code, status.reason) == (3, "Error")
    exited = v1.ContainerStateValue(state=v1.ContainerState.CONTAINER_EXITED)
    assert await containers_matching(rig, v1.ContainerFilter(state=exited)) == {done, failed}
    error = await grpc_error(rig, rig.exec(done, "true"))
    assert error.status is Status.FAILED_PRECONDITION


async def test_remove_running_container(rig: PodRig) -> None:
    pod = await rig.run_pod("remove")
    cid = await rig.start_container(pod, "main", SLEEP)
    pid = await container_pid(rig, cid)
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=cid))
    error = await grpc_error(
        rig, rig.runtime.container_status(v1.ContainerStatusRequest(container_id=cid))
    )
    assert error.status is Status.NOT_FOUND
    assert not Path(f"/proc/{pid}").exists(), "the container's process survived its removal"
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=cid))
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id="0" * 64))
    assert await containers_matching(rig, v1.ContainerFilter(pod_sandbox_id=pod)) == set()


async def test_env_args_and_working_dir_merge_with_the_image(rig: PodRig) -> None:
    pod = await rig.run_pod("merge")
    image = v1.ImageSpec(image=rig.configured_image)
    # Nothing given: the image's entrypoint and cmd, its env and working dir.
    plain = await rig.start_container(
        pod,
        "plain",
        image=image,
        envs=[
            v1.KeyValue(key="OVERRIDDEN", value=b"container"),
            v1.KeyValue(key="EXTRA", value=b"x"),
        ],
    )
    env = (await rig.exec_out(plain, "env")).splitlines()
    assert "FROM_IMAGE=image" in env
    assert "OVERRIDDEN=container" in env
    assert "OVERRIDDEN=image" not in env
    assert "EXTRA=x" in env
    assert any(line.startswith("PATH=/usr/local/sbin:") for line in env)
    assert (await rig.exec_out(plain, "pwd")) == CONFIGURED_WORKDIR + "\n"
    assert (await rig.exec_out(plain, "cat", "/proc/1/cmdline")).split("\0")[:3] == [
        "/bin/sh",
        "-c",
        "echo from-image-cmd; sleep 1000; exit 0",
    ]
    # args replace the image's cmd, keeping its entrypoint; working_dir replaces its.
    with_args = await rig.start_container(
        pod, "args", image=image, args=["echo from-args; sleep 1000; exit 0"], working_dir="/tmp"
    )
    assert (await rig.exec_out(with_args, "cat", "/proc/1/cmdline")).split("\0")[:3] == [
        "/bin/sh",
        "-c",
        "echo from-args; sleep 1000; exit 0",
    ]
    assert (await rig.exec_out(with_args, "pwd")) == "/tmp\n"
    # command replaces entrypoint and cmd.
    with_command = await rig.start_container(pod, "command", ["sleep", "1001"], image=image)
    assert (await rig.exec_out(with_command, "cat", "/proc/1/cmdline")) == "sleep\x001001\x00"
    plain_log = Path((await rig.status(plain)).log_path)
    await rig.until(lambda: _has(plain_log, "from-image-cmd"), "the image cmd's output")
    args_log = Path((await rig.status(with_args)).log_path)
    await rig.until(lambda: _has(args_log, "from-args"), "the args' output")


async def test_run_as_user_and_read_only_rootfs(rig: PodRig) -> None:
    pod = await rig.run_pod("security")
    user = await rig.start_container(
        pod, "user", SLEEP, linux=container_linux(run_as_user=v1.Int64Value(value=1000))
    )
    assert (await rig.exec_out(user, "id", "-u")) == "1000\n"
    root = await rig.start_container(pod, "root", SLEEP)
    assert (await rig.exec_out(root, "id", "-u")) == "0\n"
    assert (await rig.exec(root, "touch", "/x")).exit_code == 0
    readonly = await rig.start_container(
        pod, "readonly", SLEEP, linux=container_linux(readonly_rootfs=True)
    )
    reply = await rig.exec(readonly, "touch", "/x")
    assert reply.exit_code == 1, reply
    assert b"Read-only file system" in reply.stderr, reply.stderr


async def test_update_container_resources(rig: PodRig) -> None:
    pod = await rig.run_pod("resources")
    cid = await rig.start_container(pod, "main", SLEEP)
    pid = await container_pid(rig, cid)
    limit_file = host_cgroup_file(pid, "memory", "memory.limit_in_bytes")
    assert int(limit_file.read_text()) == UNLIMITED_V1
    await rig.runtime.update_container_resources(
        v1.UpdateContainerResourcesRequest(
            container_id=cid,
            linux=v1.LinuxContainerResources(
                memory_limit_in_bytes=64 * 1024 * 1024,
                cpu_period=100000,
                cpu_quota=50000,
                cpu_shares=512,
            ),
        )
    )
    assert int(limit_file.read_text()) == 64 * 1024 * 1024, rig.log_tail()
    assert int(host_cgroup_file(pid, "cpu", "cpu.cfs_quota_us").read_text()) == 50000
    assert int(host_cgroup_file(pid, "cpu", "cpu.shares").read_text()) == 512
    inside = await rig.exec_out(cid, "cat", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    assert inside == f"{64 * 1024 * 1024}\n"


async def test_the_runtime_hears_of_a_container_at_its_start(rig: PodRig) -> None:
    pod = await rig.run_pod("deferred")
    cid = await rig.create_container(pod, "main", SLEEP)
    runtime_root = str(rig.proc.state / "runtimes" / rig.runtime_name)
    assert cid not in run(rig.runtime_name, "--root", runtime_root, "list")
    # Limits set between create and start (kubelet's CPU manager does) are kept.
    await rig.runtime.update_container_resources(
        v1.UpdateContainerResourcesRequest(
            container_id=cid,
            linux=v1.LinuxContainerResources(cpu_period=100000, cpu_quota=30000),
        )
    )
    # Stopping a container that never started leaves it created (as on containerd).
    await rig.runtime.stop_container(v1.StopContainerRequest(container_id=cid, timeout=0))
    assert (await rig.status(cid)).state == v1.ContainerState.CONTAINER_CREATED
    await rig.runtime.start_container(v1.StartContainerRequest(container_id=cid))
    assert cid in run(rig.runtime_name, "--root", runtime_root, "list")
    pid = await container_pid(rig, cid)
    assert int(host_cgroup_file(pid, "cpu", "cpu.cfs_quota_us").read_text()) == 30000
    # A created container that is removed never reaches the runtime.
    other = await rig.create_container(pod, "never-started", SLEEP)
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=other))
    assert await containers_matching(rig, v1.ContainerFilter(pod_sandbox_id=pod)) == {cid}


async def test_a_failed_start_leaves_the_container_exited_with_start_error(rig: PodRig) -> None:
    pod = await rig.run_pod("start-error")
    cid = await rig.create_container(pod, "main", ["/no/such/program"])
    error = await grpc_error(
        rig, rig.runtime.start_container(v1.StartContainerRequest(container_id=cid))
    )
    assert "/no/such/program" in (error.message or ""), error
    status = await rig.status(cid)
    assert status.state == v1.ContainerState.CONTAINER_EXITED, rig.log_tail()
    assert (status.reason, status.exit_code) == ("StartError", 128)
    assert "/no/such/program" in status.message
    runtime_root = str(rig.proc.state / "runtimes" / rig.runtime_name)
    assert cid not in run(rig.runtime_name, "--root", runtime_root, "list")
    await rig.runtime.remove_container(v1.RemoveContainerRequest(container_id=cid))


async def test_reopen_container_log(rig: PodRig) -> None:
    pod = await rig.run_pod("reopen")
    cid = await rig.start_container(pod, "main", TICKER)
    log_path = Path((await rig.status(cid)).log_path)
    await rig.until(lambda: _has(log_path, "tick2"), "three log lines")
    rotated = log_path.with_name(log_path.name + ".1")
    log_path.rename(rotated)
    await rig.runtime.reopen_container_log(v1.ReopenContainerLogRequest(container_id=cid))
    await rig.until(lambda: _count(log_path, 2), "two lines in the reopened log")
    old = texts(rotated)
    new = texts(log_path)
    last_old = int(old[-1].removeprefix("tick"))
    first_new = int(new[0].removeprefix("tick"))
    assert first_new == last_old + 1, (old[-3:], new[:3])
    size = rotated.stat().st_size
    await asyncio.sleep(0.5)
    assert rotated.stat().st_size == size, "conmon still writes the rotated file"


async def test_create_container_errors(rig: PodRig) -> None:
    error = await grpc_error(rig, rig.create_container_raw("0" * 64, rig.container_config("x")))
    assert error.status is Status.NOT_FOUND
    assert "0" * 64 in (error.message or "")
    pod = await rig.run_pod("errors")
    absent = "127.0.0.1:1/library/absent:v1"
    error = await grpc_error(
        rig,
        rig.create_container_raw(
            pod, rig.container_config("absent", SLEEP, image=v1.ImageSpec(image=absent))
        ),
    )
    assert error.status is Status.NOT_FOUND
    assert absent in (error.message or "")
    assert "not found" in (error.message or "")
    error = await grpc_error(
        rig, rig.create_container_raw(pod, v1.ContainerConfig(image=v1.ImageSpec(image=rig.image)))
    )
    assert error.status is Status.INVALID_ARGUMENT
    assert "metadata" in (error.message or "")
    assert await containers_matching(rig, v1.ContainerFilter(pod_sandbox_id=pod)) == set()


# ---- restarts ------------------------------------------------------------------------------


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_container_survives_a_crishim_restart(rig: PodRig, kill: bool) -> None:
    pod = await rig.run_pod("survivor")
    cid = await rig.start_container(pod, "ticker", TICKER)
    log_path = Path((await rig.status(cid)).log_path)
    await rig.until(lambda: _count(log_path, 2), "ticks")
    pid = await container_pid(rig, cid)
    await rig.restart(kill=kill)
    before = len(texts(log_path))
    status = await rig.status(cid)
    assert status.state == v1.ContainerState.CONTAINER_RUNNING, rig.log_tail()
    assert await container_pid(rig, cid) == pid
    assert (await rig.pod_status(pod)).state == v1.PodSandboxState.SANDBOX_READY
    await rig.until(lambda: _count(log_path, before + 3), "more ticks after the restart")
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


async def test_a_create_that_outlives_the_deadline_is_handed_to_the_retry(rig: PodRig) -> None:
    pod_id = await rig.run_pod("retry")
    pod = await rig.pod_status(pod_id)
    assert pod.linux is not None
    assert pod.linux.namespaces is not None
    config = rig.container_config("slowpoke", ["sleep", "100"], pod.linux.namespaces.options)
    request = v1.CreateContainerRequest(pod_sandbox_id=pod_id, config=config)
    offset = len(rig.proc.log())
    with pytest.raises((GRPCError, asyncio.TimeoutError)):
        # Far below what a create takes (about 15 ms), so the deadline passes mid-create.
        await rig.runtime.create_container(request, timeout=0.001)

    async def cancelled_in_crishim() -> bool:
        return "CreateContainer failed: CANCELLED" in rig.proc.log()[offset:]

    await rig.until(cancelled_in_crishim, "crishim to see the create's deadline pass")
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
