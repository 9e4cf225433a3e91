"""Network interface counters of a network namespace, for the CRI stats calls.

``/proc/<pid>/net/dev`` shows the interfaces of the network namespace that process ``pid``
lives in, so a pod's counters come from any process of the pod. A pod without a process (its
namespace only pinned by a bind mount) is read by a short-lived ``nsenter --net=<path> cat
/proc/net/dev``: entering the namespace in a child keeps crishim's own threads where they are.
The loopback interface is never reported (kubelet ignores it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from crishim.errors import Internal
from crishim.util import proc

__all__ = [
    "InterfaceStats",
    "parse_net_dev",
    "read_interfaces",
    "read_netns_interfaces",
    "read_pod_interfaces",
]

NSENTER_TIMEOUT = 5.0
_LOOPBACK = "lo"


@dataclass(frozen=True)
class InterfaceStats:
    """The receive and transmit counters of one interface."""

    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


def parse_net_dev(text: str) -> list[InterfaceStats]:
    """The interfaces in ``/proc/net/dev`` text, loopback left out, in file order.

    After ``name:`` come 8 receive counters (bytes, packets, errs, ...) and 8 transmit ones.
    """
    interfaces: list[InterfaceStats] = []
    for line in text.splitlines():
        name, colon, counters = line.partition(":")
        fields = counters.split()
        name = name.strip()
        if not colon or name == _LOOPBACK or len(fields) < 16 or not fields[0].isdigit():
            continue
        interfaces.append(
            InterfaceStats(
                name=name,
                rx_bytes=int(fields[0]),
                rx_errors=int(fields[2]),
                tx_bytes=int(fields[8]),
                tx_errors=int(fields[10]),
            )
        )
    return interfaces


def read_interfaces(pid: int, *, proc: Path = Path("/proc")) -> list[InterfaceStats]:
    """The interfaces of the network namespace of process ``pid``.

    Raises ProcessLookupError when the process is gone.
    """
    try:
        text = (proc / str(pid) / "net" / "dev").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} is gone") from None
    return parse_net_dev(text)


async def read_netns_interfaces(
    netns_path: str, *, nsenter: str = "nsenter", timeout: float = NSENTER_TIMEOUT
) -> list[InterfaceStats]:
    """The interfaces of the network namespace pinned at ``netns_path``.

    Raises Internal when the namespace cannot be entered, DeadlineExceeded after ``timeout``.
    """
    done = await proc.run(
        [nsenter, f"--net={netns_path}", "cat", "/proc/net/dev"],
        what="nsenter (pod network statistics)",
        remedy="install util-linux",
        timeout=timeout,
    )
    if done.returncode != 0:
        message = done.stderr.decode(errors="replace").strip()
        raise Internal(f"cannot read the interfaces of {netns_path}: {message}")
    out = done.stdout
    return parse_net_dev(out.decode())


async def read_pod_interfaces(
    netns_path: str, pids: Iterable[int], *, proc: Path = Path("/proc")
) -> list[InterfaceStats]:
    """The interfaces of the network namespace pinned at ``netns_path``.

    Read through the first of ``pids`` that lives in that namespace (checked, so a reused
    pid is never trusted), or by entering the namespace when none does.
    """
    try:
        target = os.stat(netns_path)
    except FileNotFoundError:
        raise Internal(f"network namespace {netns_path} is gone") from None
    for pid in pids:
        try:
            ns = os.stat(proc / str(pid) / "ns" / "net")
            if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
                return read_interfaces(pid, proc=proc)
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return await read_netns_interfaces(netns_path)
