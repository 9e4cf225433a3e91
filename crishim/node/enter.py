"""``crishim node enter --rootfs DIR --pin FILE -- COMMAND``: run an installed crishim with
the rootfs as the root of a mount namespace of its own (the installed ``crishim.service`` runs
through it).

A chroot is not enough. A mount namespace has one root, the top of the mounts on its root
mount, and whoever joins the namespace with setns(2) lands there: a chroot only moves the
caller's own root. Each container's mount namespace starts as a copy of crishim's, and
runc's pivot_root(2) puts the container's root file system in place of crishim's root. In a
chroot that root is a mount deep in the node's tree, so the namespace's root stays the
node's ``/``, and every ``runc exec`` (ExecSync, exec probes, ``kubectl exec``) ran in the
node's file system instead of the container's. With the rootfs as the namespace's root the
container's root file system takes its place, as on any host.

The namespace outlives crishim: its file is bound at ``FILE`` (in a private mount point of
the host's, so the bind goes nowhere else), and a restarted crishim joins it again. It
holds what crishim keeps private to itself, the pins of pods' namespaces above all, which a
new namespace would not have. ``crishim-rootfs.service`` unmounts it when it stops.

The host's ``chroot`` starts this command, as the image's Python needs the rootfs. It then
steps out of the chroot to the root of the process that started it (systemd), which must
share its mount namespace. When ``FILE`` holds a namespace it joins it; otherwise:

1. unshare(CLONE_NEWNS), with the propagation of every mount unchanged. The binds of
   ``crishim-rootfs.service`` stay peers of the node's directories, so what crishim mounts
   below them in the open (container root file systems) reaches the node, and kubelet's
   volume mounts reach crishim;
2. pivot_root(2) into the rootfs (a private mount whose parent is private);
3. the old root, the node's tree, made a slave recursively and detached: its unmounts then
   cannot propagate to the node's own mounts;
4. the namespace, now complete, bound at ``FILE`` from the host's namespace. Nothing is
   bound when a step before fails, so the next start does not join a half-made namespace.

Then it execs COMMAND, looked up in the rootfs.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from crishim.errors import FailedPrecondition
from crishim.node.files import mount_points, same_mount_namespace
from crishim.util.mountpoint import make_private_mount_point
from crishim.util.syscalls import (
    CLONE_NEWNS,
    MNT_DETACH,
    MS_BIND,
    MS_REC,
    MS_SLAVE,
    mount,
    pivot_root,
    setns,
    umount,
    unshare,
)

__all__ = ["enter_rootfs"]


def _leave_chroot() -> None:
    """To the root of the parent process (systemd's), in the same mount namespace."""
    parent = os.getppid()
    try:
        if not same_mount_namespace(parent):
            raise FailedPrecondition(
                f"node enter: process {parent}, which started crishim, is in another mount "
                "namespace; run this command from the host's chroot, not from a container"
            )
        outside = os.open(f"/proc/{parent}/root", os.O_PATH | os.O_DIRECTORY)
    except OSError as exc:
        raise FailedPrecondition(f"node enter: cannot reach the host's root: {exc}") from exc
    try:
        os.fchdir(outside)
    finally:
        os.close(outside)
    os.chroot(".")


def _join(pin: str) -> None:
    namespace = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(namespace, CLONE_NEWNS)
    finally:
        os.close(namespace)


def _create(rootfs: str, pin: str) -> None:
    """A new mount namespace whose root is ``rootfs``, bound at ``pin``; this process in it."""
    if os.path.realpath(rootfs) not in mount_points():
        raise FailedPrecondition(
            f"node enter: {rootfs} is not a mount point (is crishim-rootfs.service up?)"
        )
    make_private_mount_point(Path(pin).parent)
    Path(pin).touch()
    host = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _create_pinned(host, rootfs, pin)
    finally:
        os.close(host)


def _pivot(rootfs: str) -> None:
    """This (new) mount namespace's root made ``rootfs``; the node's tree detached."""
    os.chdir(rootfs)
    old_root = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        # The old root ends up mounted over the new one; its descriptor names it.
        pivot_root(".", ".")
        os.fchdir(old_root)
    finally:
        os.close(old_root)
    mount(None, ".", None, MS_SLAVE | MS_REC)
    umount(".", MNT_DETACH)


def _create_pinned(host: int, rootfs: str, pin: str) -> None:
    """unshare(CLONE_NEWNS) and :func:`_pivot`, then the namespace bound at ``pin`` from
    ``host`` (a namespace cannot hold its own file), and this process left in it.

    The kernel refuses (EINVAL) to bind the file of a namespace whose ID is lower than the
    binder's, to prevent loops. IDs are handed out in per-CPU batches (seen on 6.18), so a
    namespace made after the host's can still have a lower ID: each try is made on the
    next CPU, and one of them (the CPU that made the host's namespace) gives a higher one.
    A refused namespace goes when its descriptor is closed."""
    original = os.sched_getaffinity(0)
    cpus = sorted(original)
    refused: OSError | None = None
    try:
        for attempt in range(4 * len(cpus)):
            os.sched_setaffinity(0, {cpus[attempt % len(cpus)]})
            unshare(CLONE_NEWNS)
            created = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _pivot(rootfs)
                setns(host, CLONE_NEWNS)  # back at the host's root, rootfs a host path again
                try:
                    mount(f"/proc/self/fd/{created}", pin, None, MS_BIND)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    refused = exc
                    continue
                setns(created, CLONE_NEWNS)
                return
            finally:
                os.close(created)
    finally:
        os.sched_setaffinity(0, original)
    raise FailedPrecondition(f"node enter: the kernel refused to keep the namespace: {refused}")


def enter_rootfs(rootfs: str, pin: str, command: list[str]) -> None:
    """Run ``command`` in the mount namespace bound at ``pin``, made first (its root
    ``rootfs``) when there is none; returns only by raising FailedPrecondition.

    ``rootfs`` and ``pin`` are paths of the starting process's root (the host's)."""
    if not command:
        raise FailedPrecondition("node enter: no command to run in the rootfs")
    for path in (rootfs, pin):
        if not os.path.isabs(path):
            raise FailedPrecondition(f"node enter: {path!r} is not an absolute path")
    _leave_chroot()
    try:
        if pin in mount_points():
            _join(pin)
        else:
            _create(rootfs, pin)
        os.chdir("/")
        os.execv(command[0], command)  # noqa: S606 (crishim itself, the unit names it)
    except OSError as exc:
        raise FailedPrecondition(f"node enter: {rootfs}: {exc}") from exc
