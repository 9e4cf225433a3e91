"""The OCI runtime command line (runc or crun) for everything but creating containers.

``create`` is run by conmon (see :mod:`crishim.runtime.conmon`), because the runtime hands its
own stdio to the container: whoever runs ``create`` must not hold pipes it waits on. Every
command here has stdio that ends when the runtime exits, so reading its pipes is safe.

Both runtimes print errors on stderr; with ``--log-format json`` each line is a JSON object
whose ``msg`` is the message. They disagree on wording, so the few cases callers must tell
apart (unknown container, container not running) are matched for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from crishim.errors import Internal, NotFound
from crishim.util import proc

__all__ = ["MAX_EXEC_OUTPUT", "ExecResult", "OciRuntime", "RuntimeState", "error_message"]

# ExecSync returns output in one gRPC message; kubelet itself caps it at 16 MiB.
MAX_EXEC_OUTPUT = 16 << 20
_READ_CHUNK = 64 << 10
# After a timed-out exec is killed, how long to wait for its pipes to close before giving up
# on them (a process that escaped the kill may still hold them).
_DRAIN_GRACE = 2.0
# How long a timed-out exec's runtime may take to reap the killed process and exit.
_KILL_GRACE = 2.0


@dataclass(frozen=True)
class RuntimeState:
    """A container as the runtime reports it (``runc state``)."""

    id: str
    status: str  # creating | created | running | stopped | paused
    pid: int
    bundle: str


@dataclass(frozen=True)
class ExecResult:
    """The outcome of :meth:`OciRuntime.exec_sync`; output is capped at MAX_EXEC_OUTPUT each."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool


def error_message(text: str) -> str:
    """The runtime's error text: the ``msg`` of JSON log lines, other lines as they are."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        if isinstance(record, dict) and isinstance(record.get("msg"), str):
            out.append(record["msg"])
        else:
            out.append(line)
    return "; ".join(out)


def _parse_state(data: object) -> RuntimeState:
    if not isinstance(data, dict):
        raise Internal(f"runtime state is not a JSON object: {data!r}")
    return RuntimeState(
        id=str(data.get("id", "")),
        status=str(data.get("status", "")),
        pid=int(data.get("pid") or 0),
        bundle=str(data.get("bundle", "")),
    )


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (host pids), read from /proc in one pass."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name may contain spaces and parentheses: fields start after the last ")".
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything it started.

    Descendants are listed before the kill, because once ``pid`` dies they are reparented
    (to the container's init) and can no longer be found from it.
    """
    for victim in [pid, *_descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


async def _drain(child: proc.Process, fd: int | None, sink: bytearray, cap: int) -> None:
    """Read the pipe ``fd`` to its end into ``sink``, keeping the first ``cap`` bytes.

    The rest is read and dropped, so a chatty process never blocks on a full pipe. ``sink``
    belongs to the caller, so output read before a cancellation is kept.
    """
    if fd is None:
        return
    while chunk := await child.read(fd, _READ_CHUNK):
        if len(sink) < cap:
            sink += chunk[: cap - len(sink)]


class OciRuntime:
    """One OCI runtime binary with its state directory (``--root``)."""

    def __init__(self, name: str, path: str, root: str, *, options: tuple[str, ...] = ()) -> None:
        self.name = name
        self.path = path
        self.root = root
        #: global options after --root, such as the cgroup driver's ``--systemd-cgroup``
        self.options = options
        os.makedirs(root, mode=0o700, exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        """The command line for ``args`` with the global options; conmon uses it too."""
        return [self.path, "--root", self.root, *self.options, *args]

    def _is_missing(self, cid: str, message: str) -> bool:
        # runc: "container does not exist"; crun names the missing state file or directory.
        return "does not exist" in message or (
            "No such file or directory" in message and os.path.join(self.root, cid) in message
        )

    @staticmethod
    def _is_not_running(message: str) -> bool:
        # runc: "container not running"; crun: "kill container: No such process". runc 1.1
        # under --systemd-cgroup on a v1 host, once the container exited and systemd removed
        # its scope: "lstat /sys/fs/cgroup/devices/<slice>/<scope>: no such file or directory".
        cgroup_gone = "/sys/fs/cgroup/" in message and "no such file or directory" in message
        return "not running" in message or "No such process" in message or cgroup_gone

    @property
    def what(self) -> str:
        """How errors name this runtime."""
        return f"runtime handler {self.name!r}"

    @property
    def remedy(self) -> str:
        """What to do when its binary is missing."""
        return f"install it, or set [runtimes.{self.name}] path in crishim's config"

    def require(self) -> str:
        """The binary's absolute path; ProgramMissing naming the handler when it is not
        installed."""
        return proc.require_program(self.path, self.what, self.remedy)

    def _knows(self, cid: str) -> bool:
        """True when the runtime's state directory holds ``cid`` (runc and crun both keep
        ``<root>/<id>``)."""
        return os.path.lexists(os.path.join(self.root, cid))

    async def _run(self, cid: str, *args: str, stdin: bytes | None = None) -> bytes:
        """Run a short runtime command; its stdout, or the error it reported."""
        done = await proc.run(
            self.argv("--log-format", "json", *args),
            what=self.what,
            remedy=self.remedy,
            input=stdin,
        )
        if done.returncode == 0:
            return done.stdout
        message = error_message(done.stderr.decode(errors="replace")) or (
            f"exit status {done.returncode}"
        )
        text = f"{self.name} {args[0]} {cid}: {message}"
        if self._is_missing(cid, message):
            raise NotFound(text)
        raise Internal(text)

    async def state(self, cid: str) -> RuntimeState | None:
        """The runtime's view of ``cid``; None when it does not know the id."""
        try:
            out = await self._run(cid, "state", cid)
        except NotFound:
            return None
        try:
            return _parse_state(json.loads(out))
        except ValueError as exc:
            raise Internal(f"{self.name} state {cid}: bad JSON: {exc}") from exc

    async def start(self, cid: str) -> None:
        """Start the user process of a created container."""
        await self._run(cid, "start", cid)

    async def kill(self, cid: str, sig: int, *, all_processes: bool = False) -> None:
        """Send ``sig`` to the container's init (or to all its processes).

        A container that already stopped or is gone is not an error: the caller wanted it dead.
        """
        args = ["kill", *(["--all"] if all_processes else []), cid, str(sig)]
        try:
            await self._run(cid, *args)
        except NotFound:
            return
        except Internal as exc:
            if not self._is_not_running(exc.message):
                raise

    async def delete(self, cid: str, *, force: bool = False) -> None:
        """Remove the runtime's record of ``cid``; an unknown id is not an error.

        Nor is a missing binary when the runtime's state has no such id: there is nothing
        to delete, and cleaning up after a failed create must not fail over it.
        """
        try:
            await self._run(cid, "delete", *(["--force"] if force else []), cid)
        except NotFound:
            return
        except proc.ProgramMissing:
            if self._knows(cid):
                raise

    async def update(self, cid: str, resources: dict[str, object]) -> None:
        """Apply OCI ``LinuxResources`` (``update --resources <file>``).

        A file, not stdin: crun opens /dev/stdin by path, which fails on the socket asyncio
        gives a subprocess as its stdin pipe.
        """
        with tempfile.NamedTemporaryFile("w", prefix="crishim-resources-", suffix=".json") as f:
            json.dump(resources, f)
            f.flush()
            await self._run(cid, "update", "--resources", f.name, cid)

    async def list(self) -> list[RuntimeState]:
        """Every container under this runtime's root (none when its binary is missing and
        its root is empty: a handler configured for a runtime not installed here)."""
        try:
            out = await self._run("", "list", "--format", "json")
        except proc.ProgramMissing:
            if os.path.isdir(self.root) and os.listdir(self.root):
                raise
            return []
        try:
            data = json.loads(out)
        except ValueError as exc:
            raise Internal(f"{self.name} list: bad JSON: {exc}") from exc
        # runc prints "null" for an empty root.
        return [_parse_state(item) for item in data or []]

    async def exec_sync(
        self, cid: str, process: dict[str, object], timeout: float | None
    ) -> ExecResult:
        """Run ``process`` (an OCI process object) in ``cid`` and collect its output.

        The runtime's own log goes to a file (``--log``), so stderr carries only the process's
        output. A pid file tells a process that ran (its exit code is the result) from a
        runtime that failed before starting it (an error). On timeout the process and its
        children are killed and ``timed_out`` is set.
        """
        work = tempfile.mkdtemp(prefix="crishim-exec-")
        try:
            spec_file = os.path.join(work, "process.json")
            pid_file = os.path.join(work, "pid")
            log_file = os.path.join(work, "log")
            Path(spec_file).write_text(json.dumps(process))
            child = proc.spawn(
                [
                    *self.argv("--log", log_file, "--log-format", "json", "exec"),
                    "--process",
                    spec_file,
                    "--pid-file",
                    pid_file,
                    cid,
                ],
                what=self.what,
                remedy=self.remedy,
                stdout=proc.PIPE,
                stderr=proc.PIPE,
                # Its own session: the runtime gets none of the signals sent to crishim's group.
                start_new_session=True,
            )
            stdout, stderr = bytearray(), bytearray()
            readers = [
                asyncio.ensure_future(_drain(child, child.stdout, stdout, MAX_EXEC_OUTPUT)),
                asyncio.ensure_future(_drain(child, child.stderr, stderr, MAX_EXEC_OUTPUT)),
            ]
            timed_out = False
            # The deadline covers the pipes too: a child left in the background may hold them
            # after the process itself exited.
            finished = asyncio.gather(child.wait(), *readers)
            try:
                await asyncio.wait_for(asyncio.shield(finished), timeout)
            except TimeoutError:
                timed_out = True
                await _kill_exec(pid_file, child)
                # Once the tree is dead the pipes close; something that escaped the kill may
                # still hold them, so give up on the rest of the output after a grace period.
                await asyncio.wait(readers, timeout=_DRAIN_GRACE)
            except asyncio.CancelledError:
                # The caller gave up: leave nothing running behind it.
                await asyncio.shield(_kill_exec(pid_file, child))
                raise
            finally:
                finished.cancel()
                for task in readers:
                    task.cancel()
                # The readers have stopped watching the pipes before they are closed.
                await asyncio.gather(*readers, return_exceptions=True)
                child.close()
            if not timed_out and not os.path.exists(pid_file):
                message = await asyncio.to_thread(_read_log, log_file)
                text = (
                    f"{self.name} exec {cid}: {message or error_message(stderr.decode('replace'))}"
                )
                if self._is_missing(cid, text):
                    raise NotFound(text)
                raise Internal(text)
            code = await child.wait()
            return ExecResult(code, bytes(stdout), bytes(stderr), timed_out)
        finally:
            shutil.rmtree(work, ignore_errors=True)


async def _kill_exec(pid_file: str, child: proc.Process) -> None:
    """Kill a timed-out exec and wait for the runtime to exit.

    First the process in the container with its children: the runtime, their parent, then
    reaps the process and exits by itself. Killing the runtime first would orphan them to
    the host's init, and the container could not stop until that init reaped them. Last the
    runtime's process group: the runtime if it had not started the process yet, and
    children that outlived the process (orphaned into the container's init).
    """
    with contextlib.suppress(OSError, ValueError):
        _kill_tree(int(Path(pid_file).read_text().strip()))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(child.wait(), _KILL_GRACE)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    await child.wait()


def _read_log(path: str) -> str:
    try:
        return error_message(Path(path).read_text(errors="replace"))
    except FileNotFoundError:
        return ""
