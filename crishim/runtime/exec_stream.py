"""Interactive processes in containers: exec with or without a terminal, and attach.

Exec without a terminal runs ``<runtime> exec`` with pipes; with a terminal the runtime
hands crishim the pty's master over a console socket (SCM_RIGHTS), and resizes go to the
master with TIOCSWINSZ. Attach talks to conmon's attach socket (SOCK_SEQPACKET): each
message from conmon starts with the pipe it came from (2 stdout, 3 stderr); what crishim
writes goes to the container's stdin.

The streams are small Protocols (``Reader``: ``read() -> b"" at EOF``; ``Writer``:
``write()``), so this module knows nothing about SPDY or WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import tempfile
import termios
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from crishim.errors import Internal
from crishim.runtime.oci_runtime import OciRuntime
from crishim.util import proc
from crishim.util.fdio import read_chunk, write_all

CHUNK = 32 * 1024
# conmon's attach messages: one byte naming the pipe, then up to 8 KiB of data.
ATTACH_BUFFER = 8192 + 1
# conmon numbers its pipes stdin 1, stdout 2, stderr 3.
STDOUT_PIPE, STDERR_PIPE = 2, 3
# How long output is still read after the process exited (children may hold the pipes).
DRAIN_SECONDS = 2.0


class Reader(Protocol):
    async def read(self, max_bytes: int = CHUNK) -> bytes: ...


class Writer(Protocol):
    async def write(self, data: bytes) -> None: ...


Resize = AsyncIterator[tuple[int, int]]  # (rows, cols)


async def _pump_stdin(
    stdin: Reader, send: Callable[[bytes], Awaitable[None]], close: Callable[[], None]
) -> None:
    try:
        while data := await stdin.read(CHUNK):
            await send(data)
    finally:
        close()


async def _pump_pipe(child: proc.Process, fd: int | None, out: Writer | None) -> None:
    if fd is None:
        return
    while data := await child.read(fd, CHUNK):
        if out is not None:
            await out.write(data)


async def exec_pipes(
    runtime: OciRuntime,
    cid: str,
    process: dict[str, object],
    *,
    stdin: Reader | None,
    stdout: Writer | None,
    stderr: Writer | None,
) -> int:
    """Run ``process`` in the container with pipes; its exit code."""
    with tempfile.TemporaryDirectory(prefix="crishim-exec-") as tmp:
        spec = Path(tmp) / "process.json"
        spec.write_text(json.dumps({**process, "terminal": False}))
        child = proc.spawn(
            runtime.argv("exec", "--pid-file", str(Path(tmp) / "pid"), "--process", str(spec), cid),
            what=runtime.what,
            remedy=runtime.remedy,
            stdin=proc.PIPE if stdin is not None else proc.DEVNULL,
            stdout=proc.PIPE,
            stderr=proc.PIPE,
        )
        tasks = [
            asyncio.create_task(_pump_pipe(child, child.stdout, stdout)),
            asyncio.create_task(_pump_pipe(child, child.stderr, stderr)),
        ]
        if stdin is not None:
            tasks.append(
                asyncio.create_task(_pump_stdin(stdin, child.write_stdin, child.close_stdin))
            )
        try:
            code = await child.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks[:2]), DRAIN_SECONDS)
            return code
        except BaseException:
            _kill_exec(Path(tmp) / "pid", child)
            raise
        finally:
            for task in tasks:
                task.cancel()
            # Every task has stopped using the pipes before they are closed.
            await asyncio.gather(*tasks, return_exceptions=True)
            child.close()
            if child.returncode is None:
                await child.wait()


def _kill_exec(pid_file: Path, runtime_proc: proc.Process) -> None:
    """Kill an exec'd process whose client went away, then the runtime waiting for it.

    Killing only the runtime would leave the process running in the container.
    """
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
    runtime_proc.kill()


def _set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


async def exec_tty(
    runtime: OciRuntime,
    cid: str,
    process: dict[str, object],
    *,
    stdin: Reader | None,
    stdout: Writer | None,
    resize: Resize | None,
) -> int:
    """Run ``process`` in the container on a new terminal; its exit code.

    runc only hands out the container's pty on a console socket when it detaches, and a
    detached exec has no exit code. So the runtime runs attached, on a pty of crishim's:
    it copies between that terminal and the container's, and forwards its size when sent
    SIGWINCH, as when a person runs ``runc exec -t`` in a terminal.
    """
    with tempfile.TemporaryDirectory(prefix="crishim-exec-") as tmp:
        spec = Path(tmp) / "process.json"
        spec.write_text(json.dumps({**process, "terminal": True}))
        master, slave = os.openpty()
        try:
            # Raw from the start: runc makes its terminal raw only once it runs, and input
            # that arrives before would be echoed and edited by this pty's line discipline
            # instead of reaching the container's own terminal untouched.
            tty.setraw(slave)
            child = proc.spawn(
                runtime.argv(
                    "exec",
                    "--tty",
                    "--pid-file",
                    str(Path(tmp) / "pid"),
                    "--process",
                    str(spec),
                    cid,
                ),
                what=runtime.what,
                remedy=runtime.remedy,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)

        def apply(rows: int, cols: int) -> None:
            _set_winsize(master, rows, cols)
            child.send_signal(signal.SIGWINCH)

        try:
            return await _serve_terminal(child, master, stdin, stdout, resize, apply)
        except BaseException:
            _kill_exec(Path(tmp) / "pid", child)
            raise


async def _serve_terminal(
    child: proc.Process,
    master: int,
    stdin: Reader | None,
    stdout: Writer | None,
    resize: Resize | None,
    apply_size: Callable[[int, int], None],
) -> int:
    os.set_blocking(master, False)

    async def forward_output() -> None:
        # One read at a time, each written out before the next: the client's pace is the
        # backpressure. EIO from the master means the terminal's last holder went away.
        while data := await read_chunk(master, CHUNK, eof_errnos=(errno.EIO,)):
            if stdout is not None:
                await stdout.write(data)

    async def send(data: bytes) -> None:
        # On the loop, not in a thread: a thread could still write after master is closed.
        await write_all(master, data)

    async def apply_resizes() -> None:
        assert resize is not None
        async for rows, cols in resize:
            apply_size(rows, cols)

    tasks = [asyncio.create_task(forward_output())]
    if stdin is not None:
        tasks.append(asyncio.create_task(_pump_stdin(stdin, send, lambda: None)))
    if resize is not None:
        tasks.append(asyncio.create_task(apply_resizes()))
    try:
        code = await child.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tasks[0], DRAIN_SECONDS)
        return code
    finally:
        for task in tasks:
            task.cancel()
        # Every task has stopped watching master before it is closed.
        await asyncio.gather(*tasks, return_exceptions=True)
        os.close(master)


async def attach(
    socket_path: Path,
    *,
    stdin: Reader | None,
    stdout: Writer | None,
    stderr: Writer | None,
    resize: Resize | None,
    apply_resize: Callable[[int, int], Awaitable[None]],
) -> None:
    """Connect to a running container's stdio through conmon until the client leaves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    # Socket paths are limited to 108 bytes: reach it through a short /proc/self/fd path.
    directory = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        await loop.sock_connect(sock, f"/proc/self/fd/{directory}/{socket_path.name}")
    except OSError as exc:
        sock.close()
        raise Internal(f"attach socket {socket_path}: {exc.strerror or exc}") from exc
    finally:
        os.close(directory)

    async def receive() -> None:
        while True:
            data = await loop.sock_recv(sock, ATTACH_BUFFER)
            if not data:
                return
            target = (
                stdout if data[0] == STDOUT_PIPE else stderr if data[0] == STDERR_PIPE else None
            )
            if target is not None and len(data) > 1:
                await target.write(data[1:])

    async def send(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    async def resizes() -> None:
        assert resize is not None
        async for rows, cols in resize:
            await apply_resize(rows, cols)

    tasks = [asyncio.create_task(receive())]
    if stdin is not None:
        tasks.append(
            asyncio.create_task(_pump_stdin(stdin, send, lambda: sock.shutdown(socket.SHUT_WR)))
        )
    if resize is not None:
        tasks.append(asyncio.create_task(resizes()))
    try:
        await tasks[0]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sock.close()
