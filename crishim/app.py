"""The composition root: the one place that builds concrete objects and wires them."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crishim import __version__
from crishim.api.image_service import ImageServicer
from crishim.api.instrument import CallTracker
from crishim.api.runtime_service import RuntimeServicer
from crishim.api.server import CriServer
from crishim.config import Config
from crishim.model import Container, Sandbox
from crishim.services.containers import ContainerService
from crishim.services.runtime_info import RuntimeInfo
from crishim.services.sandboxes import SandboxService
from crishim.store import ObjectStore

log = logging.getLogger(__name__)

# How long in-flight calls may run on after SIGTERM before they are cancelled.
SHUTDOWN_GRACE_SECONDS = 10.0


@dataclass
class Stores:
    """The durable stores under the root directory."""

    sandboxes: ObjectStore[Sandbox]
    containers: ObjectStore[Container]


def open_stores(root: Path) -> Stores:
    """The stores of an instance whose durable state lives under ``root``."""
    return Stores(
        sandboxes=ObjectStore(root / "sandboxes", "sandbox", Sandbox),
        containers=ObjectStore(root / "containers", "container", Container),
    )


def build_servicers(config: Config, stores: Stores, tracker: CallTracker) -> list[Any]:
    """The RuntimeService and ImageService servicers over the stores."""
    runtime = RuntimeServicer(
        RuntimeInfo(config),
        SandboxService(stores.sandboxes),
        ContainerService(stores.containers),
        tracker,
    )
    return [runtime, ImageServicer(tracker)]


def prepare_directories(config: Config) -> None:
    """Create the root and state directories, private to root."""
    for directory in (config.root, config.state):
        Path(directory).mkdir(parents=True, exist_ok=True, mode=0o711)


async def serve(config: Config) -> None:
    """Run crishim until SIGTERM or SIGINT, then shut down cleanly."""
    prepare_directories(config)
    stores = open_stores(Path(config.root))
    stores.sandboxes.load()
    stores.containers.load()
    tracker = CallTracker()
    server = CriServer(build_servicers(config, stores, tracker), Path(config.socket), tracker)
    await server.start()
    log.info(
        "crishim %s serving CRI on %s (%d sandboxes, %d containers; event loop %s)",
        __version__,
        config.socket,
        len(stores.sandboxes),
        len(stores.containers),
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("shutting down: finishing in-flight calls")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop(SHUTDOWN_GRACE_SECONDS)
    log.info("crishim stopped")
