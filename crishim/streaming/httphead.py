"""The HTTP/1.1 side of the streaming server: one request head in, one response head out.

Only what an upgrade needs: the request line and headers (the upgrade requests have no
body), and a response that is either ``101 Switching Protocols`` or a refusal that
closes the connection.

A refusal's body is a Kubernetes ``metav1.Status`` in JSON, because that is the one body
client-go turns into the user's error as it is: its SPDY and WebSocket upgraders both
decode a Status from a non-101 response and return it as an API error (kubectl prints
``Error from server (TooManyRequests): <message>``; the API server's WebSocket-to-SPDY
translator passes the Status on to kubectl), where plain text ends up appended to a
generic ``unable to upgrade connection`` or ``bad handshake`` error, if at all. kubelet,
when it proxies the stream, echoes the response to the client unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.parse
from dataclasses import dataclass

__all__ = [
    "MAX_REQUEST_HEAD",
    "HttpError",
    "HttpRequest",
    "read_request",
    "respond",
    "status_body",
]

MAX_REQUEST_HEAD = 16 * 1024

# metav1.StatusReason for the statuses this server answers with (clients test the reason,
# e.g. apierrors.IsTooManyRequests); statuses without one get no reason.
_STATUS_REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    408: "Timeout",
    429: "TooManyRequests",
    503: "ServiceUnavailable",
}


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A parsed request head; header names are lower case."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]

    def header(self, name: str) -> str:
        """All values of a header joined by commas (HTTP's rule for repeated headers)."""
        return ", ".join(self.headers.get(name, []))

    def tokens(self, name: str) -> list[str]:
        """A comma-separated header as a list of its non-empty items."""
        return [item.strip() for item in self.header(name).split(",") if item.strip()]


class HttpError(Exception):
    """A request refused with an HTTP status; the message goes in the response body."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def status_body(status: int, message: str) -> bytes:
    """A failure ``metav1.Status`` as JSON: what Kubernetes clients show of a refusal."""
    status_object: dict[str, object] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
    }
    if status in _STATUS_REASONS:
        status_object["reason"] = _STATUS_REASONS[status]
    status_object["code"] = status
    return json.dumps(status_object, separators=(",", ":")).encode()


async def read_request(reader: asyncio.StreamReader) -> HttpRequest:
    """Read and parse one request head (request line and headers)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise HttpError(431, "Request Header Fields Too Large", "request head too large") from exc
    if len(head) > MAX_REQUEST_HEAD:
        raise HttpError(431, "Request Header Fields Too Large", "request head too large")
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError as exc:
        raise HttpError(400, "Bad Request", "malformed request line") from exc
    if not version.startswith("HTTP/1."):
        raise HttpError(505, "HTTP Version Not Supported", "HTTP/1.x only")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "Bad Request", "malformed header line")
        headers.setdefault(name.lower(), []).append(value.strip())
    parsed = urllib.parse.urlsplit(target)
    return HttpRequest(
        method=method,
        path=parsed.path,
        query=urllib.parse.parse_qs(parsed.query),
        headers=headers,
    )


async def respond(
    writer: asyncio.StreamWriter, status: int, reason: str, headers: dict[str, str], body: str
) -> None:
    """Write a response head; a refusal (any status but 101) carries ``body`` in a Status."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    if status != 101:
        payload = status_body(status, body)
        headers = {
            **headers,
            "Content-Type": "application/json",
            "Content-Length": str(len(payload)),
            "Connection": "close",
        }
    else:
        payload = b""
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
