"""Exec, attach and port-forward into containers and pods: the streaming server's backend.

Each call is checked against the container's (or pod's) state first, so a client gets a
clear error instead of a broken stream; the I/O itself is done by ``runtime.exec_stream``
and ``network.portforward``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import anyio.to_thread

from crishim.errors import FailedPrecondition, InvalidArgument
from crishim.model import ContainerState, SandboxState
from crishim.network.portforward import connect_in_netns
from crishim.runtime.bundle import read_spec
from crishim.runtime.conmon import attach_socket_path
from crishim.runtime.conmon import resize as resize_terminal
from crishim.runtime.exec_stream import attach, exec_pipes, exec_tty
from crishim.services.containers import ContainerService
from crishim.services.sandboxes import SandboxService
from crishim.streaming.backend import Output, Stdin, TerminalSize


async def _rows_cols(sizes: AsyncIterator[TerminalSize]) -> AsyncIterator[tuple[int, int]]:
    async for size in sizes:
        yield size.height, size.width


class ExecService:
    """Implements the streaming backend over crishim's containers and pods."""

    def __init__(self, containers: ContainerService, sandboxes: SandboxService) -> None:
        self._containers = containers
        self._sandboxes = sandboxes

    def _running(self, container_id: str) -> str:
        container = self._containers.get(container_id)
        if container.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {container.id} is not running")
        return container.id

    def check_exec(self, container_id: str, cmd: list[str]) -> None:
        """Refuse an Exec that cannot work before handing out a URL."""
        if not cmd:
            raise InvalidArgument("exec: cmd must not be empty")
        self._running(container_id)

    def check_port_forward(self, sandbox_id: str) -> None:
        """Refuse a PortForward into a pod that is not ready."""
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox.state is not SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")

    async def exec(
        self,
        container_id: str,
        cmd: list[str],
        *,
        tty: bool,
        stdin: Stdin | None,
        stdout: Output | None,
        stderr: Output | None,
        resize: AsyncIterator[TerminalSize] | None,
    ) -> int:
        """Run ``cmd`` in the container with the container's user, env and cwd."""
        cid = self._running(container_id)
        container = self._containers.get(cid)
        bundle = self._containers.paths(cid).bundle
        spec = await anyio.to_thread.run_sync(read_spec, bundle)
        process = {**spec["process"], "args": list(cmd)}
        runtime = self._containers.runtime_for(container.runtime_handler)
        if tty:
            return await exec_tty(
                runtime,
                cid,
                process,
                stdin=stdin,
                stdout=stdout,
                resize=_rows_cols(resize) if resize is not None else None,
            )
        return await exec_pipes(runtime, cid, process, stdin=stdin, stdout=stdout, stderr=stderr)

    async def attach(
        self,
        container_id: str,
        *,
        tty: bool,
        stdin: Stdin | None,
        stdout: Output | None,
        stderr: Output | None,
        resize: AsyncIterator[TerminalSize] | None,
    ) -> None:
        """Connect to the container's main process through conmon."""
        cid = self._running(container_id)
        paths = self._containers.paths(cid)

        async def apply(rows: int, cols: int) -> None:
            await resize_terminal(paths.bundle, rows, cols)

        await attach(
            attach_socket_path(paths.attach, cid),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            resize=_rows_cols(resize) if resize is not None and tty else None,
            apply_resize=apply,
        )

    async def port_forward(
        self, sandbox_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to ``port`` on the pod's loopback, inside its network namespace."""
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox.state is not SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        if not sandbox.netns:
            # Host network: the pod's ports are the node's.
            return await asyncio.open_connection("127.0.0.1", port)
        return await connect_in_netns(sandbox.netns, port)
