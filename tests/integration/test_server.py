"""crishim serve as a real process: the socket, clients we did not write, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crishim.api import v1
from crishim.model import Container, ContainerMetadata, ContainerState, PodMetadata, Sandbox
from crishim.store import write_record
from tests.rig.crishim_fixtures import (
    OUR_SCHEMA_ROOT,
    REFERENCE_SCHEMA_ROOT,
    CriClient,
    grpcio_call,
)
from tests.rig.crishim_proc import CrishimProcess


def schema_roots() -> list[Path]:
    roots = [OUR_SCHEMA_ROOT]
    if (REFERENCE_SCHEMA_ROOT / "api.proto").exists():
        roots.append(REFERENCE_SCHEMA_ROOT)
    return roots


def reference_root(tmp_path: Path) -> Path:
    """The upstream schema laid out at runtime/v1/api.proto, as protoc needs it."""
    source = REFERENCE_SCHEMA_ROOT / "api.proto"
    if not source.exists():
        pytest.skip(f"reference schema not found at {source} (it ships in the shared/ folder)")
    target = tmp_path / "reference" / "runtime" / "v1" / "api.proto"
    target.parent.mkdir(parents=True)
    target.write_text(source.read_text())
    return tmp_path / "reference"


def test_socket_is_created_0660_with_its_directories(tmp_path: Path) -> None:
    proc = CrishimProcess(tmp_path)
    proc.socket = tmp_path / "deep" / "er" / "crishim.sock"
    proc.start()
    try:
        mode = proc.socket.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o660
        assert "event loop uvloop" in proc.log()
    finally:
        proc.kill()


async def test_version_and_status_over_the_socket(cri: CriClient) -> None:
    version = await cri.runtime.version(v1.VersionRequest())
    assert (version.runtime_name, version.runtime_api_version) == ("crishim", "v1")
    status = await cri.runtime.status(v1.StatusRequest())
    assert status.status is not None
    assert {c.type for c in status.status.conditions} == {"RuntimeReady", "NetworkReady"}


@pytest.mark.parametrize("schema", ["ours", "reference"])
def test_grpcio_client_gets_version_and_status(
    crishim: CrishimProcess, tmp_path: Path, schema: str
) -> None:
    root = OUR_SCHEMA_ROOT if schema == "ours" else reference_root(tmp_path)
    version = grpcio_call(root, crishim.endpoint, "RuntimeService/Version")
    assert version["runtime_name"] == "crishim"
    assert version["runtime_api_version"] == "v1"
    status = grpcio_call(root, crishim.endpoint, "RuntimeService/Status", '{"verbose": true}')
    network = next(c for c in status["status"]["conditions"] if c["type"] == "NetworkReady")
    assert network["status"] is False
    assert network["reason"] == "NetworkPluginNotReady"
    assert "config" in status["info"]
    missing = grpcio_call(root, crishim.endpoint, "RuntimeService/CheckpointContainer")
    assert missing == {
        "error": {
            "code": "UNIMPLEMENTED",
            "details": "CheckpointContainer is not implemented by crishim yet",
        }
    }
    bad = grpcio_call(root, crishim.endpoint, "ImageService/PullImage")
    assert bad == {
        "error": {"code": "INVALID_ARGUMENT", "details": "image: an image reference is required"}
    }


def seed_records(root: Path, count: int) -> None:
    """Synthetic records written the way the store writes them."""
    for i in range(count):
        sandbox = Sandbox(
            id=f"sb{i:03d}",
            metadata=PodMetadata(name=f"pod{i}", uid=f"uid{i}", namespace="ns"),
            created_at=1_700_000_000_000_000_000 + i,
            labels={"i": str(i)},
        )
        write_record(
            root / "sandboxes" / sandbox.id / "sandbox.json",
            "sandbox",
            sandbox.model_dump(mode="json"),
        )
        ctr = Container(
            id=f"ct{i:03d}",
            sandbox_id=sandbox.id,
            metadata=ContainerMetadata(name="app"),
            image="sha256:" + "e" * 64,
            state=ContainerState.EXITED,
            created_at=1_700_000_000_000_000_000 + i,
            labels={"i": str(i)},
            annotations={"io.kubernetes.container.hash": "abc"},
        )
        write_record(
            root / "containers" / ctr.id / "container.json",
            "container",
            ctr.model_dump(mode="json"),
        )


def test_pre_encoded_lists_decode_with_googles_protobuf(tmp_path: Path) -> None:
    proc = CrishimProcess(tmp_path)
    seed_records(proc.root, 30)
    proc.start()
    try:
        listed = grpcio_call(OUR_SCHEMA_ROOT, proc.endpoint, "RuntimeService/ListContainers")
        assert [c["id"] for c in listed["containers"]] == [f"ct{i:03d}" for i in range(30)]
        first = listed["containers"][0]
        assert first["metadata"] == {"name": "app", "attempt": 0}
        assert first["state"] == "CONTAINER_EXITED"
        assert first["annotations"] == {"io.kubernetes.container.hash": "abc"}
        assert first["created_at"] == str(1_700_000_000_000_000_000)
        one = grpcio_call(
            OUR_SCHEMA_ROOT,
            proc.endpoint,
            "RuntimeService/ListPodSandbox",
            '{"filter": {"label_selector": {"i": "7"}}}',
        )
        assert [s["id"] for s in one["items"]] == ["sb007"]
        assert one["items"][0]["metadata"]["uid"] == "uid7"
        assert "30 sandboxes, 30 containers" in proc.log()
    finally:
        proc.kill()


def test_a_live_socket_is_never_taken_over(crishim: CrishimProcess) -> None:
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "crishim.cli",
            "serve",
            "--config",
            str(crishim.config_file),
            "--root",
            str(crishim.base / "root2"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert second.returncode == 2
    assert f"{crishim.socket}: another process is already serving on this socket" in second.stderr
    assert grpcio_call(OUR_SCHEMA_ROOT, crishim.endpoint, "RuntimeService/Version")


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    proc = CrishimProcess(tmp_path)
    proc.socket.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(proc.socket))
    dead.close()  # the file stays, nobody listens: what a crash leaves
    proc.start()
    try:
        assert "removing stale socket" in proc.log()
        assert grpcio_call(OUR_SCHEMA_ROOT, proc.endpoint, "RuntimeService/Version")
    finally:
        proc.kill()


def test_a_regular_file_at_the_socket_path_is_not_replaced(tmp_path: Path) -> None:
    proc = CrishimProcess(tmp_path)
    proc.socket.parent.mkdir(parents=True)
    proc.socket.write_text("precious")
    with pytest.raises(RuntimeError, match="exists and is not a socket"):
        proc.start()
    assert proc.socket.read_text() == "precious"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_finishes_in_flight_calls_and_removes_the_socket(
    tmp_path: Path, signum: int
) -> None:
    # A runtime binary that answers --version slowly makes verbose Status take ~1.5 s.
    slow = tmp_path / "slow-runtime"
    slow.write_text("#!/bin/sh\nsleep 1.5\necho 'slow version 1'\n")
    os.chmod(slow, 0o755)
    proc = CrishimProcess(tmp_path, config=f'\n[runtimes.slow]\npath = "{slow}"\n').start()
    from grpclib.client import Channel

    channel = Channel(path=str(proc.socket))
    try:
        stub = v1.RuntimeServiceStub(channel)
        call = asyncio.create_task(stub.status(v1.StatusRequest(verbose=True)))
        await asyncio.sleep(0.5)
        assert proc.proc is not None
        proc.proc.send_signal(signum)
        reply = await asyncio.wait_for(call, 10)
        assert "slow version 1" in reply.info["binaries"]
        assert await asyncio.to_thread(proc.proc.wait, 10) == 0
    finally:
        channel.close()
        proc.kill()
    assert not proc.socket.exists()
    log = proc.log()
    assert "shutting down: finishing in-flight calls" in log
    assert "crishim stopped" in log
    assert "Status OK" in log


def test_failed_and_debug_rpc_lines_in_the_log(crishim: CrishimProcess) -> None:
    grpcio_call(OUR_SCHEMA_ROOT, crishim.endpoint, "RuntimeService/CheckpointContainer")
    grpcio_call(OUR_SCHEMA_ROOT, crishim.endpoint, "RuntimeService/Version")
    deadline = time.monotonic() + 5
    while "Version OK" not in crishim.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = crishim.log()
    assert (
        log.count(
            "CheckpointContainer failed: UNIMPLEMENTED CheckpointContainer is not implemented"
        )
        == 1
    )
    assert "crishim.rpc: Version OK " in log
    assert "hpack" not in log  # library chatter stays out even at debug level


def test_metrics_endpoint_counts_cri_calls(crishim: CrishimProcess) -> None:
    import re
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    grpcio_call(OUR_SCHEMA_ROOT, crishim.endpoint, "RuntimeService/Version")
    grpcio_call(OUR_SCHEMA_ROOT, crishim.endpoint, "RuntimeService/CheckpointContainer")
    match = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", crishim.log())
    assert match, crishim.log()
    with urllib.request.urlopen(match.group(1), timeout=10) as reply:
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    calls = {
        (s.labels["method"], s.labels["code"]): s.value
        for s in families["crishim_cri_requests"].samples
        if s.name == "crishim_cri_requests_total"
    }
    assert calls[("Version", "OK")] >= 1
    assert calls[("CheckpointContainer", "UNIMPLEMENTED")] == 1
    assert families["process_resident_memory_bytes"].samples[0].value > 10_000_000
    assert "crishim_pods_running" in families
