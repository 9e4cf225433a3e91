"""Pod namespaces pinned by bind mounts, so a pod needs no infra container.

A pod's network, IPC and UTS namespaces are created by a short-lived thread of crishim's
that calls ``unshare(2)`` (these namespaces belong to a thread, not to the whole process) and
keeps each one alive by bind-mounting ``/proc/thread-self/ns/<kind>`` onto a file
``<ns_dir>/<kind>/<sandbox_id>``; the thread then ends, never to run anything else.
Containers then join the namespaces by path; removing the pod unmounts and deletes the
files, and the kernel frees each namespace once its last process has left.

A pod with a user namespace of its own (``hostUsers: false``) is made differently: crishim
cannot make a user namespace from a thread, so a child process (:mod:`crishim.util.userns`)
creates the user namespace together with the network, IPC and UTS ones, which it then owns
(the pod's root may set its network sysctls, mount sysfs, hold capabilities over them).
crishim writes the ID maps, pins all four from ``/proc/<child>/ns/`` and lets the child
go; the thread that sets hostname, ``lo`` and sysctls joins the pinned namespaces with
``setns(2)`` instead of making them.

``ns_dir`` is turned into a mount point of its own with private propagation
(:mod:`crishim.util.mountpoint`), so the bind mounts of namespace files never propagate into other
mount namespaces, where they would keep namespaces alive behind crishim's back.

The same thread sets the hostname, brings ``lo`` up and writes the namespaced sysctls:
``/proc/sys/net`` and the IPC sysctls answer for the namespaces of the thread that opens
them. Sysctl names are validated by :mod:`crishim.network.sysctl` before anything is
created. No process is started, which matters when dozens of pods start at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from crishim.errors import AlreadyExists, Internal, InvalidArgument
from crishim.model.specs import UserNamespace
from crishim.model.userns import id_map_text
from crishim.network.sysctl import Sysctl, SysctlNamespace, parse_sysctl
from crishim.util import syscalls
from crishim.util.mountpoint import make_private_mount_point
from crishim.util.threads import in_own_thread
from crishim.util.userns import user_namespace_holder

log = logging.getLogger(__name__)


_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Linux limits hostnames to 64 bytes (HOST_NAME_MAX).
_HOSTNAME_MAX = 64

# ioctl(NS_GET_NSTYPE) from <linux/nsfs.h>: answers only on namespace files.
_NS_GET_NSTYPE = 0xB703

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


@dataclass(frozen=True)
class PodNamespaces:
    """Paths of a pod's pinned namespace files; None means the pod shares the host's."""

    network: str | None
    ipc: str | None
    uts: str | None
    user: str | None = None

    def paths(self) -> list[str]:
        """The pinned files, in a fixed order."""
        return [p for p in (self.network, self.ipc, self.uts, self.user) if p is not None]

    def kinds(self) -> list[tuple[str, str]]:
        """(``/proc/<pid>/ns`` name, pin) of each pinned namespace."""
        pins = (("net", self.network), ("ipc", self.ipc), ("uts", self.uts), ("user", self.user))
        return [(kind, pin) for kind, pin in pins if pin is not None]


def namespace_alive(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a namespace file (a live pin), not a plain or missing file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


async def create_pod_namespaces(
    ns_dir: Path,
    sandbox_id: str,
    *,
    network: bool,
    ipc: bool,
    uts: bool,
    hostname: str,
    sysctls: Mapping[str, str],
    userns: UserNamespace | None = None,
) -> PodNamespaces:
    """Create and pin the pod's own namespaces, set its hostname and sysctls.

    ``network``/``ipc``/``uts`` say which namespaces the pod gets of its own (False = host);
    ``userns`` (validated mappings) gives the pod a user namespace owning the others.
    Raises InvalidArgument for a bad id, hostname or sysctl (naming it), AlreadyExists when
    pins for the id exist, Internal when the host fails. Nothing is left behind on failure.
    """
    if not _SANDBOX_ID.fullmatch(sandbox_id):
        raise InvalidArgument(f"sandbox id {sandbox_id!r} is not a valid file name")
    if uts and (len(hostname.encode()) > _HOSTNAME_MAX or "\x00" in hostname):
        raise InvalidArgument(f"hostname {hostname!r} is longer than 64 bytes or has a NUL")
    wanted = _validate_sysctls(sysctls, network=network, ipc=ipc)
    if not (network or ipc or uts):
        return PodNamespaces(None, None, None)

    await asyncio.to_thread(make_private_mount_point, ns_dir)
    pods = PodNamespaces(
        network=str(ns_dir / "net" / sandbox_id) if network else None,
        ipc=str(ns_dir / "ipc" / sandbox_id) if ipc else None,
        uts=str(ns_dir / "uts" / sandbox_id) if uts else None,
        user=str(ns_dir / "user" / sandbox_id) if userns is not None else None,
    )
    created: list[str] = []
    try:
        for path in pods.paths():
            _create_pin_file(Path(path))
            created.append(path)
        if userns is not None:
            await _make_in_user_namespace(pods, userns)
            await _join(pods, hostname if uts else "", wanted)
        else:
            await _unshare(pods, hostname if uts else "", wanted)
    except BaseException:
        # Also on cancellation: a half-made pod must not leak mounts or files.
        await remove_pod_namespaces(
            PodNamespaces(
                network=pods.network if pods.network in created else None,
                ipc=pods.ipc if pods.ipc in created else None,
                uts=pods.uts if pods.uts in created else None,
                user=pods.user if pods.user in created else None,
            )
        )
        raise
    return pods


async def remove_pod_namespaces(ns: PodNamespaces) -> None:
    """Unmount and delete the pins; already-gone pins are fine, so this is idempotent."""
    for path in ns.paths():
        _unmount_all(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _validate_sysctls(sysctls: Mapping[str, str], *, network: bool, ipc: bool) -> list[Sysctl]:
    wanted: list[Sysctl] = []
    for name, value in sysctls.items():
        sysctl = parse_sysctl(name, value)
        if sysctl.namespace is SysctlNamespace.NET and not network:
            raise InvalidArgument(
                f"sysctl {name!r} cannot be set: the pod uses the host's network namespace"
            )
        if sysctl.namespace is SysctlNamespace.IPC and not ipc:
            raise InvalidArgument(
                f"sysctl {name!r} cannot be set: the pod uses the host's IPC namespace"
            )
        wanted.append(sysctl)
    return wanted


def _mount(source: str, target: str, flags: int) -> None:
    try:
        syscalls.mount(source, target, None, flags)
    except OSError as exc:
        raise Internal(f"mount {target} (flags {flags:#x}): {exc.strerror}") from None


def _unmount_all(path: str) -> None:
    # Loops because a pin could carry stacked mounts; EINVAL means "no longer a mount point".
    while True:
        try:
            syscalls.umount(path, syscalls.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise Internal(f"unmount {path}: {exc.strerror}") from None


def _create_pin_file(path: Path) -> None:
    path.parent.mkdir(mode=0o755, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    except FileExistsError:
        raise AlreadyExists(f"namespace pin {path} already exists") from None
    os.close(fd)


def _enter_new_namespaces(pods: PodNamespaces, hostname: str, sysctls: list[Sysctl]) -> None:
    """In a thread of its own: make the namespaces, pin them, set them up. The thread must
    end afterwards (it lives in the pod's namespaces now)."""
    flags = (
        (syscalls.CLONE_NEWNET if pods.network else 0)
        | (syscalls.CLONE_NEWIPC if pods.ipc else 0)
        | (syscalls.CLONE_NEWUTS if pods.uts else 0)
    )
    try:
        syscalls.unshare(flags)
    except OSError as exc:
        raise Internal(f"unshare of the pod namespaces: {exc.strerror}") from None
    for kind, pin in (("net", pods.network), ("ipc", pods.ipc), ("uts", pods.uts)):
        if pin is not None:
            _mount(f"/proc/thread-self/ns/{kind}", pin, syscalls.MS_BIND)
    _set_up(pods, hostname, sysctls)


def _join_namespaces(pods: PodNamespaces, hostname: str, sysctls: list[Sysctl]) -> None:
    """In a thread of its own: enter the pinned namespaces and set them up. The thread must
    end afterwards."""
    for kind, pin, nstype in (
        ("network", pods.network, syscalls.CLONE_NEWNET),
        ("IPC", pods.ipc, syscalls.CLONE_NEWIPC),
        ("UTS", pods.uts, syscalls.CLONE_NEWUTS),
    ):
        if pin is None:
            continue
        fd = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
        try:
            syscalls.setns(fd, nstype)
        except OSError as exc:
            raise Internal(f"entering the pod's {kind} namespace {pin}: {exc.strerror}") from None
        finally:
            os.close(fd)
    _set_up(pods, hostname, sysctls)


def _set_up(pods: PodNamespaces, hostname: str, sysctls: list[Sysctl]) -> None:
    """Hostname, ``lo`` up and sysctls, in the namespaces of the calling thread."""
    if hostname:
        socket.sethostname(hostname)
    if pods.network:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH22x", b"lo", 0)
            flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))
    for sysctl in sysctls:
        try:
            with open(sysctl.path, "w") as file:
                file.write(sysctl.value)
        except OSError as exc:
            message = f"sysctl {sysctl.name}={sysctl.value!r}: {exc.strerror}"
            raise InvalidArgument(message) from None


async def _unshare(pods: PodNamespaces, hostname: str, sysctls: list[Sysctl]) -> None:
    await in_own_thread(
        "crishim-pod-namespaces", lambda: _enter_new_namespaces(pods, hostname, sysctls)
    )


async def _join(pods: PodNamespaces, hostname: str, sysctls: list[Sysctl]) -> None:
    await in_own_thread("crishim-pod-namespaces", lambda: _join_namespaces(pods, hostname, sysctls))


async def _make_in_user_namespace(pods: PodNamespaces, userns: UserNamespace) -> None:
    """Make the user namespace and, owned by it, the others the pod gets; pin them all."""
    flags = [
        flag
        for flag, pin in (("--net", pods.network), ("--ipc", pods.ipc), ("--uts", pods.uts))
        if pin is not None
    ]
    uid_map, gid_map = id_map_text(userns.uids), id_map_text(userns.gids)
    async with user_namespace_holder(uid_map, gid_map, flags) as pid:
        for kind, pin in pods.kinds():
            await asyncio.to_thread(_mount, f"/proc/{pid}/ns/{kind}", pin, syscalls.MS_BIND)
