"""The streaming server's limits on real loopback sockets: how many sessions it serves at
once, and what a flood of connections that never finish their request costs it. The
backend is the fake of ``test_streaming_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from crishim.streaming.limits import StreamingLimits
from crishim.streaming.server import StreamingServer
from tests.integration.test_streaming_server import (
    FakeBackend,
    exec_url,
    ws_collect,
    ws_connect,
    ws_url,
)

REPO = Path(__file__).resolve().parents[2]
SUCCESS = {"metadata": {}, "status": "Success"}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(echo_port=9)  # port-forward is not used here


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


# --- sessions at once ---------------------------------------------------------------------


async def test_session_past_the_limit_is_refused_at_once_and_a_slot_frees_when_one_ends(
    backend: FakeBackend,
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


async def test_request_head_not_sent_in_time_gets_408(backend: FakeBackend) -> None:
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
    backend: FakeBackend, payload: bytes
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
                await asyncio.wait_for(echo_session(server), 10)  # while the flood pours in
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
