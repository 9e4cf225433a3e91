"""Host paths of CRI requests as crishim sees them, when crishim does not run in the node's
own root file system.

kubelet names volume sources by their path on the node (``/etc/ssl/certs``,
``/var/lib/kubelet/pods/<uid>/volumes/...``). Installed from its image (``crishim node
install``), crishim runs chrooted in ``/opt/crishim/rootfs``, where only the paths a runtime
needs are bound at their own path (``/var/lib/kubelet``, ``/var/log/pods``, ``/run``, ...)
and the node's whole root is bound at ``host_root`` (``/host``). There ``/etc/ssl/certs``
would be the image's own, not the node's.

:class:`HostPaths` maps a node path to the path that names the same file here:

- the path itself when crishim sees the node's file there (same device and inode as under
  ``host_root``): the binds at their own path, whose mount propagation both ways is what a
  Bidirectional volume needs;
- else the path under ``host_root``, symlinks resolved the way the node resolves them:
  inside ``host_root`` (an absolute link target names a node path, ``..`` stops at the
  node's root). A runtime would follow them from crishim's root instead.

With ``host_root`` ``/`` (crishim on the node's own root) every path is its own.
"""

from __future__ import annotations

import os
import stat
from pathlib import PurePosixPath

from crishim.errors import InvalidArgument

__all__ = ["HostPaths", "resolve_in_root"]

#: symlinks followed in one path before giving up, as the kernel's ELOOP limit
MAX_SYMLINKS = 40


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


def resolve_in_root(root: str, path: str) -> str:
    """``path`` (absolute, as the node sees it) with its symlinks resolved inside ``root``;
    the result is a node path. Components that do not exist are kept as written (past the
    first missing one nothing is resolved). InvalidArgument on a symlink loop."""
    pending = _parts(path)
    resolved: list[str] = []
    followed = 0
    missing = False  # past a missing component: nothing there to resolve
    while pending:
        name = pending.pop(0)
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        if missing:
            resolved.append(name)
            continue
        try:
            st = os.lstat(os.path.join(root, *resolved, name))
        except (FileNotFoundError, NotADirectoryError):
            missing = True
            resolved.append(name)
            continue
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(name)
            continue
        followed += 1
        if followed > MAX_SYMLINKS:
            raise InvalidArgument(f"host path {path}: too many levels of symbolic links")
        target = os.readlink(os.path.join(root, *resolved, name))
        if target.startswith("/"):
            resolved = []
        pending = _parts(target) + pending
    return "/" + "/".join(resolved)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class HostPaths:
    """Maps node paths to crishim's view of them (see the module's docstring)."""

    def __init__(self, host_root: str = "/") -> None:
        self.host_root = os.path.normpath(host_root)

    @property
    def identity(self) -> bool:
        """Whether every node path is its own (crishim runs on the node's root)."""
        return self.host_root == "/"

    def resolve(self, path: str) -> str:
        """The path naming here the node's file ``path`` (absolute)."""
        if self.identity:
            return path
        if not PurePosixPath(path).is_absolute():
            raise InvalidArgument(f"host path {path!r} is not absolute")
        real = resolve_in_root(self.host_root, path)
        under = os.path.join(self.host_root, real.lstrip("/"))
        seen_here = _identity(real)
        if seen_here is not None and seen_here == _identity(under):
            return real
        return under
