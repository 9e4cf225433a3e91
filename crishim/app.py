"""The composition root: the one place that builds concrete objects and wires them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crishim import __version__
from crishim.api.admin_service import AdminServicer
from crishim.api.image_service import ImageServicer
from crishim.api.instrument import CallTracker
from crishim.api.metrics_http import MetricsServer
from crishim.api.runtime_service import RuntimeServicer
from crishim.api.server import CriServer
from crishim.config import Config, StreamingConfig
from crishim.images.content import ContentStore
from crishim.images.manifest import host_platform
from crishim.images.registry import RegistryClient
from crishim.images.snapshots.base import Snapshotter
from crishim.images.snapshots.copy import CopySnapshotter
from crishim.images.snapshots.overlay import (
    OverlaySnapshotter,
    overlay_supported,
    probe_overlay_mount,
)
from crishim.model import Container, ContainerFilter, Image, Sandbox
from crishim.network.cni import CniManager
from crishim.network.default_network import default_network
from crishim.runtime.binaries import resolve_binary
from crishim.runtime.cgroup_driver import CgroupDriver, CgroupfsDriver
from crishim.runtime.host_paths import HostPaths
from crishim.runtime.oci_runtime import OciRuntime
from crishim.runtime.systemd_cgroups import SystemdDriver
from crishim.services.containers import ContainerService
from crishim.services.events import EventBus
from crishim.services.exec import ExecService
from crishim.services.images import ImageService
from crishim.services.infra import InfraProcesses
from crishim.services.metrics import CrishimMetrics
from crishim.services.recovery import Recovery
from crishim.services.runtime_info import RuntimeInfo
from crishim.services.sandboxes import SandboxService
from crishim.services.stats import StatsService
from crishim.store import ObjectStore
from crishim.streaming import StreamingLimits, StreamingServer
from crishim.util.sdnotify import Notifier

log = logging.getLogger(__name__)

# How long in-flight calls may run on after SIGTERM before they are cancelled.
SHUTDOWN_GRACE_SECONDS = 10.0


@dataclass
class Stores:
    """The durable stores under the root directory."""

    sandboxes: ObjectStore[Sandbox]
    containers: ObjectStore[Container]
    images: ObjectStore[Image]


def open_stores(root: Path) -> Stores:
    """The stores of an instance whose durable state lives under ``root``; loaded."""
    stores = Stores(
        # Not fsynced: reconciled at start, and recovery removes what a lost one leaves.
        sandboxes=ObjectStore(root / "sandboxes", "sandbox", Sandbox, durable=False),
        containers=ObjectStore(root / "containers", "container", Container, durable=False),
        images=ObjectStore(root / "images" / "records", "image", Image),
    )
    stores.sandboxes.load()
    stores.containers.load()
    stores.images.load()
    return stores


async def choose_snapshotter(images_root: Path) -> Snapshotter:
    """overlayfs when the kernel can mount it under the root, else the copying one."""
    overlay_root = images_root / "snapshots" / "overlayfs"
    if overlay_supported():
        problem = await probe_overlay_mount(images_root)
        if not problem:
            return OverlaySnapshotter(overlay_root)
        log.warning("overlayfs cannot mount under %s (%s): using copies", images_root, problem)
    return CopySnapshotter(images_root / "snapshots" / "native")


@dataclass
class Services:
    """The use cases, built once per instance."""

    runtime_info: RuntimeInfo
    sandboxes: SandboxService
    containers: ContainerService
    images: ImageService
    exec: ExecService
    stats: StatsService
    metrics: CrishimMetrics
    registry: RegistryClient
    recovery: Recovery
    cgroups: CgroupDriver


def cgroup_driver(config: Config) -> CgroupDriver:
    """The cgroup driver kubelet's ``cgroupDriver`` names."""
    if config.cgroup_driver == "systemd":
        return SystemdDriver()
    return CgroupfsDriver()


def oci_runtimes(config: Config, cgroups: CgroupDriver) -> dict[str, OciRuntime]:
    """One OciRuntime per configured runtime handler."""
    return {
        name: OciRuntime(
            name,
            resolve_binary(handler.path) or handler.path,
            config.runtime_root(name),
            options=cgroups.runtime_options,
        )
        for name, handler in config.runtimes.items()
    }


def build_services(config: Config, stores: Stores, snapshotter: Snapshotter) -> Services:
    """The services over the stores and infrastructure."""
    root, state = Path(config.root), Path(config.state)
    content = ContentStore(root / "images" / "content")
    content.recover()
    snapshotter.recover()
    registry = RegistryClient(config.registry.config_path)
    images = ImageService(stores.images, content, snapshotter, registry, host_platform())
    cni = CniManager(
        config.cni.conf_dir,
        config.cni.bin_dirs,
        root / "cni-cache",
        default=default_network(config),
    )
    cgroups = cgroup_driver(config)
    runtimes = oci_runtimes(config, cgroups)
    events = EventBus()
    sandboxes = SandboxService(
        stores.sandboxes,
        state_dir=state,
        cni=cni,
        runtime_handlers=tuple(runtimes),
        events=events,
        cgroups=cgroups,
    )
    containers = ContainerService(
        stores.containers,
        state_dir=state,
        sandboxes=sandboxes,
        images=images,
        runtimes=runtimes,
        default_runtime=config.default_runtime,
        cgroups=cgroups,
        conmon=config.conmon,
        events=events,
        host_paths=HostPaths(config.host_root),
    )
    events.pod_state = lambda sandbox_id: (
        sandboxes.find(sandbox_id),
        containers.matching(ContainerFilter(sandbox_id=sandbox_id)),
    )
    sandboxes.reap_containers = containers.reap_sandbox
    sandboxes.check_runtime = containers.check_runtime
    runtime_info = RuntimeInfo(config)
    sandboxes.userns_support = runtime_info.userns_support
    infra = InfraProcesses(
        state_dir=state,
        sandboxes=sandboxes,
        runtime_for=containers.runtime_for,
        cgroups=cgroups,
        conmon=config.conmon,
    )
    sandboxes.start_infra = infra.start
    sandboxes.stop_infra = infra.stop
    return Services(
        runtime_info=runtime_info,
        sandboxes=sandboxes,
        containers=containers,
        images=images,
        exec=ExecService(containers, sandboxes),
        stats=StatsService(containers, sandboxes, images.snapshotter, cgroups=cgroups),
        metrics=CrishimMetrics(pulls=images.metrics, sandboxes=sandboxes, containers=containers),
        registry=registry,
        recovery=Recovery(
            state_dir=state,
            runtimes=runtimes.values(),
            snapshotter=snapshotter,
            cni=cni,
            cgroups=cgroups,
        ),
        cgroups=cgroups,
    )


def build_servicers(
    services: Services, tracker: CallTracker, streaming: StreamingServer | None = None
) -> list[Any]:
    """The CRI's RuntimeService and ImageService servicers, and crishim's Admin service."""
    runtime = RuntimeServicer(
        services.runtime_info,
        services.sandboxes,
        services.containers,
        services.stats,
        tracker,
        services.exec,
        streaming,
    )
    return [
        runtime,
        ImageServicer(services.images, services.stats, tracker),
        AdminServicer(services.images, tracker),
    ]


def streaming_limits(config: StreamingConfig) -> StreamingLimits:
    """The streaming server's limits from its config section."""
    return StreamingLimits(
        max_sessions=config.max_sessions,
        max_handshakes=config.max_handshakes,
        request_timeout=config.request_timeout,
        idle_timeout=config.idle_timeout,
    )


def prepare_directories(config: Config) -> None:
    """Create the root and state directories, private to root."""
    for directory in (config.root, config.state):
        Path(directory).mkdir(parents=True, exist_ok=True, mode=0o711)


async def serve(config: Config) -> None:
    """Run crishim until SIGTERM or SIGINT, then shut down cleanly.

    Under systemd (``Type=notify``) it says READY=1 once the socket is served and STOPPING=1
    when it begins to shut down.
    """
    notifier = Notifier.from_environment()
    prepare_directories(config)
    stores = open_stores(Path(config.root))
    snapshotter = await choose_snapshotter(Path(config.root) / "images")
    services = build_services(config, stores, snapshotter)
    await services.runtime_info.probe_user_namespaces(snapshotter.root)
    await services.recovery.sweep(set(services.sandboxes.ids()), set(services.containers.ids()))
    await services.sandboxes.refresh()
    await services.containers.refresh()
    tracker = CallTracker()
    tracker.observe = services.metrics.observe_rpc
    host, _, port = config.streaming.address.rpartition(":")
    streaming = StreamingServer(
        services.exec, host=host, port=int(port), limits=streaming_limits(config.streaming)
    )
    await streaming.start()
    log.info("streaming server on %s:%d", *streaming.address)
    server = CriServer(build_servicers(services, tracker, streaming), Path(config.socket), tracker)
    await server.start()
    metrics_server = None
    if config.metrics.address:
        host, _, port = config.metrics.address.rpartition(":")
        metrics_server = MetricsServer(
            services.metrics.render, host, int(port), allow_remote=config.metrics.allow_remote
        )
        await metrics_server.start()
        log.info("metrics on http://%s:%d/metrics", *metrics_server.address)
    log.info(
        "crishim %s serving CRI on %s (%d sandboxes, %d containers, %d images; snapshotter "
        "%s; event loop %s)",
        __version__,
        config.socket,
        len(stores.sandboxes),
        len(stores.containers),
        len(stores.images),
        snapshotter.name,
        type(asyncio.get_running_loop()).__module__.split(".")[0],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier.notify("READY=1", f"STATUS=serving CRI on {config.socket}", f"MAINPID={os.getpid()}")
    try:
        await stop.wait()
        log.info("shutting down: finishing in-flight calls")
    finally:
        notifier.notify("STOPPING=1", "STATUS=shutting down")
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        await server.stop(SHUTDOWN_GRACE_SECONDS)
        if metrics_server is not None:
            await metrics_server.stop()
        await streaming.close()
        await services.containers.close()
        await services.registry.close()
        await services.cgroups.close()
    log.info("crishim stopped")
