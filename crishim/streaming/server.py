"""The streaming HTTP server behind CRI Exec, Attach and PortForward.

A CRI call does not stream anything itself: the runtime stores the request under a
random single-use token and answers with a URL (``http://127.0.0.1:PORT/exec/<token>``).
kubelet, crictl or kubectl then connect to that URL and upgrade the HTTP/1.1 connection
to SPDY/3.1 (``Upgrade: SPDY/3.1``, protocol chosen with ``X-Stream-Protocol-Version``)
or to WebSocket (protocol chosen with ``Sec-WebSocket-Protocol``).

Tokens expire after ``token_ttl`` seconds (60 by default, as in Kubernetes) and work
once: an unknown, expired or reused token gets 404. Each connection runs in its own task,
so a client that breaks its protocol only loses its own connection. ``limits.py`` bounds
the sessions served at once, the connections still sending their request, and how long a
session may sit idle; a refusal is a ``metav1.Status`` that Kubernetes clients show.

The HTTP handling is deliberately minimal: one request per connection, headers only (the
upgrade requests have no body), no keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from crishim.streaming import portforward, remotecommand
from crishim.streaming import websocket as ws
from crishim.streaming.backend import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    StreamingBackend,
)
from crishim.streaming.httphead import (
    MAX_REQUEST_HEAD,
    HttpError,
    HttpRequest,
    read_request,
    respond,
)
from crishim.streaming.limits import HandshakeGate, LogTally, StreamingLimits, idle_timeout
from crishim.streaming.session import SpdySession
from crishim.streaming.wsconn import ChannelConnection

__all__ = ["StreamingServer"]

log = logging.getLogger(__name__)

# How long a refused or finished connection may take to accept our last bytes.
_HANG_UP_SECONDS = 5.0
# Connections the kernel completes before crishim accepts them. asyncio's default (100)
# overflows under a burst, and each connection past it waits for a SYN retransmit (1 s,
# then 3 s, ...): real clients with it. Accepted in one batch, they cost a few KiB each.
_LISTEN_BACKLOG = 1024

Kind = Literal["exec", "attach", "portforward"]
_Request = ExecRequest | AttachRequest | PortForwardRequest


@dataclass(frozen=True, slots=True)
class _Pending:
    kind: Kind
    request: _Request
    expires_at: float


class StreamingServer:
    """Serves exec/attach/port-forward streams for URLs it hands out.

    ``port=0`` picks a free port; :attr:`address` tells which after :meth:`start`.
    ``base_url`` overrides the scheme and host of the URLs handed out (for a server bound
    to 0.0.0.0, say). ``limits`` bounds what clients may hold (see ``limits.py``).
    """

    def __init__(
        self,
        backend: StreamingBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token_ttl: float = 60.0,
        stream_creation_timeout: float = 30.0,
        base_url: str | None = None,
        limits: StreamingLimits | None = None,
    ) -> None:
        self._backend = backend
        self._host = host
        self._port = port
        self._token_ttl = token_ttl
        self._stream_timeout = stream_creation_timeout
        self._base_url = base_url
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._limits = limits or StreamingLimits()
        self._handshakes = HandshakeGate(self._limits.max_handshakes)
        self._sessions = 0
        self._refused = LogTally()

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the server listens on."""
        if self._server is None:
            raise RuntimeError("the streaming server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(
            self._on_connection,
            self._host,
            self._port,
            backlog=_LISTEN_BACKLOG,
            # What a connection may buffer before its head is complete (asyncio's default
            # is 64 KiB); after the upgrade the sessions read in their own chunks anyway.
            limit=MAX_REQUEST_HEAD,
        )

    async def close(self) -> None:
        """Stop listening and end every connection (cancelling backend calls)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> StreamingServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def create_exec_url(self, request: ExecRequest) -> str:
        """Store an Exec request; return the single-use URL its client connects to."""
        return self._create_url("exec", request)

    def create_attach_url(self, request: AttachRequest) -> str:
        """Store an Attach request; return its URL."""
        return self._create_url("attach", request)

    def create_portforward_url(self, request: PortForwardRequest) -> str:
        """Store a PortForward request; return its URL."""
        return self._create_url("portforward", request)

    def _create_url(self, kind: Kind, request: _Request) -> str:
        now = time.monotonic()
        for token in [t for t, p in self._pending.items() if p.expires_at <= now]:
            del self._pending[token]
        token = secrets.token_urlsafe(16)
        self._pending[token] = _Pending(kind, request, now + self._token_ttl)
        return f"{self._url_base()}/{kind}/{token}"

    def _url_base(self) -> str:
        if self._base_url is not None:
            return self._base_url.rstrip("/")
        host, port = self.address
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def _take(self, kind: str, token: str) -> _Request:
        # Popped whatever happens next: a token is good for one connection attempt only.
        pending = self._pending.pop(token, None)
        if pending is None or pending.kind != kind or pending.expires_at <= time.monotonic():
            raise HttpError(404, "Not Found", "unknown or expired streaming token")
        return pending.request

    # --- connections ---------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                await self._serve(reader, writer)
            finally:
                self._connections.discard(task)
                await _hang_up(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only close() cancels these tasks (while serving or hanging up); asyncio's
            # stream machinery would log a cancelled connection task as an error.
            pass
        except Exception:
            log.exception("streaming connection failed")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            http = await self._read_head(reader, writer)
            segments = http.path.strip("/").split("/")
            if len(segments) != 2 or segments[0] not in ("exec", "attach", "portforward"):
                raise HttpError(404, "Not Found", "no such streaming endpoint")
            kind, token = segments
            # Refused before the token is taken: the URL stays good for a retry in its TTL.
            self._check_session_limit()
            request = self._take(kind, token)
            upgrade = http.header("upgrade").lower()
            if "upgrade" not in [t.lower() for t in http.tokens("connection")]:
                raise HttpError(400, "Bad Request", "streaming needs a connection upgrade")
            self._sessions += 1
            try:
                if upgrade.startswith("spdy/3.1"):
                    await self._serve_spdy(reader, writer, http, request)
                elif upgrade == "websocket":
                    await self._serve_websocket(reader, writer, http, request)
                else:
                    raise HttpError(400, "Bad Request", f"unsupported upgrade {upgrade!r}")
            finally:
                self._sessions -= 1
        except HttpError as exc:
            await respond(writer, exc.status, exc.reason, {}, str(exc))

    async def _read_head(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> HttpRequest:
        with self._handshakes.waiting(writer.transport):
            try:
                async with asyncio.timeout(self._limits.request_timeout):
                    return await read_request(reader)
            except TimeoutError as exc:
                raise HttpError(408, "Request Timeout", "request head not received") from exc

    def _check_session_limit(self) -> None:
        limit = self._limits.max_sessions
        if self._sessions < limit:
            return
        if refused := self._refused.add():
            log.warning(
                "refused %d streaming session(s): %d are being served, the limit "
                "([streaming] max_sessions)",
                refused,
                limit,
            )
        raise HttpError(
            429,
            "Too Many Requests",
            f"too many streaming sessions: the container runtime serves at most {limit} at "
            "once (crishim [streaming] max_sessions); try again when one has ended",
        )

    async def _serve_spdy(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        http: HttpRequest,
        request: _Request,
    ) -> None:
        is_portforward = isinstance(request, PortForwardRequest)
        supported = portforward.SPDY_PROTOCOLS if is_portforward else remotecommand.SPDY_PROTOCOLS
        offered = http.tokens("x-stream-protocol-version")
        if offered:
            protocol = next((p for p in offered if p in supported), None)
            if protocol is None:
                raise HttpError(
                    403, "Forbidden", f"no supported protocol among {offered}: want {supported}"
                )
        else:
            # Kubernetes falls back to the oldest protocol when the client offers none.
            protocol = supported[-1]
        headers = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
        if offered:
            headers["X-Stream-Protocol-Version"] = protocol
        await respond(writer, 101, "Switching Protocols", headers, "")
        session = SpdySession(reader, writer)
        # The watch spans the closing too: a client that reads nothing could hold it up.
        async with idle_timeout(session, self._limits.idle_timeout):
            runner = asyncio.create_task(session.run())
            try:
                if isinstance(request, PortForwardRequest):
                    await portforward.serve_spdy(session, request, self._backend)
                else:
                    await remotecommand.serve_spdy(
                        session,
                        protocol,
                        request,
                        self._backend,
                        stream_timeout=self._stream_timeout,
                    )
            finally:
                # The protocol handlers close gracefully; this is for errors and cancellation.
                await session.close(linger=0)
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner

    async def _serve_websocket(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        http: HttpRequest,
        request: _Request,
    ) -> None:
        if http.header("sec-websocket-version").strip() != "13":
            raise HttpError(426, "Upgrade Required", "WebSocket version 13 is required")
        try:
            accept = ws.accept_key(http.header("sec-websocket-key"))
        except ws.WebSocketProtocolError as exc:
            raise HttpError(400, "Bad Request", str(exc)) from exc
        is_portforward = isinstance(request, PortForwardRequest)
        supported = (
            portforward.WEBSOCKET_PROTOCOLS if is_portforward else remotecommand.WEBSOCKET_PROTOCOLS
        )
        offered = http.tokens("sec-websocket-protocol")
        protocol = next((p for p in offered if p in supported), None)
        if protocol is None and offered:
            raise HttpError(400, "Bad Request", f"no supported subprotocol among {offered}")
        ports: list[int] = []
        if isinstance(request, PortForwardRequest):
            ports = _ports(http.query) or list(request.ports)
            if not ports:
                raise HttpError(400, "Bad Request", "no port to forward")
        headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Accept": accept}
        if protocol is not None:
            headers["Sec-WebSocket-Protocol"] = protocol
        await respond(writer, 101, "Switching Protocols", headers, "")
        chosen = protocol or "channel.k8s.io"
        connection = ChannelConnection(reader, writer, base64_framing="base64" in chosen)
        async with idle_timeout(connection, self._limits.idle_timeout):
            if isinstance(request, PortForwardRequest):
                await portforward.serve_websocket(connection, request, self._backend, ports)
            else:
                await remotecommand.serve_websocket(connection, chosen, request, self._backend)


async def _hang_up(writer: asyncio.StreamWriter) -> None:
    """Close the connection; abort it if the client does not take our last bytes in time."""
    writer.close()
    try:
        async with asyncio.timeout(_HANG_UP_SECONDS):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # it ended with an error: closed all the same


def _ports(query: dict[str, list[str]]) -> list[int]:
    ports = []
    for value in query.get("port", []):
        for item in value.split(","):
            try:
                port = int(item)
            except ValueError as exc:
                raise HttpError(400, "Bad Request", f"invalid port {item!r}") from exc
            if not 0 < port < 65536:
                raise HttpError(400, "Bad Request", f"port {port} out of range")
            ports.append(port)
    return ports
