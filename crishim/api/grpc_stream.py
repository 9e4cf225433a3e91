"""One gRPC call on crishim's server (:mod:`crishim.api.grpc_server`), as its handler sees
it: the part of grpclib's server stream that the generated handlers use (``recv_message``,
``send_message``, async iteration), and the call's state the connection keeps: what the
client sent and has yet to be taken, what the reply still has to send, and both windows.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING, Any

from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status

from crishim.api import h2frames as h2

if TYPE_CHECKING:
    from crishim.api.grpc_server import GrpcConnection

__all__ = ["MAX_MESSAGE", "SERVER_STREAMS", "STREAM_WINDOW", "ServerStream"]

MAX_MESSAGE = 16 * 1024 * 1024
STREAM_WINDOW = 4 * 1024 * 1024
SERVER_STREAMS = (Cardinality.UNARY_STREAM, Cardinality.STREAM_STREAM)


class ServerStream:
    """One call, as its handler sees it (the part of grpclib's server stream it uses)."""

    __slots__ = (
        "_conn",
        "_drained",
        "_messages",
        "_partial",
        "_waiter",
        "deadline_passed",
        "ended",
        "error",
        "handler",
        "headers_sent",
        "id",
        "offset",
        "pending",
        "queued",
        "recv_window",
        "reset",
        "send_window",
        "started",
        "task",
        "timer",
        "trailers",
        "unacked",
    )

    def __init__(self, conn: GrpcConnection, stream_id: int, handler: Handler) -> None:
        self._conn = conn
        self.id = stream_id
        self.handler = handler
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.deadline_passed = False
        self.started = False  # the handler's task has taken its first step
        self.reset = False
        # receiving
        self.ended = False
        self.recv_window = STREAM_WINDOW
        self.unacked = 0  # bytes received and not yet given back to the client's window
        self.queued = 0  # bytes of whole messages the handler has not taken yet
        self._partial = bytearray()
        self._messages: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.error: GRPCError | None = None
        # sending
        self.send_window = conn.peer_initial_window
        self.headers_sent = False
        self.pending = b""  # DATA payload not yet sent, from ``offset``
        self.offset = 0
        self.trailers: bytes | None = None
        self._drained: asyncio.Future[None] | None = None

    # -- the handler's side --

    async def recv_message(self) -> Any:
        """The next request message, or None once the client has ended its stream."""
        while not self._messages:
            if self.error is not None:
                raise self.error
            if self.ended:
                if self._partial:
                    raise GRPCError(Status.INTERNAL, "the request stream ended inside a message")
                return None
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        raw = self._messages.popleft()
        self.queued -= len(raw)
        self._conn.taken(self)
        request_type = self.handler.request_type
        try:
            return self._conn.codec.decode(raw, request_type)
        except Exception as exc:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"the request is not a valid {request_type.__name__} message: {exc}",
            ) from exc

    def __aiter__(self) -> ServerStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.recv_message()
        if message is None:
            raise StopAsyncIteration
        return message

    async def send_message(self, message: Any) -> None:
        """Send a reply message; a stream's messages leave at once, a single reply with
        the trailers."""
        data = self._conn.codec.encode(message, self.handler.reply_type)
        self.append(h2.MESSAGE_PREFIX.pack(0, len(data)) + data)
        if self.handler.cardinality in SERVER_STREAMS:
            self._conn.send(self)
            if self.pending and not self.reset:
                self._drained = self._conn.loop.create_future()
                try:
                    await self._drained
                finally:
                    self._drained = None

    # -- the connection's side --

    def append(self, payload: bytes) -> None:
        """Queue DATA payload behind what is still waiting for the window."""
        if self.offset < len(self.pending):
            self.pending = self.pending[self.offset :] + payload
        else:
            self.pending = payload
        self.offset = 0

    def drained(self) -> None:
        """All queued DATA has left."""
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def on_data(self, data: bytes) -> None:
        """DATA from the client: split into whole messages."""
        if self.error is not None:
            return
        if self._partial:
            self._partial += data
            buf: bytes | bytearray = self._partial
        else:
            buf = data
        pos, size = 0, len(buf)
        while size - pos >= h2.MESSAGE_PREFIX_SIZE:
            flag, length = h2.MESSAGE_PREFIX.unpack_from(buf, pos)
            if length > MAX_MESSAGE:
                self.fail(
                    GRPCError(
                        Status.RESOURCE_EXHAUSTED,
                        f"request message of {length} bytes is larger than the limit "
                        f"of {MAX_MESSAGE} bytes",
                    )
                )
                return
            if flag:
                self.fail(
                    GRPCError(
                        Status.UNIMPLEMENTED,
                        "compressed request messages are not supported; send them uncompressed",
                    )
                )
                return
            end = pos + h2.MESSAGE_PREFIX_SIZE + length
            if end > size:
                break
            message = bytes(buf[pos + h2.MESSAGE_PREFIX_SIZE : end])
            self._messages.append(message)
            self.queued += len(message)
            pos = end
        if pos == size:
            self._partial = bytearray()
        elif buf is not self._partial:
            self._partial = bytearray(buf[pos:])
        elif pos:
            del self._partial[:pos]
        self.wake()

    def fail(self, error: GRPCError) -> None:
        """The request cannot be received: the handler's next receive raises ``error``."""
        self.error = error
        self._partial = bytearray()
        self.wake()

    def end(self) -> None:
        """The client ended its stream."""
        self.ended = True
        self.wake()

    def wake(self) -> None:
        """Wake the handler waiting for a message."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def abandon(self) -> None:
        """The call is gone (reset by the client, or its connection lost): nothing more is
        sent, its handler is cancelled, its deadline dropped."""
        self.reset = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        self.drained()

    def expire(self) -> None:
        """The call's deadline has passed."""
        self.deadline_passed = True
        if self.task is None:
            self._conn.expired(self)
        elif self.started:
            self.task.cancel()
        # (a task not yet started sees deadline_passed when it does, and answers)
