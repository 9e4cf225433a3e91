"""The streaming server end to end, driven by clients crishim did not write.

SPDY: Node.js ``spdy-transport`` (the implementation behind node-spdy), through
``tests/streaming_client/spdy_exec.js``. WebSocket: the ``websockets`` library from PyPI.
The backend is a fake defined here: its exec echoes stdin to stdout, writes to stderr and
returns an exit code; its port-forward connects to a local echo server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from crishim.streaming import spdy
from crishim.streaming.backend import (
    AttachRequest,
    ExecRequest,
    Output,
    PortForwardRequest,
    Stdin,
    TerminalSize,
)
from crishim.streaming.server import StreamingServer
from tests.rig.node_spdy import run_node

BLOCK = bytes(range(256)) * 4096  # 1 MiB of a pattern that shows reordering


class FakeBackend:
    """Commands understood by exec:

    ``echo [code]``   copy stdin to stdout until EOF, write "err" to stderr, exit ``code``
    ``produce N``     write N bytes of the BLOCK pattern to stdout
    ``resize``        collect terminal sizes until stdin ends
    ``sleep``         wait until cancelled (records the cancellation)
    """

    def __init__(self, echo_port: int) -> None:
        self.echo_port = echo_port
        self.resizes: list[TerminalSize] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def exec(
        self,
        container_id: str,
        cmd: list[str],
        *,
        tty: bool,
        stdin: Stdin | None,
        stdout: Output | None,
        stderr: Output | None,
        resize: AsyncIterator[TerminalSize] | None,
    ) -> int:
        self.started.set()
        if cmd[0] == "echo":
            assert stdin is not None
            assert stdout is not None
            while data := await stdin.read():
                await stdout.write(data)
            if stderr is not None:
                await stderr.write(b"err")
            return int(cmd[1]) if len(cmd) > 1 else 0
        if cmd[0] == "produce":
            assert stdout is not None
            remaining = int(cmd[1])
            while remaining:
                piece = BLOCK[: min(remaining, 64 * 1024)]
                await stdout.write(piece)
                remaining -= len(piece)
            return 0
        if cmd[0] == "resize":
            assert resize is not None
            assert stdin is not None
            collector = asyncio.create_task(self._collect(resize))
            while await stdin.read():
                pass
            await asyncio.sleep(0.2)
            collector.cancel()
            return 0
        if cmd[0] == "sleep":
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return 127

    async def _collect(self, resize: AsyncIterator[TerminalSize]) -> None:
        async for size in resize:
            self.resizes.append(size)

    async def attach(
        self,
        container_id: str,
        *,
        tty: bool,
        stdin: Stdin | None,
        stdout: Output | None,
        stderr: Output | None,
        resize: AsyncIterator[TerminalSize] | None,
    ) -> None:
        assert stdout is not None
        await stdout.write(f"attached to {container_id}".encode())

    async def port_forward(
        self, sandbox_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if port != 7:
            raise ConnectionRefusedError(f"nothing listens on port {port}")
        return await asyncio.open_connection("127.0.0.1", self.echo_port)


def expected_digest(size: int) -> str:
    digest = hashlib.sha256()
    remaining = size
    while remaining:
        piece = BLOCK[: min(remaining, 64 * 1024)]
        digest.update(piece)
        remaining -= len(piece)
    return digest.hexdigest()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
def backend(echo_port: int) -> FakeBackend:
    return FakeBackend(echo_port)


@pytest.fixture
async def server(backend: FakeBackend) -> AsyncIterator[StreamingServer]:
    async with StreamingServer(backend) as streaming:
        yield streaming


def exec_url(server: StreamingServer, cmd: list[str], **flags: bool) -> str:
    return server.create_exec_url(
        ExecRequest(container_id="c1", cmd=cmd, stdin=flags.pop("stdin", True), **flags)
    )


def ws_url(http_url: str) -> str:
    return "ws://" + http_url.removeprefix("http://")


@contextlib.asynccontextmanager
async def ws_connect(
    url: str, protocol: str = "v5.channel.k8s.io"
) -> AsyncIterator[ClientConnection]:
    async with connect(
        url, subprotocols=[Subprotocol(protocol)], proxy=None, max_size=None, compression=None
    ) as client:
        yield client


async def ws_collect(client: ClientConnection) -> dict[int, bytes]:
    channels: dict[int, bytes] = {}
    with contextlib.suppress(ConnectionClosed):
        async for message in client:
            assert isinstance(message, bytes)
            channels[message[0]] = channels.get(message[0], b"") + message[1:]
    return channels


# --- SPDY (spdy-transport) ----------------------------------------------------------------


async def test_spdy_exec_success_echoes_stdin(server: StreamingServer, node_client: Path) -> None:
    url = exec_url(server, ["echo"])
    result = await run_node(node_client, {"url": url, "stdin": "hello crishim"})
    assert result["status"] == 101
    assert result["protocol"] == "v4.channel.k8s.io"
    assert result["stdout"] == "hello crishim"
    assert result["stderr"] == "err"
    assert json.loads(result["error"]) == {"metadata": {}, "status": "Success"}


async def test_spdy_exec_nonzero_exit_reports_exit_code(
    server: StreamingServer, node_client: Path
) -> None:
    result = await run_node(node_client, {"url": exec_url(server, ["echo", "3"]), "stdin": "x"})
    status = json.loads(result["error"])
    assert status["status"] == "Failure"
    assert status["reason"] == "NonZeroExitCode"
    assert status["message"].startswith("command terminated with non-zero exit code: ")
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


async def test_spdy_older_protocol_reports_exit_as_text(
    server: StreamingServer, node_client: Path
) -> None:
    config = {
        "url": exec_url(server, ["echo", "2"]),
        "stdin": "x",
        "protocols": ["v2.channel.k8s.io", "channel.k8s.io"],
    }
    result = await run_node(node_client, config)
    assert result["protocol"] == "v2.channel.k8s.io"
    assert result["stdout"] == "x"
    assert "non-zero exit code" in result["error"]


async def test_spdy_unsupported_protocol_is_forbidden(
    server: StreamingServer, node_client: Path
) -> None:
    config = {"url": exec_url(server, ["echo"]), "stdin": "", "protocols": ["v9.channel.k8s.io"]}
    assert (await run_node(node_client, config))["status"] == 403


async def test_spdy_stdin_eof_ends_the_command(server: StreamingServer, node_client: Path) -> None:
    # Empty stdin: the only way "echo" returns is by seeing EOF.
    result = await run_node(node_client, {"url": exec_url(server, ["echo"]), "stdin": ""})
    assert result["stdout"] == ""
    assert json.loads(result["error"])["status"] == "Success"


async def test_spdy_tty_resize_reaches_backend(
    server: StreamingServer, backend: FakeBackend, node_client: Path
) -> None:
    url = exec_url(server, ["resize"], tty=True, stderr=False)
    config = {"url": url, "stdin": "", "tty": True, "resize": [[80, 24], [120, 40]]}
    result = await run_node(node_client, config)
    assert json.loads(result["error"])["status"] == "Success"
    assert backend.resizes == [TerminalSize(80, 24), TerminalSize(120, 40)]


async def test_spdy_twenty_concurrent_sessions(server: StreamingServer, node_client: Path) -> None:
    configs = [{"url": exec_url(server, ["echo"]), "stdin": f"session {i}"} for i in range(20)]
    results = await asyncio.gather(*(run_node(node_client, c) for c in configs))
    assert [r["stdout"] for r in results] == [f"session {i}" for i in range(20)]


@pytest.mark.parametrize("size", [10 * 1024 * 1024, 100 * 1024 * 1024], ids=["10MB", "100MB"])
async def test_spdy_large_stdout_arrives_whole_and_in_order(
    server: StreamingServer, node_client: Path, size: int
) -> None:
    started = time.monotonic()
    url = exec_url(server, ["produce", str(size)], stdin=False)
    result = await run_node(node_client, {"url": url, "stdin": None}, timeout=120)
    assert result["stdoutLength"] == size
    assert result["stdoutSha256"] == expected_digest(size)
    assert json.loads(result["error"])["status"] == "Success"
    print(f"{size} bytes in {time.monotonic() - started:.1f}s")


async def test_spdy_attach(server: StreamingServer, node_client: Path) -> None:
    url = server.create_attach_url(AttachRequest(container_id="c9", stderr=False))
    result = await run_node(node_client, {"url": url, "stdin": None, "stderr": False})
    assert result["stdout"] == "attached to c9"
    assert json.loads(result["error"])["status"] == "Success"


async def test_spdy_port_forward_two_concurrent_connections(
    server: StreamingServer, node_client: Path
) -> None:
    url = server.create_portforward_url(PortForwardRequest(sandbox_id="pod1"))
    forwards = [
        {"port": 7, "requestId": "0", "data": "first connection " * 1000},
        {"port": 7, "requestId": "1", "data": "second connection"},
    ]
    result = await run_node(node_client, {"url": url, "portforward": forwards})
    assert result["protocol"] == "portforward.k8s.io"
    assert [f["data"] for f in result["forwards"]] == [f["data"] for f in forwards]
    assert [f["error"] for f in result["forwards"]] == ["", ""]


async def test_spdy_port_forward_failure_goes_to_error_stream(
    server: StreamingServer, node_client: Path
) -> None:
    url = server.create_portforward_url(PortForwardRequest(sandbox_id="pod1"))
    config = {"url": url, "portforward": [{"port": 8, "requestId": "0", "data": "x"}]}
    (forward,) = (await run_node(node_client, config))["forwards"]
    assert "nothing listens on port 8" in forward["error"]


# --- tokens ---------------------------------------------------------------------------------


async def http_status(url: str) -> int:
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /{path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: Upgrade\r\n"
        "Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n".encode()
    )
    line = await reader.readline()
    writer.close()
    return int(line.split()[1])


async def test_reused_token_is_refused(server: StreamingServer) -> None:
    url = exec_url(server, ["echo"])
    assert await http_status(url) == 101
    assert await http_status(url) == 404


async def test_unknown_token_is_refused(server: StreamingServer) -> None:
    url = exec_url(server, ["echo"])
    assert await http_status(url.rsplit("/", 1)[0] + "/not-a-token") == 404


async def test_expired_token_is_refused(backend: FakeBackend) -> None:
    async with StreamingServer(backend, token_ttl=0.05) as streaming:
        url = exec_url(streaming, ["echo"])
        await asyncio.sleep(0.1)
        assert await http_status(url) == 404


async def test_token_of_another_kind_is_refused(server: StreamingServer) -> None:
    url = exec_url(server, ["echo"]).replace("/exec/", "/attach/")
    assert await http_status(url) == 404


async def test_refusal_body_is_a_kubernetes_status_with_the_message(
    server: StreamingServer,
) -> None:
    """client-go turns a Status body into the user's error; text would be lost or garbled."""
    url = exec_url(server, ["echo"]).rsplit("/", 1)[0] + "/not-a-token"
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(ws_url(url)):
            pass
    response = info.value.response
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "unknown or expired streaming token",
        "reason": "NotFound",
        "code": 404,
    }


# --- robustness -----------------------------------------------------------------------------


async def spdy_upgrade(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /{path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: Upgrade\r\n"
        "Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


async def test_malformed_frame_closes_only_that_connection(
    server: StreamingServer, node_client: Path
) -> None:
    reader, writer = await spdy_upgrade(exec_url(server, ["echo"]))
    # A PING whose length says 5 bytes: invalid in SPDY/3.1.
    writer.write(bytes.fromhex("80030006 00000005 0000000102"))
    received = await asyncio.wait_for(reader.read(), 5)  # until the server hangs up
    frames = spdy.FrameParser().feed(received)
    assert spdy.GoAway(0, spdy.GoAwayStatus.PROTOCOL_ERROR) in frames
    writer.close()
    result = await run_node(node_client, {"url": exec_url(server, ["echo"]), "stdin": "alive"})
    assert result["stdout"] == "alive"


async def test_vanished_client_cancels_the_backend(
    server: StreamingServer, backend: FakeBackend
) -> None:
    url = exec_url(server, ["sleep"], stdin=False, stderr=False)
    async with ws_connect(ws_url(url)):
        await asyncio.wait_for(backend.started.wait(), 5)
    # Leaving the block closed the connection: the backend must be cancelled.
    await asyncio.wait_for(backend.cancelled.wait(), 5)


# --- WebSocket (websockets) -----------------------------------------------------------------


async def test_websocket_exec_v5_with_stdin_close(server: StreamingServer) -> None:
    async with ws_connect(ws_url(exec_url(server, ["echo"]))) as client:
        assert client.subprotocol == "v5.channel.k8s.io"
        await client.send(b"\x00hello ")
        await client.send(b"\x00websocket")
        await client.send(b"\xff\x00")  # v5: close stdin
        channels = await ws_collect(client)
    assert channels[1] == b"hello websocket"
    assert channels[2] == b"err"
    assert json.loads(channels[3]) == {"metadata": {}, "status": "Success"}


async def test_websocket_exec_nonzero_exit_v4(server: StreamingServer) -> None:
    url = exec_url(server, ["produce", "5"], stdin=False)
    async with ws_connect(ws_url(url), "v4.channel.k8s.io") as client:
        channels = await ws_collect(client)
    assert channels[1] == BLOCK[:5]
    assert json.loads(channels[3])["status"] == "Success"
    url = exec_url(server, ["echo", "3"])
    async with ws_connect(ws_url(url), "v5.channel.k8s.io") as client:
        await client.send(b"\xff\x00")
        channels = await ws_collect(client)
    status = json.loads(channels[3])
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]


async def test_websocket_base64_protocol(server: StreamingServer) -> None:
    url = exec_url(server, ["produce", "300"], stdin=False)
    async with ws_connect(ws_url(url), "v4.base64.channel.k8s.io") as client:
        text = ""
        with contextlib.suppress(ConnectionClosed):
            async for message in client:
                assert isinstance(message, str)
                if message[0] == "1":
                    text += message[1:]
    assert base64.b64decode(text) == BLOCK[:300]


async def test_websocket_tty_resize_reaches_backend(
    server: StreamingServer, backend: FakeBackend
) -> None:
    url = exec_url(server, ["resize"], tty=True, stderr=False)
    async with ws_connect(ws_url(url)) as client:
        await client.send(b"\x04" + json.dumps({"Width": 100, "Height": 30}).encode())
        await client.send(b"\x04" + json.dumps({"Width": 132, "Height": 43}).encode())
        await asyncio.sleep(0.1)
        await client.send(b"\xff\x00")
        channels = await ws_collect(client)
    assert json.loads(channels[3])["status"] == "Success"
    assert backend.resizes == [TerminalSize(100, 30), TerminalSize(132, 43)]


async def test_websocket_large_stdout(server: StreamingServer) -> None:
    size = 10 * 1024 * 1024
    url = exec_url(server, ["produce", str(size)], stdin=False)
    async with ws_connect(ws_url(url)) as client:
        channels = await ws_collect(client)
    assert len(channels[1]) == size
    assert hashlib.sha256(channels[1]).hexdigest() == expected_digest(size)


async def test_websocket_unknown_subprotocol_is_refused(server: StreamingServer) -> None:
    with pytest.raises(InvalidStatus):
        async with ws_connect(ws_url(exec_url(server, ["echo"])), "v9.channel.k8s.io"):
            pass


async def test_websocket_port_forward_two_ports(server: StreamingServer) -> None:
    url = server.create_portforward_url(PortForwardRequest(sandbox_id="pod1"))
    async with ws_connect(ws_url(url) + "?port=7&port=7", "v4.channel.k8s.io") as client:
        prefixes = {}
        for _ in range(4):
            message = await client.recv()
            assert isinstance(message, bytes)
            prefixes[message[0]] = message[1:]
        assert prefixes == dict.fromkeys(range(4), struct.pack("<H", 7))
        await client.send(b"\x00to port one")
        await client.send(b"\x02to port two")
        received: dict[int, bytes] = {0: b"", 2: b""}
        while received[0] != b"to port one" or received[2] != b"to port two":
            message = await asyncio.wait_for(client.recv(), 5)
            assert isinstance(message, bytes)
            received[message[0]] += message[1:]


async def test_websocket_malformed_frame_closes_connection(server: StreamingServer) -> None:
    url = exec_url(server, ["echo"])
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: Upgrade\r\n"
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    writer.write(b"\x82\x05hello")  # unmasked client frame: a protocol error
    rest = await asyncio.wait_for(reader.read(), 5)
    assert rest.startswith(b"\x88")
    assert struct.unpack(">H", rest[2:4]) == (1002,)
    writer.close()


# --- a peer without flow control (like moby/spdystream, used by kubelet and kubectl) --------


async def test_peer_without_window_updates_gets_everything_both_ways(
    server: StreamingServer,
) -> None:
    """spdystream neither sends WINDOW_UPDATE nor honours ours: nothing may stall or be lost."""
    size = 1024 * 1024
    reader, writer = await spdy_upgrade(exec_url(server, ["echo"], stderr=False))
    compressor = spdy.HeaderCompressor()
    for stream_id, kind in [(1, "error"), (3, "stdin"), (5, "stdout")]:
        writer.write(spdy.encode(spdy.SynStream(stream_id, (("streamtype", kind),)), compressor))

    async def send_stdin() -> None:
        for start in range(0, size, 32 * 1024):
            writer.write(spdy.encode(spdy.Data(3, BLOCK[start : start + 32 * 1024])))
            await writer.drain()
        writer.write(spdy.encode(spdy.Data(3, b"", spdy.FLAG_FIN)))

    sender = asyncio.create_task(send_stdin())
    parser = spdy.FrameParser()
    received: dict[int, bytearray] = {1: bytearray(), 5: bytearray()}
    finished: set[int] = set()
    while finished != {1, 5}:
        data = await asyncio.wait_for(reader.read(65536), 10)
        assert data, "server hung up early"
        for frame in parser.feed(data):
            if isinstance(frame, spdy.Data) and frame.stream_id in received:
                received[frame.stream_id] += frame.data
                if frame.fin:
                    finished.add(frame.stream_id)
    await sender
    writer.close()
    assert bytes(received[5]) == BLOCK[:size]
    assert json.loads(received[1])["status"] == "Success"
