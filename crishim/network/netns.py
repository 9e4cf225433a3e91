"""Pod namespaces pinned by bind mounts, so a pod needs no infra container.

A pod's network, IPC and UTS namespaces are created by ``unshare(1)``, which keeps each one
alive by bind-mounting it onto a file ``<ns_dir>/<kind>/<sandbox_id>``. Containers then join
the namespaces by path; removing the pod unmounts and deletes the files, and the kernel frees
each namespace once its last process has left.

``ns_dir`` is turned into a mount point of its own with private propagation (as ``ip netns``
does for ``/run/netns``), so the bind mounts of namespace files never propagate into other
mount namespaces, where they would keep namespaces alive behind crishim's back.

The hostname and namespaced sysctls are set by a small helper that runs inside the new
namespaces. Every value reaches it as its own argv entry (no shell), and sysctl names are
validated by :mod:`crishim.network.sysctl` before anything is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from crishim.errors import AlreadyExists, DeadlineExceeded, Internal, InvalidArgument
from crishim.network.sysctl import Sysctl, SysctlNamespace, parse_sysctl

log = logging.getLogger(__name__)

HELPER_TIMEOUT = 30.0

_SANDBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Linux limits hostnames to 64 bytes (HOST_NAME_MAX).
_HOSTNAME_MAX = 64

_MS_BIND = 0x1000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 2
# ioctl(NS_GET_NSTYPE) from <linux/nsfs.h>: answers only on namespace files.
_NS_GET_NSTYPE = 0xB703

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

# Serialises the check-then-mount of ns_dir: two pods created at once must not stack two
# bind mounts. A threading lock (taken in a worker thread) works across event loops.
_prepare_lock = threading.Lock()

# Runs inside the new namespaces: argv is the hostname ("" = keep), "1"/"0" for bringing
# lo up, then pairs of /proc/sys path and value. On a failed write it prints the pair's
# index and the error and exits 3, so the caller can name the sysctl.
_HELPER = r"""
import fcntl, socket, struct, sys
hostname, lo_up, *pairs = sys.argv[1:]
if hostname:
    socket.sethostname(hostname)
if lo_up == "1":
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, 0x8913, request))[1]
        fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))
for index in range(0, len(pairs), 2):
    try:
        with open(pairs[index], "w") as file:
            file.write(pairs[index + 1])
    except OSError as exc:
        sys.stderr.write(f"{index // 2} {exc.strerror}\n")
        sys.exit(3)
"""


@dataclass(frozen=True)
class PodNamespaces:
    """Paths of a pod's pinned namespace files; None means the pod shares the host's."""

    network: str | None
    ipc: str | None
    uts: str | None

    def paths(self) -> list[str]:
        """The pinned files, in a fixed order."""
        return [p for p in (self.network, self.ipc, self.uts) if p is not None]


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
) -> PodNamespaces:
    """Create and pin the pod's own namespaces, set its hostname and sysctls.

    ``network``/``ipc``/``uts`` say which namespaces the pod gets of its own (False = host).
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

    await asyncio.to_thread(_prepare_ns_dir, ns_dir)
    pods = PodNamespaces(
        network=str(ns_dir / "net" / sandbox_id) if network else None,
        ipc=str(ns_dir / "ipc" / sandbox_id) if ipc else None,
        uts=str(ns_dir / "uts" / sandbox_id) if uts else None,
    )
    created: list[str] = []
    try:
        for path in pods.paths():
            _create_pin_file(Path(path))
            created.append(path)
        await _unshare(pods, hostname if uts else "", wanted)
    except BaseException:
        # Also on cancellation: a half-made pod must not leak mounts or files.
        await remove_pod_namespaces(
            PodNamespaces(
                network=pods.network if pods.network in created else None,
                ipc=pods.ipc if pods.ipc in created else None,
                uts=pods.uts if pods.uts in created else None,
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


def _prepare_ns_dir(ns_dir: Path) -> None:
    """Make ``ns_dir`` a private mount point (bind-mounted onto itself when it is not one)."""
    with _prepare_lock:
        ns_dir.mkdir(parents=True, exist_ok=True)
        target = os.path.realpath(ns_dir)
        if not _is_mount_point(target):
            _mount(target, target, _MS_BIND)
        _mount("none", target, _MS_PRIVATE)


def _is_mount_point(path: str) -> bool:
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and the like escaped as octal.
            mount_point = line.split(" ", 5)[4]
            decoded = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mount_point)
            if decoded == path:
                return True
    return False


def _mount(source: str, target: str, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise Internal(f"mount {target} (flags {flags:#x}): {os.strerror(err)}")


def _unmount_all(path: str) -> None:
    # Loops because a pin could carry stacked mounts; EINVAL means "no longer a mount point".
    while _libc.umount2(path.encode(), _MNT_DETACH) == 0:
        pass
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOENT):
        raise Internal(f"unmount {path}: {os.strerror(err)}")


def _create_pin_file(path: Path) -> None:
    path.parent.mkdir(mode=0o755, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    except FileExistsError:
        raise AlreadyExists(f"namespace pin {path} already exists") from None
    os.close(fd)


async def _unshare(pods: PodNamespaces, hostname: str, sysctls: list[Sysctl]) -> None:
    argv = ["unshare"]
    for option, path in (("--net", pods.network), ("--ipc", pods.ipc), ("--uts", pods.uts)):
        if path is not None:
            argv.append(f"{option}={path}")
    # -I: the helper needs only the standard library and must ignore PYTHON* variables.
    argv += ["--", sys.executable, "-I", "-c", _HELPER, hostname]
    argv.append("1" if pods.network is not None else "0")
    for sysctl in sysctls:
        argv += [sysctl.path, sysctl.value]

    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), HELPER_TIMEOUT)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise DeadlineExceeded(
                f"creating pod namespaces took longer than {HELPER_TIMEOUT:.0f}s"
            ) from None
        raise
    message = stderr.decode(errors="replace").strip()
    if proc.returncode == 3:
        index, _, reason = message.partition(" ")
        if index.isdigit() and int(index) < len(sysctls):
            failed = sysctls[int(index)]
            raise InvalidArgument(f"sysctl {failed.name}={failed.value!r}: {reason}")
    if proc.returncode != 0:
        raise Internal(f"creating pod namespaces failed (exit {proc.returncode}): {message}")
