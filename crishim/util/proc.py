"""Child processes: started with vfork, awaited through a pidfd, stdio on the event loop.

Why not ``asyncio.create_subprocess_exec``: under uvloop it starts children with
``fork()``, which copies crishim's page tables while the event loop waits: 15-40 ms of a
blocked loop per child for a process of crishim's size, and a node starting dozens of pods
starts hundreds of children (runtimes, conmons, CNI plugins, mounts). ``subprocess.Popen``
uses ``vfork()`` (about 2 ms), and a pidfd tells the loop when the child has exited, so it
is reaped right then whether or not anyone still waits for it (no zombies, even when a
call is cancelled).

Descriptors: :func:`spawn` makes the pipes itself. A :class:`Process` owns the parent's
ends of its pipes and closes each once (:meth:`Process.close`); the child's ends are
closed right after the child started. A descriptor passed in (``stdin=fd``) stays its
caller's: the child gets a duplicate.

A binary that is missing, not executable or without its interpreter raises
:class:`ProgramMissing` (a FailedPrecondition: the node needs fixing, a retry will not
help) naming what it is for (``what``), the path tried and, given a ``remedy``, how to fix
it, instead of a bare FileNotFoundError::

    runtime handler 'runc': /usr/sbin/runc not found; install it, or set [runtimes.runc] ...
    conmon: conmon not found in PATH (/usr/sbin:/usr/bin); containers need conmon (...)

A program that runs and fails is its caller's to report, with its own stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

from crishim.errors import DeadlineExceeded, FailedPrecondition
from crishim.util.fdio import read_chunk, write_all

__all__ = [
    "DEVNULL",
    "PIPE",
    "Completed",
    "Process",
    "ProgramMissing",
    "find_program",
    "require_program",
    "run",
    "run_blocking",
    "spawn",
]

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
_READ_SIZE = 64 * 1024

# What a child's stdio may be: PIPE, DEVNULL, a descriptor or a file of the caller's.
Stdio = int | IO[Any] | None


@dataclass(frozen=True)
class Completed:
    """A finished child: its exit status (negative: killed by that signal) and output."""

    returncode: int
    stdout: bytes
    stderr: bytes


class ProgramMissing(FailedPrecondition):
    """A program crishim needs is not installed where it is looked for, or cannot run."""


def _search_path(env: Mapping[str, str] | None) -> str:
    if env is not None and "PATH" in env:
        return env["PATH"]
    return os.environ.get("PATH", os.defpath)


def find_program(name_or_path: str, env: Mapping[str, str] | None = None) -> str | None:
    """The absolute path of the executable file named by path, or by name on PATH (the
    PATH of ``env`` when given, as exec would use it); None when there is none."""
    if "/" in name_or_path:
        ok = os.path.isfile(name_or_path) and os.access(name_or_path, os.X_OK)
        return os.path.abspath(name_or_path) if ok else None
    return shutil.which(name_or_path, path=_search_path(env))


def _missing(
    what: str, name_or_path: str, remedy: str, env: Mapping[str, str] | None
) -> ProgramMissing:
    if "/" not in name_or_path:
        problem = f"{name_or_path} not found in PATH ({_search_path(env)})"
    elif os.path.exists(name_or_path):
        problem = f"{name_or_path} not executable"
    else:
        problem = f"{name_or_path} not found"
    return ProgramMissing(f"{what}: {problem}" + (f"; {remedy}" if remedy else ""))


def require_program(
    name_or_path: str, what: str, remedy: str = "", env: Mapping[str, str] | None = None
) -> str:
    """The program's absolute path; ProgramMissing naming ``what`` (what the program is,
    "conmon", "runtime handler 'runc'") and ``remedy`` when it is not there to run."""
    found = find_program(name_or_path, env)
    if found is None:
        raise _missing(what, name_or_path, remedy, env)
    return found


def _not_runnable(
    argv: Sequence[str], what: str, remedy: str, env: Mapping[str, str] | None, exc: OSError
) -> ProgramMissing | None:
    """The ProgramMissing an exec failure means; None when it is about something else (a
    missing working directory, no memory, too many open files)."""
    binary = argv[0]
    if exc.filename is not None and exc.filename != binary:
        return None  # subprocess names the cwd when changing into it failed
    if find_program(binary, env) is None:
        return _missing(what, binary, remedy, env)
    if exc.errno == errno.ENOENT:
        # The file is there: exec found no interpreter for it ("#!" line or ELF loader).
        problem = "its interpreter is missing"
    elif exc.errno in (errno.ENOEXEC, errno.EACCES, errno.EPERM, errno.ELIBBAD):
        problem = exc.strerror or str(exc)
    else:
        return None
    return ProgramMissing(
        f"{what}: {binary} cannot be run: {problem}" + (f"; {remedy}" if remedy else "")
    )


class Process:
    """A running child and the parent's ends of its pipes."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        #: the parent's ends of the pipes (None when not a pipe); owned by this object
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except OSError:
            # No pidfd (an old kernel): a worker thread waits instead.
            waiter = loop.run_in_executor(None, popen.wait)
            waiter.add_done_callback(lambda f: self._set_exited(f.result()))
        else:
            loop.add_reader(self._pidfd, self._on_pidfd)

    def _on_pidfd(self) -> None:
        assert self._pidfd is not None
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        # Exited: this reaps it without blocking.
        self._set_exited(self._popen.wait())

    def _set_exited(self, code: int) -> None:
        if not self._exited.done():
            self._exited.set_result(code)

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has been reaped, else None."""
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        """The exit status (negative: killed by that signal); cancelling the wait leaves
        the child running, and it is still reaped when it exits."""
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        """Signal the child unless it has already been reaped (its pid may be reused)."""
        if not self._exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the child."""
        self.send_signal(signal.SIGKILL)

    async def write_stdin(self, data: bytes) -> None:
        """Write to the child's stdin pipe (waiting while the child is behind)."""
        assert self.stdin is not None, "stdin is not a pipe"
        await write_all(self.stdin, data)

    def close_stdin(self) -> None:
        """Close the child's stdin: it reads end of file."""
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    async def read(self, fd: int, size: int = _READ_SIZE) -> bytes:
        """Up to ``size`` bytes from one of the output pipes; ``b""`` at end of file."""
        return await read_chunk(fd, size)

    async def read_all(self, fd: int | None, limit: int | None = None) -> bytes:
        """An output pipe to its end (at most ``limit`` bytes kept; the rest is read and
        dropped so the child never blocks on a full pipe)."""
        if fd is None:
            return b""
        data = bytearray()
        while chunk := await read_chunk(fd, _READ_SIZE):
            if limit is None or len(data) < limit:
                data += chunk if limit is None else chunk[: limit - len(data)]
        return bytes(data)

    def close(self) -> None:
        """Close the parent's ends of the pipes (once; later calls do nothing)."""
        self.close_stdin()
        for name in ("stdout", "stderr"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    async def communicate(
        self, data: bytes | None = None, *, limit: int | None = None
    ) -> tuple[bytes, bytes]:
        """Feed ``data`` to stdin (then close it), read stdout and stderr to their ends and
        wait for the exit. The pipes are closed afterwards, also when cancelled."""
        feeder = None
        try:
            if self.stdin is not None:
                feeder = asyncio.ensure_future(self._feed(data or b""))
            out, err = await asyncio.gather(
                self.read_all(self.stdout, limit), self.read_all(self.stderr, limit)
            )
            if feeder is not None:
                await feeder
            await self.wait()
            return out, err
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await feeder
            self.close()

    async def _feed(self, data: bytes) -> None:
        try:
            if data:
                await self.write_stdin(data)
        except BrokenPipeError:
            pass  # the child does not read its input: not our problem
        finally:
            self.close_stdin()


def _pipe_for(spec: Stdio, child_reads: bool) -> tuple[Stdio, int | None, int | None]:
    """(what Popen gets, the parent's end, the child's end to close after the start)."""
    if spec != PIPE:
        return spec, None, None
    read_end, write_end = os.pipe()
    if child_reads:
        os.set_blocking(write_end, False)
        return read_end, write_end, read_end
    os.set_blocking(read_end, False)
    return write_end, read_end, write_end


def spawn(
    argv: Sequence[str],
    *,
    what: str,
    remedy: str = "",
    stdin: Stdio = DEVNULL,
    stdout: Stdio = DEVNULL,
    stderr: Stdio = DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pass_fds: Sequence[int] = (),
    start_new_session: bool = False,
) -> Process:
    """Start ``argv`` (vfork + exec); ``what`` names the program in errors, ``remedy``
    says how to install a missing one."""
    specs = [_pipe_for(stdin, True), _pipe_for(stdout, False), _pipe_for(stderr, False)]
    child_ends = [child for _, _, child in specs if child is not None]
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=specs[0][0],
            stdout=specs[1][0],
            stderr=specs[2][0],
            env=dict(env) if env is not None else None,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            start_new_session=start_new_session,
            close_fds=True,
        )
    except OSError as exc:
        for _, parent, _ in specs:
            if parent is not None:
                os.close(parent)
        problem = _not_runnable(argv, what, remedy, env, exc)
        if problem is None:
            raise
        raise problem from exc
    finally:
        # The child has its copies (or never started): ours would hide its end of file.
        for fd in child_ends:
            os.close(fd)
    return Process(popen, specs[0][1], specs[1][1], specs[2][1])


async def run(
    argv: Sequence[str],
    *,
    what: str,
    remedy: str = "",
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    limit: int | None = None,
) -> Completed:
    """Run ``argv`` to its end and collect its output (``limit`` bytes of each at most).

    On timeout or cancellation the child is killed (and reaped); a timeout raises
    DeadlineExceeded naming ``what``.
    """
    proc = spawn(
        argv,
        what=what,
        remedy=remedy,
        stdin=PIPE if input is not None else DEVNULL,
        stdout=PIPE,
        stderr=PIPE,
        env=env,
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input, limit=limit), timeout)
    except BaseException as exc:
        proc.kill()
        # Killed: it exits at once. Reaped here, so no zombie outlives the call.
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise DeadlineExceeded(f"{what}: no answer within {timeout:g}s, killed") from None
        raise
    return Completed(await proc.wait(), out, err)


def run_blocking(
    argv: Sequence[str], *, what: str, remedy: str = ""
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to its end in the calling thread (for work already in a worker thread)
    and capture its output; the same ProgramMissing as :func:`spawn` when it cannot start."""
    try:
        return subprocess.run(list(argv), capture_output=True, check=False)
    except OSError as exc:
        problem = _not_runnable(argv, what, remedy, None, exc)
        if problem is None:
            raise
        raise problem from exc
