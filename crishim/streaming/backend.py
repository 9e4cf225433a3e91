"""What the streaming server needs from the rest of crishim, and the requests it serves.

``streaming`` is infrastructure: it cannot import ``services``. It states here the one
Protocol it needs (exec, attach and port-forward into a container or pod), and ``services``
implements it. The byte streams handed to the backend are small Protocols too, so the same
backend serves SPDY and WebSocket clients:

- :class:`Stdin` — ``read()`` waits for data from the client and returns ``b""`` once the
  client closed its stdin (EOF propagates);
- :class:`Output` — ``write()`` returns once the client's flow-control window (or the
  socket) has taken the bytes, so a fast process is slowed to the client's pace rather
  than buffered in memory.

A backend call is cancelled when the client goes away; it must then free what it started
(kill the exec'd process, close the port-forward connection).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "AttachRequest",
    "ExecRequest",
    "Output",
    "PortForwardRequest",
    "Stdin",
    "StreamingBackend",
    "TerminalSize",
]


@dataclass(frozen=True, slots=True)
class TerminalSize:
    """A terminal size sent by the client on the resize channel."""

    width: int
    height: int


class Stdin(Protocol):
    """The client's standard input."""

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes`` bytes; ``b""`` at end of input."""
        ...


class Output(Protocol):
    """One of the client's output streams (stdout or stderr)."""

    async def write(self, data: bytes) -> None:
        """Send ``data``; waits while the client is not keeping up."""
        ...


class StreamingBackend(Protocol):
    """Runs the streaming calls against real containers (implemented in ``services``)."""

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
        """Run ``cmd`` in the container, wired to the streams given; return its exit code."""
        ...

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
        """Attach to the container's main process until it exits or the client leaves."""
        ...

    async def port_forward(
        self, sandbox_id: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a TCP connection to ``port`` inside the pod's network namespace."""
        ...


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """An accepted CRI Exec request, waiting for its client to connect."""

    container_id: str
    cmd: list[str]
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True, slots=True)
class AttachRequest:
    """An accepted CRI Attach request."""

    container_id: str
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True, slots=True)
class PortForwardRequest:
    """An accepted CRI PortForward request; ``ports`` is what WebSocket clients get by default."""

    sandbox_id: str
    ports: list[int] = field(default_factory=list)
