"""crishim's gRPC server (crishim/api/grpc_server.py) on a socket of the test's own,
through two independent clients (grpclib's, on h2, and Google's grpcio, C-core) and raw
HTTP/2 frames for what no polite client sends."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
from grpclib import GRPCError
from grpclib.client import Channel, StreamUnaryMethod, UnaryStreamMethod, UnaryUnaryMethod
from grpclib.const import Cardinality, Handler, Status

from crishim.api import h2frames as h2
from crishim.api import v1
from crishim.api.codec import CriCodec
from crishim.api.grpc_server import GrpcServer
from crishim.api.grpc_stream import MAX_MESSAGE, STREAM_WINDOW

Req, Rep = v1.ExecSyncRequest, v1.ExecSyncResponse


class Calls:
    """Handlers of a test service, recording what happened to them."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.max_queued = 0
        self.started = asyncio.Event()

    def mapping(self) -> dict[str, Handler]:
        uu, us, su = Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM, Cardinality.STREAM_UNARY
        return {
            "/t.T/Echo": Handler(self.echo, uu, Req, Rep),
            "/t.T/Fail": Handler(self.fail, uu, Req, Rep),
            "/t.T/Huge": Handler(self.huge, uu, Req, Rep),
            "/t.T/Slow": Handler(self.slow, uu, Req, Rep),
            "/t.T/Silent": Handler(self.silent, uu, Req, Rep),
            "/t.T/Events": Handler(self.events, us, Req, Rep),
            "/t.T/Upload": Handler(self.upload, su, Req, Rep),
        }

    async def echo(self, stream: Any) -> None:
        """Replies with the request's container_id, then ``timeout`` bytes of stdout."""
        request = await stream.recv_message()
        stdout = request.container_id.encode() + b"x" * request.timeout
        await stream.send_message(Rep(stdout=stdout))

    async def fail(self, stream: Any) -> None:
        await stream.recv_message()
        raise GRPCError(Status.NOT_FOUND, "nö such container: 100% gone\nreally")

    async def huge(self, stream: Any) -> None:
        """An error whose message, escaped, would not fit one frame."""
        await stream.recv_message()
        raise GRPCError(Status.NOT_FOUND, "é\n" * 10_000)

    async def slow(self, stream: Any) -> None:
        request = await stream.recv_message()
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.append(request.container_id)
            raise

    async def silent(self, stream: Any) -> None:
        await stream.recv_message()

    async def events(self, stream: Any) -> None:
        """``timeout`` messages of len(cmd[0]) bytes each, numbered in exit_code."""
        request = await stream.recv_message()
        for n in range(request.timeout):
            await stream.send_message(Rep(stdout=request.cmd[0].encode(), exit_code=n))

    async def upload(self, stream: Any) -> None:
        """Takes messages slowly; replies with the number of bytes and messages."""
        total = count = 0
        async for request in stream:
            self.max_queued = max(self.max_queued, stream.queued)
            total += len(request.container_id)
            count += 1
            await asyncio.sleep(0.02)
        await stream.send_message(Rep(stdout=str(total).encode(), exit_code=count))


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    # A socket path must stay within 108 bytes.
    with tempfile.TemporaryDirectory(prefix="crishim-grpc-", dir="/tmp") as name:
        yield Path(name)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Calls, GrpcServer, str]]:
    calls = Calls()
    server = GrpcServer(calls.mapping(), CriCodec())
    with short_dir() as where:
        path = str(where / "t.sock")
        await server.start(path)
        try:
            yield calls, server, path
        finally:
            server.close()
            await server.wait_closed()


def unary(channel: Channel, name: str) -> UnaryUnaryMethod[Any, Any]:
    return UnaryUnaryMethod(channel, f"/t.T/{name}", Req, Rep)


async def test_unary_calls_round_trip_with_large_messages_both_ways(served: Any) -> None:
    _, _, path = served
    async with Channel(path=path) as channel:
        echo = unary(channel, "Echo")
        small = await echo(Req(container_id="hello", timeout=3))
        assert small.stdout == b"helloxxx"
        # larger than a frame, than the default window, than our stream window
        big_in = "y" * (STREAM_WINDOW + 100_000)
        reply = await echo(Req(container_id=big_in, timeout=5_000_000))
        assert reply.stdout == big_in.encode() + b"x" * 5_000_000


async def test_many_concurrent_calls_on_one_connection_and_several(served: Any) -> None:
    _, _, path = served
    channels = [Channel(path=path) for _ in range(4)]
    try:
        calls = [
            unary(channels[n % 4], "Echo")(Req(container_id=f"call-{n}", timeout=n * 100))
            for n in range(200)
        ]
        replies = await asyncio.gather(*calls)
        for n, reply in enumerate(replies):
            assert reply.stdout == f"call-{n}".encode() + b"x" * (n * 100)
    finally:
        for channel in channels:
            channel.close()


async def test_errors_carry_status_and_the_whole_message(served: Any) -> None:
    _, _, path = served
    async with Channel(path=path) as channel:
        with pytest.raises(GRPCError) as info:
            await unary(channel, "Fail")(Req())
        assert info.value.status is Status.NOT_FOUND
        assert info.value.message == "nö such container: 100% gone\nreally"
        with pytest.raises(GRPCError) as info:
            await UnaryUnaryMethod(channel, "/t.T/Nope", Req, Rep)(Req())
        assert info.value.status is Status.UNIMPLEMENTED
        assert info.value.message == "Method not found: /t.T/Nope"
        with pytest.raises(GRPCError) as info:
            await unary(channel, "Silent")(Req())
        assert info.value.status is Status.INTERNAL
        # the connection still serves
        assert (await unary(channel, "Echo")(Req(container_id="ok"))).stdout == b"ok"


async def test_an_error_message_too_long_for_a_frame_is_cut(served: Any) -> None:
    calls, _, path = served
    async with Channel(path=path) as channel:
        other = await start_slow(channel, calls, "bystander")
        with pytest.raises(GRPCError) as info:
            await unary(channel, "Huge")(Req())
        assert info.value.status is Status.NOT_FOUND
        assert (info.value.message or "").startswith("é\né\n")
        assert len((info.value.message or "").encode()) <= h2.GRPC_MESSAGE_LIMIT
        # the connection, and the call running on it, live on
        assert not other.done()
        assert (await unary(channel, "Echo")(Req(container_id="ok"))).stdout == b"ok"
        other.cancel()


async def start_slow(channel: Channel, calls: Calls, name: str) -> asyncio.Future[Any]:
    """A Slow call, once its handler runs."""
    call = asyncio.ensure_future(unary(channel, "Slow")(Req(container_id=name)))
    await asyncio.wait_for(calls.started.wait(), 5)
    return call


async def test_a_cancelled_call_cancels_its_handler(served: Any) -> None:
    calls, _, path = served
    async with Channel(path=path) as channel:
        call = await start_slow(channel, calls, "c1")
        call.cancel()
        for _ in range(100):
            if calls.cancelled:
                break
            await asyncio.sleep(0.02)
        assert calls.cancelled == ["c1"]
        assert (await unary(channel, "Echo")(Req(container_id="ok"))).stdout == b"ok"


async def test_server_stream_larger_than_the_clients_window(served: Any) -> None:
    _, _, path = served
    async with Channel(path=path) as channel:
        events = UnaryStreamMethod(channel, "/t.T/Events", Req, Rep)
        replies = await events(Req(cmd=["e" * 60_000], timeout=120))
    assert [r.exit_code for r in replies] == list(range(120))
    assert all(r.stdout == b"e" * 60_000 for r in replies)


async def test_client_stream_is_held_back_by_a_slow_handler(served: Any) -> None:
    calls, _, path = served
    chunk = "u" * (1024 * 1024)
    async with Channel(path=path) as channel:
        upload = StreamUnaryMethod(channel, "/t.T/Upload", Req, Rep)
        reply = await upload([Req(container_id=chunk) for _ in range(16)])
    assert reply.exit_code == 16
    assert reply.stdout == str(16 * len(chunk)).encode()
    # 16 MiB went up; the server never held much more than a window of it
    assert 0 < calls.max_queued <= 2 * STREAM_WINDOW


async def test_grpcio_client_unary_stream_and_errors(served: Any) -> None:
    _, _, path = served
    # grpcio blocks: it runs in a thread while the server runs on this loop.
    await asyncio.to_thread(grpcio_calls, path)


def grpcio_calls(path: str) -> None:
    with grpc.insecure_channel(f"unix:{path}") as channel:
        encode, decode = bytes, Rep.FromString
        echo = channel.unary_unary("/t.T/Echo", encode, decode)
        assert echo(Req(container_id="hi", timeout=70_000)).stdout == b"hi" + b"x" * 70_000
        events = channel.unary_stream("/t.T/Events", encode, decode)
        replies = list(events(Req(cmd=["z" * 30_000], timeout=50)))
        assert [r.exit_code for r in replies] == list(range(50))
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/t.T/Fail", encode, decode)(Req())
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "nö such container: 100% gone\nreally"
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/t.T/Slow", encode, decode)(Req(), timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


# --- raw HTTP/2, for what clients do not send ---


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()

    @classmethod
    async def connect(cls, path: str, preface: bytes = h2.PREFACE) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(preface + h2.settings_frame({}))
        return cls(reader, writer)

    def request(
        self,
        stream_id: int,
        method: str,
        body: bytes,
        extra: list[tuple[str, str]] = (),  # type: ignore[assignment]
    ) -> None:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", f"/t.T/{method}"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra,
        ]
        block = self.encoder.encode(headers)
        self.writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, stream_id, block))
        self.writer.write(h2.frame(h2.DATA, h2.END_STREAM, stream_id, body))

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await self.reader.readexactly(9)
        high, low, frame_type, flags, stream_id = h2.FRAME_HEADER.unpack(head)
        payload = await self.reader.readexactly(high << 8 | low)
        return frame_type, flags, stream_id, payload

    async def trailers(self, stream_id: int) -> dict[str, str]:
        """The headers of the frame ending ``stream_id``."""
        while True:
            frame_type, flags, sid, payload = await asyncio.wait_for(self.frame(), 5)
            if frame_type == h2.HEADERS and sid == stream_id and flags & h2.END_STREAM:
                return dict(decoded(self.decoder, payload))
            if frame_type == h2.GOAWAY:
                raise AssertionError(f"GOAWAY {payload!r}")

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def raw_client(path: str) -> AsyncIterator[RawClient]:
    """A connected :class:`RawClient`, closed afterwards."""
    client = await RawClient.connect(path)
    try:
        yield client
    finally:
        client.close()


def decoded(decoder: hpack.Decoder, block: bytes) -> list[tuple[str, str]]:
    """A header block as (name, value) pairs of text."""
    return [(str(name), str(value)) for name, value in decoder.decode(block)]


def message(request: Any, flag: int = 0) -> bytes:
    data = bytes(request)
    return struct.pack(">BI", flag, len(data)) + data


async def test_server_enforces_the_calls_deadline(served: Any) -> None:
    calls, _, path = served
    async with raw_client(path) as client:
        client.request(1, "Slow", message(Req(container_id="late")), [("grpc-timeout", "200m")])
        trailers = await client.trailers(1)
        assert trailers["grpc-status"] == str(Status.DEADLINE_EXCEEDED.value)
        assert calls.cancelled == ["late"]


async def test_a_deadline_passing_before_the_handler_starts_is_answered(served: Any) -> None:
    """The deadline fires in the loop turn that delivers the request: the handler's task
    exists but has not run. The call still ends with DEADLINE_EXCEEDED."""
    calls, _, path = served
    async with raw_client(path) as client:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/t.T/Slow"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("grpc-timeout", "20m"),
        ]
        block = client.encoder.encode(headers)
        client.writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, block))
        await asyncio.sleep(0.005)  # the server has the headers and the deadline's timer
        data = message(Req(container_id="never"))
        client.writer.write(h2.frame(h2.DATA, h2.END_STREAM, 1, data))
        time.sleep(0.05)  # noqa: ASYNC251 - the loop must be late: data and deadline together
        trailers = await client.trailers(1)
        assert trailers["grpc-status"] == str(Status.DEADLINE_EXCEEDED.value)
        assert calls.cancelled == []  # the handler never ran


async def test_malformed_requests_are_refused_by_name(served: Any) -> None:
    _, _, path = served
    async with raw_client(path) as client:
        client.request(1, "Echo", message(Req()), [("grpc-timeout", "123456789S")])
        trailers = await client.trailers(1)
        assert (trailers[":status"], trailers["grpc-status"]) == ("400", "13")
        assert "grpc-timeout" in trailers["grpc-message"]
        headers = [(":method", "POST"), (":path", "/t.T/Echo"), ("content-type", "text/plain")]
        block = client.encoder.encode(headers)
        client.writer.write(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 3, block))
        trailers = await client.trailers(3)
        assert trailers[":status"] == "415"
        assert "text/plain" in trailers["grpc-message"]


async def test_compressed_and_oversized_messages_are_refused_by_name(served: Any) -> None:
    _, _, path = served
    async with raw_client(path) as client:
        client.request(1, "Echo", message(Req(), flag=1), [("grpc-encoding", "gzip")])
        trailers = await client.trailers(1)
        assert trailers["grpc-status"] == str(Status.UNIMPLEMENTED.value)
        assert "compressed" in trailers["grpc-message"]
        too_big = struct.pack(">BI", 0, MAX_MESSAGE + 1) + b"\0" * 1000
        client.request(3, "Echo", too_big)
        trailers = await client.trailers(3)
        assert trailers["grpc-status"] == str(Status.RESOURCE_EXHAUSTED.value)
        assert str(MAX_MESSAGE) in trailers["grpc-message"]
        # container_id (a string) of bytes that are not UTF-8
        client.request(5, "Echo", b"\0\0\0\0\x04\x0a\x02\xff\xfe")
        trailers = await client.trailers(5)
        assert trailers["grpc-status"] == str(Status.INVALID_ARGUMENT.value)
        assert "ExecSyncRequest" in trailers["grpc-message"]
        # container_id (a string) as a varint: refused, not handed on as an int
        client.request(7, "Echo", b"\0\0\0\0\x02\x08\x05")
        trailers = await client.trailers(7)
        assert trailers["grpc-status"] == str(Status.INVALID_ARGUMENT.value)
        assert "field 1 under wire type 0" in trailers["grpc-message"]


async def test_garbage_closes_only_its_own_connection(served: Any) -> None:
    _, _, path = served
    bad = await RawClient.connect(path, preface=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    frames = []
    with contextlib.suppress(asyncio.IncompleteReadError):
        while True:
            frames.append(await asyncio.wait_for(bad.frame(), 5))
    assert any(frame_type == h2.GOAWAY for frame_type, *_ in frames)
    bad.close()
    # a frame header announcing more than the frame size limit
    worse = await RawClient.connect(path)
    worse.writer.write(h2.FRAME_HEADER.pack(0xFFFF, 0xFF, h2.DATA, 0, 1))
    frames = []
    with contextlib.suppress(asyncio.IncompleteReadError):
        while True:
            frames.append(await asyncio.wait_for(worse.frame(), 5))
    goaways = [payload for frame_type, _, _, payload in frames if frame_type == h2.GOAWAY]
    assert struct.unpack(">II", goaways[0][:8])[1] == h2.FRAME_SIZE_ERROR
    worse.close()
    async with Channel(path=path) as channel:
        assert (await unary(channel, "Echo")(Req(container_id="still"))).stdout == b"still"


async def test_a_client_that_does_not_read_stops_being_read(served: Any) -> None:
    """PINGs from a client that never reads its PING ACKs: the server stops reading it
    instead of piling up answers."""
    _, server, path = served
    client = await RawClient.connect(path)
    try:
        ping = h2.frame(h2.PING, 0, 0, b"12345678")
        client.writer.write(ping * 300_000)  # 5 MiB of PINGs, 5 MiB of ACKs to send back
        await asyncio.sleep(1.0)
        (conn,) = server.connections
        assert conn.buffered() < 2 * 1024 * 1024
    finally:
        client.writer.transport.abort()


async def test_closing_the_server_cancels_running_calls(served: Any) -> None:
    calls, server, path = served
    async with Channel(path=path) as channel:
        call = await start_slow(channel, calls, "running")
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)
        assert calls.cancelled == ["running"]
        with pytest.raises(Exception):  # noqa: B017, PT011 - any client error: the server left
            await asyncio.wait_for(call, 5)


# --- the pure parts ---


@pytest.mark.parametrize("value", [0, 1, 14, 15, 16, 126, 127, 128, 300, 16_383, 20_000])
def test_hpack_literals_decode_with_a_real_decoder(value: int) -> None:
    name, text = b"x-test", b"v" * value
    assert decoded(hpack.Decoder(), h2.hpack_literal(name, text)) == [("x-test", text.decode())]


def test_reply_headers_and_trailers_decode_with_a_real_decoder() -> None:
    decoder = hpack.Decoder()
    assert decoded(decoder, h2.REPLY_HEADERS) == [
        (":status", "200"),
        ("content-type", "application/grpc"),
    ]
    assert decoded(decoder, h2.status_block(415)) == [(":status", "415")]
    assert decoded(decoder, h2.trailer_block(5, "50% nö")) == [
        ("grpc-status", "5"),
        ("grpc-message", "50%25 n%C3%B6"),
    ]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1H", 3600.0), ("2M", 120.0), ("3S", 3.0), ("250m", 0.25), ("100u", 1e-4), ("5n", 5e-9)],
)
def test_grpc_timeouts(value: str, seconds: float) -> None:
    assert h2.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "S", "1x", "123456789S", "-1S", "1.5S"])
def test_malformed_grpc_timeouts_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="grpc-timeout"):
        h2.parse_timeout(value)


def test_settings_out_of_range_are_connection_errors() -> None:
    with pytest.raises(h2.H2ConnectionError) as info:
        h2.parse_settings(struct.pack(">HI", h2.SETTINGS_INITIAL_WINDOW_SIZE, 2**31))
    assert info.value.code == h2.FLOW_CONTROL_ERROR
    with pytest.raises(h2.H2ConnectionError) as info:
        h2.parse_settings(struct.pack(">HI", h2.SETTINGS_MAX_FRAME_SIZE, 100))
    assert info.value.code == h2.PROTOCOL_ERROR
    with pytest.raises(h2.H2ConnectionError):
        h2.parse_settings(b"\0\0\0")


def test_padding_is_stripped_and_checked() -> None:
    assert h2.strip_padding(h2.PADDED, b"\x02abc\0\0") == b"abc"
    assert h2.strip_padding(0, b"abc") == b"abc"
    assert h2.strip_padding(h2.PADDED, b"\x00" + b"\0" * 5 + b"hdr", 5) == b"hdr"
    with pytest.raises(h2.H2ConnectionError):
        h2.strip_padding(h2.PADDED, b"\x09abc")
