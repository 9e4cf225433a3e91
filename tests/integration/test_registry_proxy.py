"""The registry proxy rig against a real distribution registry.

Images are pushed straight to the upstream :class:`Registry`, then read back
through :class:`RegistryProxy` with plain urllib / http.client, so every check
here is about the proxy: passthrough fidelity, auth challenges and tokens,
each fault kind, the request records, and a clean ``stop()``.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import http.server
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any

import pytest

from tests.rig.oci_image import (
    OCI_MANIFEST,
    Image,
    LayerBuilder,
    RegistryClient,
    push,
    sha256_digest,
)
from tests.rig.registry import Registry
from tests.rig.registry_proxy import CHUNK, Fault, RegistryProxy

REPO = "proxy/app"
OTHER_REPO = "proxy/other"
USER, PASSWORD = "alice", "s3cret"
SERVICE = "crishim-test-registry"
# The layer is stored uncompressed so its blob spans several 64 KiB chunks.
BIG_FILE_SIZE = 5 * CHUNK


@dataclass(frozen=True)
class Pushed:
    digest: str
    manifest: bytes
    config_digest: str
    layer_digest: str
    layer: bytes


@pytest.fixture(scope="module")
def pushed(registry: Registry) -> Pushed:
    layer = LayerBuilder().file("data/big", os.urandom(BIG_FILE_SIZE)).build("none")
    image = Image(layers=[layer])
    digest = push(registry.url, REPO, "v1", image)
    push(registry.url, OTHER_REPO, "v1", image)
    return Pushed(digest, image.manifest_bytes, image.config_digest, layer.digest, layer.blob)


# --- small HTTP helpers ------------------------------------------------------

# No proxies from the environment: loopback must stay loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Resp:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 5.0,
) -> Resp:
    # distribution answers 404 for an OCI manifest the client did not Accept;
    # blob endpoints ignore the header.
    hdrs = {"Accept": OCI_MANIFEST, **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            return Resp(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        with e:
            return Resp(e.code, e.headers, e.read())


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def manifest_url(proxy: RegistryProxy, repo: str = REPO, ref: str = "v1") -> str:
    return f"{proxy.url}/v2/{repo}/manifests/{ref}"


def blob_url(proxy: RegistryProxy, digest: str, repo: str = REPO) -> str:
    return f"{proxy.url}/v2/{repo}/blobs/{digest}"


def get_token(proxy: RegistryProxy, *scopes: str, **extra: str) -> dict[str, Any]:
    query = urllib.parse.urlencode(
        [("service", SERVICE), *(("scope", s) for s in scopes), *extra.items()]
    )
    resp = fetch(f"{proxy.realm}?{query}", headers=basic(USER, PASSWORD))
    assert resp.status == 200, resp.body
    doc: dict[str, Any] = resp.json()
    return doc


def post_token(proxy: RegistryProxy, **form: str) -> Resp:
    body = urllib.parse.urlencode({"service": SERVICE, **form}).encode()
    return fetch(
        proxy.realm,
        method="POST",
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )


@pytest.fixture
def bearer_proxy(registry: Registry) -> Iterator[RegistryProxy]:
    with RegistryProxy(registry.url, auth="bearer", users={USER: PASSWORD}) as proxy:
        yield proxy


@pytest.fixture
def proxy(registry: Registry) -> Iterator[RegistryProxy]:
    with RegistryProxy(registry.url) as p:
        yield p


# --- passthrough --------------------------------------------------------------


def test_anonymous_passthrough(proxy: RegistryProxy, pushed: Pushed) -> None:
    m = fetch(manifest_url(proxy), headers={"Accept": OCI_MANIFEST})
    assert m.status == 200
    assert m.body == pushed.manifest
    assert sha256_digest(m.body) == pushed.digest == m.headers["Docker-Content-Digest"]
    assert m.headers["Content-Type"] == OCI_MANIFEST
    for digest in (pushed.config_digest, pushed.layer_digest):
        blob = fetch(blob_url(proxy, digest))
        assert blob.status == 200
        assert sha256_digest(blob.body) == digest
    head = fetch(blob_url(proxy, pushed.layer_digest), method="HEAD")
    assert head.status == 200
    assert head.body == b""
    assert int(head.headers["Content-Length"]) == len(pushed.layer)
    assert fetch(manifest_url(proxy, ref="nope")).status == 404

    assert proxy.count("GET", r"/blobs/sha256:") == 2
    assert proxy.count("HEAD", r"/blobs/") == 1
    assert proxy.count("*", r"/manifests/") == 2
    records = proxy.requests
    assert [r.status for r in records] == [200, 200, 200, 200, 404]
    assert {r.auth_kind for r in records} == {"none"}
    assert records[2].bytes_sent == len(pushed.layer)
    assert records[3].bytes_sent == 0  # HEAD: headers only


def test_push_through_proxy_streams_bodies_and_rewrites_location(
    proxy: RegistryProxy, registry: Registry
) -> None:
    start = fetch(f"{proxy.url}/v2/proxy/pushed/blobs/uploads/", method="POST", data=b"")
    assert start.status == 202
    location = start.headers["Location"]
    assert location.startswith(proxy.url + "/v2/proxy/pushed/blobs/uploads/")

    # A chunked PATCH (as docker pushes layers), then the closing PUT.
    pieces = [os.urandom(100_000), os.urandom(70_000), b"tail"]
    data = b"".join(pieces)
    parts = urllib.parse.urlsplit(location)
    conn = http.client.HTTPConnection(proxy.host.split(":")[0], proxy.port, timeout=5)
    try:
        conn.request(
            "PATCH",
            f"{parts.path}?{parts.query}",
            body=iter(pieces),
            headers={"Content-Type": "application/octet-stream"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 202, resp.status
        location = resp.headers["Location"]
        assert location.startswith(proxy.url)
    finally:
        conn.close()
    sep = "&" if "?" in location else "?"
    digest = sha256_digest(data)
    put = fetch(f"{location}{sep}digest={digest}", method="PUT", data=b"")
    assert put.status == 201
    assert RegistryClient(registry.url).get_blob("proxy/pushed", digest) == data

    # The rig's own pusher (POST + monolithic PUT) through the proxy.
    image = Image(layers=[LayerBuilder().file("f", b"via proxy").build("gzip")])
    assert push(proxy.url, "proxy/pushed", "v1", image) == image.digest
    assert proxy.count("PUT", r"/manifests/v1$") == 1


# --- basic auth ---------------------------------------------------------------


def test_basic_auth(registry: Registry, pushed: Pushed) -> None:
    with RegistryProxy(registry.url, auth="basic", users={USER: PASSWORD}) as proxy:
        anon = fetch(f"{proxy.url}/v2/")
        assert anon.status == 401
        assert anon.headers["WWW-Authenticate"] == f'Basic realm="{proxy.url}"'
        assert anon.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert fetch(f"{proxy.url}/v2/", headers=basic(USER, "wrong")).status == 401
        assert fetch(f"{proxy.url}/v2/", headers=basic("mallory", PASSWORD)).status == 401
        assert fetch(f"{proxy.url}/v2/", headers=basic(USER, PASSWORD)).status == 200
        m = fetch(manifest_url(proxy), headers={**basic(USER, PASSWORD), "Accept": OCI_MANIFEST})
        assert m.status == 200
        assert sha256_digest(m.body) == pushed.digest
        assert fetch(manifest_url(proxy), headers=bearer("x")).status == 401
        kinds = [r.auth_kind for r in proxy.requests]
        assert kinds == ["none", "basic", "basic", "basic", "basic", "bearer"]


# --- bearer auth --------------------------------------------------------------


def test_bearer_challenge_format(bearer_proxy: RegistryProxy) -> None:
    proxy = bearer_proxy
    realm = f"http://127.0.0.1:{proxy.port}/token"
    root = fetch(f"{proxy.url}/v2/")
    assert root.status == 401
    assert root.headers["WWW-Authenticate"] == f'Bearer realm="{realm}",service="{SERVICE}"'
    assert root.headers["Content-Type"].startswith("application/json")
    assert root.json()["errors"][0]["code"] == "UNAUTHORIZED"

    m = fetch(manifest_url(proxy))
    assert m.status == 401
    assert m.headers["WWW-Authenticate"] == (
        f'Bearer realm="{realm}",service="{SERVICE}",scope="repository:{REPO}:pull"'
    )
    assert m.json()["errors"][0]["detail"] == [
        {"Type": "repository", "Name": REPO, "Action": "pull"}
    ]
    # Basic credentials do not count in bearer mode: same challenge.
    b = fetch(manifest_url(proxy), headers=basic(USER, PASSWORD))
    assert b.headers["WWW-Authenticate"] == m.headers["WWW-Authenticate"]
    # Writes ask for pull and push, as distribution does.
    up = fetch(f"{proxy.url}/v2/{REPO}/blobs/uploads/", method="POST", data=b"")
    assert up.status == 401
    assert up.headers["WWW-Authenticate"].endswith(f'scope="repository:{REPO}:pull,push"')
    assert proxy.count("*", r"^/v2/") == 4


def test_token_fetch_and_access(bearer_proxy: RegistryProxy, pushed: Pushed) -> None:
    proxy = bearer_proxy
    before = time.time()
    doc = get_token(proxy, f"repository:{REPO}:pull")
    assert set(doc) == {"token", "access_token", "expires_in", "issued_at"}
    assert doc["token"] == doc["access_token"]
    assert doc["expires_in"] == 60
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["issued_at"])
    auth = bearer(doc["token"])

    m = fetch(manifest_url(proxy), headers={**auth, "Accept": OCI_MANIFEST})
    assert m.status == 200
    assert sha256_digest(m.body) == pushed.digest
    blob = fetch(blob_url(proxy, pushed.layer_digest), headers=auth)
    assert sha256_digest(blob.body) == pushed.layer_digest
    assert fetch(f"{proxy.url}/v2/", headers=auth).status == 200
    # A pull token does not allow a push.
    up = fetch(f"{proxy.url}/v2/{REPO}/blobs/uploads/", method="POST", data=b"", headers=auth)
    assert up.status == 401
    assert 'error="insufficient_scope"' in up.headers["WWW-Authenticate"]

    assert proxy.token_requests == 1
    [record] = proxy.tokens_issued
    assert record.username == USER
    assert record.scopes == (f"repository:{REPO}:pull",)
    assert before + 59 < record.expiry < time.time() + 61
    assert [r.auth_kind for r in proxy.requests if r.path.startswith("/v2/")] == ["bearer"] * 4

    # Repeated scope parameters are all granted.
    two = get_token(proxy, f"repository:{REPO}:pull", f"repository:{OTHER_REPO}:pull,push")
    assert proxy.tokens_issued[-1].scopes == (
        f"repository:{REPO}:pull",
        f"repository:{OTHER_REPO}:pull,push",
    )
    assert fetch(manifest_url(proxy, OTHER_REPO), headers=bearer(two["token"])).status == 200


def test_token_endpoint_credentials(bearer_proxy: RegistryProxy, registry: Registry) -> None:
    proxy = bearer_proxy
    query = f"service={SERVICE}&scope=repository:{REPO}:pull"
    wrong = fetch(f"{proxy.realm}?{query}", headers=basic(USER, "nope"))
    assert wrong.status == 401
    assert fetch(f"{proxy.realm}?{query}").status == 401  # anonymous not allowed
    bad_service = fetch(f"{proxy.realm}?service=other&scope=x", headers=basic(USER, PASSWORD))
    assert bad_service.status == 400
    assert proxy.token_requests == 3
    assert proxy.tokens_issued == []

    with RegistryProxy(registry.url, auth="bearer", anonymous_pull=True) as anon_proxy:
        resp = fetch(
            f"{anon_proxy.realm}?service={SERVICE}&scope=repository:{REPO}:pull,push"
            f"&scope=registry:catalog:*"
        )
        assert resp.status == 200
        # Anonymous: repository pull only, whatever was asked.
        assert anon_proxy.tokens_issued[0][:2] == (None, (f"repository:{REPO}:pull",))
        assert "refresh_token" not in resp.json()
        ok = fetch(manifest_url(anon_proxy), headers=bearer(resp.json()["token"]))
        assert ok.status == 200


def test_expired_token(registry: Registry) -> None:
    with RegistryProxy(registry.url, auth="bearer", users={USER: PASSWORD}, token_ttl=0.2) as proxy:
        doc = get_token(proxy, f"repository:{REPO}:pull")
        assert doc["expires_in"] == 1  # whole seconds on the wire
        assert fetch(manifest_url(proxy), headers=bearer(doc["token"])).status == 200
        time.sleep(0.25)
        late = fetch(manifest_url(proxy), headers=bearer(doc["token"]))
        assert late.status == 401
        assert late.headers["WWW-Authenticate"].endswith(
            f'scope="repository:{REPO}:pull",error="invalid_token"'
        )
        # expire_tokens() does the same without waiting.
        fresh = get_token(proxy, f"repository:{REPO}:pull")["token"]
        proxy.expire_tokens()
        assert fetch(manifest_url(proxy), headers=bearer(fresh)).status == 401
        assert fetch(manifest_url(proxy), headers=bearer("never-issued")).status == 401


def test_scope_for_wrong_repo(bearer_proxy: RegistryProxy) -> None:
    proxy = bearer_proxy
    token = get_token(proxy, f"repository:{REPO}:pull")["token"]
    resp = fetch(manifest_url(proxy, OTHER_REPO), headers=bearer(token))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == (
        f'Bearer realm="{proxy.realm}",service="{SERVICE}",'
        f'scope="repository:{OTHER_REPO}:pull",error="insufficient_scope"'
    )


def test_refresh_token_flow(bearer_proxy: RegistryProxy) -> None:
    proxy = bearer_proxy
    scope = f"repository:{REPO}:pull"
    doc = get_token(proxy, scope, offline_token="true", client_id="crishim")
    refresh = doc["refresh_token"]

    resp = post_token(
        proxy,
        grant_type="refresh_token",
        refresh_token=refresh,
        scope=f"{scope} repository:{OTHER_REPO}:pull",  # space-separated in the form
        client_id="crishim",
    )
    assert resp.status == 200
    body = resp.json()
    assert body["token"] == body["access_token"]
    assert body["scope"] == f"{scope} repository:{OTHER_REPO}:pull"
    assert "refresh_token" not in body
    for repo in (REPO, OTHER_REPO):
        assert fetch(manifest_url(proxy, repo), headers=bearer(body["token"])).status == 200

    # A refresh token made by the test, as an identity token from a CRI AuthConfig.
    made = proxy.issue_refresh_token(USER)
    resp = post_token(
        proxy, grant_type="refresh_token", refresh_token=made, scope=scope, client_id="x"
    )
    assert resp.status == 200
    assert proxy.tokens_issued[-1].username == USER

    bad = post_token(
        proxy, grant_type="refresh_token", refresh_token="bogus", scope=scope, client_id="x"
    )
    assert bad.status == 401
    no_client = post_token(proxy, grant_type="refresh_token", refresh_token=made, scope=scope)
    assert no_client.status == 400

    pw = post_token(
        proxy,
        grant_type="password",
        username=USER,
        password=PASSWORD,
        scope=scope,
        client_id="x",
        access_type="offline",
    )
    assert pw.status == 200
    assert "refresh_token" in pw.json()
    wrong_pw = post_token(
        proxy, grant_type="password", username=USER, password="x", scope=scope, client_id="x"
    )
    assert wrong_pw.status == 401
    weird = post_token(proxy, grant_type="client_credentials", client_id="x")
    assert weird.status == 400
    assert weird.json()["error"] == "unsupported_grant_type"
    assert proxy.token_requests == 8
    assert [t.username for t in proxy.tokens_issued] == [USER] * 4


def test_static_token(bearer_proxy: RegistryProxy) -> None:
    proxy = bearer_proxy
    proxy.grant_static_token("cri-registry-token", [f"repository:{REPO}:*"], ttl=30)
    assert fetch(manifest_url(proxy), headers=bearer("cri-registry-token")).status == 200
    up = fetch(
        f"{proxy.url}/v2/{REPO}/blobs/uploads/",
        method="POST",
        data=b"",
        headers=bearer("cri-registry-token"),
    )
    assert up.status == 202  # '*' covers push
    assert (
        fetch(manifest_url(proxy, OTHER_REPO), headers=bearer("cri-registry-token")).status == 401
    )
    assert proxy.tokens_issued == []
    with pytest.raises(ValueError, match="bad scope"):
        proxy.grant_static_token("t", ["nonsense"])


# --- faults -------------------------------------------------------------------


def test_fault_status_and_times(proxy: RegistryProxy, pushed: Pushed) -> None:
    proxy.add_fault(Fault(r"/blobs/", status=503, times=2, headers={"Retry-After": "0"}))
    url = blob_url(proxy, pushed.layer_digest)
    for _ in range(2):
        resp = fetch(url)
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "0"
        assert resp.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert proxy.faults == []
    assert sha256_digest(fetch(url).body) == pushed.layer_digest
    assert [r.status for r in proxy.requests] == [503, 503, 200]


def test_fault_forever_and_matching(proxy: RegistryProxy, pushed: Pushed) -> None:
    proxy.add_fault(Fault(r"/manifests/", method="HEAD", status=404, times=-1))
    proxy.add_fault(Fault(r"/blobs/", method="*", status=500, times=-1))
    for _ in range(3):
        assert fetch(manifest_url(proxy), method="HEAD").status == 404
        assert fetch(blob_url(proxy, pushed.config_digest), method="HEAD").status == 500
        assert fetch(blob_url(proxy, pushed.config_digest)).status == 500
    assert fetch(manifest_url(proxy)).status == 200  # GET is not HEAD
    assert [remaining for _f, remaining in proxy.faults] == [-1, -1]
    proxy.clear_faults()
    assert fetch(manifest_url(proxy), method="HEAD").status == 200
    assert fetch(blob_url(proxy, pushed.config_digest)).status == 200
    assert proxy.count("HEAD", r"/manifests/v1$") == 4


def test_fault_drop_after(proxy: RegistryProxy, pushed: Pushed) -> None:
    proxy.add_fault(Fault(r"/blobs/", drop_after=1000))
    req = urllib.request.Request(blob_url(proxy, pushed.layer_digest))
    with _OPENER.open(req, timeout=5) as r:
        assert r.status == 200
        assert int(r.headers["Content-Length"]) == len(pushed.layer)  # the real length
        with pytest.raises(http.client.IncompleteRead) as exc:
            r.read()
    assert exc.value.partial == pushed.layer[:1000]
    last = proxy.requests[-1]
    assert (last.status, last.bytes_sent) == (200, 1000)
    assert fetch(blob_url(proxy, pushed.layer_digest)).body == pushed.layer


def test_fault_truncate(proxy: RegistryProxy, pushed: Pushed) -> None:
    proxy.add_fault(Fault(r"/blobs/", truncate_to=5000))
    resp = fetch(blob_url(proxy, pushed.layer_digest))
    assert resp.status == 200  # the short body "completes"
    assert resp.headers["Content-Length"] == "5000"
    assert resp.body == pushed.layer[:5000]
    assert sha256_digest(resp.body) != pushed.layer_digest


def test_fault_corrupt(proxy: RegistryProxy, pushed: Pushed) -> None:
    proxy.add_fault(Fault(r"/blobs/", corrupt=True))
    resp = fetch(blob_url(proxy, pushed.layer_digest))
    assert resp.status == 200
    assert len(resp.body) == len(pushed.layer)
    assert sha256_digest(resp.body) != pushed.layer_digest
    diff = [i for i, (a, b) in enumerate(zip(resp.body, pushed.layer, strict=True)) if a != b]
    assert diff == [len(pushed.layer) // 2]


def test_fault_delay_per_chunk(proxy: RegistryProxy, pushed: Pushed) -> None:
    chunks = -(-len(pushed.layer) // CHUNK)
    assert chunks >= 5
    proxy.add_fault(Fault(r"/blobs/", delay_per_chunk=0.04))
    start = time.monotonic()
    resp = fetch(blob_url(proxy, pushed.layer_digest))
    assert time.monotonic() - start >= 0.04 * (chunks - 1)
    assert sha256_digest(resp.body) == pushed.layer_digest


def test_fault_hang_until_client_gives_up(proxy: RegistryProxy, pushed: Pushed) -> None:
    proxy.add_fault(Fault(r"/manifests/", hang=True))
    with pytest.raises(TimeoutError):
        fetch(manifest_url(proxy), timeout=0.3)
    # In flight or abandoned: recorded, with no status.
    assert proxy.requests[0][:3] == ("GET", f"/v2/{REPO}/manifests/v1", None)
    assert fetch(manifest_url(proxy)).status == 200  # times=1: used up


def test_faults_apply_after_auth(bearer_proxy: RegistryProxy) -> None:
    proxy = bearer_proxy
    proxy.add_fault(Fault(r"/manifests/", status=500))
    proxy.add_fault(Fault(r"^/token$", status=503))
    assert fetch(manifest_url(proxy)).status == 401  # the challenge does not use it up
    query = f"service={SERVICE}&scope=repository:{REPO}:pull"
    assert fetch(f"{proxy.realm}?{query}", headers=basic(USER, PASSWORD)).status == 503
    token = get_token(proxy, f"repository:{REPO}:pull")["token"]
    assert fetch(manifest_url(proxy), headers=bearer(token)).status == 500
    assert fetch(manifest_url(proxy), headers=bearer(token)).status == 200


def test_fault_validation() -> None:
    with pytest.raises(ValueError, match="does nothing"):
        Fault(r"/blobs/")
    with pytest.raises(ValueError, match="times"):
        Fault(r"/blobs/", status=500, times=0)
    with pytest.raises(ValueError, match="hang"):
        Fault(r"/blobs/", hang=True, status=500)
    with pytest.raises(ValueError, match="status"):
        Fault(r"/blobs/", status=500, corrupt=True)
    with pytest.raises(ValueError, match="drop_after"):
        Fault(r"/blobs/", drop_after=-1)


# --- an upstream that answers chunked -----------------------------------------


class _ChunkedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    payload = bytes(range(256)) * 700  # ~175 KiB

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(self.payload), 50_000):
            piece = self.payload[i : i + 50_000]
            self.wfile.write(b"%X\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def chunked_upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChunkedHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_chunked_upstream_body(chunked_upstream: str) -> None:
    payload = _ChunkedHandler.payload
    with RegistryProxy(chunked_upstream) as proxy:
        url = f"{proxy.url}/v2/x/blobs/sha256:{hashlib.sha256(payload).hexdigest()}"
        resp = fetch(url)
        assert resp.body == payload
        assert resp.headers["Transfer-Encoding"] == "chunked"
        proxy.add_fault(Fault(r"/blobs/", truncate_to=70_000))
        short = fetch(url)
        assert (short.headers["Content-Length"], short.body) == ("70000", payload[:70_000])
        proxy.add_fault(Fault(r"/blobs/", drop_after=10))
        with pytest.raises(http.client.IncompleteRead):
            fetch(url)


# --- lifecycle ----------------------------------------------------------------


def _proxy_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("registry-proxy")}


def test_stop_leaves_no_threads_or_sockets(registry: Registry, pushed: Pushed) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    assert _proxy_threads() == set()
    proxy = RegistryProxy(registry.url).start()
    port = proxy.port
    proxy.add_fault(Fault(r"/manifests/", hang=True))
    proxy.add_fault(Fault(r"/blobs/", delay_per_chunk=5.0))
    # An idle keep-alive connection, a hung request and a slow stream.
    idle = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    idle.request("GET", "/v2/")
    idle.getresponse().read()
    hung = socket.create_connection(("127.0.0.1", port), timeout=5)
    hung.sendall(f"GET /v2/{REPO}/manifests/v1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    slow.sendall(f"GET /v2/{REPO}/blobs/{pushed.layer_digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert slow.recv(100).startswith(b"HTTP/1.1 200")
    deadline = time.monotonic() + 2
    while proxy.count("GET", r"/manifests/") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(_proxy_threads()) == 4  # acceptor + three connections

    start = time.monotonic()
    proxy.stop()
    assert time.monotonic() - start < 2
    assert _proxy_threads() == set()
    assert hung.recv(100) == b""  # closed without an answer
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    for s in (hung, slow):
        s.close()
    idle.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    proxy.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        _ = proxy.url
