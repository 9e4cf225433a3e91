"""Container exits: conmon records them, crishim notices and keeps the record.

conmon writes ``<exits>/<id>`` with the exit code when a container's process ends (and an
``oom`` file in the bundle after an OOM kill). While containers run, one background watch
reads the exit directory whenever inotify reports a file landing in it (and every second
regardless) and marks the exited ones; after a restart
of crishim, :meth:`ExitTracker.refresh` reconciles every record with conmon's files and the
runtime's view.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from crishim.model import Container, ContainerState
from crishim.model.events import EventType
from crishim.runtime.conmon import oom_killed, read_exit_code
from crishim.runtime.oci_runtime import OciRuntime
from crishim.services.events import EventBus
from crishim.store import ObjectStore
from crishim.util.inotify import DirectoryWatch
from crishim.util.tasks import BackgroundTasks

__all__ = ["EXIT_POLL_SECONDS", "ExitTracker"]

log = logging.getLogger(__name__)

# conmon writes each exit file; inotify tells crishim when one lands. The exit directory
# is still read this often (every EXIT_POLL_SECONDS where inotify is not available).
WATCH_FALLBACK_SECONDS = 1.0
WATCH_RETRY_SECONDS = 30.0  # between tries to watch, where a watch could not be set up
EXIT_POLL_SECONDS = 0.25


class ExitTracker:
    """Records containers' exits in their records, as conmon reports them."""

    def __init__(
        self,
        store: ObjectStore[Container],
        *,
        state_dir: Path,
        runtime_for: Callable[[str], OciRuntime],
        events: EventBus,
        lock_for: Callable[[str], asyncio.Lock],
    ) -> None:
        self._store = store
        self._state = state_dir
        self._exits = state_dir / "exits"
        self._runtime_for = runtime_for
        self._events = events
        self._lock_for = lock_for
        self._background = BackgroundTasks()
        self._watcher: asyncio.Task[None] | None = None
        self._landing = DirectoryWatch(self._exits)
        self._retry_watch_at = 0.0
        self._closed = False

    def _landed(self) -> asyncio.Future[None]:
        """A future for the next exit file (taken before looking for one)."""
        now = time.monotonic()
        if not self._landing.active and not self._closed and now >= self._retry_watch_at:
            # Where inotify fails (out of instances, say), polling goes on and a new watch
            # is tried now and then, not at every poll.
            self._retry_watch_at = now + WATCH_RETRY_SECONDS
            try:
                self._exits.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("cannot create %s: %s", self._exits, exc)
            else:
                self._landing.start()
        return self._landing.changed()

    def _poll_interval(self) -> float:
        return WATCH_FALLBACK_SECONDS if self._landing.active else EXIT_POLL_SECONDS

    def _bundle(self, container_id: str) -> Path:
        return self._state / "containers" / container_id / "bundle"

    async def wait(self, container_id: str, timeout: float) -> bool:
        """True once conmon recorded the container's exit, False after ``timeout`` s."""
        deadline = time.monotonic() + max(timeout, 0)
        while True:
            landed = self._landed()
            if read_exit_code(self._exits, container_id) is not None:
                self._landing.forget(landed)
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._landing.forget(landed)
                return False
            # (inotify wakes this at once; the poll is the fallback should it stop)
            wait = min(remaining, 0.5 if self._landing.active else 0.05)
            await self._landing.wait(landed, wait)

    async def record(self, container_id: str) -> Container:
        """Mark the container exited with the code conmon recorded (the caller holds the
        container's lock)."""
        code = read_exit_code(self._exits, container_id)
        container = self._store.get(container_id)
        if code is None:
            state = await self._runtime_for(container.runtime_handler).state(container_id)
            if state is not None and state.status in ("running", "created", "paused"):
                return container
            reason, code, message = "Unknown", 255, "exit code not recorded"
        else:
            if oom_killed(self._bundle(container_id)):
                reason = "OOMKilled"
            else:
                reason = "Completed" if code == 0 else "Error"
            message = ""
        finished = time.time_ns()
        exited = await self._store.update(
            container_id,
            lambda c: c.model_copy(
                update={
                    "state": ContainerState.EXITED,
                    "exit_code": code,
                    "finished_at": finished,
                    "reason": reason,
                    "message": message,
                }
            ),
        )
        self._events.publish(container_id, exited.sandbox_id, EventType.STOPPED)
        return exited

    def watch(self) -> None:
        """Make sure the background watch runs (it ends when nothing runs any more)."""
        if self._watcher is None or self._watcher.done():
            self._watcher = self._background.spawn(self._watch(), "the exit watcher")

    async def close(self) -> None:
        """Stop watching (at shutdown)."""
        self._closed = True
        await self._background.close()
        self._landing.close()

    async def _watch(self) -> None:
        while True:
            landed = self._landed()
            running = [c for c in self._store.list() if c.state is ContainerState.RUNNING]
            if not running:
                self._landing.forget(landed)
                return
            # One directory read per round, however many containers run.
            try:
                written = set(os.listdir(self._exits))
            except FileNotFoundError:
                written = set()
            for container in running:
                if container.id in written:
                    try:
                        await self._record_running(container.id)
                    except Exception:
                        # One container's trouble must not stop the watch over the others.
                        log.exception("recording the exit of container %s", container.id[:12])
            await self._landing.wait(landed, self._poll_interval())

    async def _record_running(self, container_id: str) -> None:
        async with self._lock_for(container_id):
            # Removed or stopped meanwhile (the listing above is from before the lock).
            current = self._store.find(container_id)
            if current is not None and current.state is ContainerState.RUNNING:
                await self.record(container_id)

    async def refresh(self) -> None:
        """After a restart: exits that happened meanwhile are recorded, a start that crishim
        did not see through is finished or undone, watching resumes."""
        for container in self._store.list():
            if container.state is ContainerState.CREATED:
                await self._refresh_created(container)
            if self._store.get(container.id).state is not ContainerState.RUNNING:
                continue
            code = read_exit_code(self._exits, container.id)
            runtime_state = await self._runtime_for(container.runtime_handler).state(container.id)
            if code is not None or runtime_state is None or runtime_state.status == "stopped":
                await self.record(container.id)
        self.watch()

    async def _refresh_created(self, container: Container) -> None:
        """A created container whose start was under way when crishim stopped: running now
        means the start happened; anything else is left to StartContainer, which starts
        over from what is there."""
        if not (self._bundle(container.id) / "conmon.pid").exists():
            return  # never reached the runtime
        state = await self._runtime_for(container.runtime_handler).state(container.id)
        if state is not None and state.status in ("running", "stopped"):
            await self._store.update(
                container.id,
                lambda c: c.model_copy(
                    update={
                        "state": ContainerState.RUNNING,
                        "started_at": time.time_ns(),
                        "pid": state.pid,
                    }
                ),
            )
