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
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from crishim.config import Config, load_config
from crishim.errors import ConfigError, CrishimError, FailedPrecondition
from crishim.node import kubelet
from crishim.node.files import (
    file_digest,
    mount_points,
    release_stale_mounts,
    remove_tree,
    sync_tree,
    write_atomic,
)
from crishim.node.host import HostSystem
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
    host_path,
    render_default_config,
    render_rootfs_unit,
    render_service_unit,
)
from crishim.node.unit import render_unit

__all__ = ["STEPS", "Node", "Step", "preflight"]

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


def _save_original(node: Node, host_absolute: str) -> str | None:
    """Keep a copy of a host file about to be replaced; its host path, None if none."""
    original = node.path(host_absolute)
    if not original.is_file():
        return None
    copy = node.saved(host_absolute)
    copy.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(copy, original.read_bytes(), stat.S_IMODE(original.stat().st_mode))
    return host_absolute


def _restore_original(node: Node, host_absolute: str) -> None:
    copy = node.saved(host_absolute)
    target = node.path(host_absolute)
    write_atomic(target, copy.read_bytes(), stat.S_IMODE(copy.stat().st_mode))
    copy.unlink()


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
            driver = _config_of(node).cgroup_driver
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


def _config_of(node: Node) -> Any:
    try:
        return load_config(node.path(CONFIG_FILE))
    except ConfigError as exc:
        raise FailedPrecondition(f"crishim's config on the host: {exc}") from exc


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
        saved = [s for p in units if (s := _save_original(node, p)) is not None]
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
                _restore_original(node, path)
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


def crishim_socket(node: Node) -> str:
    """crishim's socket, a host path (the rootfs binds /run at /run); the default one
    while the host has no crishim.toml yet."""
    if not node.path(CONFIG_FILE).exists():
        return str(Config().socket)
    return str(_config_of(node).socket)


class ReadyStep(Step):
    name = "ready"

    def apply(self, node: Node, data: Data) -> str:
        socket = crishim_socket(node)
        version = node.host.wait_cri(node.path(socket), CRI_TIMEOUT)
        return f"{version} answers on {socket}"


@dataclass(frozen=True)
class KubeletSetup:
    """How this node tells kubelet its runtime."""

    #: "flags" (kubeadm's flags file) or "config" (kubelet's config file)
    form: str
    path: str
    config: str | None


def kubelet_setup(node: Node) -> KubeletSetup:
    """Find where kubelet takes its runtime endpoint from on this node."""
    args = node.host.kubelet_args() or []
    config = kubelet.flag_value(args, "--config")
    if config is None and node.path(kubelet.DEFAULT_CONFIG).is_file():
        config = kubelet.DEFAULT_CONFIG
    flags_file = node.path(kubelet.FLAGS_FILE)
    flags = kubelet.flags_of(flags_file.read_text()) if flags_file.is_file() else []
    if kubelet.flag_value(flags, kubelet.FLAGS[0]) is not None:
        return KubeletSetup("flags", kubelet.FLAGS_FILE, config)
    if kubelet.flag_value(args, kubelet.FLAGS[0]) is not None:
        raise FailedPrecondition(
            "kubelet has --container-runtime-endpoint on its command line, set outside "
            f"{kubelet.FLAGS_FILE}; move it to kubelet's config file (containerRuntimeEndpoint) "
            "and install again"
        )
    if config is not None and node.path(config).is_file():
        return KubeletSetup("config", config, config)
    where = f"--config {config}" if config else f"{kubelet.DEFAULT_CONFIG} or {kubelet.FLAGS_FILE}"
    raise FailedPrecondition(f"kubelet's config not found ({where}): is this a kubelet node?")


def _kubelet_value(node: Node, config_key: str, flag: str) -> str | None:
    flags_file = node.path(kubelet.FLAGS_FILE)
    flags = kubelet.flags_of(flags_file.read_text()) if flags_file.is_file() else []
    value = kubelet.flag_value(node.host.kubelet_args() or [], flag)
    value = kubelet.flag_value(flags, flag) or value
    if value is not None:
        return value
    setup = kubelet_setup(node)
    if setup.config is not None and node.path(setup.config).is_file():
        return kubelet.config_value(node.path(setup.config).read_text(), config_key)
    return None


def kubelet_cgroup_driver(node: Node) -> str:
    """kubelet's cgroup driver (its default, cgroupfs, when it sets none)."""
    driver = _kubelet_value(node, "cgroupDriver", "--cgroup-driver") or "cgroupfs"
    if driver not in ("cgroupfs", "systemd"):
        raise FailedPrecondition(
            f"kubelet's cgroupDriver {driver!r} is neither cgroupfs nor systemd"
        )
    return driver


def _kubelet_port(node: Node) -> int:
    """kubelet's healthz port; 0 when it serves none."""
    port = _kubelet_value(node, "healthzPort", "--healthz-port")
    return int(port) if port and port.isdigit() else 10248


def kubelet_on_crishim(node: Node) -> bool:
    """Whether kubelet's runtime endpoint is crishim's socket already."""
    setup = kubelet_setup(node)
    text = node.path(setup.path).read_text()
    return _endpoints_before(setup, text)[_runtime_key(setup)] == f"unix://{crishim_socket(node)}"


def _endpoint_socket(endpoint: str | None) -> str:
    """The socket path of a CRI endpoint (kubelet's default: containerd's)."""
    value = endpoint or DEFAULT_RUNTIME_ENDPOINT
    return value.removeprefix("unix://")


def _remove_pods(node: Node, endpoint: str | None) -> str:
    """Every pod of the runtime kubelet leaves, stopped and removed: kubelet starts them
    anew on the other one, and they would run twice (ports, IPs, volumes) otherwise."""
    socket = _endpoint_socket(endpoint)
    try:
        count = node.host.remove_pods(node.path(socket), POD_TIMEOUT)
    except CrishimError as exc:
        return f"WARNING: its pods on {socket} not removed: {exc}"
    return f"removed its {count} pod(s) on {socket}"


def _switch_kubelet(node: Node, leaving: str | None, change: Callable[[], None]) -> str:
    """kubelet stopped, the pods of the runtime it leaves removed, ``change`` made,
    kubelet started again (also when the change fails)."""
    node.host.systemctl("stop", "kubelet.service")
    try:
        removed = _remove_pods(node, leaving)
        change()
    except BaseException:
        node.host.systemctl("restart", "kubelet.service")
        raise
    return f"kubelet stopped, {removed}, {_restart_kubelet(node)}"


def _restart_kubelet(node: Node) -> str:
    node.host.systemctl("restart", "kubelet.service")
    port = _kubelet_port(node)
    if port == 0:
        return "restarted (it serves no healthz to wait for)"
    node.host.wait_kubelet(port, KUBELET_TIMEOUT)
    return "restarted, healthy"


def _edit(setup: KubeletSetup, text: str, changes: dict[str, str | None]) -> str:
    if setup.form == "flags":
        return kubelet.edit_flags(text, changes)
    return kubelet.edit_config(text, changes)


def _endpoints_before(setup: KubeletSetup, text: str) -> dict[str, str | None]:
    if setup.form == "flags":
        flags = kubelet.flags_of(text)
        return {f: kubelet.flag_value(flags, f) for f in kubelet.FLAGS}
    return {k: kubelet.config_value(text, k) for k in kubelet.CONFIG_KEYS}


def _runtime_key(setup: KubeletSetup) -> str:
    return kubelet.FLAGS[0] if setup.form == "flags" else kubelet.CONFIG_KEYS[0]


class KubeletStep(Step):
    name = "kubelet"

    def observe(self, node: Node) -> Data:
        setup = kubelet_setup(node)
        text = node.path(setup.path).read_text()
        try:
            before = _endpoints_before(setup, text)
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"{setup.path}: {exc}") from exc
        _save_original(node, setup.path)
        return {"form": setup.form, "path": setup.path, "config": setup.config, "before": before}

    def apply(self, node: Node, data: Data) -> str:
        setup = KubeletSetup(data["form"], data["path"], data["config"])
        target = node.path(setup.path)
        text = target.read_text()
        endpoint = f"unix://{crishim_socket(node)}"
        # The image endpoint only where the node sets one; else kubelet uses the runtime's.
        changes: dict[str, str | None] = {
            k: endpoint for k, v in data["before"].items() if v is not None
        }
        changes[_runtime_key(setup)] = endpoint
        try:
            edited = _edit(setup, text, changes)
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"{setup.path}: {exc}") from exc
        if edited == text:
            return f"kubelet already uses {endpoint} ({setup.path})"

        def switch() -> None:
            write_atomic(target, edited.encode(), stat.S_IMODE(target.stat().st_mode))
            data["written"] = file_digest(target)

        switched = _switch_kubelet(node, data["before"][_runtime_key(setup)], switch)
        return f"kubelet now uses {endpoint} ({setup.path}); {switched}"

    def undo(self, node: Node, data: Data, *, purge: bool) -> str:
        setup = KubeletSetup(data["form"], data["path"], data["config"])
        target = node.path(setup.path)
        saved = node.saved(setup.path)
        if data.get("written") is None:
            saved.unlink(missing_ok=True)
            return "kubelet not changed"
        said = []

        def switch_back() -> None:
            if file_digest(target) == data.get("written") or not target.exists():
                _restore_original(node, setup.path)
                said.append(f"{setup.path} restored")
            else:
                # Changed since: put back only the endpoints, keep the rest of the change.
                edited = _edit(setup, target.read_text(), data["before"])
                write_atomic(target, edited.encode(), stat.S_IMODE(target.stat().st_mode))
                saved.unlink(missing_ok=True)
                said.append(f"{setup.path} changed since install: only its endpoints put back")

        switched = _switch_kubelet(node, f"unix://{crishim_socket(node)}", switch_back)
        return f"{said[0]}; {switched}"


def preflight(node: Node) -> None:
    """Fail before any change on a host the install cannot finish on: no kubelet config
    to edit, an endpoint set where it cannot be edited, no ``mount`` for the binds."""
    kubelet_setup(node)
    kubelet_cgroup_driver(node)
    if node.from_rootfs:
        node.host_binary("mount")
        node.host_binary("umount")


STEPS: tuple[Step, ...] = (
    RootfsStep(),
    DirectoriesStep(),
    ConfigStep(),
    UnitsStep(),
    ServiceStep(),
    ReadyStep(),
    KubeletStep(),
)
