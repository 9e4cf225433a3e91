"""What ``crishim node install`` puts on a host, and why it is laid out this way (pure).

The host's OS is not the image's and may have no Python, so crishim runs from a copy of its
image's root file system, ``/opt/crishim/rootfs``, with the host paths a runtime needs
bound into it at the same paths. Two systemd units do that:

- ``crishim-rootfs.service`` (oneshot) makes the binds in the host's mount namespace with
  the host's ``mount``: the rootfs onto itself, twice, private (runc needs its root to be
  a mount point, pivot_root(2) one whose parent mount is not shared), then
  ``mount --rbind /run /opt/crishim/rootfs/run`` and so on for each host path. On a
  systemd host every mount is shared, so each bind joins its source's peer group and mount
  events travel both ways: volumes kubelet mounts under ``/var/lib/kubelet`` appear in the
  rootfs, and what crishim or a container with Bidirectional propagation mounts there (CSI
  drivers) appears on the host. Its stop makes every bind a slave first, then detaches the
  tree: unmounting a shared bind would propagate and unmount the host's own mounts below it.
  The node's whole root is bound at ``/opt/crishim/rootfs/host`` too (a slave: the
  node's mounts reach it, none go back), and crishim runs with ``--host-root /host``:
  a volume kubelet names by a node path that is not bound at its own path
  (``hostPath: /etc/ssl``, or ``/`` itself) is taken from there, not from the image.
- ``crishim.service`` is the shipped unit (``crishim unit``) with ``ExecStart=`` run by the
  host's ``chroot`` into the rootfs, through ``crishim node enter`` (crishim.node.enter):
  it gives crishim a mount namespace of its own whose root is the rootfs, with the
  propagation of every bind unchanged, kept at ``/run/crishim-rootfs/mnt`` for the next
  crishim after a restart, and execs ``crishim serve`` there. A plain chroot
  would leave the node's ``/`` as the root of every container's mount namespace, where
  ``runc exec`` then lands.

Why not ``RootDirectory=`` with ``BindPaths=``: any ``BindPaths=`` (or ``MountAPIVFS=yes``)
gives the service a mount namespace systemd makes a slave of the host's before it sets it
up, so its mounts never propagate back to the host; and systemd 252 (Debian 12) looks the
``ExecStart=`` program up on the host's root, not in ``RootDirectory=``. crishim pins each
pod's namespaces with bind mounts under ``/run/crishim/ns`` and mounts container root file
systems under ``/var/lib/crishim``; after a restart or an upgrade of crishim (containers
keep running under conmon) the new process must find them, and a container's
Bidirectional mounts must reach kubelet. ``crishim node enter`` keeps the binds peers of
the host's directories, so both keep working (tests/systemd/test_node_install.py restarts
crishim under a running pod), at the price of each mount below a bound path being listed
twice in the host's mount table.

``/opt/crishim`` also holds the record of what the installer did (``install.json``), the
originals it replaced (``saved/``) and the marker of a finished install (``installed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from crishim.node.unit import UNIT_NAME, add_settings, render_unit

__all__ = [
    "BINDS",
    "CONFIG_FILE",
    "HOST_IN_ROOTFS",
    "INSTALLED_MARKER",
    "LOCK_FILE",
    "NAMESPACE_PIN",
    "NODE_UNIT_NAME",
    "OPT_DIR",
    "RECORD_FILE",
    "ROOTFS_DIR",
    "ROOTFS_EXCLUDES",
    "ROOTFS_UNIT_NAME",
    "SAVED_DIR",
    "SERVICE_UNIT_NAME",
    "STATE_DIR",
    "UNIT_DIR",
    "Bind",
    "host_path",
    "render_default_config",
    "render_rootfs_unit",
    "render_service_unit",
]

OPT_DIR = "/opt/crishim"
ROOTFS_DIR = f"{OPT_DIR}/rootfs"
RECORD_FILE = f"{OPT_DIR}/install.json"
SAVED_DIR = f"{OPT_DIR}/saved"
INSTALLED_MARKER = f"{OPT_DIR}/installed"
UNIT_DIR = "/etc/systemd/system"
SERVICE_UNIT_NAME = UNIT_NAME
ROOTFS_UNIT_NAME = "crishim-rootfs.service"
CONFIG_FILE = "/etc/crishim/crishim.toml"
#: where the rootfs holds the node's whole root (crishim's ``host_root``)
HOST_IN_ROOTFS = "/host"
#: the transient unit a DaemonSet's install or uninstall hands its work to
NODE_UNIT_NAME = "crishim-node.service"
#: held by whoever installs or uninstalls (on the node's /run: gone at reboot)
LOCK_FILE = "/run/crishim-node.lock"
STATE_DIR = "/var/lib/crishim"
#: crishim's mount namespace, kept for the next crishim (crishim.node.enter); in a private
#: mount point of its own
NAMESPACE_PIN = "/run/crishim-rootfs/mnt"


@dataclass(frozen=True)
class Bind:
    """A host path bound at the same path inside the rootfs."""

    path: str
    #: a directory (bound with its submounts) or a single file
    directory: bool = True
    #: created on the host when missing (and removed again when the installer made it)
    create: bool = False
    #: the service starts without it when the host has none
    optional: bool = False


# Order matters: /proc, /sys, /dev and /run first, as a chroot needs them.
BINDS: tuple[Bind, ...] = (
    Bind("/proc"),
    Bind("/sys"),  # with /sys/fs/cgroup: cgroups of both drivers
    Bind("/dev"),  # with /dev/pts, /dev/shm, /dev/mqueue
    # The CRI socket, runtime state and namespace pins (/run/crishim), sd_notify's socket
    # and D-Bus (/run/systemd, /run/dbus) for the systemd cgroup driver, /run/netns.
    Bind("/run"),
    Bind(STATE_DIR, create=True),
    Bind("/var/lib/kubelet", create=True),  # volumes, device plugin and pod directories
    Bind("/var/log/pods", create=True),  # container logs kubelet reads
    Bind("/var/lib/cni", create=True),  # host-local IPAM leases and CNI result caches
    Bind("/etc/cni", create=True),  # network configs a cluster network plugin writes
    Bind("/opt/cni", create=True),  # plugin binaries a cluster network plugin installs
    Bind("/etc/crishim", create=True),  # crishim.toml, crishim.d/, certs.d/
    Bind("/etc/resolv.conf", directory=False, optional=True),  # registry names
    Bind("/etc/hosts", directory=False, optional=True),
)

# Never copied from the image: kernel file systems, the host's root as the DaemonSet
# mounts it, scratch space. Every mount point inside the image's root is left out too.
ROOTFS_EXCLUDES: tuple[str, ...] = (
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    HOST_IN_ROOTFS,
    "/var/tmp",
)


def _mount_lines(mount: str, umount: str, rm: str) -> tuple[list[str], list[str]]:
    # The rootfs is made a mount point of its own, twice over, both private. runc sets the
    # propagation of "/" (crishim's root), which only a mount point has, and pivot_root(2)
    # refuses a root whose parent mount is shared (the host's /): the upper bind's parent
    # is the lower one. Private, so the binds below are not copied onto the host's /.
    start = [
        f"ExecStart={mount} --bind {ROOTFS_DIR} {ROOTFS_DIR}",
        f"ExecStart={mount} --make-private {ROOTFS_DIR}",
        f"ExecStart={mount} --bind {ROOTFS_DIR} {ROOTFS_DIR}",
        f"ExecStart={mount} --make-private {ROOTFS_DIR}",
    ]
    # The node's whole root at /host, a slave: the node's mounts reach it, nothing done
    # there goes back. crishim resolves volume paths it does not see at their own path
    # below it (crishim.runtime.host_paths). Made before the binds below, so that it holds
    # none of them.
    start += [
        f"ExecStart={mount} --rbind / {ROOTFS_DIR}{HOST_IN_ROOTFS}",
        f"ExecStart={mount} --make-rslave {ROOTFS_DIR}{HOST_IN_ROOTFS}",
    ]
    for bind in BINDS:
        how = "--rbind" if bind.directory else "--bind"
        prefix = "-" if bind.optional else ""
        start.append(f"ExecStart={prefix}{mount} {how} {bind.path} {ROOTFS_DIR}{bind.path}")
    # crishim's mount namespace goes with the binds it was made of (crishim.node.enter).
    pin_dir = str(PurePosixPath(NAMESPACE_PIN).parent)
    stop = [
        f"ExecStopPost=-{umount} {NAMESPACE_PIN}",
        f"ExecStopPost=-{umount} --lazy {pin_dir}",
        f"ExecStopPost=-{rm} -f {NAMESPACE_PIN}",
        f"ExecStopPost=-{rm} -d {pin_dir}",
    ]
    # Slaves first: unmounting a shared bind would unmount the host's mounts below it.
    stop += [
        f"ExecStopPost=-{mount} --make-rslave {ROOTFS_DIR}",
        f"ExecStopPost=-{umount} --recursive --lazy {ROOTFS_DIR}",
        f"ExecStopPost=-{umount} --lazy {ROOTFS_DIR}",
    ]
    return start, stop


def render_rootfs_unit(
    mount: str = "/bin/mount", umount: str = "/bin/umount", rm: str = "/bin/rm"
) -> str:
    """``crishim-rootfs.service``: the binds of :data:`BINDS` into the rootfs, made with the
    host's ``mount``, and undone with its ``umount`` and ``rm`` (absolute paths on the host),
    with crishim's mount namespace."""
    start, stop = _mount_lines(mount, umount, rm)
    lines = [
        "# Written by `crishim node install`: binds the host paths crishim needs into its root",
        f"# file system {ROOTFS_DIR}, in the host's mount namespace.",
        "[Unit]",
        f"Description=Host paths bound into crishim's root file system {ROOTFS_DIR}",
        "After=local-fs.target",
        f"Before={SERVICE_UNIT_NAME}",
        "",
        "[Service]",
        "Type=oneshot",
        "RemainAfterExit=yes",
        *start,
        *stop,
    ]
    return "\n".join(lines) + "\n"


def render_service_unit(shipped: str, executable: str, chroot: str = "/usr/sbin/chroot") -> str:
    """``crishim.service`` for the rootfs: the shipped unit running ``executable`` (a path
    inside the rootfs) through ``crishim node enter`` (crishim.node.enter), started by the
    host's ``chroot`` (an absolute path on the host), after and bound to
    ``crishim-rootfs.service``."""
    enter = (
        f"{chroot} {ROOTFS_DIR} {executable} node enter --rootfs {ROOTFS_DIR}"
        f" --pin {NAMESPACE_PIN}"
        f" -- {executable}"
    )
    text = render_unit(shipped, enter)
    text = (
        "\n".join(
            f"{line} --host-root {HOST_IN_ROOTFS}" if line.startswith("ExecStart=") else line
            for line in text.splitlines()
        )
        + "\n"
    )
    text = add_settings(
        text,
        "Unit",
        [f"BindsTo={ROOTFS_UNIT_NAME}", f"After={ROOTFS_UNIT_NAME}"],
    )
    return add_settings(
        text,
        "Service",
        [
            "# Installed by `crishim node install`: crishim runs from its image's root file",
            "# system, as the root of a mount namespace whose binds stay peers of the host's",
            "# (no namespacing setting may be added: systemd's namespace would cut them off).",
        ],
    )


def render_default_config(cgroup_driver: str) -> str:
    """The ``crishim.toml`` written when the host has none."""
    return (
        "# Written by `crishim node install` (only because there was no crishim.toml).\n"
        "# Every setting, with its default: `crishim config --default`.\n"
        f'cgroup_driver = "{cgroup_driver}"  # as kubelet\'s cgroupDriver\n'
    )


def host_path(host_root: str, path: str) -> str:
    """``path`` (absolute, as the host sees it) under ``host_root``."""
    relative = PurePosixPath(path).relative_to("/")
    return str(PurePosixPath(host_root) / relative)
