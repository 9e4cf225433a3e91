"""pytest fixtures for crishim itself: a real subprocess, clients, an in-memory API."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel

from crishim.api import v1
from crishim.api.codec import CriCodec
from crishim.api.instrument import CallTracker
from crishim.api.server import CriServer
from crishim.app import Services, Stores, build_servicers, build_services, open_stores
from crishim.config import Config
from crishim.images.snapshots.copy import CopySnapshotter
from tests.rig.crishim_proc import CrishimProcess

REPO = Path(__file__).resolve().parents[2]
OUR_SCHEMA_ROOT = REPO / "protos"
REFERENCE_SCHEMA_ROOT = REPO.parent / "shared" / "reference" / "cri-api"
SCHEMA_FILE = "runtime/v1/api.proto"


@dataclass
class CriClient:
    """betterproto2 stubs over one grpclib channel."""

    channel: Channel
    runtime: v1.RuntimeServiceStub
    images: v1.ImageServiceStub


@pytest.fixture
def crishim(tmp_path: Path) -> Iterator[CrishimProcess]:
    """A running crishim on private directories; stopped with SIGTERM afterwards."""
    proc = CrishimProcess(tmp_path).start()
    try:
        yield proc
    finally:
        proc.kill()
        proc.unmount_all()


@pytest.fixture
async def cri(crishim: CrishimProcess) -> AsyncIterator[CriClient]:
    """A client of the ``crishim`` fixture over its unix socket."""
    channel = Channel(path=str(crishim.socket))
    try:
        yield CriClient(channel, v1.RuntimeServiceStub(channel), v1.ImageServiceStub(channel))
    finally:
        channel.close()


@dataclass
class InMemoryApi:
    """The real servicers over stores in a temporary root, served on a private socket."""

    config: Config
    client: CriClient
    stores: Stores
    tracker: CallTracker
    services: Services


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[InMemoryApi]:
    """Fast handler tests: the servicers behind crishim's gRPC server on a socket of the
    test's own, called through real stubs (grpclib's client)."""
    cni = tmp_path / "cni"
    cni.mkdir()
    config = Config(root=str(tmp_path / "root"), state=str(tmp_path / "state"))
    config.cni.conf_dir = str(cni)
    # Off as in CrishimProcess: a test that wants the built-in network turns it on.
    config.cni.default_network.enabled = False
    stores = open_stores(Path(config.root))
    tracker = CallTracker()
    snapshotter = CopySnapshotter(tmp_path / "root" / "images" / "snapshots" / "native")
    services = build_services(config, stores, snapshotter)
    servicers = build_servicers(services, tracker)
    # A socket path must stay within 108 bytes: pytest's directories can be longer.
    with tempfile.TemporaryDirectory(prefix="crishim-api-", dir="/tmp") as socket_dir:
        server = CriServer(servicers, Path(socket_dir) / "cri.sock", tracker)
        await server.start()
        channel = Channel(path=str(server.socket_path), codec=CriCodec())
        client = CriClient(channel, v1.RuntimeServiceStub(channel), v1.ImageServiceStub(channel))
        try:
            yield InMemoryApi(config, client, stores, tracker, services)
        finally:
            channel.close()
            await server.stop(grace=5)
            await services.registry.close()


def grpcio_call(proto_root: Path, endpoint: str, method: str, request: str = "{}") -> Any:
    """Call crishim with Google's grpcio client compiled from ``proto_root`` (subprocess)."""
    import json

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.rig.grpcio_client",
            str(proto_root),
            SCHEMA_FILE,
            endpoint,
            method,
            request,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        raise AssertionError(f"grpcio client failed:\n{out.stderr}")
    return json.loads(out.stdout)
