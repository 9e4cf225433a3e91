"""Containers through crishim's CRI socket, on runc and on crun (root): create, start, logs,
status, exec-sync, stop, removal, user and environment, resources, errors.

Every test runs against one crishim per runtime (``pod_rig``, module scope) with its own
CNI network and the rig's busybox images; the ``rig`` fixture removes every pod after each
test and fails the test if anything of it is left.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
from grpclib.const import Status

from crishim.api import v1
from tests.rig.checks import (
    SLEEP,
    TICKER,
    UNLIMITED_V1,
    container_linux,
    container_pid,
    containers_matching,
    grpc_error,
    has_lines,
    has_text,
    host_cgroup_file,
    log_lines,
    texts,
)
from tests.rig.host import run
from tests.rig.pods import (
    CONFIGURED_WORKDIR,
    PodRig,
    pod_rig_fixture,  # noqa: F401 - the module-scoped fixture ``pod_rig``
    rig_fixture,  # noqa: F401 - the per-test fixture ``rig``
)

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]


async def pid1_runs(rig: PodRig, cid: str, argv: list[str]) -> None:
    """Wait for the container's process to be ``argv``: runc's start returns when the process
    is released, and its exec of the command may come a moment later (so for containerd too)."""
    seen: list[str] = []

    async def runs() -> bool:
        seen[:] = (await rig.exec_out(cid, "cat", "/proc/1/cmdline")).split("\0")[: len(argv)]
        return seen == argv

    await rig.until(runs, f"pid 1 of {cid} to run {argv}")


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

    await rig.until(lambda: has_text(log_path, "hi from the host"), "the container's output")
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
    await rig.until(lambda: has_lines(log_path, 1), "the trap to be set")
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
    await pid1_runs(rig, plain, ["/bin/sh", "-c", "echo from-image-cmd; sleep 1000; exit 0"])
    # args replace the image's cmd, keeping its entrypoint; working_dir replaces its.
    with_args = await rig.start_container(
        pod, "args", image=image, args=["echo from-args; sleep 1000; exit 0"], working_dir="/tmp"
    )
    await pid1_runs(rig, with_args, ["/bin/sh", "-c", "echo from-args; sleep 1000; exit 0"])
    assert (await rig.exec_out(with_args, "pwd")) == "/tmp\n"
    # command replaces entrypoint and cmd.
    with_command = await rig.start_container(pod, "command", ["sleep", "1001"], image=image)
    await pid1_runs(rig, with_command, ["sleep", "1001"])
    plain_log = Path((await rig.status(plain)).log_path)
    await rig.until(lambda: has_text(plain_log, "from-image-cmd"), "the image cmd's output")
    args_log = Path((await rig.status(with_args)).log_path)
    await rig.until(lambda: has_text(args_log, "from-args"), "the args' output")


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
    await rig.until(lambda: has_text(log_path, "tick2"), "three log lines")
    rotated = log_path.with_name(log_path.name + ".1")
    log_path.rename(rotated)
    await rig.runtime.reopen_container_log(v1.ReopenContainerLogRequest(container_id=cid))
    await rig.until(lambda: has_lines(log_path, 2), "two lines in the reopened log")
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
