"""The ``/metrics`` endpoint: a minimal asyncio HTTP/1.1 server for Prometheus scrapes.

GET (or HEAD) ``/metrics`` answers the text exposition format 0.0.4 from ``render``; other
paths answer 404, other methods on ``/metrics`` 405. Connections are kept alive between
requests (HTTP/1.1) and closed after ``idle_timeout`` seconds without one, or after a
request that asks for it. Request bodies are not expected: one announced with
Content-Length is read and dropped (up to a small limit), a chunked one is refused.

The server binds to loopback only unless ``allow_remote`` says otherwise: the metrics tell
what runs on the node, which is not for everyone on the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from crishim.errors import ConfigError

__all__ = ["CONTENT_TYPE", "MetricsServer"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
LINE_LIMIT = 16 * 1024
MAX_HEADERS = 100
MAX_BODY = 64 * 1024

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
}


class _BadRequest(Exception):
    """The request cannot be parsed; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    keep_alive: bool


async def _is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback one."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]).is_loopback for info in infos
    )


class MetricsServer:
    """Serves ``render()`` at ``/metrics`` on ``host:port`` (port 0 picks a free one)."""

    def __init__(
        self,
        render: Callable[[], str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        allow_remote: bool = False,
        idle_timeout: float = 30.0,
    ) -> None:
        self._render = render
        self._host = host
        self._port = port
        self._allow_remote = allow_remote
        self._idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        # Open connections and the tasks serving them.
        self._connections: dict[asyncio.StreamWriter, asyncio.Task[None]] = {}

    @property
    def address(self) -> tuple[str, int]:
        """The host and port listened on (the first socket's), once started."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the metrics server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Listen; ConfigError for a non-loopback host unless remote access is allowed."""
        if not self._allow_remote and not await _is_loopback(self._host):
            raise ConfigError(
                f"metrics address {self._host!r} is not a loopback address; "
                "allow remote access explicitly to serve metrics on it"
            )
        self._server = await asyncio.start_server(
            self._serve, self._host, self._port, limit=LINE_LIMIT
        )
        host, port = self.address
        log.info("serving metrics on http://%s:%d%s", host, port, METRICS_PATH)

    async def stop(self) -> None:
        """Stop listening and close every open connection."""
        if self._server is None:
            return
        self._server.close()
        tasks = list(self._connections.values())
        for writer in list(self._connections):
            writer.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[writer] = task
        try:
            keep_alive = True
            while keep_alive:
                try:
                    async with asyncio.timeout(self._idle_timeout):
                        request = await _read_request(reader)
                except TimeoutError:
                    return
                except _BadRequest as exc:
                    await _respond(writer, exc.status, f"{exc}\n", keep_alive=False)
                    return
                if request is None:
                    return
                keep_alive = request.keep_alive
                await self._answer(writer, request)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._connections.pop(writer, None)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, writer: asyncio.StreamWriter, request: _Request) -> None:
        keep_alive = request.keep_alive
        if request.path != METRICS_PATH:
            await _respond(writer, 404, "not found\n", keep_alive=keep_alive)
            return
        if request.method not in ("GET", "HEAD"):
            await _respond(
                writer,
                405,
                "method not allowed\n",
                keep_alive=keep_alive,
                headers={"Allow": "GET, HEAD"},
            )
            return
        try:
            body = self._render()
        except Exception:
            log.exception("rendering metrics failed")
            await _respond(writer, 500, "metrics could not be rendered\n", keep_alive=keep_alive)
            return
        await _respond(
            writer,
            200,
            body,
            keep_alive=keep_alive,
            content_type=CONTENT_TYPE,
            head=request.method == "HEAD",
        )


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    """The next request's head (its body, if any, dropped); None at a clean end of stream."""
    try:
        line = await reader.readline()
        while line in (b"\r\n", b"\n"):  # tolerated before a request line (RFC 9112 2.2)
            line = await reader.readline()
        if not line:
            return None
        headers: dict[str, str] = {}
        while True:
            header = await reader.readline()
            if header in (b"\r\n", b"\n"):
                break
            if not header:
                raise asyncio.IncompleteReadError(header, None)
            if len(headers) >= MAX_HEADERS:
                raise _BadRequest(400, "too many headers")
            name, sep, value = header.decode("latin-1").partition(":")
            if not sep or not name.strip() or name != name.strip():
                raise _BadRequest(400, "malformed header line")
            headers[name.lower()] = value.strip()
    except ValueError as exc:  # a line longer than the stream's limit
        raise _BadRequest(400, "request line or header too long") from exc
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    await _drop_body(reader, headers)
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    # HTTP/1.1 keeps the connection unless told to close it; HTTP/1.0 only when asked.
    http10 = version == "HTTP/1.0"
    keep_alive = "keep-alive" in connection if http10 else "close" not in connection
    return _Request(method, target.split("?", 1)[0], keep_alive)


async def _drop_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    if "transfer-encoding" in headers:
        raise _BadRequest(501, "request bodies with a transfer encoding are not supported")
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise _BadRequest(400, "invalid Content-Length")
    if int(length) > MAX_BODY:
        raise _BadRequest(413, "request body too large")
    if int(length):
        await reader.readexactly(int(length))


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: str,
    *,
    keep_alive: bool,
    content_type: str = "text/plain; charset=utf-8",
    headers: dict[str, str] | None = None,
    head: bool = False,
) -> None:
    data = body.encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(data)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    if not keep_alive:
        lines.append("Connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    if not head:
        writer.write(data)
    await writer.drain()
