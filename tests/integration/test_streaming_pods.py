"""Exec, attach and port-forward into real containers on runc and crun, through crishim's
own Exec/Attach/PortForward URLs, with clients we did not write: Node's spdy-transport and
the ``websockets`` library."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from crishim.api import v1
from tests.integration.test_streaming_server import ws_collect, ws_connect, ws_url
from tests.rig.node_spdy import run_node
from tests.rig.pods import (
    PodRig,
    pod_rig_fixture,  # noqa: F401 - the module-scoped fixture ``pod_rig``
    rig_fixture,  # noqa: F401 - the per-test fixture ``rig``
)

pytestmark = [pytest.mark.root, pytest.mark.asyncio(loop_scope="module")]

EXIT_CAUSE = "NonZeroExitCode"


async def exec_url(rig: PodRig, cid: str, cmd: list[str], **flags: bool) -> str:
    reply = await rig.runtime.exec(
        v1.ExecRequest(
            container_id=cid,
            cmd=cmd,
            tty=flags.get("tty", False),
            stdin=flags.get("stdin", False),
            stdout=True,
            stderr=not flags.get("tty", False),
        )
    )
    assert reply.url.startswith("http://127.0.0.1:"), reply.url
    return reply.url


async def test_spdy_exec_runs_in_the_container_with_stdin_and_exit_code(
    rig: PodRig, node_client: Path
) -> None:
    pod = await rig.run_pod("spdy-exec")
    cid = await rig.start_container(pod, "app", ["sleep", "300"])
    url = await exec_url(rig, cid, ["sh", "-c", "cat; echo err >&2; hostname; exit 3"], stdin=True)
    result = await run_node(node_client, {"url": url, "stdin": "from the client\n"})
    assert result["status"] == 101, result
    assert result["stdout"] == "from the client\nspdy-exec\n", result
    assert result["stderr"] == "err\n", result
    status = json.loads(result["error"])
    assert status["status"] == "Failure", status
    assert status["reason"] == EXIT_CAUSE
    assert status["details"]["causes"][0]["message"] == "3"


async def test_exec_with_a_terminal_follows_resizes(rig: PodRig) -> None:
    pod = await rig.run_pod("tty-exec")
    cid = await rig.start_container(pod, "app", ["sleep", "300"])
    url = await exec_url(rig, cid, ["sh", "-c", "sleep 1; stty size; tty"], tty=True, stdin=True)
    async with ws_connect(ws_url(url)) as client:
        await client.send(b"\x04" + json.dumps({"Width": 91, "Height": 27}).encode())
        channels = await ws_collect(client)
    lines = channels.get(1, b"").decode().replace("\r", "").split("\n")
    assert "27 91" in lines, channels
    assert any(line.startswith("/dev/pts/") for line in lines), channels


async def test_websocket_exec_v5(rig: PodRig) -> None:
    pod = await rig.run_pod("ws-exec")
    cid = await rig.start_container(pod, "app", ["sleep", "300"])
    url = await exec_url(rig, cid, ["sh", "-c", "cat; id -u"], stdin=True)
    async with ws_connect(ws_url(url)) as client:
        await client.send(b"\x00piped in\n")
        await client.send(b"\xff\x00")  # v5: close stdin
        channels = await ws_collect(client)
    assert channels[1] == b"piped in\n0\n", channels
    assert json.loads(channels[3])["status"] == "Success"


async def test_attach_to_the_container_stdio(rig: PodRig) -> None:
    pod = await rig.run_pod("attach")
    cid = await rig.start_container(
        pod, "app", ["sh", "-c", "while read line; do echo got:$line; done"], stdin=True
    )
    reply = await rig.runtime.attach(
        v1.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)
    )
    received = b""
    await asyncio.sleep(0.5)
    status = await rig.status(cid)
    assert status.state == v1.ContainerState.CONTAINER_RUNNING, (status, rig.log_tail())
    async with ws_connect(ws_url(reply.url)) as client:
        await client.send(b"\x00hello attach\n")
        while b"got:hello attach" not in received:
            message = await asyncio.wait_for(client.recv(), 20)
            assert isinstance(message, bytes)
            if message[0] == 1:
                received += message[1:]
    assert b"got:hello attach\n" in received


async def test_port_forward_reaches_the_pods_loopback(rig: PodRig, node_client: Path) -> None:
    pod = await rig.run_pod("portfwd")
    await rig.start_container(
        pod,
        "web",
        ["sh", "-c", "while :; do echo -n pong | nc -l -p 8080 127.0.0.1; done"],
    )
    await asyncio.sleep(0.5)
    reply = await rig.runtime.port_forward(v1.PortForwardRequest(pod_sandbox_id=pod, port=[8080]))
    result = await run_node(
        node_client,
        {"url": reply.url, "portforward": [{"port": 8080, "requestId": "0", "data": "ping"}]},
    )
    assert result["forwards"][0]["data"] == "pong", result


async def test_streaming_into_a_stopped_container_is_refused(rig: PodRig) -> None:
    pod = await rig.run_pod("stopped")
    cid = await rig.start_container(pod, "app", ["sleep", "300"])
    await rig.runtime.stop_container(v1.StopContainerRequest(container_id=cid, timeout=0))
    with pytest.raises(Exception, match="is not running"):
        await rig.runtime.exec(v1.ExecRequest(container_id=cid, cmd=["true"], stdout=True))


async def test_twenty_concurrent_exec_sessions(rig: PodRig) -> None:
    pod = await rig.run_pod("many-exec")
    cid = await rig.start_container(pod, "app", ["sleep", "300"])

    async def one(i: int) -> bytes:
        url = await exec_url(rig, cid, ["sh", "-c", f"echo session-{i}"])
        async with ws_connect(ws_url(url)) as client:
            return (await ws_collect(client)).get(1, b"")

    outputs = await asyncio.gather(*(one(i) for i in range(20)))
    assert outputs == [f"session-{i}\n".encode() for i in range(20)]


async def test_100_mb_through_stdout_arrive_whole(rig: PodRig, node_client: Path) -> None:
    pod = await rig.run_pod("bulk")
    cid = await rig.start_container(pod, "app", ["sleep", "300"])
    size = 100 * 1024 * 1024
    url = await exec_url(rig, cid, ["head", "-c", str(size), "/dev/zero"])
    result = await run_node(node_client, {"url": url, "stdin": None}, timeout=120)
    assert result["stdoutLength"] == size, {k: v for k, v in result.items() if k != "stdout"}
    assert result["stdoutSha256"] == hashlib.sha256(bytes(size)).hexdigest()


async def test_a_client_that_vanishes_frees_the_process(rig: PodRig) -> None:
    pod = await rig.run_pod("vanish")
    cid = await rig.start_container(pod, "app", ["sleep", "300"])
    url = await exec_url(rig, cid, ["sleep", "4242"], stdin=True)
    async with ws_connect(ws_url(url)):
        await asyncio.sleep(1)
        assert "sleep 4242" in await rig.exec_out(cid, "ps")
    for _ in range(50):
        if "sleep 4242" not in await rig.exec_out(cid, "ps"):
            break
        await asyncio.sleep(0.1)
    assert "sleep 4242" not in await rig.exec_out(cid, "ps"), rig.log_tail()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_slow_reader_does_not_grow_memory(rig: PodRig) -> None:
    pod = await rig.run_pod("slow-reader")
    cid = await rig.start_container(pod, "app", ["sleep", "300"])
    assert rig.proc.proc is not None
    pid = rig.proc.proc.pid
    before = _rss_bytes(pid)
    url = await exec_url(rig, cid, ["head", "-c", str(500 * 1024 * 1024), "/dev/zero"])
    async with ws_connect(ws_url(url)) as client:
        first = await client.recv()  # the stream has started
        assert isinstance(first, bytes)
        await asyncio.sleep(3)  # then the client reads nothing for a while
        grown = _rss_bytes(pid) - before
    assert grown < 64 * 1024 * 1024, f"crishim grew {grown} bytes for a reader that stalled"
