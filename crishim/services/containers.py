"""Container use cases: create, start, stop, remove, status, list, update, exec-sync.

CreateContainer prepares the root filesystem, the bundle and the record; the runtime first
hears of the container at StartContainer, when conmon runs ``runc|crun create`` (then
``start``), holds the container's stdio, writes the CRI log and records the exit code in
the exit directory. conmon outlives crishim, so crishim can restart while containers keep
running; the exit directory and ``runc state`` tell crishim afterwards what happened
(services/exits.py), and recovery removes what half-made ones left. The infra process of
pods sharing a PID namespace is in services/infra.py.

The files of a container, and how a pod with its own user namespace sees them, are in
services/container_files.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import time
from pathlib import Path

import anyio.to_thread

from crishim.errors import (
    AlreadyExists,
    CrishimError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from crishim.model import Container, ContainerFilter, ContainerMetadata, ContainerState, Sandbox
from crishim.model.events import EventType
from crishim.model.specs import (
    ContainerConfig,
    ImageConfigView,
    LinuxResources,
    NamespaceMode,
    SandboxConfig,
)
from crishim.oci.build import build_container_spec
from crishim.oci.opts import linux_resources
from crishim.oci.spec import dump_spec
from crishim.runtime.bundle import read_spec, write_spec
from crishim.runtime.bundle import update_resources as update_bundle_resources
from crishim.runtime.cgroup_driver import CgroupDriver
from crishim.runtime.conmon import (
    MonitorSpec,
    create_container,
    discard_container,
    reopen_log,
)
from crishim.runtime.host_paths import HostPaths
from crishim.runtime.idmap import prepare_stage_root, release_stage
from crishim.runtime.mounts import MountRequest, mount_all, unmount
from crishim.runtime.oci_runtime import ExecResult, OciRuntime
from crishim.services.container_context import SpecContexts
from crishim.services.container_files import (
    ContainerPaths,
    pod_idmap,
    stage_volumes,
    volumes_seen_here,
)
from crishim.services.events import EventBus
from crishim.services.exits import ExitTracker
from crishim.services.images import ImageService
from crishim.services.sandboxes import SandboxService
from crishim.store import ObjectStore
from crishim.util.disk import disk_full_as
from crishim.util.fs import remove_tree
from crishim.util.tasks import BackgroundTasks, join_shared

log = logging.getLogger(__name__)


class ContainerService:
    """Containers as kubelet sees them."""

    def __init__(
        self,
        store: ObjectStore[Container],
        *,
        state_dir: Path,
        sandboxes: SandboxService,
        images: ImageService,
        runtimes: dict[str, OciRuntime],
        default_runtime: str,
        cgroups: CgroupDriver,
        conmon: str = "conmon",
        events: EventBus | None = None,
        host_paths: HostPaths | None = None,
    ) -> None:
        self._store = store
        self._state = state_dir
        self._sandboxes = sandboxes
        self._images = images
        self._runtimes = runtimes
        self._default_runtime = default_runtime
        self._cgroups = cgroups
        self._contexts = SpecContexts(cgroups)
        self._conmon = conmon
        self._host_paths = host_paths or HostPaths()
        self._events = events or EventBus()
        self._creating: dict[tuple[str, str, int], asyncio.Task[Container]] = {}
        # Containers whose create finished after its caller gave up, by (sandbox, name, attempt).
        self._unclaimed: dict[tuple[str, str, int], str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._releasing = BackgroundTasks()
        self._exits = ExitTracker(
            store,
            state_dir=state_dir,
            runtime_for=self.runtime_for,
            events=self._events,
            lock_for=self._lock,
        )

    # ---- queries ------------------------------------------------------------------------

    def matching(self, criteria: ContainerFilter) -> list[Container]:
        """Containers matching ``criteria``, oldest first."""
        found = [c for c in self._store.list() if criteria.matches(c)]
        found.sort(key=lambda c: c.created_at)
        return found

    def count(self) -> int:
        """How many containers exist."""
        return len(self._store)

    def ids(self) -> list[str]:
        """The id of every container."""
        return [c.id for c in self._store.list()]

    def get(self, container_id: str) -> Container:
        """The container with this id or a unique prefix of it; NotFound otherwise."""
        found = self._store.find(container_id)
        if found is not None:
            return found
        matches = [c for c in self._store.list() if container_id and c.id.startswith(container_id)]
        if len(matches) == 1:
            return matches[0]
        raise NotFound(f"container {container_id!r} not found")

    @property
    def events(self) -> EventBus:
        """Where lifecycle events go."""
        return self._events

    def config_of(self, container: Container) -> ContainerConfig:
        """The config the container was created with."""
        return ContainerConfig.model_validate(container.config)

    def paths(self, container_id: str) -> ContainerPaths:
        """The container's files."""
        return ContainerPaths(
            self._state / "containers" / container_id,
            self._state / "exits",
            self._state / "attach",
            self._state / "idmapped" / container_id,
        )

    def runtime_for(self, handler: str) -> OciRuntime:
        """The OCI runtime of a runtime handler ("" = the default)."""
        name = handler or self._default_runtime
        try:
            return self._runtimes[name]
        except KeyError:
            raise InvalidArgument(f"runtime handler {name!r} is not configured") from None

    def check_runtime(self, handler: str) -> None:
        """Raise unless the runtime of ``handler`` is configured and its binary installed."""
        self.runtime_for(handler).require()

    # ---- create -------------------------------------------------------------------------

    async def create(
        self, sandbox_id: str, config: ContainerConfig, sandbox_config: SandboxConfig | None
    ) -> Container:
        """Create a container in a ready sandbox; a retry of a create in progress joins it."""
        sandbox = self._sandboxes.get(sandbox_id)
        if config.metadata is None or not config.metadata.name:
            raise InvalidArgument("container config: metadata.name is required")
        key = (sandbox.id, config.metadata.name, config.metadata.attempt)
        unclaimed = self._unclaimed.pop(key, None)
        if unclaimed is not None and self._store.find(unclaimed) is not None:
            # The caller of the create that made it gave up (kubelet's deadline); this is
            # kubelet's retry: hand it the container instead of "name already in use".
            return self._store.get(unclaimed)
        for existing in self._store.list():
            if (existing.sandbox_id, existing.metadata.name, existing.metadata.attempt) == key:
                raise AlreadyExists(
                    f"container {config.metadata.name!r} attempt {config.metadata.attempt} "
                    f"already exists in pod sandbox {sandbox.id} as {existing.id}"
                )
        task = self._creating.get(key)
        if task is None:
            # Kept running when the call is cancelled, so the retry finds it.
            task = asyncio.create_task(self._create(sandbox, config))
            self._creating[key] = task
            task.add_done_callback(lambda _: self._creating.pop(key, None))
        try:
            return await join_shared(task, f"create of container {config.metadata.name!r}")
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: self._keep_unclaimed(key, t))
            raise

    def _keep_unclaimed(self, key: tuple[str, str, int], task: asyncio.Task[Container]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._unclaimed[key] = task.result().id

    async def _create(self, sandbox: Sandbox, config: ContainerConfig) -> Container:
        if sandbox.state.value != "ready":
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        assert config.metadata is not None
        if config.image is None or not config.image.image:
            raise InvalidArgument("container config: image is required")
        image = self._images.status(config.image.image)
        if image is None:
            raise NotFound(f"image {config.image.image!r} not found; pull it first")
        container_id = secrets.token_hex(32)
        paths = self.paths(container_id)
        self.runtime_for(sandbox.runtime_handler)  # an unknown handler fails the create
        sandbox_config = SandboxConfig.model_validate(sandbox.config)
        snapshotter = self._images.snapshotter
        idmap = pod_idmap(sandbox, sandbox_config)
        async with contextlib.AsyncExitStack() as undo:
            with disk_full_as("making the bundle directory", paths.bundle):
                paths.bundle.mkdir(parents=True)
            undo.push_async_callback(remove_tree, paths.base)
            undo.push_async_callback(release_stage, paths.idmapped)
            if idmap is not None:
                await prepare_stage_root(paths.idmapped.parent)
            spec_config = await volumes_seen_here(config, self._host_paths)
            spec_config = await stage_volumes(spec_config, sandbox_config, idmap, paths.idmapped)
            mounts = await anyio.to_thread.run_sync(
                snapshotter.prepare, container_id, image.top_chain_id or None
            )
            undo.callback(snapshotter.remove, container_id)
            await mount_all(
                [MountRequest(m.type, m.source, m.options) for m in mounts],
                paths.rootfs,
                idmap,
                paths.layers_stage,
            )
            undo.push_async_callback(unmount, paths.rootfs)
            image_config = self._images.config(image)
            log_path = self._log_path(sandbox, config)
            ctx = self._contexts.for_container(
                container_id,
                sandbox,
                sandbox_config,
                spec_config,
                image_config,
                paths.rootfs,
                self._sandboxes.paths(sandbox.id),
                self._target_pid(config),
            )
            spec = build_container_spec(spec_config, ctx)
            for warning in ctx.warnings:
                log.warning("container %s: %s", container_id[:12], warning)
            write_spec(paths.bundle, dump_spec(spec))
            if log_path:
                with disk_full_as("making the log directory", Path(log_path).parent):
                    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            stop_signal = (
                config.stop_signal or ImageConfigView.from_image_config(image_config).stop_signal
            )
            container = Container(
                id=container_id,
                sandbox_id=sandbox.id,
                metadata=ContainerMetadata(
                    name=config.metadata.name, attempt=config.metadata.attempt
                ),
                image=image.id,
                user_specified_image=config.image.image,
                image_ref=image.repo_digests[0] if image.repo_digests else image.id,
                image_id=image.id,
                state=ContainerState.CREATED,
                created_at=time.time_ns(),
                labels=dict(config.labels),
                annotations=dict(config.annotations),
                runtime_handler=sandbox.runtime_handler,
                log_path=log_path,
                pid=0,
                uid=spec.process.user.uid if spec.process else 0,
                gid=spec.process.user.gid if spec.process else 0,
                supplemental_groups=list(
                    (spec.process.user.additional_gids or []) if spec.process else []
                ),
                stop_signal=stop_signal,
                config=config.model_dump(mode="json"),
            )
            await self._store.add(container)
            undo.pop_all()
        self._events.publish(container.id, sandbox.id, EventType.CREATED)
        return container

    def _target_pid(self, config: ContainerConfig) -> int | None:
        """The pid whose PID namespace the container joins (namespace mode TARGET)."""
        security = config.security_context
        ns = security.namespace_options if security else None
        if ns is None or ns.pid is not NamespaceMode.TARGET:
            return None
        target = self.get(ns.target_id)
        if target.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"target container {ns.target_id} is not running")
        return target.pid

    @staticmethod
    def _log_path(sandbox: Sandbox, config: ContainerConfig) -> str:
        if not config.log_path:
            return ""
        if os.path.isabs(config.log_path) or not sandbox.log_directory:
            return config.log_path
        return os.path.join(sandbox.log_directory, config.log_path)

    # ---- start / stop -------------------------------------------------------------------

    def _lock(self, container_id: str) -> asyncio.Lock:
        return self._locks.setdefault(container_id, asyncio.Lock())

    async def start(self, container_id: str) -> None:
        """Start a created container: conmon runs ``<runtime> create``, then ``start``.

        Like containerd, the runtime first hears of a container here, not at create: a
        create is then only files and a record, and a container that is never started
        costs no runtime work. A failed start leaves the container exited with reason
        StartError, as containerd reports it.
        """
        container = self.get(container_id)
        async with self._lock(container.id):
            container = self._store.get(container.id)
            if not container.can_start():
                raise FailedPrecondition(
                    f"container {container.id} is {container.state.value}, not created"
                )
            runtime = self.runtime_for(container.runtime_handler)
            try:
                pid = await self._create_in_runtime(container, runtime)
                await runtime.start(container.id)
            except BaseException as exc:
                await asyncio.shield(self._start_failed(container, exc))
                raise
            await self._store.update(
                container.id,
                lambda c: c.model_copy(
                    update={
                        "state": ContainerState.RUNNING,
                        "started_at": time.time_ns(),
                        "pid": pid,
                    }
                ),
            )
        self._events.publish(container.id, container.sandbox_id, EventType.STARTED)
        self._ensure_watcher()

    def _monitor_spec(self, container: Container) -> MonitorSpec:
        paths = self.paths(container.id)
        sandbox = self._sandboxes.get(container.sandbox_id)
        config = self.config_of(container)
        return MonitorSpec(
            container_id=container.id,
            name=f"{sandbox.metadata.namespace}_{sandbox.metadata.name}_"
            f"{container.metadata.name}_{container.metadata.attempt}",
            bundle=paths.bundle,
            runtime=self.runtime_for(container.runtime_handler),
            log_path=Path(container.log_path)
            if container.log_path
            else paths.base / "container.log",
            exit_dir=paths.exits,
            socket_dir=paths.attach,
            pid_file=paths.pid_file,
            conmon_pid_file=paths.conmon_pid_file,
            stdin=config.stdin,
            stdin_once=config.stdin_once,
            tty=config.tty,
        )

    async def _create_in_runtime(self, container: Container, runtime: OciRuntime) -> int:
        """The container's init pid, created under a new conmon (or found from an attempt
        that crishim did not see through: it died after conmon had created it)."""
        paths = self.paths(container.id)
        if paths.conmon_pid_file.exists():
            state = await runtime.state(container.id)
            if state is not None and state.status == "created":
                return state.pid
            # Gone or half-made: start over.
            await runtime.delete(container.id, force=True)
            for stale in (paths.conmon_pid_file, paths.pid_file, paths.exits / container.id):
                stale.unlink(missing_ok=True)
        sandbox = self._sandboxes.get(container.sandbox_id)
        parent = sandbox.cgroup_parent
        pid = await create_container(
            self._monitor_spec(container),
            conmon=self._conmon,
            place=lambda pid: self._cgroups.place_monitor(pid, parent, container.id),
        )
        resources = self.config_of(container).linux
        if resources is not None and resources.resources is not None:
            await self._cgroups.settle_container_resources(container.id, resources.resources)
        return pid

    async def _start_failed(self, container: Container, exc: BaseException) -> None:
        """Leave nothing behind a failed start (conmon, the runtime's container, exit file,
        attach link, cgroups), and say why it failed. A failing cleanup is logged: ``exc``
        is what the caller must see."""
        await discard_container(self._monitor_spec(container))
        pod = self._sandboxes.find(container.sandbox_id)
        try:
            await self._cgroups.release(pod.cgroup_parent if pod else "", container.id)
        except (CrishimError, OSError) as exc_release:
            log.warning("container %s: releasing its cgroups: %s", container.id[:12], exc_release)
        if isinstance(exc, asyncio.CancelledError):
            return  # kubelet's retry may start it again
        finished = time.time_ns()
        message = str(exc)
        exited = await self._store.update(
            container.id,
            lambda c: c.model_copy(
                update={
                    "state": ContainerState.EXITED,
                    "exit_code": 128,
                    "started_at": finished,
                    "finished_at": finished,
                    "reason": "StartError",
                    "message": message,
                }
            ),
        )
        self._events.publish(container.id, exited.sandbox_id, EventType.STOPPED)

    async def stop(self, container_id: str, timeout: float) -> None:
        """Signal the container, SIGKILL after ``timeout`` s; missing or stopped is fine."""
        try:
            container = self.get(container_id)
        except NotFound:
            return
        async with self._lock(container.id):
            if self._store.find(container.id) is None:
                return  # removed while this call waited for the lock
            await self._stop_locked(container.id, timeout)

    async def _stop_locked(self, container_id: str, timeout: float) -> None:
        container = self._store.get(container_id)
        if container.state in (ContainerState.EXITED, ContainerState.UNKNOWN):
            return
        runtime = self.runtime_for(container.runtime_handler)
        if container.state is ContainerState.RUNNING:
            sig = _signal_number(container.stop_signal) if timeout > 0 else signal.SIGKILL
            await runtime.kill(container.id, sig)
            if not await self._wait_exit(container.id, timeout):
                await runtime.kill(container.id, signal.SIGKILL, all_processes=True)
                await self._wait_exit(container.id, 10.0)
        else:
            # Created, never started: nothing runs (the runtime has not heard of it yet), and
            # it stays created, as on containerd.
            return
        await self._record_exit(container.id)

    # ---- exits -------------------------------------------------------------------------

    async def _wait_exit(self, container_id: str, timeout: float) -> bool:
        return await self._exits.wait(container_id, timeout)

    async def _record_exit(self, container_id: str) -> Container:
        return await self._exits.record(container_id)

    def _ensure_watcher(self) -> None:
        self._exits.watch()

    async def refresh(self) -> None:
        """After a restart: exits that happened meanwhile are recorded, a start that crishim
        did not see through is finished or undone, watching resumes."""
        await self._exits.refresh()

    async def close(self, grace: float = 5.0) -> None:
        """Stop the background work (at shutdown); releases under way get ``grace``
        seconds to finish (what they leave, recovery removes at the next start)."""
        await self._releasing.drain(grace)
        await self._exits.close()

    # ---- remove -------------------------------------------------------------------------

    async def remove(self, container_id: str) -> None:
        """Remove the container, stopping it first; missing is fine."""
        try:
            container = self.get(container_id)
        except NotFound:
            return
        async with self._lock(container.id):
            if self._store.find(container.id) is None:
                return  # a concurrent removal (kubelet's GC and its pod cleanup race) did it
            await self._stop_locked(container.id, 0)
            if not self._store.get(container.id).can_remove():
                raise FailedPrecondition(
                    f"container {container.id} did not stop after SIGKILL; not removing it"
                )
            # The record goes first: from here the container no longer exists for kubelet,
            # and what it leaves is released in the background. A crash before that is done
            # leaves traces without a record, which recovery removes at the next start.
            await self._store.delete(container.id)
        self._events.publish(container.id, container.sandbox_id, EventType.DELETED)
        self._locks.pop(container.id, None)
        pod = self._sandboxes.find(container.sandbox_id)
        release = self._release(container, pod.cgroup_parent if pod else "")
        self._releasing.spawn(release, f"releasing container {container.id[:12]}")

    async def _release(self, container: Container, parent: str) -> None:
        """Remove what a removed (stopped) container leaves: its runtime state, its
        conmon's cgroup, root filesystem, snapshot and files."""
        paths = self.paths(container.id)
        if paths.conmon_pid_file.exists():  # else the runtime never heard of it
            try:
                await self.runtime_for(container.runtime_handler).delete(container.id, force=True)
            except (CrishimError, OSError) as exc:
                # A runtime that fails (or is gone) must not keep the rest: recovery retries
                # it at the next start.
                log.warning(
                    "container %s: removing it from its runtime: %s", container.id[:12], exc
                )
            await self._cgroups.release(parent, container.id)
        await unmount(paths.rootfs)
        await release_stage(paths.idmapped)
        await anyio.to_thread.run_sync(self._images.snapshotter.remove, container.id)
        await remove_tree(paths.exits / container.id)
        await remove_tree(paths.base)
        await remove_tree(paths.attach / container.id)

    async def reap_sandbox(self, sandbox_id: str, remove: bool) -> None:
        """Stop (and with ``remove``, remove) every container of a sandbox."""
        members = [c for c in self._store.list() if c.sandbox_id == sandbox_id]
        await asyncio.gather(*(self.stop(c.id, 0) for c in members))
        if remove:
            await asyncio.gather(*(self.remove(c.id) for c in members))

    # ---- update, logs, exec -------------------------------------------------------------

    async def update_resources(self, container_id: str, resources: LinuxResources) -> None:
        """Apply new resource limits to a created or running container.

        Before the runtime has created it (its start), the limits go into its bundle, so
        that kubelet's updates between create and start (the CPU manager's) are kept.
        """
        container = self.get(container_id)
        if container.state not in (ContainerState.CREATED, ContainerState.RUNNING):
            raise FailedPrecondition(f"container {container.id} is {container.state.value}")
        oci = linux_resources(resources, swap_available=self._contexts.swap_available).model_dump(
            by_alias=True, exclude_none=True
        )
        async with self._lock(container.id):
            paths = self.paths(container.id)
            if not paths.conmon_pid_file.exists():
                await anyio.to_thread.run_sync(update_bundle_resources, paths.bundle, oci)
                return
            await self.runtime_for(container.runtime_handler).update(container.id, oci)
            await self._cgroups.settle_container_resources(container.id, resources)

    async def reopen_log(self, container_id: str) -> None:
        """Make conmon reopen the log file (after kubelet rotated it)."""
        container = self.get(container_id)
        if container.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {container.id} is not running")
        if not container.log_path:
            raise FailedPrecondition(f"container {container.id} has no log file")
        await reopen_log(self.paths(container.id).bundle, Path(container.log_path))

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: float) -> ExecResult:
        """Run ``cmd`` in the container and collect its output and exit code."""
        if not cmd:
            raise InvalidArgument("exec: cmd must not be empty")
        container = self.get(container_id)
        if container.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {container.id} is not running")
        spec = await anyio.to_thread.run_sync(read_spec, self.paths(container.id).bundle)
        process = dict(spec["process"])
        process["args"] = cmd
        process["terminal"] = False
        runtime = self.runtime_for(container.runtime_handler)
        return await runtime.exec_sync(container.id, process, timeout if timeout > 0 else None)


def _signal_number(name: str) -> int:
    if not name:
        return int(signal.SIGTERM)
    text = name.upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal.Signals[text])
    except KeyError:
        return int(signal.SIGTERM)
