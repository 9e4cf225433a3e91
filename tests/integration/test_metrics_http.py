"""The /metrics endpoint over real sockets: scrapes parsed by prometheus_client, errors."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crishim.api.metrics_http import CONTENT_TYPE, MetricsServer
from crishim.errors import ConfigError
from crishim.services.pull_progress import PullMetrics
from tests.unit.test_metrics import crishim_metrics


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., MetricsServer]]:
    """Starts MetricsServers on 127.0.0.1 (free ports) and stops them after the test."""
    servers: list[MetricsServer] = []

    def make(render: Callable[[], str], idle_timeout: float = 30.0) -> MetricsServer:
        server = MetricsServer(render, "127.0.0.1", 0, idle_timeout=idle_timeout)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


def _url(server: MetricsServer, path: str = "/metrics") -> str:
    host, port = server.address
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    data = b"x" if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


async def test_scrape_is_parsed_by_prometheus_client(
    serve: Callable[..., MetricsServer],
) -> None:
    pulls = PullMetrics()
    pulls.bytes_total = 4096
    pulls.observe(3.0, ok=True)
    metrics = crishim_metrics(pulls)
    metrics.observe_rpc("ListContainers", "OK", 0.0004)
    metrics.observe_rpc("ListContainers", "OK", 0.02)
    metrics.observe_rpc("StartContainer", "INTERNAL", 12.0)
    server = serve(metrics.render)
    await server.start()

    status, headers, body = await asyncio.to_thread(_get, _url(server))
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    families = {f.name: f for f in text_string_to_metric_families(body)}

    requests = families["crishim_cri_requests"]
    assert requests.type == "counter"
    assert {(s.labels["method"], s.labels["code"]): s.value for s in requests.samples} == {
        ("ListContainers", "OK"): 2,
        ("StartContainer", "INTERNAL"): 1,
    }
    durations = families["crishim_cri_request_duration_seconds"]
    assert durations.type == "histogram"
    buckets = {
        s.labels["le"]: s.value
        for s in durations.samples
        if s.name.endswith("_bucket") and s.labels["method"] == "ListContainers"
    }
    assert buckets["0.001"] == 1
    assert buckets["0.025"] == 2
    assert buckets["+Inf"] == 2
    assert list(buckets.values()) == sorted(buckets.values())
    assert families["crishim_image_pull_bytes"].samples[0].value == 4096
    pull = families["crishim_image_pull_duration_seconds"]
    assert {s.labels.get("le"): s.value for s in pull.samples if s.name.endswith("_bucket")}[
        "5"
    ] == 1
    assert families["crishim_pods_running"].samples[0].value == 2
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    assert families["process_cpu_seconds"].type == "counter"


async def test_other_paths_and_methods(serve: Callable[..., MetricsServer]) -> None:
    server = serve(lambda: "# HELP x X.\n# TYPE x gauge\nx 1\n")
    await server.start()

    assert (await asyncio.to_thread(_get, _url(server, "/")))[0] == 404
    assert (await asyncio.to_thread(_get, _url(server, "/metricsx")))[0] == 404
    status, headers, _ = await asyncio.to_thread(_get, _url(server), "POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    status, headers, body = await asyncio.to_thread(_get, _url(server) + "?x=1", "HEAD")
    assert (status, body) == (200, "")
    assert headers["Content-Length"] == str(len("# HELP x X.\n# TYPE x gauge\nx 1\n"))


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[str, bytes]:
    """Send one request and read one response: its head and body."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = next(
        int(line.split(":", 1)[1])
        for line in head.split("\r\n")
        if line.lower().startswith("content-length:")
    )
    return head, await reader.readexactly(length)


async def test_keep_alive_then_idle_connections_are_closed(
    serve: Callable[..., MetricsServer],
) -> None:
    scrapes = iter(range(1, 100))
    server = serve(lambda: f"n {next(scrapes)}\n", idle_timeout=0.3)
    await server.start()
    reader, writer = await asyncio.open_connection(*server.address)

    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    head, body = await _exchange(reader, writer, request)
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert "Connection: close" not in head
    assert body == b"n 1\n"
    assert (await _exchange(reader, writer, request))[1] == b"n 2\n"
    # Nothing more is sent: the server hangs up after the idle timeout.
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()


async def test_connection_close_and_bad_requests(serve: Callable[..., MetricsServer]) -> None:
    server = serve(lambda: "x 1\n")
    await server.start()

    reader, writer = await asyncio.open_connection(*server.address)
    head, _ = await _exchange(reader, writer, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert "Connection: close" in head
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()

    for bad in (b"NONSENSE\r\n\r\n", b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n"):
        reader, writer = await asyncio.open_connection(*server.address)
        head, _ = await _exchange(reader, writer, bad)
        assert head.startswith("HTTP/1.1 400 Bad Request\r\n")
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        writer.close()


async def test_a_failing_render_answers_500(serve: Callable[..., MetricsServer]) -> None:
    def render() -> str:
        raise RuntimeError("boom")

    server = serve(render)
    await server.start()
    assert (await asyncio.to_thread(_get, _url(server)))[0] == 500


async def test_stop_closes_open_connections(serve: Callable[..., MetricsServer]) -> None:
    server = serve(lambda: "x 1\n")
    await server.start()
    reader, writer = await asyncio.open_connection(*server.address)
    await _exchange(reader, writer, b"GET /metrics HTTP/1.1\r\n\r\n")

    await asyncio.wait_for(server.stop(), timeout=5)
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    writer.close()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.address


@pytest.mark.parametrize("host", ["0.0.0.0", "", "::"])
async def test_remote_addresses_need_permission(host: str) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        await MetricsServer(lambda: "", host, 0).start()


async def test_loopback_names_and_allowed_remote_addresses_bind() -> None:
    for server in (
        MetricsServer(lambda: "", "localhost", 0),
        MetricsServer(lambda: "", "0.0.0.0", 0, allow_remote=True),
    ):
        await server.start()
        try:
            assert (await asyncio.to_thread(_get, _url(server)))[0] == 200
        finally:
            await server.stop()
