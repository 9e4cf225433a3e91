"""Pods in a user namespace of their own (``hostUsers: false``), on runc and on crun (root).

Every pod here gets the mapping kubelet would pick (65536 IDs at a multiple of 65536);
the tests look from both sides: what the pod sees (``/proc/self/uid_map``, owners, what its
root may do) and what the node sees (owners of files it wrote, the process' IDs). The
``rig`` fixture checks that removing the pods leaves no pin, mount or stage behind.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from grpclib.const import Status

from crishim.api import v1
from tests.integration.test_streaming_server import ws_connect, ws_url
from tests.rig.checks import SLEEP, container_pid, grpc_error
from tests.rig.host import mounts_below, run
from tests.rig.node_spdy import run_node
from tests.rig.pods import (
    PodRig,
    pod_rig_fixture,  # noqa: F401 - the module-scoped fixture ``pod_rig``
    rig_fixture,  # noqa: F401 - the per-test fixture ``rig``
)

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

# Node IDs 65536 * 37 .. + 65535: the pod's 0 .. 65535 (far from the node's own users).
BASE = 65536 * 37
MAPPING = [v1.IdMapping(host_id=BASE, container_id=0, length=65536)]


def userns_options(mappings: list[v1.IdMapping] | None = None) -> v1.NamespaceOption:
    mapping = mappings if mappings is not None else MAPPING
    return v1.NamespaceOption(
        network=v1.NamespaceMode.POD,
        pid=v1.NamespaceMode.CONTAINER,
        ipc=v1.NamespaceMode.POD,
        userns_options=v1.UserNamespace(mode=v1.NamespaceMode.POD, uids=mapping, gids=mapping),
    )


def pod_linux(
    namespaces: v1.NamespaceOption | None = None, sysctls: dict[str, str] | None = None
) -> v1.LinuxPodSandboxConfig:
    return v1.LinuxPodSandboxConfig(
        security_context=v1.LinuxSandboxSecurityContext(
            namespace_options=namespaces or userns_options()
        ),
        sysctls=sysctls or {},
    )


@pytest.fixture(autouse=True)
def searchable_state(pod_rig: PodRig) -> None:
    """pytest makes its temporary directories 0700; the runtime, working as the pod's root
    (a node user without rights), must reach the bundles under the state directory."""
    for directory in (pod_rig.proc.state, *pod_rig.proc.state.parents):
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


async def userns_pod(rig: PodRig, name: str, **overrides: object) -> str:
    return await rig.run_pod(name, linux=pod_linux(**overrides))  # type: ignore[arg-type]


def mapped_mount(container_path: str, host_path: Path) -> v1.Mount:
    """A volume as kubelet sends it for such a pod: ID-mapped with the pod's mappings."""
    return v1.Mount(
        container_path=container_path,
        host_path=str(host_path),
        uid_mappings=MAPPING,
        gid_mappings=MAPPING,
    )


async def test_every_runtime_handler_says_it_runs_user_namespaced_pods(rig: PodRig) -> None:
    status = await rig.runtime.status(v1.StatusRequest())
    features = {h.name: h.features for h in status.runtime_handlers}
    assert set(features) == {"", "runc", "crun"}
    assert all(f is not None and f.user_namespaces for f in features.values()), features


async def test_root_of_the_pod_is_a_mapped_node_user(rig: PodRig) -> None:
    pod = await userns_pod(rig, "userns-root")
    status = await rig.pod_status(pod)
    assert status.linux is not None
    assert status.linux.namespaces is not None
    options = status.linux.namespaces.options
    assert options is not None
    assert options.userns_options is not None
    assert options.userns_options.mode == v1.NamespaceMode.POD
    assert options.userns_options.uids == MAPPING

    cid = await rig.start_container(pod, "main", SLEEP)
    uid_map = (await rig.exec_out(cid, "cat", "/proc/self/uid_map")).split()
    assert uid_map == ["0", str(BASE), "65536"]
    assert (await rig.exec_out(cid, "cat", "/proc/self/gid_map")).split() == uid_map
    assert (await rig.exec_out(cid, "id", "-u")).strip() == "0"
    pid = await container_pid(rig, cid)
    node_ids = Path(f"/proc/{pid}/status").read_text()
    assert f"Uid:\t{BASE}\t{BASE}\t{BASE}\t{BASE}" in node_ids

    # The image's files are the pod's root's (ID-mapped layers), and the root may write.
    assert (await rig.exec_out(cid, "stat", "-c", "%u:%g", "/bin", "/etc")).split() == [
        "0:0",
        "0:0",
    ]
    await rig.exec_out(cid, "sh", "-c", "echo new > /etc/written && touch /made-here")
    written = os.stat(f"/proc/{pid}/root/etc/written")
    assert (written.st_uid, written.st_gid) == (BASE, BASE)
    # /dev/shm is the pod's root's too.
    assert (await rig.exec_out(cid, "stat", "-c", "%u", "/dev/shm")).strip() == "0"


async def test_files_written_to_a_host_directory_belong_to_the_mapped_user(
    rig: PodRig, tmp_path: Path
) -> None:
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir()
    empty_dir.chmod(0o777)  # as kubelet makes an emptyDir
    mapped = tmp_path / "mapped"
    mapped.mkdir()
    (mapped / "config").write_text("from the node\n")
    (mapped / "config").chmod(0o600)
    pod = await userns_pod(rig, "userns-volumes")
    cid = await rig.start_container(
        pod,
        "main",
        SLEEP,
        mounts=[
            v1.Mount(container_path="/plain", host_path=str(empty_dir)),
            mapped_mount("/mapped", mapped),
        ],
    )
    await rig.exec_out(cid, "sh", "-c", "echo hi > /plain/by-pod-root")
    owner = os.stat(empty_dir / "by-pod-root")
    assert (owner.st_uid, owner.st_gid) == (BASE, BASE)

    # An ID-mapped volume keeps the owners the pod sees: node root's file is the pod root's.
    assert (await rig.exec_out(cid, "stat", "-c", "%u:%g", "/mapped/config")).strip() == "0:0"
    assert await rig.exec_out(cid, "cat", "/mapped/config") == "from the node\n"
    await rig.exec_out(cid, "sh", "-c", "echo hi > /mapped/by-pod-root")
    owner = os.stat(mapped / "by-pod-root")
    assert (owner.st_uid, owner.st_gid) == (0, 0)
    # The same host directory, not ID-mapped, is nobody's in the pod.
    status = await rig.status(cid)
    assert [m.host_path for m in status.mounts] == [str(empty_dir), str(mapped)]


async def test_root_of_the_pod_cannot_write_what_its_node_user_cannot(
    rig: PodRig, tmp_path: Path
) -> None:
    host_dir = tmp_path / "node-files"
    host_dir.mkdir()
    (host_dir / "node-owned").write_text("keep\n")
    (host_dir / "node-owned").chmod(0o644)
    pod = await userns_pod(rig, "userns-limits")
    cid = await rig.start_container(
        pod, "main", SLEEP, mounts=[v1.Mount(container_path="/host", host_path=str(host_dir))]
    )
    for cmd in (
        "echo x > /host/node-owned",
        "rm /host/node-owned",
        "chmod 666 /host/node-owned",
        "touch /host/new-file",
    ):
        reply = await rig.exec(cid, "sh", "-c", cmd)
        assert reply.exit_code != 0, f"{cmd!r} worked for the pod's root"
    assert (host_dir / "node-owned").read_text() == "keep\n"
    assert stat.S_IMODE(os.stat(host_dir / "node-owned").st_mode) == 0o644
    assert sorted(os.listdir(host_dir)) == ["node-owned"]


async def test_sysctls_and_capabilities_are_the_pods_namespaces(rig: PodRig) -> None:
    pod = await userns_pod(
        rig, "userns-netns", sysctls={"net.ipv4.ip_unprivileged_port_start": "80"}
    )
    net_admin = v1.LinuxContainerConfig(
        security_context=v1.LinuxContainerSecurityContext(
            capabilities=v1.Capability(add_capabilities=["NET_ADMIN"])
        )
    )
    cid = await rig.start_container(pod, "main", SLEEP, linux=net_admin)
    sysctl = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
    assert (await rig.exec_out(cid, "cat", sysctl)).strip() == "80"
    # CAP_NET_ADMIN of the pod's root counts in the pod's network namespace only because
    # the pod's user namespace owns it.
    await rig.exec_out(cid, "busybox", "ip", "link", "set", "lo", "mtu", "1400")
    assert "mtu 1400" in await rig.exec_out(cid, "busybox", "ip", "link", "show", "lo")
    # Without the capability the same root may not.
    plain = await rig.start_container(pod, "plain", SLEEP)
    reply = await rig.exec(plain, "busybox", "ip", "link", "set", "lo", "mtu", "1300")
    assert reply.exit_code != 0


async def test_exec_logs_and_a_crishim_restart(rig: PodRig) -> None:
    pod = await userns_pod(rig, "userns-restart")
    command = ["sh", "-c", "cat /proc/self/uid_map; sleep 1000"]
    cid = await rig.start_container(pod, "main", command)
    await rig.restart()
    assert (await rig.pod_status(pod)).state == v1.PodSandboxState.SANDBOX_READY
    assert (await rig.exec_out(cid, "cat", "/proc/self/uid_map")).split() == [
        "0",
        str(BASE),
        "65536",
    ]
    after = await rig.start_container(pod, "after-restart", SLEEP)
    assert (await rig.exec_out(after, "id", "-u")).strip() == "0"
    log = (await rig.status(cid)).log_path
    assert f"{BASE}" in Path(log).read_text()


async def test_bad_user_namespace_requests_are_invalid(rig: PodRig) -> None:
    overlapping = [
        v1.IdMapping(host_id=BASE, container_id=0, length=65536),
        v1.IdMapping(host_id=BASE + 1000, container_id=65536, length=1000),
    ]
    err = await grpc_error(
        rig, rig.run_pod("userns-bad", linux=pod_linux(userns_options(overlapping)))
    )
    assert err.status == Status.INVALID_ARGUMENT
    assert "overlap on the host side" in (err.message or "")

    pod = await userns_pod(rig, "userns-other")
    other = [v1.IdMapping(host_id=BASE + 65536, container_id=0, length=65536)]
    config = rig.container_config("main", SLEEP, userns_options(other))
    err = await grpc_error(rig, rig.create_container_raw(pod, config))
    assert err.status == Status.INVALID_ARGUMENT
    assert "differ from its pod's" in (err.message or "")

    config = rig.container_config(
        "main", SLEEP, userns_options(), mounts=[mapped_mount("/x", Path("/"))]
    )
    config.mounts[0].uid_mappings = other
    err = await grpc_error(rig, rig.create_container_raw(pod, config))
    assert err.status == Status.INVALID_ARGUMENT
    assert "mount /x: its UID/GID mappings differ" in (err.message or "")


async def test_recovery_removes_user_namespace_pins_and_stages_no_record_owns(
    rig: PodRig, tmp_path: Path
) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "data").write_text("precious\n")
    orphan_pod, orphan_container = "e" * 64, "f" * 64
    state = rig.proc.state
    pin = state / "ns" / "user" / orphan_pod
    stage = state / "idmapped" / orphan_container / "volume-0"
    rig.close()
    rig.proc.kill()
    # What a crishim killed half-way through a user-namespaced pod and container leaves.
    pin.parent.mkdir(parents=True, exist_ok=True)
    pin.touch()
    run("mount", "--bind", "/proc/self/ns/user", str(pin))
    stage.mkdir(parents=True)
    run("mount", "--bind", str(volume), str(stage))
    await asyncio.to_thread(rig.proc.start)
    rig.connect()
    assert not pin.exists(), rig.log_tail()
    assert not (state / "idmapped" / orphan_container).exists(), rig.log_tail()
    assert mounts_below(state / "idmapped") == []
    assert (volume / "data").read_text() == "precious\n"


async def test_attach_to_a_user_namespaced_container(rig: PodRig) -> None:
    pod = await userns_pod(rig, "userns-attach")
    cid = await rig.start_container(
        pod, "app", ["sh", "-c", "while read line; do echo got:$line:$(id -u); done"], stdin=True
    )
    await rig.wait_state(cid, v1.ContainerState.CONTAINER_RUNNING)
    reply = await rig.runtime.attach(
        v1.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)
    )
    received = b""
    async with ws_connect(ws_url(reply.url)) as client:
        await client.send(b"\x00hello attach\n")
        while b"got:hello attach" not in received:
            message = await asyncio.wait_for(client.recv(), 20)
            assert isinstance(message, bytes)
            if message[0] == 1:
                received += message[1:]
    assert b"got:hello attach:0\n" in received, received


async def test_port_forward_reaches_the_loopback_of_a_user_namespaced_pod(
    rig: PodRig, node_client: Path
) -> None:
    pod = await userns_pod(rig, "userns-portfwd")
    cid = await rig.start_container(
        pod,
        "web",
        ["sh", "-c", "while :; do echo -n pong-$(id -u) | nc -l -p 8080 127.0.0.1; done"],
    )

    async def listening() -> bool:
        reply = await rig.exec(cid, "grep", "-q", "0100007F:1F90 00000000:0000 0A", "/proc/net/tcp")
        return reply.exit_code == 0

    await rig.until(listening, "the pod's listener on 127.0.0.1:8080")
    reply = await rig.runtime.port_forward(v1.PortForwardRequest(pod_sandbox_id=pod, port=[8080]))
    result = await run_node(
        node_client,
        {"url": reply.url, "portforward": [{"port": 8080, "requestId": "0", "data": "ping"}]},
    )
    assert result["forwards"][0]["data"] == "pong-0", result


async def test_stats_of_a_user_namespaced_pod(rig: PodRig) -> None:
    pod = await userns_pod(rig, "userns-stats")
    cid = await rig.start_container(
        pod, "burner", ["sh", "-c", "i=0; while :; do i=$((i+1)); done"]
    )
    await asyncio.sleep(0.5)
    stats = (await rig.runtime.container_stats(v1.ContainerStatsRequest(container_id=cid))).stats
    assert stats is not None
    assert stats.attributes is not None
    assert stats.attributes.id == cid
    assert stats.cpu is not None
    assert stats.cpu.usage_core_nano_seconds is not None
    assert stats.cpu.usage_core_nano_seconds.value > 0, stats
    assert stats.memory is not None
    assert stats.memory.working_set_bytes is not None
    assert stats.memory.working_set_bytes.value > 0, stats

    request = v1.PodSandboxStatsRequest(pod_sandbox_id=pod)
    pod_stats = (await rig.runtime.pod_sandbox_stats(request)).stats
    assert pod_stats is not None, rig.log_tail()
    assert pod_stats.linux is not None, rig.log_tail()
    linux = pod_stats.linux
    assert linux.cpu is not None
    assert linux.cpu.usage_core_nano_seconds is not None
    assert linux.cpu.usage_core_nano_seconds.value > 0, linux
    assert linux.memory is not None
    assert linux.memory.working_set_bytes is not None
    assert linux.memory.working_set_bytes.value > 0, linux
    assert [c.attributes.id for c in linux.containers if c.attributes] == [cid]
    # The pod's network namespace (owned by its user namespace) is read too.
    assert linux.network is not None, linux
    assert linux.network.default_interface is not None, linux
    assert linux.network.default_interface.name == "eth0"


def propagation(mount_point: Path) -> list[str]:
    """The optional fields (``shared:N``, ``master:N``...) of ``mount_point`` in crishim's
    (our) mount namespace, of the topmost mount there; [] is private."""
    found: list[str] | None = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mount_point):
            found = fields[6 : fields.index("-")]
    assert found is not None, f"{mount_point} is not a mount point"
    return found


def mounts_seen_by(pid: int, path: Path) -> list[str]:
    """Mount points at or below ``path`` in the mount namespace of process ``pid``."""
    points = [line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


async def test_staged_volumes_do_not_propagate_to_other_mount_namespaces(
    rig: PodRig, tmp_path: Path
) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "data").write_text("precious\n")
    state = rig.proc.state
    stages = state / "idmapped"
    # As /run on a systemd host: the state directory on a shared mount, and another mount
    # namespace (a container with an rslave bind of /run, say) that receives its mounts.
    run("mount", "--rbind", str(state), str(state))
    observer: asyncio.subprocess.Process | None = None
    try:
        run("mount", "--make-shared", str(state))
        observer = await asyncio.create_subprocess_exec(
            "unshare", "--mount", "--propagation", "slave", "sleep", "1000"
        )
        own = os.readlink("/proc/self/ns/mnt")

        async def observer_ready() -> bool:
            assert observer is not None
            try:
                return os.readlink(f"/proc/{observer.pid}/ns/mnt") != own
            except OSError:
                return False

        await rig.until(observer_ready, "the observer's mount namespace")
        probe = state / "propagation-probe"
        probe.mkdir()
        try:  # the observer does receive what is mounted on the state directory
            run("mount", "-t", "tmpfs", "probe", str(probe))
            assert mounts_seen_by(observer.pid, probe) == [str(probe)]
        finally:
            run("umount", str(probe), check=False)
            probe.rmdir()

        pod = await userns_pod(rig, "userns-propagation")
        cid = await rig.start_container(pod, "main", SLEEP, mounts=[mapped_mount("/v", volume)])
        assert await rig.exec_out(cid, "cat", "/v/data") == "precious\n"
        assert mounts_below(stages / cid) == [str(stages / cid / "volume-0")]
        assert propagation(stages) == [], "the stages' directory is not a private mount point"
        assert mounts_seen_by(observer.pid, stages / cid) == []

        await rig.runtime.stop_pod_sandbox(v1.StopPodSandboxRequest(pod_sandbox_id=pod))
        await rig.runtime.remove_pod_sandbox(v1.RemovePodSandboxRequest(pod_sandbox_id=pod))

        async def released() -> bool:  # removal releases a container's files in the background
            return mounts_below(stages) == [] and not (stages / cid).exists()

        await rig.until(released, "the stage's release")
        # (the observer has its own copies of the stages' directory itself, nothing below)
        assert [p for p in mounts_seen_by(observer.pid, stages) if p != str(stages)] == []
        assert (volume / "data").read_text() == "precious\n"
    finally:
        if observer is not None:
            observer.kill()
            await observer.wait()
        run("umount", "-l", str(state), check=False)
