"""A flood of half-open connections, run as its own process: ``python -m tests.rig.flood``.

Arguments: ``HOST PORT COUNT KEEP [PAYLOAD]``. Opens COUNT TCP connections to HOST:PORT,
writes PAYLOAD on each (a Python bytes literal such as ``b'POST /exec/x HTTP/1.1\\r\\n'``;
nothing by default) and never completes a request. It prints ``{"halfway": COUNT/2}`` when
half are open, so that a test can start a session in the thick of it. Then it waits, up to
60 seconds, until the server has hung up on all but KEEP of them, and prints
``{"connected": N, "dropped": M, "answered": A}``: M hang-ups without a word, A with a
response (a timeout's 408, say). It holds the rest open until its stdin closes.

A separate process, so that memory measured in the test process is the server's alone.
"""

from __future__ import annotations

import ast
import contextlib
import json
import resource
import selectors
import socket
import sys
import time

_PATIENCE_SECONDS = 60.0


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def _hung_up(sock: socket.socket) -> tuple[bool, bool]:
    """(whether the server closed it, whether it said something first)."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False, False
    except OSError:
        return True, False
    if not data:
        return True, False
    # A response: read to its end (the server closes right after).
    with contextlib.suppress(OSError):
        sock.setblocking(True)
        sock.settimeout(5)
        while sock.recv(65536):
            pass
    return True, True


def main() -> None:
    host, port, count, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    payload = ast.literal_eval(sys.argv[5]) if len(sys.argv) > 5 else b""
    assert isinstance(payload, bytes)
    _raise_fd_limit(count + 64)
    selector = selectors.DefaultSelector()
    for opened in range(count):
        if opened == count // 2:
            print(json.dumps({"halfway": opened}), flush=True)
        sock = socket.create_connection((host, port))
        if payload:
            # The server may already have dropped this one: that is what it should do.
            with contextlib.suppress(OSError):
                sock.sendall(payload)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    dropped = answered = 0
    deadline = time.monotonic() + _PATIENCE_SECONDS
    while dropped + answered < count - keep and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            closed, spoke = _hung_up(ready)
            if closed:
                selector.unregister(ready)
                ready.close()
                dropped += not spoke
                answered += spoke
    print(json.dumps({"connected": count, "dropped": dropped, "answered": answered}), flush=True)
    sys.stdin.read()
    for key in list(selector.get_map().values()):
        assert isinstance(key.fileobj, socket.socket)
        key.fileobj.close()


if __name__ == "__main__":
    main()
