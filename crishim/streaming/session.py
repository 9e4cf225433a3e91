"""A SPDY/3.1 server session on an asyncio stream pair: streams, flow control, PING, GOAWAY.

The frames themselves come from ``spdy.py``; this module gives them meaning. The client
opens every stream (Kubernetes clients open one per channel); the session answers each
SYN_STREAM with a SYN_REPLY at once, as the Kubernetes streaming servers do, and hands the
stream out through :meth:`SpdySession.accept`.

Flow control, and why it bends for one kind of peer:

- Receiving: each stream buffers at most its window (64 KiB, SPDY/3.1's initial window);
  WINDOW_UPDATEs (per stream, and for the connection on stream 0) are sent only as the
  consumer reads, so a compliant peer can never make us buffer more. A peer that ignores
  windows is not reset: the session simply stops reading the socket until the consumer
  has caught up, so TCP pushes back instead and memory stays bounded.
- Sending: writes wait for the peer's stream and connection windows. Kubernetes' own SPDY
  library (moby/spdystream, used by kubelet, kubectl and crictl) speaks the framing but
  neither sends nor honours WINDOW_UPDATE. A peer that has shown no sign of flow control
  (no SETTINGS with a window size, no WINDOW_UPDATE) and leaves a write blocked on an empty
  window for ``legacy_grace`` seconds is taken to be such a peer; from then on the session
  relies on TCP backpressure alone for that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from crishim.streaming import spdy

__all__ = ["SpdySession", "SpdyStream", "StreamClosedError"]

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024
# Large enough to keep per-frame overhead low, small enough to interleave streams fairly.
_MAX_CHUNK = 32 * 1024


# Kubernetes' own clients ignore reply headers; HTTP-minded SPDY clients (node-spdy's
# spdy-transport) reset a stream whose reply lacks :status, so send the HTTP/1.1 pair.
_REPLY_HEADERS: spdy.HeaderList = ((":status", "200"), (":version", "HTTP/1.1"))


class StreamClosedError(ConnectionError):
    """A write on a stream that was reset, or on a session that is gone."""


class SpdyStream:
    """One client-opened stream: an async byte reader and writer."""

    def __init__(self, session: SpdySession, stream_id: int, headers: spdy.HeaderList) -> None:
        self._session = session
        self.stream_id = stream_id
        self.headers = dict(headers)
        self._buffer = bytearray()
        self._readable = asyncio.Event()
        # Set while the buffer holds at most one window: the reader waits on it otherwise.
        self._drained = asyncio.Event()
        self._drained.set()
        self._remote_closed = False
        self._local_closed = False
        self._reset = False
        self.send_window = session.peer_initial_window
        self._unacked = 0

    @property
    def closed(self) -> bool:
        """Whether both halves are closed, or the stream was reset."""
        return self._reset or (self._remote_closed and self._local_closed)

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes from the client; ``b""`` at FIN, reset or disconnect."""
        while not self._buffer:
            if self._remote_closed or self._reset:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        if len(self._buffer) <= self._session.local_window:
            self._drained.set()
        await self._session._consumed(self, len(chunk))
        return chunk

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting for the peer's windows and the socket."""
        view = memoryview(data)
        while view:
            if self._local_closed or self._reset:
                raise StreamClosedError(f"stream {self.stream_id} is closed")
            allowed = await self._session._reserve_window(self, min(len(view), _MAX_CHUNK))
            await self._session._send(spdy.Data(self.stream_id, bytes(view[:allowed])))
            view = view[allowed:]

    async def close(self) -> None:
        """Half-close: tell the client we will send nothing more (FIN)."""
        if self._local_closed or self._reset:
            return
        self._local_closed = True
        with contextlib.suppress(ConnectionError):
            await self._session._send(spdy.Data(self.stream_id, b"", spdy.FLAG_FIN))
        self._session._forget_if_done(self)

    async def reset(self, status: int = spdy.RstStatus.CANCEL) -> None:
        """Abort the stream in both directions."""
        if self._reset:
            return
        self._mark_reset()
        with contextlib.suppress(ConnectionError):
            await self._session._send(spdy.RstStream(self.stream_id, status))

    def _mark_reset(self) -> None:
        self._reset = True
        self._readable.set()
        self._drained.set()
        self._session._forget(self)

    def _receive(self, data: bytes, fin: bool) -> None:
        if data:
            self._buffer += data
            if len(self._buffer) > self._session.local_window:
                self._drained.clear()
        if fin:
            self._remote_closed = True
        self._readable.set()


class SpdySession:
    """The server side of one SPDY/3.1 connection (after the HTTP upgrade)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_frame_size: int = spdy.DEFAULT_MAX_FRAME_SIZE,
        legacy_grace: float = 0.5,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._parser = spdy.FrameParser(max_frame_size=max_frame_size)
        self._compressor = spdy.HeaderCompressor()
        self._send_lock = asyncio.Lock()
        self._streams: dict[int, SpdyStream] = {}
        self._accept_queue: asyncio.Queue[SpdyStream | None] = asyncio.Queue()
        self._last_stream_id = 0
        self._window_changed = asyncio.Condition()
        self._legacy_grace = legacy_grace
        self._peer_flow_control = False
        self._ignore_windows = False
        self._goaway_sent = False
        self.local_window = spdy.DEFAULT_WINDOW
        self.peer_initial_window = spdy.DEFAULT_WINDOW
        self.send_window = spdy.DEFAULT_WINDOW
        self._conn_unacked = 0
        self.closed = asyncio.Event()
        self.error: BaseException | None = None
        # time.monotonic() of the last bytes read from or written to the socket.
        self.last_activity = time.monotonic()

    async def accept(self) -> SpdyStream | None:
        """The next stream the client opens; ``None`` once the session ends or went away."""
        if self.closed.is_set() and self._accept_queue.empty():
            return None
        stream = await self._accept_queue.get()
        if stream is None:
            self._accept_queue.put_nowait(None)  # every later accept() also sees the end
        return stream

    async def run(self) -> None:
        """Read and dispatch frames until the client disconnects or breaks the protocol.

        A protocol error is answered with GOAWAY(PROTOCOL_ERROR) and ends this connection
        only; it is kept in :attr:`error`.
        """
        try:
            while True:
                data = await self._reader.read(_READ_SIZE)
                if not data:
                    break
                self.last_activity = time.monotonic()
                for frame in self._parser.feed(data):
                    await self._dispatch(frame)
        except spdy.SpdyProtocolError as exc:
            log.info("SPDY protocol error, closing the connection: %s", exc)
            self.error = exc
            with contextlib.suppress(ConnectionError):
                await self.goaway(spdy.GoAwayStatus.PROTOCOL_ERROR)
        except ConnectionError as exc:
            self.error = exc
        finally:
            await self._shut_down()

    async def goaway(self, status: int = spdy.GoAwayStatus.OK) -> None:
        """Tell the client no more streams will be accepted."""
        if self._goaway_sent:
            return
        self._goaway_sent = True
        await self._send(spdy.GoAway(self._last_stream_id, status))

    async def close(self, *, linger: float = 5.0) -> None:
        """Send GOAWAY, give the client ``linger`` seconds to hang up, then close the socket.

        Closing at once could cut off frames the client has not read yet (spdy-transport
        drops what is still buffered when the socket closes), so the client is left to end
        the connection, as Kubernetes' servers do.
        """
        with contextlib.suppress(ConnectionError):
            await self.goaway()
        if linger > 0 and not self.closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), linger)
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        await self._shut_down()

    async def expire(self, reason: str) -> None:
        """End the session now, as when the client vanishes: GOAWAY, then drop the socket.

        For a session gone idle, so the client may be reading nothing: the GOAWAY is
        written past the send lock (a writer may hold it, stuck in drain; frames never
        interleave, each is written whole) and the socket is aborted if it cannot be sent.
        SPDY has no field for ``reason``: the caller logs it.
        """
        transport = self._writer.transport
        if not self._goaway_sent and not transport.is_closing():
            self._goaway_sent = True
            self._writer.write(spdy.encode(spdy.GoAway(self._last_stream_id)))
        if transport.get_write_buffer_size():
            transport.abort()
        await self._shut_down()

    async def _shut_down(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for stream in list(self._streams.values()):
            stream._mark_reset()
        self._accept_queue.put_nowait(None)
        async with self._window_changed:
            self._window_changed.notify_all()
        self._writer.close()

    async def _send(self, frame: spdy.Frame) -> None:
        if self.closed.is_set():
            raise StreamClosedError("the SPDY session is closed")
        # One lock covers compression and writing: header blocks must reach the wire in the
        # order the shared zlib context produced them.
        async with self._send_lock:
            self._writer.write(spdy.encode(frame, self._compressor))
            self.last_activity = time.monotonic()
            await self._writer.drain()
            self.last_activity = time.monotonic()

    async def _dispatch(self, frame: spdy.Frame) -> None:
        if isinstance(frame, spdy.Data):
            await self._on_data(frame)
        elif isinstance(frame, spdy.SynStream):
            await self._on_syn_stream(frame)
        elif isinstance(frame, spdy.WindowUpdate):
            await self._on_window_update(frame)
        elif isinstance(frame, spdy.Settings):
            await self._on_settings(frame)
        elif isinstance(frame, spdy.Ping):
            # Odd ids are the client's pings; even ones would be answers to ours (none sent).
            if frame.ping_id % 2 == 1:
                await self._send(frame)
        elif isinstance(frame, spdy.RstStream):
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                stream._mark_reset()
                await self._notify_window()
        elif isinstance(frame, spdy.GoAway):
            # Streams already open carry on; no new ones will come.
            self._accept_queue.put_nowait(None)
        elif isinstance(frame, spdy.Headers):
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                stream.headers.update(frame.headers)
                if frame.flags & spdy.FLAG_FIN:
                    stream._receive(b"", True)
        # SYN_REPLY: this server opens no streams, so there is nothing to reply to.

    async def _on_syn_stream(self, frame: spdy.SynStream) -> None:
        sid = frame.stream_id
        if sid % 2 == 0 or sid <= self._last_stream_id:
            await self._send(spdy.RstStream(sid, spdy.RstStatus.PROTOCOL_ERROR))
            return
        self._last_stream_id = sid
        if self._goaway_sent:
            await self._send(spdy.RstStream(sid, spdy.RstStatus.REFUSED_STREAM))
            return
        stream = SpdyStream(self, sid, frame.headers)
        self._streams[sid] = stream
        if frame.flags & spdy.FLAG_FIN:
            stream._receive(b"", True)
        if frame.flags & spdy.FLAG_UNIDIRECTIONAL:
            stream._local_closed = True
        await self._send(spdy.SynReply(sid, _REPLY_HEADERS))
        self._accept_queue.put_nowait(stream)

    async def _on_data(self, frame: spdy.Data) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None or stream._reset or stream._remote_closed:
            # Late data for a stream we reset: drop it, but give the connection window back.
            await self._credit_connection(len(frame.data))
            if stream is None and frame.stream_id > self._last_stream_id:
                await self._send(spdy.RstStream(frame.stream_id, spdy.RstStatus.INVALID_STREAM))
            return
        stream._receive(frame.data, frame.fin)
        self._forget_if_done(stream)
        # Backpressure for peers that ignore our window: stop reading the socket.
        while not stream._drained.is_set() and not self.closed.is_set():
            await stream._drained.wait()

    async def _on_window_update(self, frame: spdy.WindowUpdate) -> None:
        self._peer_flow_control = True
        if frame.stream_id == 0:
            self.send_window += frame.delta
            if self.send_window > spdy.MAX_WINDOW:
                raise spdy.SpdyProtocolError("connection window grew past 2^31-1")
        else:
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                return
            stream.send_window += frame.delta
            if stream.send_window > spdy.MAX_WINDOW:
                await stream.reset(spdy.RstStatus.FLOW_CONTROL_ERROR)
        await self._notify_window()

    async def _on_settings(self, frame: spdy.Settings) -> None:
        for entry in frame.entries:
            if entry.id == spdy.SettingsId.INITIAL_WINDOW_SIZE:
                if entry.value > spdy.MAX_WINDOW:
                    raise spdy.SpdyProtocolError("initial window size past 2^31-1")
                self._peer_flow_control = True
                delta = entry.value - self.peer_initial_window
                self.peer_initial_window = entry.value
                for stream in self._streams.values():
                    stream.send_window += delta
        await self._notify_window()

    async def _notify_window(self) -> None:
        async with self._window_changed:
            self._window_changed.notify_all()

    async def _reserve_window(self, stream: SpdyStream, wanted: int) -> int:
        """Wait until ``stream`` may send, then take up to ``wanted`` bytes of both windows."""
        async with self._window_changed:
            while True:
                if stream._reset or self.closed.is_set():
                    raise StreamClosedError(f"stream {stream.stream_id} is closed")
                if self._ignore_windows:
                    return wanted
                allowed = min(wanted, stream.send_window, self.send_window)
                if allowed > 0:
                    stream.send_window -= allowed
                    self.send_window -= allowed
                    return allowed
                if self._peer_flow_control:
                    await self._window_changed.wait()
                    continue
                try:
                    await asyncio.wait_for(self._window_changed.wait(), self._legacy_grace)
                except TimeoutError:
                    if not self._peer_flow_control:
                        log.debug("peer sends no WINDOW_UPDATE: relying on TCP backpressure")
                        self._ignore_windows = True

    async def _consumed(self, stream: SpdyStream, size: int) -> None:
        """Give back window for bytes the consumer has read."""
        if not stream._remote_closed and not stream._reset:
            stream._unacked += size
            if stream._unacked >= self.local_window // 2:
                delta, stream._unacked = stream._unacked, 0
                with contextlib.suppress(ConnectionError):
                    await self._send(spdy.WindowUpdate(stream.stream_id, delta))
        await self._credit_connection(size)

    async def _credit_connection(self, size: int) -> None:
        self._conn_unacked += size
        if self._conn_unacked >= self.local_window // 2:
            delta, self._conn_unacked = self._conn_unacked, 0
            with contextlib.suppress(ConnectionError):
                await self._send(spdy.WindowUpdate(0, delta))

    def _forget_if_done(self, stream: SpdyStream) -> None:
        if stream._remote_closed and stream._local_closed and not stream._buffer:
            self._forget(stream)

    def _forget(self, stream: SpdyStream) -> None:
        self._streams.pop(stream.stream_id, None)
