"""Validation of pod sysctls: which names are safe to set, and in which namespace.

Only sysctls that the kernel scopes to a namespace the pod owns may be set, since any other
write would change the whole node. Kubernetes' list of namespaced sysctls is followed:
``net.*`` lives in the network namespace; ``kernel.shm*``, ``kernel.msg*``, ``kernel.sem``
and ``fs.mqueue.*`` live in the IPC namespace.

Names use dots (``net.ipv4.ip_forward``) or, as Kubernetes allows for names whose parts
contain dots (interface names such as ``eth0.100``), slashes (``net/ipv4/conf/eth0.100/rp_filter``).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from crishim.errors import InvalidArgument

# Strict on purpose: the name becomes a path under /proc/sys, so nothing that could climb
# out of it ("..", absolute paths, odd characters) may pass.
_DOTTED = re.compile(r"[a-z][a-z0-9_]*(\.[A-Za-z0-9_-]+)+")
_SLASHED = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.-]+)+")
_IPC_KERNEL = re.compile(r"kernel/(shm[a-z_]*|msg[a-z_]*|sem)")


class SysctlNamespace(enum.Enum):
    """The namespace a sysctl belongs to."""

    NET = "net"
    IPC = "ipc"


@dataclass(frozen=True)
class Sysctl:
    """One validated sysctl: its name as given, its /proc/sys path, namespace and value."""

    name: str
    path: str
    namespace: SysctlNamespace
    value: str


def _components(name: str) -> list[str]:
    if "/" in name:
        if not _SLASHED.fullmatch(name):
            raise InvalidArgument(f"sysctl {name!r}: not a valid sysctl name")
        parts = name.split("/")
        if any(part in (".", "..") for part in parts):
            raise InvalidArgument(f"sysctl {name!r}: not a valid sysctl name")
        return parts
    if not _DOTTED.fullmatch(name):
        raise InvalidArgument(f"sysctl {name!r}: not a valid sysctl name")
    return name.split(".")


def parse_sysctl(name: str, value: str) -> Sysctl:
    """Validate one sysctl; InvalidArgument names it when it is malformed or not namespaced."""
    relative = "/".join(_components(name))
    if relative.startswith("net/"):
        namespace = SysctlNamespace.NET
    elif _IPC_KERNEL.fullmatch(relative) or relative.startswith("fs/mqueue/"):
        namespace = SysctlNamespace.IPC
    else:
        raise InvalidArgument(
            f"sysctl {name!r} is not namespaced: setting it would change the whole node"
        )
    # The value is written as the file's content; a newline or NUL would let one value
    # smuggle in a second write or be cut short.
    if "\n" in value or "\x00" in value:
        raise InvalidArgument(f"sysctl {name!r}: value contains a newline or NUL byte")
    return Sysctl(name=name, path=f"/proc/sys/{relative}", namespace=namespace, value=value)
