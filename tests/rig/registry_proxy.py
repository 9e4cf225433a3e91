"""An HTTP proxy in front of a real registry, for testing crishim's registry *client*.

:class:`RegistryProxy` listens on ``127.0.0.1:<free port>`` and forwards
everything to an upstream registry (normally the rig's :class:`Registry`),
adding what the upstream cannot do on demand:

* **Auth** the way Docker Hub and distribution do it: ``basic`` (a Basic
  challenge on every ``/v2/`` request) or ``bearer`` (a Bearer challenge
  pointing at the proxy's own token endpoint, which hands out opaque tokens
  with scopes and an expiry, supports ``offline_token`` refresh tokens and the
  OAuth2 ``POST`` flow).  Authorization is checked here and never forwarded.
* **Faults**: the next N matching requests get an error status, a dropped
  connection, a short body that still "completes", flipped bytes, a slow
  stream, or no answer at all (:class:`Fault`).
* **Records** of every request and token for assertions (:attr:`requests`,
  :meth:`count`, :attr:`tokens_issued`).

Only the standard library is used.  Bodies are streamed in 64 KiB chunks in
both directions, never buffered whole.  ``stop()`` shuts every client
connection and joins every thread it started.

Usage::

    with RegistryProxy(registry.url, auth="bearer", users={"u": "p"}) as proxy:
        proxy.add_fault(Fault(r"/blobs/sha256:", status=503))
        ...pull from proxy.host...
        assert proxy.count("GET", r"/blobs/") == 2
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import hmac
import http.client
import http.server
import json
import logging
import math
import re
import secrets
import select
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self, cast

__all__ = [
    "AuthKind",
    "AuthMode",
    "Fault",
    "RegistryProxy",
    "RequestRecord",
    "TokenRecord",
]

logger = logging.getLogger(__name__)

AuthMode = Literal["none", "basic", "bearer"]
#: what the client presented in its Authorization header
AuthKind = Literal["none", "basic", "bearer", "other"]

#: body chunk size both ways; ``Fault.delay_per_chunk`` sleeps between chunks of this size
CHUNK = 64 * 1024
# Small request bodies we read ourselves (token endpoint forms) are capped at this.
_MAX_FORM = 64 * 1024

# RFC 7230 section 6.1: meaningful for one connection only, never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Not forwarded upstream either: Host is the upstream's, Content-Length is
# re-sent by us, Authorization is checked here and belongs to the proxy, and
# Expect was already answered (BaseHTTPRequestHandler sends 100 Continue).
_NOT_FORWARDED_UP = _HOP_BY_HOP | {"host", "content-length", "authorization", "expect"}

# /v2/<name>/<kind>/...: the repository name is the shortest prefix before an
# endpoint keyword, which is right for every name the distribution grammar allows
# unless a path component of the name itself is one of these keywords.
_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)/")


# --- public records and fault description ----------------------------------


class RequestRecord(NamedTuple):
    """One request as the proxy saw it.

    ``path`` excludes the query string.  ``status`` is None until the status
    line goes out, and stays None if it never does (``hang``, or the client
    went away first).  ``bytes_sent`` counts response *body* bytes.  The record
    is updated *before* each write, so a client holding its answer always finds
    it complete in :attr:`RegistryProxy.requests`.
    """

    method: str
    path: str
    status: int | None
    bytes_sent: int
    auth_kind: AuthKind


class TokenRecord(NamedTuple):
    """A token handed out by the token endpoint (not static grants).

    ``scopes`` are the *granted* scopes (``repository:<name>:<actions>``);
    ``expiry`` is wall-clock seconds since the epoch.
    """

    username: str | None
    scopes: tuple[str, ...]
    expiry: float


@dataclass
class Fault:
    """A misbehaviour for the next ``times`` requests matching method and path.

    ``path_regex`` is searched (``re.search``) in the request path without
    its query; ``method`` is compared case-insensitively, ``"*"`` matches any.
    ``times=-1`` keeps the fault until :meth:`RegistryProxy.clear_faults`.

    Faults are consulted only for requests that passed the proxy's auth
    check, so a challenge/retry round-trip does not use one up; they also
    apply to the proxy's own token endpoint.

    Kinds (``status`` and ``hang`` answer without asking the upstream; the
    others change the upstream's real answer and may be combined):

    * ``status``: answer with this status and a small JSON errors body
      (plus ``headers``, e.g. ``{"Retry-After": "1"}``).
    * ``drop_after``: send the real headers (real Content-Length) and N body
      bytes, then close the connection: clients see an incomplete read.
    * ``truncate_to``: send only the first N body bytes, with Content-Length N:
      a short body that completes cleanly.
    * ``corrupt``: flip one byte (XOR 0xFF) in the middle of the body, same
      length: a digest mismatch.
    * ``delay_per_chunk``: sleep this long before each 64 KiB body chunk but
      the first: a slow stream.
    * ``hang``: read the request and never answer, until the client goes away
      or the proxy stops.
    """

    path_regex: str
    _: KW_ONLY
    method: str = "GET"
    times: int = 1
    status: int | None = None
    headers: Mapping[str, str] | None = None
    drop_after: int | None = None
    truncate_to: int | None = None
    corrupt: bool = False
    delay_per_chunk: float = 0.0
    hang: bool = False

    def __post_init__(self) -> None:
        re.compile(self.path_regex)  # fail at add time, not in a handler thread
        if self.times == 0 or self.times < -1:
            raise ValueError(f"times must be >= 1 or -1 (forever), not {self.times}")
        for name in ("drop_after", "truncate_to"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.delay_per_chunk < 0:
            raise ValueError("delay_per_chunk must be >= 0")
        body_kinds = (
            self.drop_after is not None
            or self.truncate_to is not None
            or self.corrupt
            or self.delay_per_chunk > 0
        )
        if self.hang and (self.status is not None or body_kinds):
            raise ValueError("hang cannot be combined with other fault kinds")
        if self.status is not None and body_kinds:
            raise ValueError("status replaces the upstream answer; it cannot be combined")
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError(f"bad status {self.status}")
        if not (self.hang or self.status is not None or body_kinds):
            raise ValueError("Fault does nothing: set status, drop_after, truncate_to, ...")


# --- internals: scopes, grants, replies ------------------------------------


class _Scope(NamedTuple):
    type: str
    name: str
    actions: frozenset[str]

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(sorted(self.actions))}"

    @classmethod
    def parse(cls, text: str) -> _Scope | None:
        # Scope syntax is <type>:<name>:<actions>, and the name may itself
        # contain ':' (host:port/repo), so split at the first and last colon.
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not (sep and sep2 and kind and name):
            return None
        return cls(kind, name, frozenset(a for a in actions.split(",") if a))


@dataclass
class _Grant:
    user: str | None
    scopes: tuple[_Scope, ...]
    expiry: float

    def allows(self, need: _Scope | None, now: float) -> bool:
        if now >= self.expiry:
            return False
        if need is None:  # e.g. GET /v2/: any valid token will do
            return True
        have: set[str] = set()
        for s in self.scopes:
            if s.type == need.type and s.name == need.name:
                have |= s.actions
        return "*" in have or need.actions <= have


@dataclass
class _ActiveFault:
    fault: Fault
    pattern: re.Pattern[str]
    remaining: int


@dataclass
class _Reply:
    """A response to send: the upstream's or one made here."""

    status: int
    headers: list[tuple[str, str]]
    body: Iterable[bytes] = ()
    length: int | None = 0  # None: unknown (upstream sent chunked)
    close: Callable[[], None] = field(default=lambda: None)


def _json_reply(
    status: int, doc: Mapping[str, Any], headers: Iterable[tuple[str, str]] = ()
) -> _Reply:
    body = json.dumps(doc).encode()
    hdrs = [
        ("Content-Type", "application/json; charset=utf-8"),
        ("Docker-Distribution-API-Version", "registry/2.0"),
        *headers,
    ]
    return _Reply(status, hdrs, [body], len(body))


def _errors(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    return {"errors": [err]}


def _rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _auth_kind(header: str | None) -> AuthKind:
    if not header:
        return "none"
    scheme = header.split(None, 1)[0].lower()
    if scheme == "basic":
        return "basic"
    if scheme == "bearer":
        return "bearer"
    return "other"


def _decode_basic(header: str | None) -> tuple[str, str] | None:
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


# --- the HTTP server --------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    """Tracks each connection's socket and thread so ``stop()`` can end them."""

    daemon_threads = True

    def __init__(self, proxy: RegistryProxy) -> None:
        self.proxy = proxy
        self.conn_lock = threading.Lock()
        self.conns: dict[threading.Thread, socket.socket] = {}
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can
        # stall in sandboxes; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        # ThreadingMixIn does not keep daemon threads, so track them ourselves.
        t = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"registry-proxy-conn-{client_address[1]}",
            daemon=True,
        )
        with self.conn_lock:
            self.conns[t] = request
        t.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.conn_lock:
                self.conns.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response is routine in fault tests.
        logger.debug("registry proxy: error serving %s", client_address, exc_info=True)


class _ClientGone(Exception):
    """The client connection failed while we were writing to it."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real registries do
    server_version = "crishim-registry-proxy"

    # Set per request in _handle.
    _status: int | None
    _sent: int
    _body_read: bool
    _record: int

    @property
    def proxy(self) -> RegistryProxy:
        return cast(_Server, self.server).proxy

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("registry proxy: " + format, *args)

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    # -- dispatch --

    def _handle(self) -> None:
        proxy = self.proxy
        path, _, query = self.path.partition("?")
        self._status, self._sent, self._body_read = None, 0, not self._has_body()
        self._record = proxy._begin(
            self.command, path, _auth_kind(self.headers.get("Authorization"))
        )
        try:
            self._dispatch(path, query)
        except _ClientGone:
            self.close_connection = True
        except (OSError, http.client.HTTPException) as exc:
            # Upstream trouble: say so if nothing was sent yet, else just hang up.
            logger.debug("registry proxy: %s %s failed", self.command, path, exc_info=True)
            self.close_connection = True
            if self._status is None:
                with contextlib.suppress(_ClientGone):
                    self._send(_json_reply(502, _errors("UNAVAILABLE", f"upstream: {exc}")), None)
        finally:
            if not self._body_read:
                # An unread request body would be parsed as the next request.
                self.close_connection = True
            proxy._update(self._record, self._status, self._sent)

    def _dispatch(self, path: str, query: str) -> None:
        proxy = self.proxy
        if proxy.auth == "bearer" and path == proxy.realm_path:
            fault = proxy._take_fault(self.command, path)
            if not self._apply_early_fault(fault):
                self._send(self._token_endpoint(query), fault)
            return
        if proxy.auth != "none" and (path == "/v2" or path.startswith("/v2/")):
            denial = self._check_auth(path)
            if denial is not None:
                self._send(denial, None)
                return
        fault = proxy._take_fault(self.command, path)
        if self._apply_early_fault(fault):
            return
        reply = self._upstream(path, query)
        try:
            self._send(reply, fault)
        finally:
            reply.close()

    def _apply_early_fault(self, fault: Fault | None) -> bool:
        """Handle ``hang`` and ``status`` faults; True if the request is answered."""
        if fault is None:
            return False
        if fault.hang:
            self._hang()
            self.close_connection = True
            return True
        if fault.status is not None:
            reply = _json_reply(
                fault.status,
                _errors("UNAVAILABLE", f"injected fault: HTTP {fault.status}"),
                (fault.headers or {}).items(),
            )
            self._send(reply, None)
            return True
        return False

    def _hang(self) -> None:
        # Wait for the proxy to stop or the client to give up (EOF on the socket);
        # a client that times out must not leave this thread behind.
        sock = self.connection
        stop = self.proxy._stop_event
        while not stop.is_set():
            readable, _, _ = select.select([sock], [], [], 0.05)
            if readable:
                try:
                    if not sock.recv(1, socket.MSG_PEEK):
                        return
                except OSError:
                    return
                stop.wait(0.05)  # pipelined data, not EOF: keep hanging

    # -- auth on /v2/ --

    def _check_auth(self, path: str) -> _Reply | None:
        """None if the request may go on, else the 401 to send."""
        proxy = self.proxy
        header = self.headers.get("Authorization")
        if proxy.auth == "basic":
            creds = _decode_basic(header)
            if creds is not None and proxy._password_ok(*creds):
                return None
            return _json_reply(
                401,
                _errors("UNAUTHORIZED", "authentication required"),
                [("WWW-Authenticate", f'Basic realm="{proxy.url}"')],
            )
        need = self._required_scope(path)
        token = None
        if header and _auth_kind(header) == "bearer":
            token = header.partition(" ")[2].strip()
        error = ""
        if token is not None:
            grant = proxy._grant_for(token)
            now = time.time()
            if grant is not None and grant.allows(need, now):
                return None
            # As distribution/Docker Hub: a token that is bad is "invalid_token",
            # a good one that lacks the scope is "insufficient_scope".
            valid = grant is not None and now < grant.expiry
            error = "insufficient_scope" if valid else "invalid_token"
        challenge = f'Bearer realm="{proxy.url}{proxy.realm_path}",service="{proxy.service}"'
        if need is not None:
            challenge += f',scope="{need}"'
        if error:
            challenge += f',error="{error}"'
        detail = (
            [{"Type": need.type, "Name": need.name, "Action": a} for a in sorted(need.actions)]
            if need is not None
            else None
        )
        return _json_reply(
            401,
            _errors("UNAUTHORIZED", "authentication required", detail),
            [("WWW-Authenticate", challenge)],
        )

    def _required_scope(self, path: str) -> _Scope | None:
        if path.rstrip("/") == "/v2/_catalog":
            return _Scope("registry", "catalog", frozenset({"*"}))
        m = _REPO_PATH.match(path)
        if m is None:
            return None
        if self.command in ("GET", "HEAD", "OPTIONS"):
            actions = frozenset({"pull"})
        elif self.command == "DELETE":
            actions = frozenset({"delete"})
        else:  # writes: distribution asks for both
            actions = frozenset({"pull", "push"})
        return _Scope("repository", m["name"], actions)

    # -- token endpoint --

    def _token_endpoint(self, query: str) -> _Reply:
        proxy = self.proxy
        with proxy._lock:
            proxy._token_requests += 1
        if self.command == "GET":
            params = urllib.parse.parse_qs(query, keep_blank_values=True)
        elif self.command == "POST":
            form = self._read_small_body()
            if form is None:
                return _json_reply(400, _oauth_error("invalid_request", "bad form body"))
            params = urllib.parse.parse_qs(form.decode("latin-1"), keep_blank_values=True)
        else:
            return _json_reply(405, _oauth_error("invalid_request", "use GET or POST"))

        def one(name: str) -> str | None:
            values = params.get(name)
            return values[0] if values else None

        if one("service") != proxy.service:
            return _json_reply(
                400, _oauth_error("invalid_request", f"service must be {proxy.service!r}")
            )
        # GET repeats scope=; the OAuth2 POST form packs them space-separated.
        requested = [
            s for v in params.get("scope", []) for s in (_Scope.parse(x) for x in v.split()) if s
        ]
        user: str | None
        refresh: str | None = None
        if self.command == "GET":
            header = self.headers.get("Authorization")
            creds = _decode_basic(header)
            if creds is not None:
                if not proxy._password_ok(*creds):
                    return self._token_denied("incorrect username or password")
                user = creds[0]
            elif header or not proxy.anonymous_pull:
                return self._token_denied("authentication required")
            else:
                user = None
            if user is not None and one("offline_token") == "true":
                refresh = proxy.issue_refresh_token(user)
        else:
            if not one("client_id"):
                return _json_reply(400, _oauth_error("invalid_request", "client_id is required"))
            grant_type = one("grant_type")
            if grant_type == "refresh_token":
                user = proxy._refresh_user(one("refresh_token") or "")
                if user is None:
                    return self._token_denied("invalid refresh token")
            elif grant_type == "password":
                username, password = one("username") or "", one("password") or ""
                if not proxy._password_ok(username, password):
                    return self._token_denied("incorrect username or password")
                user = username
                if one("access_type") == "offline":
                    refresh = proxy.issue_refresh_token(user)
            else:
                return _json_reply(
                    400, _oauth_error("unsupported_grant_type", f"grant_type {grant_type!r}")
                )
        token, record = proxy._issue_token(user, requested)
        now = time.time()
        doc: dict[str, Any] = {
            "token": token,
            "access_token": token,
            # Docker's token spec has whole seconds here (Go clients decode an int).
            "expires_in": max(0, math.ceil(proxy.token_ttl)),
            "issued_at": _rfc3339(now),
        }
        if self.command == "POST":
            doc["scope"] = " ".join(record.scopes)
        if refresh is not None:
            doc["refresh_token"] = refresh
        return _json_reply(200, doc)

    def _token_denied(self, message: str) -> _Reply:
        return _json_reply(
            401,
            _errors("UNAUTHORIZED", message),
            [("WWW-Authenticate", f'Basic realm="{self.proxy.url}{self.proxy.realm_path}"')],
        )

    # -- request body --

    def _has_body(self) -> bool:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return True
        return self._content_length() not in (None, 0)

    def _content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        if value is None:
            return None
        try:
            n = int(value)
        except ValueError:
            return None
        return n if n >= 0 else None

    def _request_body(self) -> Iterator[bytes]:
        """Stream the client's request body (Content-Length or chunked)."""
        self._body_read = True
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            yield from self._read_chunked()
            return
        remaining = self._content_length() or 0
        while remaining:
            data = self.rfile.read(min(remaining, CHUNK))
            if not data:
                raise _ClientGone("request body ended early")
            remaining -= len(data)
            yield data

    def _read_chunked(self) -> Iterator[bytes]:
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _ClientGone(f"bad chunk header {line[:40]!r}") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers are dropped
                return
            while size:
                data = self.rfile.read(min(size, CHUNK))
                if not data:
                    raise _ClientGone("chunked request body ended early")
                size -= len(data)
                yield data
            self.rfile.readline()  # the CRLF after each chunk

    def _read_small_body(self) -> bytes | None:
        length = self._content_length()
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            length = None
        buf = b""
        for data in self._request_body():
            buf += data
            if len(buf) > _MAX_FORM:
                return None
        return buf if length is None or len(buf) == length else None

    # -- upstream --

    def _upstream(self, path: str, query: str) -> _Reply:
        proxy = self.proxy
        conn = http.client.HTTPConnection(
            proxy._up_host, proxy._up_port, timeout=proxy.upstream_timeout
        )
        try:
            target = path + ("?" + query if query else "")
            conn.putrequest(self.command, target, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", proxy._up_netloc)
            connection_tokens = {
                t.strip().lower() for t in (self.headers.get("Connection") or "").split(",")
            }
            for name, value in self.headers.items():
                low = name.lower()
                if low not in _NOT_FORWARDED_UP and low not in connection_tokens:
                    conn.putheader(name, value)
            if proxy.upstream_auth is not None:
                user, password = proxy.upstream_auth
                cred = base64.b64encode(f"{user}:{password}".encode()).decode()
                conn.putheader("Authorization", f"Basic {cred}")
            chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
            length = self._content_length()
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            elif length is not None:
                conn.putheader("Content-Length", str(length))
            conn.endheaders()
            if chunked or length:
                for data in self._request_body():
                    conn.send(b"%X\r\n%s\r\n" % (len(data), data) if chunked else data)
                if chunked:
                    conn.send(b"0\r\n\r\n")
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        headers: list[tuple[str, str]] = []
        resp_tokens = {t.strip().lower() for t in (resp.getheader("Connection") or "").split(",")}
        length_out: int | None = None
        for name, value in resp.getheaders():
            low = name.lower()
            if low == "content-length":
                with contextlib.suppress(ValueError):
                    length_out = int(value)
                continue
            if low in _HOP_BY_HOP or low in resp_tokens:
                continue
            if low in ("location", "link"):
                # The upstream builds absolute URLs from the Host we sent.
                value = value.replace(proxy._up_base, proxy.url)
            headers.append((name, value))

        def body() -> Iterator[bytes]:
            while data := resp.read(CHUNK):
                yield data

        return _Reply(resp.status, headers, body(), length_out, conn.close)

    # -- response writing, with body faults --

    def _send(self, reply: _Reply, fault: Fault | None) -> None:
        body_allowed = (
            self.command != "HEAD" and reply.status >= 200 and reply.status not in (204, 304)
        )
        length = reply.length
        body: Iterable[bytes] = reply.body
        truncate = fault.truncate_to if fault is not None else None
        if truncate is not None and body_allowed:
            if length is None:
                # Unknown length: buffer at most truncate_to bytes to learn it.
                buf = b""
                for data in body:
                    buf += data
                    if len(buf) >= truncate:
                        break
                body, length = [buf[:truncate]], min(len(buf), truncate)
            else:
                length = min(length, truncate)
        chunked = body_allowed and length is None and self.request_version == "HTTP/1.1"
        if body_allowed and length is None and not chunked:
            self.close_connection = True  # HTTP/1.0: the end of the body is EOF
        if not self._body_read:
            self.close_connection = True
        try:
            self.send_response_only(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            if not any(n.lower() == "date" for n, _ in reply.headers):
                self.send_header("Date", self.date_time_string())
            if length is not None:
                self.send_header("Content-Length", str(length))
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            if self.close_connection:
                self.send_header("Connection", "close")
            # Record before the client can see it, so a test that has its
            # answer always finds the record complete.
            self._status = reply.status
            self.proxy._update(self._record, self._status, self._sent)
            self.end_headers()
        except OSError as exc:
            raise _ClientGone from exc
        if body_allowed:
            self._send_body(body, length, chunked, fault)

    def _send_body(
        self, body: Iterable[bytes], length: int | None, chunked: bool, fault: Fault | None
    ) -> None:
        drop = fault.drop_after if fault is not None else None
        delay = fault.delay_per_chunk if fault is not None else 0.0
        flip_at = -1
        if fault is not None and fault.corrupt:
            flip_at = length // 2 if length else 0
        # Bytes to send at most: the declared length, or fewer if dropping early.
        limit = length if drop is None else drop if length is None else min(length, drop)
        stop = self.proxy._stop_event
        first = True
        for chunk in body:
            data = chunk if limit is None else chunk[: limit - self._sent]
            if not data:
                if limit is not None and self._sent >= limit:
                    break
                continue
            if 0 <= flip_at - self._sent < len(data):
                i = flip_at - self._sent
                data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
            if delay and not first and stop.wait(delay):
                raise _ClientGone("proxy stopping")
            first = False
            self.proxy._update(self._record, self._status, self._sent + len(data))
            try:
                self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if chunked else data)
            except OSError as exc:
                raise _ClientGone from exc
            self._sent += len(data)
            if drop is not None and self._sent >= drop:
                break
        if drop is not None:
            # Hang up (FIN, not RST, so the client reads every byte sent and
            # then sees the body end short of its length); if the body was
            # shorter than drop_after it went out whole, and we still hang up.
            self.close_connection = True
            if self._sent >= drop:
                return  # no chunked terminator: the body must look cut off
        if chunked:
            try:
                self.wfile.write(b"0\r\n\r\n")
            except OSError as exc:
                raise _ClientGone from exc


def _oauth_error(code: str, description: str) -> dict[str, Any]:
    # Both shapes: OAuth2 clients read "error", distribution clients "errors".
    return {"error": code, "error_description": description, **_errors(code.upper(), description)}


# --- the proxy ---------------------------------------------------------------


class RegistryProxy:
    """An auth- and fault-injecting proxy in front of *upstream_url*, on 127.0.0.1.

    ``auth`` selects the scheme clients must use (see the module docstring);
    ``users`` maps user names to passwords for Basic credentials, the token
    endpoint's Basic and ``grant_type=password``.  ``upstream_auth`` is sent
    as Basic credentials to the upstream (for an upstream with htpasswd).
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        auth: AuthMode = "none",
        users: Mapping[str, str] | None = None,
        token_ttl: float = 60.0,
        realm_path: str = "/token",
        service: str = "crishim-test-registry",
        anonymous_pull: bool = False,
        upstream_auth: tuple[str, str] | None = None,
        upstream_timeout: float = 30.0,
    ) -> None:
        if auth not in ("none", "basic", "bearer"):
            raise ValueError(f"unknown auth mode {auth!r}")
        if not realm_path.startswith("/") or realm_path.startswith("/v2"):
            raise ValueError("realm_path must start with '/' and lie outside /v2/")
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream_url must be http://host[:port], not {upstream_url!r}")
        self.upstream_url = upstream_url
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self._up_netloc = parts.netloc
        self._up_base = f"http://{parts.netloc}"
        self.auth: AuthMode = auth
        self.users: dict[str, str] = dict(users or {})
        self.token_ttl = token_ttl
        self.realm_path = realm_path
        self.service = service
        self.anonymous_pull = anonymous_pull
        self.upstream_auth = upstream_auth
        self.upstream_timeout = upstream_timeout

        self._lock = threading.Lock()
        self._requests: list[RequestRecord] = []
        self._tokens_issued: list[TokenRecord] = []
        self._token_requests = 0
        self._grants: dict[str, _Grant] = {}
        self._refresh: dict[str, str] = {}  # refresh token -> user
        self._faults: list[_ActiveFault] = []
        self._stop_event = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        # Kept apart from _server: handlers still finishing during stop() read url.
        self._port: int | None = None

    # -- lifecycle --

    def start(self) -> Self:
        with self._lock:
            if self._server is not None:
                return self
            self._stop_event.clear()
            server = _Server(self)
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"registry-proxy-{server.server_port}",
                daemon=True,
            )
            self._server = server
            self._port = server.server_port
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every connection, join every thread.  Idempotent."""
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
        if server is None:
            return
        self._stop_event.set()  # wakes hang and delay_per_chunk waits
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        with server.conn_lock:
            conns = list(server.conns.items())
        for _t, sock in conns:
            # Unblocks handlers waiting on idle keep-alive reads or writes.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10.0
        for t, _sock in conns:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                logger.warning("registry proxy: connection thread %s did not finish", t.name)
        with self._lock:
            if self._server is None:  # not restarted meanwhile
                self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- address --

    @property
    def port(self) -> int:
        port = self._port
        if port is None:
            raise RuntimeError("registry proxy is not running")
        return port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def realm(self) -> str:
        """The token endpoint URL named in Bearer challenges."""
        return self.url + self.realm_path

    # -- records --

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def count(self, method: str, path_regex: str) -> int:
        """How many requests matched *method* (``"*"``: any) and ``re.search(path_regex)``."""
        pattern = re.compile(path_regex)
        m = method.upper()
        return sum(
            1
            for r in self.requests
            if (m == "*" or r.method == m) and pattern.search(r.path) is not None
        )

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def tokens_issued(self) -> list[TokenRecord]:
        with self._lock:
            return list(self._tokens_issued)

    @property
    def token_requests(self) -> int:
        """Requests to the token endpoint, whatever their outcome."""
        with self._lock:
            return self._token_requests

    # -- tokens --

    def grant_static_token(
        self,
        token: str,
        scopes: Iterable[str],
        ttl: float | None = None,
        *,
        user: str | None = None,
    ) -> None:
        """Accept ``Authorization: Bearer <token>`` for *scopes* (as CRI's registry_token)."""
        parsed = []
        for s in scopes:
            scope = _Scope.parse(s)
            if scope is None:
                raise ValueError(f"bad scope {s!r}; want type:name:actions")
            parsed.append(scope)
        expiry = time.time() + (self.token_ttl if ttl is None else ttl)
        with self._lock:
            self._grants[token] = _Grant(user, tuple(parsed), expiry)

    def issue_refresh_token(self, user: str) -> str:
        """A refresh token for ``POST <realm> grant_type=refresh_token``, acting as *user*."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._refresh[token] = user
        return token

    def expire_tokens(self) -> None:
        """Make every access token issued or granted so far expire now."""
        now = time.time()
        with self._lock:
            for grant in self._grants.values():
                grant.expiry = min(grant.expiry, now)

    # -- faults --

    def add_fault(self, fault: Fault) -> None:
        active = _ActiveFault(fault, re.compile(fault.path_regex), fault.times)
        with self._lock:
            self._faults.append(active)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[tuple[Fault, int]]:
        """Pending faults with their remaining counts (-1: forever)."""
        with self._lock:
            return [(a.fault, a.remaining) for a in self._faults]

    # -- internals used by the handler --

    def _begin(self, method: str, path: str, auth_kind: AuthKind) -> int:
        with self._lock:
            self._requests.append(RequestRecord(method, path, None, 0, auth_kind))
            return len(self._requests) - 1

    def _update(self, index: int, status: int | None, sent: int) -> None:
        with self._lock:
            # clear_requests() may have run meanwhile; then there is nothing to update.
            if index < len(self._requests):
                self._requests[index] = self._requests[index]._replace(
                    status=status, bytes_sent=sent
                )

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for i, active in enumerate(self._faults):
                f = active.fault
                if f.method != "*" and f.method.upper() != method.upper():
                    continue
                if active.pattern.search(path) is None:
                    continue
                if active.remaining > 0:
                    active.remaining -= 1
                    if active.remaining == 0:
                        del self._faults[i]
                return f
        return None

    def _password_ok(self, user: str, password: str) -> bool:
        expected = self.users.get(user)
        # compare_digest even in a test rig: no reason to model a timing leak.
        return expected is not None and hmac.compare_digest(expected.encode(), password.encode())

    def _grant_for(self, token: str) -> _Grant | None:
        with self._lock:
            return self._grants.get(token)

    def _refresh_user(self, refresh_token: str) -> str | None:
        with self._lock:
            return self._refresh.get(refresh_token)

    def _issue_token(self, user: str | None, requested: list[_Scope]) -> tuple[str, TokenRecord]:
        granted: list[_Scope] = []
        for s in requested:
            if user is None:
                # Anonymous (anonymous_pull=True): repository pulls only, like Hub.
                if s.type != "repository" or "pull" not in s.actions:
                    continue
                s = s._replace(actions=frozenset({"pull"}))
            granted.append(s)
        token = secrets.token_urlsafe(32)
        expiry = time.time() + self.token_ttl
        record = TokenRecord(user, tuple(str(s) for s in granted), expiry)
        with self._lock:
            self._grants[token] = _Grant(user, tuple(granted), expiry)
            self._tokens_issued.append(record)
        return token, record

    def __repr__(self) -> str:
        where = self.host if self._server is not None else "stopped"
        return f"<RegistryProxy {where} -> {self.upstream_url} auth={self.auth}>"
