"""The streaming server's limits on real loopback sockets: how many sessions it serves at
once, what a flood of connections that never finish their request costs it, and when an
idle session is ended. The backend is the fake of ``test_streaming_server``, with two more
commands for one-way traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus
from websockets.typing import Subprotocol

from crishim.streaming import spdy
from crishim.streaming.backend import Output, Stdin, TerminalSize
from crishim.streaming.limits import StreamingLimits
from crishim.streaming.server import StreamingServer
from tests.integration.test_streaming_server import (
    FakeBackend,
    exec_url,
    spdy_upgrade,
    ws_collect,
    ws_connect,
    ws_url,
)
from tests.rig.node_spdy import run_node

REPO = Path(__file__).resolve().parents[2]
SUCCESS = {"metadata": {}, "status": "Success"}


class LimitsBackend(FakeBackend):
    """The fake backend, plus:

    ``drip N SECONDS``  write one byte to stdout N times, SECONDS apart
    ``swallow``         read stdin until EOF, write nothing
    """

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
        if cmd[0] == "drip":
            assert stdout is not None
            for _ in range(int(cmd[1])):
                await asyncio.sleep(float(cmd[2]))
                await stdout.write(b".")
            return 0
        if cmd[0] == "swallow":
            assert stdin is not None
            while await stdin.read():
                pass
            return 0
        return await super().exec(
            container_id, cmd, tty=tty, stdin=stdin, stdout=stdout, stderr=stderr, resize=resize
        )


@pytest.fixture
def backend() -> LimitsBackend:
    return LimitsBackend(echo_port=9)  # port-forward is not used here


async def echo(client: ClientConnection, data: bytes) -> None:
    """One round trip through an ``echo`` session."""
    await client.send(b"\x00" + data)
    assert await asyncio.wait_for(client.recv(), 5) == b"\x01" + data


async def echo_session(server: StreamingServer) -> None:
    """A whole exec session: stdin echoed, then stdin closed and success reported."""
    async with ws_connect(ws_url(exec_url(server, ["echo"]))) as client:
        await echo(client, b"ping")
        await client.send(b"\xff\x00")
        channels = await ws_collect(client)
    assert json.loads(channels[3]) == SUCCESS


async def echo_session_dropped_or_not(server: StreamingServer, attempts: int = 5) -> None:
    """An exec session while a flood of half-open connections pours in: the cap drops the
    oldest handshakes, and on a loaded machine that may be this client's before the server
    has read its request; like any client it then connects again."""
    for attempt in range(attempts):
        try:
            await echo_session(server)
            return
        except (InvalidMessage, EOFError, ConnectionError):
            if attempt == attempts - 1:
                raise


async def connect_when_free(url: str, timeout: float = 5.0) -> ClientConnection:
    """Connect to ``url``, retrying while the server answers 429."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await connect(
                ws_url(url),
                subprotocols=[Subprotocol("v5.channel.k8s.io")],
                proxy=None,
                compression=None,
            )
        except InvalidStatus as exc:
            if exc.response.status_code != 429 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def spdy_refusal(url: str) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the answer to a SPDY upgrade request, as kubectl sends it."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /{path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: Upgrade\r\n"
        "Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n".encode()
    )
    return await read_response(reader, writer)


async def read_response(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[int, dict[str, Any]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), json.loads(body)


async def read_spdy_stream(reader: asyncio.StreamReader, stream_id: int) -> bytes:
    """What the server sends on one stream, up to its FIN."""
    parser = spdy.FrameParser()
    data = bytearray()
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, "the server hung up early"
        for frame in parser.feed(chunk):
            if isinstance(frame, spdy.Data) and frame.stream_id == stream_id:
                data += frame.data
                if frame.fin:
                    return bytes(data)


# --- sessions at once ---------------------------------------------------------------------


async def test_session_past_the_limit_is_refused_at_once_and_a_slot_frees_when_one_ends(
    backend: LimitsBackend,
) -> None:
    async with (
        StreamingServer(backend, limits=StreamingLimits(max_sessions=3)) as server,
        contextlib.AsyncExitStack() as stack,
    ):
        clients = [
            await stack.enter_async_context(ws_connect(ws_url(exec_url(server, ["echo"]))))
            for _ in range(3)
        ]
        for client in clients:
            await echo(client, b"before")

        refused_url = exec_url(server, ["echo"])
        started = time.monotonic()
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(ws_url(refused_url)):
                pass
        assert time.monotonic() - started < 2, "a refusal must not wait for a slot"
        response = info.value.response
        assert response.status_code == 429
        status = json.loads(response.body)
        assert status["reason"] == "TooManyRequests"
        assert status["code"] == 429
        assert "serves at most 3 at once" in status["message"]
        assert "max_sessions" in status["message"]
        # SPDY clients (kubelet, kubectl, crictl) get the same answer.
        assert await spdy_refusal(exec_url(server, ["echo"])) == (429, status)

        for client in clients:
            await echo(client, b"after")
        # One ends: its slot frees, and the refused URL, not used up, now works.
        await clients[0].send(b"\xff\x00")
        assert json.loads((await ws_collect(clients[0]))[3]) == SUCCESS
        async with await connect_when_free(refused_url) as late:
            await echo(late, b"late")
        for client in clients[1:]:
            await echo(client, b"still")


async def test_request_head_not_sent_in_time_gets_408(backend: LimitsBackend) -> None:
    async with StreamingServer(backend, limits=StreamingLimits(request_timeout=0.2)) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"POST /exec/token HTTP/1.1\r\nHost: crishim\r\n")
        status, body = await read_response(reader, writer)
    assert status == 408
    assert body["reason"] == "Timeout"


# --- a flood of half-open connections -----------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [b"", b"POST /exec/token HTTP/1.1\r\nHost: crishim\r\n"],
    ids=["silent", "half-a-request-head"],
)
async def test_half_open_flood_holds_little_memory_and_sessions_go_on(
    backend: LimitsBackend, payload: bytes
) -> None:
    """2000 connections that never finish a request: 128 are held, the rest dropped."""
    count = 2000
    # A request timeout longer than the test: only the cap may drop connections.
    limits = StreamingLimits(max_handshakes=128, request_timeout=120)
    async with StreamingServer(backend, limits=limits) as server:
        host, port = server.address
        await echo_session(server)  # first-use allocations happen before measuring
        gc.collect()
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            flood = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.rig.flood",
                host,
                str(port),
                str(count),
                str(limits.max_handshakes),
                repr(payload),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=REPO,
            )
            try:
                assert flood.stdout is not None
                halfway = json.loads(await asyncio.wait_for(flood.stdout.readline(), 30))
                assert halfway == {"halfway": count // 2}
                started = time.monotonic()
                # while the flood pours in
                await asyncio.wait_for(echo_session_dropped_or_not(server), 10)
                during = time.monotonic() - started
                report = json.loads(await asyncio.wait_for(flood.stdout.readline(), 90))
                started = time.monotonic()
                await asyncio.wait_for(echo_session(server), 10)  # with the cap's worth held
                after = time.monotonic() - started
                gc.collect()
                held, peak = (size - baseline for size in tracemalloc.get_traced_memory())
            finally:
                assert flood.stdin is not None
                flood.stdin.close()
                await flood.wait()
        finally:
            tracemalloc.stop()
    print(
        f"flood of {count} ({report}): crishim holds {held / 1024:.0f} KiB after, "
        f"peak {peak / 1024:.0f} KiB; exec session took {during:.2f} s during the flood, "
        f"{after:.2f} s after"
    )
    assert report["connected"] == count
    assert report["answered"] == 0
    assert report["dropped"] >= count - limits.max_handshakes
    # Each held connection costs crishim some 8-11 KiB (transport, stream reader and
    # writer, task); 2000 of them would be over 16 MiB.
    assert held < 3 * 1024 * 1024
    assert during < 5
    assert after < 2


# --- idle sessions ------------------------------------------------------------------------


async def test_idle_websocket_session_is_closed_and_the_backend_sees_the_client_gone(
    backend: LimitsBackend,
) -> None:
    async with StreamingServer(backend, limits=StreamingLimits(idle_timeout=0.3)) as server:
        url = exec_url(server, ["sleep"], stdin=False, stderr=False)
        started = time.monotonic()
        async with ws_connect(ws_url(url)) as client:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(client.recv(), 5)
        await asyncio.wait_for(backend.cancelled.wait(), 5)
    assert 0.3 <= time.monotonic() - started < 3
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1001
    assert info.value.rcvd.reason == "no traffic for 0.3 seconds"


async def test_idle_spdy_session_is_closed_and_the_backend_sees_the_client_gone(
    backend: LimitsBackend,
) -> None:
    async with StreamingServer(backend, limits=StreamingLimits(idle_timeout=0.3)) as server:
        url = exec_url(server, ["sleep"], stdin=False, stderr=False)
        started = time.monotonic()
        reader, writer = await spdy_upgrade(url)
        compressor = spdy.HeaderCompressor()
        for stream_id, kind in [(1, "error"), (3, "stdout")]:
            writer.write(
                spdy.encode(spdy.SynStream(stream_id, (("streamtype", kind),)), compressor)
            )
        received = await asyncio.wait_for(reader.read(), 5)  # until the server hangs up
        writer.close()
        await asyncio.wait_for(backend.cancelled.wait(), 5)
    assert 0.3 <= time.monotonic() - started < 3
    assert spdy.GoAway(3) in spdy.FrameParser().feed(received)


@pytest.mark.parametrize("direction", ["both ways", "client to server", "server to client"])
async def test_traffic_either_way_keeps_a_websocket_session_open(
    backend: LimitsBackend, direction: str
) -> None:
    """Twelve messages 0.1 s apart, over a session whose idle timeout is 0.3 s."""
    async with StreamingServer(backend, limits=StreamingLimits(idle_timeout=0.3)) as server:
        if direction == "server to client":
            url = exec_url(server, ["drip", "12", "0.1"], stdin=False)
            async with ws_connect(ws_url(url)) as client:
                channels = await ws_collect(client)
            assert channels[1] == b"." * 12
        else:
            url = exec_url(server, ["echo" if direction == "both ways" else "swallow"])
            async with ws_connect(ws_url(url)) as client:
                for _ in range(12):
                    await asyncio.sleep(0.1)
                    if direction == "both ways":
                        await echo(client, b"tick")
                    else:
                        await client.send(b"\x00tick")
                await client.send(b"\xff\x00")
                channels = await ws_collect(client)
    assert json.loads(channels[3]) == SUCCESS
    assert not backend.cancelled.is_set()


async def test_output_keeps_a_spdy_session_open(backend: LimitsBackend, node_client: Path) -> None:
    async with StreamingServer(backend, limits=StreamingLimits(idle_timeout=0.3)) as server:
        url = exec_url(server, ["drip", "12", "0.1"], stdin=False)
        result = await run_node(node_client, {"url": url, "stdin": None})
    assert result["stdout"] == "." * 12
    assert json.loads(result["error"]) == SUCCESS


async def test_input_keeps_a_spdy_session_open(backend: LimitsBackend) -> None:
    async with StreamingServer(backend, limits=StreamingLimits(idle_timeout=0.3)) as server:
        reader, writer = await spdy_upgrade(exec_url(server, ["swallow"], stderr=False))
        compressor = spdy.HeaderCompressor()
        for stream_id, kind in [(1, "error"), (3, "stdin"), (5, "stdout")]:
            writer.write(
                spdy.encode(spdy.SynStream(stream_id, (("streamtype", kind),)), compressor)
            )
        for _ in range(12):
            await asyncio.sleep(0.1)
            writer.write(spdy.encode(spdy.Data(3, b"tick")))
        writer.write(spdy.encode(spdy.Data(3, b"", spdy.FLAG_FIN)))
        error = await read_spdy_stream(reader, 1)
        writer.close()
    assert json.loads(error) == SUCCESS
    assert not backend.cancelled.is_set()
