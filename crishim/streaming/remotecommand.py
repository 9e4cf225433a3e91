"""The Kubernetes remote command protocols (exec and attach) over SPDY and WebSocket.

SPDY (``X-Stream-Protocol-Version``): the client opens one stream per channel, naming it
in a ``streamtype`` header: ``error``, ``stdin``, ``stdout``, ``stderr``, ``resize``.

    channel.k8s.io      v1: error stream carries a plain text message
    v2.channel.k8s.io   v2: same streams, fixed stream-creation handshake
    v3.channel.k8s.io   v3: adds the resize stream (JSON {"Width":..,"Height":..} objects)
    v4.channel.k8s.io   v4: the error stream carries a JSON metav1.Status, always written

WebSocket (``Sec-WebSocket-Protocol``): one connection, messages prefixed by a channel
number: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; ``v5.channel.k8s.io`` adds
channel 255, on which the client closes one of its channels (stdin EOF). The base64
variants carry the same in text messages (see ``wsconn.py``).

The command's end is reported on the error channel; then every stream is closed. If the
client vanishes first, the backend call is cancelled so the process is not left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from crishim.streaming.backend import (
    AttachRequest,
    ExecRequest,
    Output,
    Stdin,
    StreamingBackend,
    TerminalSize,
)
from crishim.streaming.session import SpdySession, SpdyStream
from crishim.streaming.wsconn import ChannelConnection

__all__ = [
    "SPDY_PROTOCOLS",
    "WEBSOCKET_PROTOCOLS",
    "serve_spdy",
    "serve_websocket",
]

log = logging.getLogger(__name__)

# In the order this server prefers them; the client's order decides (as in Kubernetes).
SPDY_PROTOCOLS = ("v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io")
WEBSOCKET_PROTOCOLS = (
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
)

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
_CLOSE_CHANNEL = 255
_MAX_RESIZE_BUFFER = 64 * 1024

RemoteRequest = ExecRequest | AttachRequest


@dataclass(frozen=True, slots=True)
class _Outcome:
    exit_code: int | None  # None for attach, which has no exit code
    error: BaseException | None = None


def _status_for(request: RemoteRequest, outcome: _Outcome) -> dict[str, object]:
    """The metav1.Status the v4/v5 protocols write on the error channel."""
    if outcome.error is not None:
        message = f"Internal error occurred: {outcome.error}"
        return {
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "details": {"causes": [{"message": str(outcome.error)}]},
            "code": 500,
        }
    if not outcome.exit_code:
        return {"metadata": {}, "status": "Success"}
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: {_exit_text(request, outcome)}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(outcome.exit_code)}]},
    }


def _exit_text(request: RemoteRequest, outcome: _Outcome) -> str:
    command = " ".join(request.cmd) if isinstance(request, ExecRequest) else "attach"
    return f"command '{command}' exited with {outcome.exit_code}"


def _error_message(request: RemoteRequest, outcome: _Outcome, *, structured: bool) -> bytes:
    """What goes on the error channel: JSON Status (v4+), else text on failure only."""
    if structured:
        return json.dumps(_status_for(request, outcome), separators=(",", ":")).encode()
    if outcome.error is not None:
        return f"error executing remote command: {outcome.error}".encode()
    if outcome.exit_code:
        return (
            f"command terminated with non-zero exit code: {_exit_text(request, outcome)}".encode()
        )
    return b""


async def _resize_events(read: Callable[[], Awaitable[bytes]]) -> AsyncIterator[TerminalSize]:
    """Decode the resize channel: a sequence of JSON objects, however they are chunked."""
    decoder = json.JSONDecoder()
    pending = ""
    while chunk := await read():
        pending += chunk.decode(errors="replace")
        while pending.strip():
            pending = pending.lstrip()
            try:
                value, end = decoder.raw_decode(pending)
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            pending = pending[end:]
            if isinstance(value, dict):
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    yield TerminalSize(int(value["Width"]), int(value["Height"]))
        if len(pending) > _MAX_RESIZE_BUFFER:
            log.info("resize channel carries no valid JSON; ignoring it")
            return


async def _run_backend(
    backend: StreamingBackend,
    request: RemoteRequest,
    *,
    stdin: Stdin | None,
    stdout: Output | None,
    stderr: Output | None,
    resize: AsyncIterator[TerminalSize] | None,
    client_gone: asyncio.Event,
) -> _Outcome | None:
    """Run exec/attach; ``None`` when the client left first (the call is then cancelled)."""
    call: Awaitable[int | None]
    if isinstance(request, ExecRequest):
        call = backend.exec(
            request.container_id,
            list(request.cmd),
            tty=request.tty,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            resize=resize,
        )
    else:
        call = backend.attach(
            request.container_id,
            tty=request.tty,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            resize=resize,
        )
    task: asyncio.Future[int | None] = asyncio.ensure_future(call)
    gone: asyncio.Future[Any] = asyncio.ensure_future(client_gone.wait())
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            # The client vanished (or the server is closing): stop the process rather than
            # let it run unattended.
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        return None
    try:
        return _Outcome(exit_code=task.result())
    except ConnectionError:
        # The client went away while the backend was writing to it.
        return None
    except Exception as exc:
        log.warning("streaming backend failed for %s: %s", request.container_id, exc)
        return _Outcome(exit_code=None, error=exc)


# --- SPDY ---------------------------------------------------------------------------------


async def serve_spdy(
    session: SpdySession,
    protocol: str,
    request: RemoteRequest,
    backend: StreamingBackend,
    *,
    stream_timeout: float = 30.0,
) -> None:
    """Serve one exec/attach over an upgraded SPDY session, then close it."""
    expected = {"error"}
    if request.stdin:
        expected.add("stdin")
    if request.stdout:
        expected.add("stdout")
    if request.stderr and not request.tty:
        expected.add("stderr")
    if request.tty and protocol in ("v3.channel.k8s.io", "v4.channel.k8s.io"):
        expected.add("resize")
    try:
        streams = await asyncio.wait_for(_collect_streams(session, expected), stream_timeout)
    except TimeoutError:
        log.info("client did not open the streams %s in time", sorted(expected))
        await session.close()
        return
    if streams is None:
        await session.close()
        return
    # Streams the client did not ask for are ignored; the error stream is ours to write.
    stdin = streams.get("stdin")
    resize_stream = streams.get("resize")
    resize = _resize_events(resize_stream.read) if resize_stream is not None else None
    outcome = await _run_backend(
        backend,
        request,
        stdin=stdin,
        stdout=streams.get("stdout"),
        stderr=streams.get("stderr"),
        resize=resize,
        client_gone=session.closed,
    )
    if outcome is not None:
        with contextlib.suppress(ConnectionError):
            message = _error_message(request, outcome, structured=protocol == "v4.channel.k8s.io")
            if message:
                await streams["error"].write(message)
            for stream in streams.values():
                await stream.close()
    await session.close()


async def _collect_streams(
    session: SpdySession, expected: set[str]
) -> dict[str, SpdyStream] | None:
    streams: dict[str, SpdyStream] = {}
    while not expected <= streams.keys():
        stream = await session.accept()
        if stream is None:
            return None
        kind = stream.headers.get("streamtype", "")
        if kind not in expected or kind in streams:
            await stream.reset()
            continue
        streams[kind] = stream
    return streams


# --- WebSocket ----------------------------------------------------------------------------


class _QueueStdin:
    """Stdin fed by the connection's reader; a bounded queue pushes back on the socket."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=16)
        self._pending = b""
        self._eof = False

    async def read(self, max_bytes: int = 65536) -> bytes:
        if not self._pending and not self._eof:
            self._pending = await self.queue.get()
            self._eof = not self._pending
        chunk, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return chunk


class _ChannelOutput:
    def __init__(self, connection: ChannelConnection, channel: int) -> None:
        self._connection = connection
        self._channel = channel

    async def write(self, data: bytes) -> None:
        if data:
            await self._connection.send(self._channel, data)


async def serve_websocket(
    connection: ChannelConnection,
    protocol: str,
    request: RemoteRequest,
    backend: StreamingBackend,
) -> None:
    """Serve one exec/attach over an upgraded WebSocket connection, then close it."""
    stdin = _QueueStdin() if request.stdin else None
    resize_queue = _QueueStdin() if request.tty else None
    pump = asyncio.create_task(_pump_websocket(connection, stdin, resize_queue, protocol))
    try:
        outcome = await _run_backend(
            backend,
            request,
            stdin=stdin,
            stdout=_ChannelOutput(connection, STDOUT) if request.stdout else None,
            stderr=(
                _ChannelOutput(connection, STDERR) if request.stderr and not request.tty else None
            ),
            resize=_resize_events(resize_queue.read) if resize_queue is not None else None,
            client_gone=connection.closed,
        )
        if outcome is not None:
            structured = protocol.startswith(("v4.", "v5."))
            message = _error_message(request, outcome, structured=structured)
            if message:
                with contextlib.suppress(ConnectionError):
                    await connection.send(ERROR, message)
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        await connection.close()


async def _pump_websocket(
    connection: ChannelConnection,
    stdin: _QueueStdin | None,
    resize: _QueueStdin | None,
    protocol: str,
) -> None:
    """Route client messages to stdin and resize; end both at close."""
    while (message := await connection.receive()) is not None:
        channel, payload = message
        if channel == STDIN and stdin is not None and payload:
            await stdin.queue.put(payload)
        elif channel == RESIZE and resize is not None:
            await resize.queue.put(payload)
        elif (
            channel == _CLOSE_CHANNEL
            and protocol == "v5.channel.k8s.io"
            and payload[:1] == bytes([STDIN])
            and stdin is not None
        ):
            await stdin.queue.put(b"")
    for queue in (stdin, resize):
        if queue is not None:
            with contextlib.suppress(asyncio.QueueFull):
                queue.queue.put_nowait(b"")
