"""What every install step works with: the node being changed (:class:`Node`), the step
protocol (:class:`Step`) and the helpers several steps share."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from crishim.config import Config, load_config
from crishim.errors import ConfigError, FailedPrecondition
from crishim.node.files import write_atomic
from crishim.node.host import HostSystem
from crishim.node.layout import CONFIG_FILE, SAVED_DIR, host_path

__all__ = [
    "CRI_TIMEOUT",
    "Data",
    "Node",
    "Step",
    "config_of",
    "crishim_socket",
    "restore_original",
    "save_original",
]

Data = dict[str, Any]
CRI_TIMEOUT = 90.0
KUBELET_TIMEOUT = 120.0
#: seconds each CRI call removing a pod may take (a stop waits for the containers' grace)
POD_TIMEOUT = 60.0
#: kubelet's runtime endpoint when its config names none (containerd's socket)
DEFAULT_RUNTIME_ENDPOINT = "unix:///run/containerd/containerd.sock"
_HOST_BINARY_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")


@dataclass
class Node:
    """The host being changed, and where the crishim to install comes from."""

    host_root: Path
    #: the image's root (the DaemonSet container's ``/``), copied into the rootfs
    image_root: Path
    host: HostSystem
    #: the ``crishim`` command, a path inside the image
    executable: str
    shipped_unit: str
    say: Callable[[str], None] = print
    #: something changed in this run: the service is restarted
    changed: set[str] = field(default_factory=set)
    #: run here even in a container (the host's transient unit a DaemonSet handed to)
    on_host: bool = False

    @property
    def from_rootfs(self) -> bool:
        """crishim runs from a copy of its image; False when the image is the host itself
        (``crishim node install --host-root /`` run where crishim is installed)."""
        return os.path.realpath(self.image_root) != os.path.realpath(self.host_root)

    def path(self, host_absolute: str) -> Path:
        """A host path as seen from here."""
        return Path(host_path(str(self.host_root), host_absolute))

    def saved(self, host_absolute: str) -> Path:
        """Where the original of a host file is kept."""
        return Path(host_path(str(self.path(SAVED_DIR)), host_absolute))

    def host_binary(self, name: str) -> str:
        """The absolute host path of a host program (``mount``)."""
        for directory in _HOST_BINARY_DIRS:
            candidate = f"{directory}/{name}"
            if os.access(self.path(candidate), os.X_OK):
                return candidate
        searched = ", ".join(_HOST_BINARY_DIRS)
        raise FailedPrecondition(f"the host has no {name} program (searched {searched})")


class Step:
    """One reversible step of the install."""

    name: ClassVar[str]

    def observe(self, node: Node) -> Data:
        """What undoing this step will need, seen before anything changes."""
        return {}

    def apply(self, node: Node, data: Data) -> str:
        """Make the host as this step wants it (again); says what it did. May add to
        ``data`` what undo needs of the change (recorded once the step is done)."""
        raise NotImplementedError

    def undo(self, node: Node, data: Data, *, purge: bool) -> str:
        """Put back what ``observe`` found; says what it did."""
        return "nothing to undo"


def save_original(node: Node, host_absolute: str) -> str | None:
    """Keep a copy of a host file about to be replaced; its host path, None if none."""
    original = node.path(host_absolute)
    if not original.is_file():
        return None
    copy = node.saved(host_absolute)
    copy.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(copy, original.read_bytes(), stat.S_IMODE(original.stat().st_mode))
    return host_absolute


def restore_original(node: Node, host_absolute: str) -> None:
    copy = node.saved(host_absolute)
    target = node.path(host_absolute)
    write_atomic(target, copy.read_bytes(), stat.S_IMODE(copy.stat().st_mode))
    copy.unlink()


def config_of(node: Node) -> Any:
    try:
        return load_config(node.path(CONFIG_FILE))
    except ConfigError as exc:
        raise FailedPrecondition(f"crishim's config on the host: {exc}") from exc


def crishim_socket(node: Node) -> str:
    """crishim's socket, a host path (the rootfs binds /run at /run); the default one
    while the host has no crishim.toml yet."""
    if not node.path(CONFIG_FILE).exists():
        return str(Config().socket)
    return str(config_of(node).socket)
