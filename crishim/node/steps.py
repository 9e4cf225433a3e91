"""The steps of ``crishim node install``, each with its undo.

A step first observes what it is about to change (``observe``: its record entry, written
before anything changes), then makes the host as it wants it (``apply``: idempotent, it may
run again on a host it already changed) and can put back what it found (``undo``, from the
entry alone). In install order:

rootfs       the image's root copied to /opt/crishim/rootfs (not when run from the host)
directories  host directories bound into the rootfs, created when missing
config       /etc/crishim/crishim.toml, only when there is none
units        crishim.service (and crishim-rootfs.service) in /etc/systemd/system
service      enabled and (re)started
ready        crishim answers CRI on its socket
kubelet      kubelet pointed at crishim's socket and restarted, healthy again
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from crishim.errors import FailedPrecondition
from crishim.node.base import (
    CRI_TIMEOUT,
    Data,
    Node,
    Step,
    config_of,
    crishim_socket,
    restore_original,
    save_original,
)
from crishim.node.files import (
    file_digest,
    mount_points,
    release_stale_mounts,
    remove_tree,
    sync_tree,
    write_atomic,
)
from crishim.node.kubelet_step import KubeletStep, kubelet_cgroup_driver, kubelet_setup
from crishim.node.layout import (
    BINDS,
    CONFIG_FILE,
    INSTALLED_MARKER,
    RECORD_FILE,
    ROOTFS_DIR,
    ROOTFS_EXCLUDES,
    ROOTFS_UNIT_NAME,
    SAVED_DIR,
    SERVICE_UNIT_NAME,
    STATE_DIR,
    UNIT_DIR,
    render_default_config,
    render_rootfs_unit,
    render_service_unit,
)
from crishim.node.unit import render_unit

__all__ = ["STEPS", "Node", "Step", "missing_dirs", "preflight"]


class RootfsStep(Step):
    name = "rootfs"

    def observe(self, node: Node) -> Data:
        return {"existed": node.path(ROOTFS_DIR).exists()}

    def apply(self, node: Node, data: Data) -> str:
        rootfs = node.path(ROOTFS_DIR)
        skip = {p.strip("/") for p in ROOTFS_EXCLUDES}
        skip |= {b.path.strip("/") for b in BINDS}
        skip |= _mounts_inside(node.image_root)
        # The host's root, when the image sees it below its own (the DaemonSet's /host).
        image, host = os.path.realpath(node.image_root), os.path.realpath(node.host_root)
        if host.startswith(image.rstrip("/") + "/"):
            skip.add(os.path.relpath(host, image))
        # The installer's own files, should the image be a view of the host's root.
        skip |= {p.strip("/") for p in (ROOTFS_DIR, RECORD_FILE, SAVED_DIR, INSTALLED_MARKER)}
        changes = sync_tree(node.image_root, rootfs, skip)
        _make_mount_targets(rootfs)
        if changes:
            node.changed.add(self.name)
        return f"{ROOTFS_DIR}: {changes} files changed" if changes else f"{ROOTFS_DIR}: up to date"

    def undo(self, node: Node, data: Data, *, purge: bool) -> str:
        if data.get("existed"):
            return f"{ROOTFS_DIR} was there before: kept"
        rootfs = node.path(ROOTFS_DIR)
        released = release_stale_mounts(rootfs, ROOTFS_DIR)
        removed = f"{ROOTFS_DIR} removed" if remove_tree(rootfs) else "no rootfs"
        if released:
            removed += f" (after detaching {len(released)} stale copies of its mounts here)"
        return removed


def _mounts_inside(root: Path) -> set[str]:
    """Mount points strictly inside ``root``, relative to it (the container's /etc/hosts,
    service account token and the like are not part of the image)."""
    top = os.path.realpath(root).rstrip("/") + "/"
    return {p[len(top) :] for p in mount_points() if p.startswith(top) and p != top}


def _make_mount_targets(rootfs: Path) -> None:
    for excluded in ROOTFS_EXCLUDES:  # /host included: the node's root is bound there
        _ensure_inside(rootfs, excluded, directory=True)
    for name in ("tmp", "var/tmp"):
        os.chmod(rootfs / name, 0o1777)  # noqa: S103 - scratch space, sticky as on any host
    for bind in BINDS:
        _ensure_inside(rootfs, bind.path, directory=bind.directory)


def _ensure_inside(rootfs: Path, absolute: str, *, directory: bool) -> None:
    """Make ``absolute`` exist inside ``rootfs`` with no symlink on the way: the host's
    mount would follow one out of the rootfs."""
    current = rootfs
    parts = [p for p in absolute.split("/") if p]
    for index, part in enumerate(parts):
        current = current / part
        last = index == len(parts) - 1
        if current.is_symlink():
            if last and not directory:
                current.unlink()  # the image's /etc/resolv.conf link: the host's file instead
            else:
                raise FailedPrecondition(
                    f"{current}: a symlink where a mount point must be; the image must have "
                    f"a real {absolute}"
                )
        if last and not directory:
            if not current.exists():
                current.touch(mode=0o644)
        elif not current.exists():
            current.mkdir(mode=0o755)


def missing_dirs(node: Node, host_absolute: str) -> list[str]:
    """``host_absolute`` and those of its parents the host lacks, outermost first."""
    missing: list[str] = []
    path = PurePosixPath(host_absolute)
    while path != path.parent and not node.path(str(path)).exists():
        missing.insert(0, str(path))
        path = path.parent
    return missing


class DirectoriesStep(Step):
    name = "directories"

    def observe(self, node: Node) -> Data:
        missing: list[str] = []
        for bind in BINDS:
            if bind.create:
                missing += [p for p in missing_dirs(node, bind.path) if p not in missing]
        return {"created": missing}

    def apply(self, node: Node, data: Data) -> str:
        for path in data["created"]:
            node.path(path).mkdir(mode=0o755, parents=True, exist_ok=True)
        return f"created {', '.join(data['created'])}" if data["created"] else "all there"

    def undo(self, node: Node, data: Data, *, purge: bool) -> str:
        said = []
        for path in reversed(data["created"]):
            here = node.path(path)
            if not here.exists():
                continue
            if path == STATE_DIR and not purge:
                said.append(f"{path} kept (--purge removes it)")
            elif path == STATE_DIR:
                remove_tree(here)
                said.append(f"{path} removed")
            elif any(here.iterdir()):
                said.append(f"{path} kept: not empty")
            else:
                here.rmdir()
                said.append(f"{path} removed")
        return "; ".join(said) or "nothing to remove"


class ConfigStep(Step):
    name = "config"

    def observe(self, node: Node) -> Data:
        return {"existed": node.path(CONFIG_FILE).exists()}

    def apply(self, node: Node, data: Data) -> str:
        target = node.path(CONFIG_FILE)
        wanted = kubelet_cgroup_driver(node)
        if data["existed"] or (target.exists() and "written" not in data):
            driver = config_of(node).cgroup_driver
            if driver != wanted:
                return (
                    f"{CONFIG_FILE} kept; WARNING: its cgroup_driver {driver!r} differs from "
                    f"kubelet's {wanted!r}"
                )
            return f"{CONFIG_FILE} kept"
        if target.exists():
            return f"{CONFIG_FILE} as written before"
        text = render_default_config(wanted).encode()
        write_atomic(target, text)
        data["written"] = file_digest(target)
        node.changed.add(self.name)
        return f"{CONFIG_FILE} written (cgroup_driver {wanted!r}, as kubelet)"

    def undo(self, node: Node, data: Data, *, purge: bool) -> str:
        target = node.path(CONFIG_FILE)
        if data.get("existed") or not target.exists():
            return "nothing to remove"
        if "written" in data and file_digest(target) != data["written"]:
            return f"{CONFIG_FILE} kept: changed since it was written"
        target.unlink()
        return f"{CONFIG_FILE} removed"


def _units(node: Node) -> dict[str, str]:
    """The unit files to install (host path -> text)."""
    if not node.from_rootfs:
        return {f"{UNIT_DIR}/{SERVICE_UNIT_NAME}": render_unit(node.shipped_unit, node.executable)}
    mount, umount = node.host_binary("mount"), node.host_binary("umount")
    return {
        f"{UNIT_DIR}/{ROOTFS_UNIT_NAME}": render_rootfs_unit(mount, umount, node.host_binary("rm")),
        f"{UNIT_DIR}/{SERVICE_UNIT_NAME}": render_service_unit(
            node.shipped_unit, node.executable, node.host_binary("chroot")
        ),
    }


class UnitsStep(Step):
    name = "units"

    def observe(self, node: Node) -> Data:
        units = _units(node)
        saved = [s for p in units if (s := save_original(node, p)) is not None]
        return {"files": list(units), "saved": saved}

    def apply(self, node: Node, data: Data) -> str:
        changed = []
        for path, text in _units(node).items():
            target = node.path(path)
            if not target.is_file() or target.read_bytes() != text.encode():
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, text.encode())
                changed.append(path)
        if not changed:
            return "up to date"
        node.changed.add(self.name)
        if f"{UNIT_DIR}/{ROOTFS_UNIT_NAME}" in changed:
            node.changed.add(ROOTFS_UNIT_NAME)
        node.host.systemctl("daemon-reload")
        return f"wrote {', '.join(changed)}; systemctl daemon-reload"

    def undo(self, node: Node, data: Data, *, purge: bool) -> str:
        for path in data["files"]:
            if path in data["saved"]:
                restore_original(node, path)
            else:
                remove_tree(node.path(path))
        node.host.systemctl("daemon-reload")
        restored = f" (restored {', '.join(data['saved'])})" if data["saved"] else ""
        return f"removed {', '.join(data['files'])}{restored}; systemctl daemon-reload"


class ServiceStep(Step):
    name = "service"

    def observe(self, node: Node) -> Data:
        # How it runs is recorded: an uninstall by hand (--host-root /) cannot tell.
        return {"was_active": node.host.unit_active(SERVICE_UNIT_NAME), "rootfs": node.from_rootfs}

    def apply(self, node: Node, data: Data) -> str:
        node.host.systemctl("enable", SERVICE_UNIT_NAME)
        if node.from_rootfs and ROOTFS_UNIT_NAME in node.changed:
            node.host.systemctl("restart", ROOTFS_UNIT_NAME)
        if node.changed or not node.host.unit_active(SERVICE_UNIT_NAME):
            node.host.systemctl("restart", SERVICE_UNIT_NAME)
            return f"enabled and (re)started {SERVICE_UNIT_NAME}"
        return f"{SERVICE_UNIT_NAME} enabled and running"

    def undo(self, node: Node, data: Data, *, purge: bool) -> str:
        rootfs = data.get("rootfs", node.from_rootfs)
        if data.get("was_active"):
            # It ran from the unit install replaced: stopped here, that unit is put back
            # next; starting it again is the operator's call.
            node.host.systemctl("stop", SERVICE_UNIT_NAME)
            if rootfs:
                node.host.systemctl("stop", ROOTFS_UNIT_NAME)
            return f"stopped {SERVICE_UNIT_NAME}; it ran before the install: start it again"
        node.host.systemctl("disable", "--now", SERVICE_UNIT_NAME)
        if rootfs:
            node.host.systemctl("stop", ROOTFS_UNIT_NAME)
            return f"stopped and disabled {SERVICE_UNIT_NAME}, stopped {ROOTFS_UNIT_NAME}"
        return f"stopped and disabled {SERVICE_UNIT_NAME}"


class ReadyStep(Step):
    name = "ready"

    def apply(self, node: Node, data: Data) -> str:
        socket = crishim_socket(node)
        version = node.host.wait_cri(node.path(socket), CRI_TIMEOUT)
        return f"{version} answers on {socket}"


def preflight(node: Node) -> None:
    """Fail before any change on a host the install cannot finish on: no kubelet config
    to edit, an endpoint set where it cannot be edited, a host program the units run
    missing (``mount``, ``umount`` and ``rm`` for the binds, ``chroot`` for crishim)."""
    kubelet_setup(node)
    kubelet_cgroup_driver(node)
    if node.from_rootfs:
        for program in ("mount", "umount", "rm", "chroot"):
            node.host_binary(program)


STEPS: tuple[Step, ...] = (
    RootfsStep(),
    DirectoriesStep(),
    ConfigStep(),
    UnitsStep(),
    ServiceStep(),
    ReadyStep(),
    KubeletStep(),
)
