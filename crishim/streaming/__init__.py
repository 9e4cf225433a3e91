"""Streaming for CRI Exec, Attach and PortForward: an HTTP server speaking SPDY and WebSocket.

Public face: :class:`StreamingServer` (hands out single-use URLs and serves them), the
requests it stores, :class:`StreamingLimits` (what clients may hold), and
:class:`StreamingBackend`, the Protocol ``services`` implements.
Modules: ``spdy`` and ``websocket`` are wire codecs; ``session`` and ``wsconn`` run them on
sockets; ``remotecommand`` and ``portforward`` are the Kubernetes protocols; ``server``
is the HTTP front (``httphead`` reads its request heads and writes its responses,
``limits`` keeps the sessions, unfinished requests and idle time in bounds).
"""

from __future__ import annotations

from crishim.streaming.backend import (
    AttachRequest,
    ExecRequest,
    Output,
    PortForwardRequest,
    Stdin,
    StreamingBackend,
    TerminalSize,
)
from crishim.streaming.limits import StreamingLimits
from crishim.streaming.server import StreamingServer

__all__ = [
    "AttachRequest",
    "ExecRequest",
    "Output",
    "PortForwardRequest",
    "Stdin",
    "StreamingBackend",
    "StreamingLimits",
    "StreamingServer",
    "TerminalSize",
]
