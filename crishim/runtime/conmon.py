"""Starting containers under conmon 2.1.6 and talking to the conmon that monitors each one.

conmon runs ``<runtime> create``, holds the container's stdio, writes the CRI log file
(``RFC3339Nano stream P|F message``, its ``k8s-file`` driver), records the exit code and keeps
running when crishim exits: it double-forks, so the process crishim starts returns at once
and the monitor is reparented to init.

The protocol with conmon (see conmon's ``src/conmon.c`` and ``src/parent_pipe_fd.c``):

* ``_OCI_SYNCPIPE=<fd>``: the write end of a pipe conmon inherits. After ``create``, conmon
  writes one JSON line: ``{"data": <pid>}`` (with ``--api-version 1``) or, when the runtime
  failed, ``{"data": -1, "message": "<runtime stderr>"}``. If the runtime failed silently
  conmon just exits, which reads as end of file.
* ``_OCI_STARTPIPE=<fd>``: when set, conmon blocks on reading it before forking anything, so
  the parent can move it into a cgroup first; any write (or end of file) releases it.
* Files: ``<exit_dir>/<cid>`` holds the exit code once the container exited; ``oom`` appears
  in conmon's working directory (the bundle, as crishim starts it) after an OOM kill;
  ``<bundle>/ctl`` and ``<bundle>/winsz`` are FIFOs conmon reads; ``<socket_dir>/<cuuid>`` is
  a symlink to the bundle, so the attach socket ``<bundle>/attach`` is reachable by a path
  short enough for ``sun_path``.
* ``ctl`` messages are lines ``<type> <rows> <cols>``: type 1 resizes the terminal, type 2
  reopens the log file (conmon writes ``<log>.tmp`` and renames it over the log path).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from crishim.errors import (
    CrishimError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    ResourceExhausted,
)
from crishim.runtime.oci_runtime import OciRuntime, error_message
from crishim.util import proc
from crishim.util.fdio import read_line
from crishim.util.fs import remove_tree

__all__ = [
    "CTL_REOPEN_LOG",
    "CTL_RESIZE",
    "MonitorPlacement",
    "MonitorSpec",
    "attach_socket_path",
    "conmon_alive",
    "conmon_argv",
    "create_container",
    "discard_container",
    "find_conmons",
    "kill_conmon",
    "oom_killed",
    "read_exit_code",
    "reopen_log",
    "resize",
]

log = logging.getLogger(__name__)

CTL_RESIZE = 1
CTL_REOPEN_LOG = 2
#: what to do when conmon is missing (in errors)
CONMON_REMEDY = (
    "containers need conmon (apt-get install conmon), or set conmon in crishim's config "
    "to where it is"
)
_POLL_INTERVAL = 0.01

#: Moves a conmon (by pid) into its cgroup before it forks anything (the cgroup driver's).
MonitorPlacement = Callable[[int], Awaitable[None]]


@dataclass(frozen=True)
class MonitorSpec:
    """Everything conmon needs to create and watch one container.

    ``pid_file`` receives the container's init pid (written by the runtime) and
    ``conmon_pid_file`` the pid of the monitor itself.
    """

    container_id: str
    name: str
    bundle: Path
    runtime: OciRuntime
    log_path: Path
    exit_dir: Path
    socket_dir: Path
    pid_file: Path
    conmon_pid_file: Path
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    log_size_max: int | None = None


def conmon_argv(spec: MonitorSpec, conmon: str = "conmon") -> list[str]:
    """The conmon 2.1.6 command line for ``spec``."""
    runtime = spec.runtime
    cid = spec.container_id
    argv = [
        conmon,
        "--api-version",
        "1",
        "-c",
        cid,
        "-u",
        cid,
        "-n",
        spec.name,
        "-r",
        runtime.path,
        "-b",
        str(spec.bundle),
        "-p",
        str(spec.pid_file),
        "-P",
        str(spec.conmon_pid_file),
        "-l",
        f"k8s-file:{spec.log_path}",
        "--exit-dir",
        str(spec.exit_dir),
        "--socket-dir-path",
        str(spec.socket_dir),
        "--log-level",
        "info",
        # conmon's own warnings (runtime errors, OOM events) go to the node's journal.
        "--syslog",
    ]
    # The runtime's global options, minus its path: conmon puts that first itself. JSON logs
    # let a failed create be reported by message (conmon relays the runtime's stderr).
    for arg in [*runtime.argv("--log-format", "json")[1:]]:
        argv += ["--runtime-arg", arg]
    if spec.stdin:
        argv.append("-i")
        if not spec.stdin_once:
            # Otherwise conmon closes the container's stdin when the first attach ends.
            argv.append("--leave-stdin-open")
    if spec.tty:
        argv.append("-t")
    if spec.log_size_max is not None:
        argv += ["--log-size-max", str(spec.log_size_max)]
    return argv


def _kill_conmon(pid_file: Path) -> None:
    # The runtime child of conmon has PDEATHSIG=SIGKILL, so it dies with it.
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)


def find_conmons(under: Path, proc: Path = Path("/proc")) -> dict[str, int]:
    """The conmons whose bundle lies below ``under``: container id -> pid.

    Found by their command lines, so this sees conmons whose pid file was never written
    (crishim died while starting them).
    """
    prefix = str(under).rstrip("/") + "/"
    found: dict[str, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "conmon":
                continue
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        # Each argument with the one after it: "-c" -> the id, "-b" -> the bundle.
        options = dict(itertools.pairwise(argv[1:]))
        cid, bundle = options.get("-c"), options.get("-b")
        if cid and bundle and bundle.startswith(prefix):
            found[cid] = int(entry.name)
    return found


def kill_conmon(pid: int) -> None:
    """SIGKILL a conmon (its runtime child dies with it); gone already is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def create_container(
    spec: MonitorSpec,
    conmon: str = "conmon",
    timeout: float = 60,
    place: MonitorPlacement | None = None,
) -> int:
    """Create the container under a new conmon and return its init pid.

    ``place`` moves conmon into its cgroup while it waits, so the runtime and the monitor
    are born there. The container is left ``created``: :meth:`OciRuntime.start` runs its
    process. On failure, timeout or cancellation, what was made is undone
    (:func:`discard_container`; the caller releases the cgroup it placed conmon in) and the
    error that caused it raised. A missing conmon or runtime binary raises ProgramMissing.
    """
    cid = spec.container_id
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    # Checked first: conmon would only report a missing runtime as a failed create.
    spec.runtime.require()
    conmon = proc.require_program(conmon, "conmon", CONMON_REMEDY, env)
    # conmon fails silently (after forking) when these are missing.
    for directory in (spec.exit_dir, spec.socket_dir, spec.log_path.parent):
        directory.mkdir(parents=True, exist_ok=True)
    sync_r, sync_w = os.pipe()
    start_r, start_w = os.pipe()
    env |= {"_OCI_SYNCPIPE": str(sync_w), "_OCI_STARTPIPE": str(start_r)}
    try:
        try:
            await _spawn(spec, conmon, env, (sync_w, start_r), start_w, place)
        finally:
            # Only conmon holds these now; ours would hide its exit from the read below.
            for fd in (sync_w, start_r, start_w):
                os.close(fd)
        # sync_r stays ours alone: read_line only watches it (see util.fdio).
        line = await asyncio.wait_for(read_line(sync_r), timeout)
        return _parse_sync(spec.runtime, cid, line)
    except BaseException as exc:
        await asyncio.shield(discard_container(spec))
        if isinstance(exc, TimeoutError):
            raise DeadlineExceeded(f"conmon for {cid}: no answer in {timeout}s") from exc
        raise
    finally:
        os.close(sync_r)


async def discard_container(spec: MonitorSpec) -> None:
    """Undo a create: kill its conmon (the runtime child dies with it, and a dead conmon
    writes no exit file), delete the container from the runtime, remove the exit file and
    attach link. Problems are logged, not raised: this runs while the error that made the
    create fail is on its way to the caller, and must not replace it."""
    cid = spec.container_id
    # Only while it is still conmon: a second discard must not signal whatever reused its pid.
    if conmon_alive(spec.conmon_pid_file):
        _kill_conmon(spec.conmon_pid_file)
    try:
        await spec.runtime.delete(cid, force=True)
    except (CrishimError, OSError) as exc:
        log.warning("container %s: deleting it after a failed create: %s", cid[:12], exc)
    (spec.exit_dir / cid).unlink(missing_ok=True)
    await remove_tree(spec.socket_dir / cid)


async def _spawn(
    spec: MonitorSpec,
    conmon: str,
    env: dict[str, str],
    pass_fds: tuple[int, ...],
    start_w: int,
    place: MonitorPlacement | None,
) -> None:
    """Run conmon until it detached: its first process exits once the monitor forked."""
    # conmon's stderr only matters until it detaches (it then points its stdio at
    # /dev/null): an anonymous file, never a pipe, so nothing can block on it.
    with tempfile.TemporaryFile() as early_errors:
        child = proc.spawn(
            conmon_argv(spec, conmon),
            what="conmon",
            remedy=CONMON_REMEDY,
            stderr=early_errors.fileno(),
            pass_fds=pass_fds,
            env=env,
            # conmon writes its "oom" marker file into its working directory.
            cwd=spec.bundle,
        )
        try:
            if place is not None:
                # conmon waits on the start pipe before forking: its children inherit this.
                await place(child.pid)
        except BaseException:
            # Killed before the release: closing the start pipe must not let it go on.
            child.kill()
            await child.wait()
            raise
        os.write(start_w, b"0")
        status = await child.wait()
        if status != 0:
            early_errors.seek(0)
            detail = early_errors.read().decode(errors="replace").strip() or "no message"
            raise _failure(
                f"conmon {conmon} for container {spec.container_id} exited with status "
                f"{status}: {detail}"
            )


def _parse_sync(runtime: OciRuntime, cid: str, line: bytes) -> int:
    if not line:
        raise Internal(f"conmon for {cid} exited without reporting the container's pid")
    try:
        message = json.loads(line)
        value = int(message["data"])
    except (ValueError, KeyError, TypeError) as exc:
        raise Internal(f"conmon for {cid}: bad sync message {line!r}") from exc
    if value <= 0:
        text = error_message(str(message.get("message", ""))) or "no message"
        raise _failure(f"create container {cid}: {runtime.what} ({runtime.path}) failed: {text}")
    return value


def _failure(message: str) -> CrishimError:
    """The error for a failure conmon or the runtime reported: ResourceExhausted when it was
    a full disk (conmon, runc and crun all print strerror's words), else Internal."""
    lowered = message.lower()
    if "no space left on device" in lowered or "disk quota exceeded" in lowered:
        return ResourceExhausted(f"{message} (the disk is full)")
    return Internal(message)


def read_exit_code(exit_dir: Path, cid: str) -> int | None:
    """The exit code conmon recorded for ``cid``, or None while it has not exited."""
    try:
        text = (exit_dir / cid).read_text().strip()
    except FileNotFoundError:
        return None
    # conmon writes the file in one go (g_file_set_contents renames a temp file into place).
    return int(text)


def oom_killed(bundle: Path) -> bool:
    """True when conmon saw the container's cgroup OOM-kill a process."""
    return (bundle / "oom").exists()


def attach_socket_path(socket_dir: Path, cid: str) -> Path:
    """The attach socket (SOCK_SEQPACKET) through conmon's short symlink to the bundle."""
    return socket_dir / cid / "attach"


def conmon_alive(conmon_pid_file: Path) -> bool:
    """True while the conmon named by ``conmon_pid_file`` runs (and is still conmon)."""
    try:
        pid = int(conmon_pid_file.read_text().strip())
        proc = Path(f"/proc/{pid}")
        # The pid may have been reused by now: check the name and that it is not a zombie.
        comm = (proc / "comm").read_text().strip()
        stat = (proc / "stat").read_text()
    except (OSError, ValueError):
        return False
    state = stat[stat.rfind(")") + 2 :].split()[0]
    return comm == "conmon" and state not in ("Z", "X")


def _write_ctl(bundle: Path, kind: int, rows: int = 0, cols: int = 0) -> None:
    try:
        # Non-blocking: with no conmon reading, open fails (ENXIO) instead of hanging.
        fd = os.open(bundle / "ctl", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):
            raise FailedPrecondition(f"no conmon listens on {bundle / 'ctl'}") from exc
        raise
    try:
        # Shorter than PIPE_BUF, so written whole and never interleaved with another writer.
        os.write(fd, f"{kind} {rows} {cols}\n".encode())
    finally:
        os.close(fd)


async def resize(bundle: Path, rows: int, cols: int) -> None:
    """Resize the container's terminal (only meaningful for a tty container)."""
    _write_ctl(bundle, CTL_RESIZE, rows, cols)


async def reopen_log(bundle: Path, log_path: Path, timeout: float = 5.0) -> None:
    """Make conmon start a new log file at ``log_path`` (after the old one was rotated away).

    conmon handles the message asynchronously; this returns once the new file is in place.
    """

    def inode() -> int | None:
        with contextlib.suppress(FileNotFoundError):
            return log_path.stat().st_ino
        return None

    before = inode()
    _write_ctl(bundle, CTL_REOPEN_LOG)
    deadline = time.monotonic() + timeout
    # conmon always creates a new file (temp + rename), so a new inode means it is done.
    while (now := inode()) is None or now == before:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"conmon did not reopen {log_path} in {timeout}s")
        await asyncio.sleep(_POLL_INTERVAL)
