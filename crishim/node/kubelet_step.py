"""The install's last step: kubelet pointed at crishim's socket (and back), through
kubeadm's flags file or kubelet's config file, whichever the node uses; the pods of the
runtime kubelet leaves are removed on the way."""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass

from crishim.errors import CrishimError, FailedPrecondition
from crishim.node import kubelet
from crishim.node.base import (
    DEFAULT_RUNTIME_ENDPOINT,
    KUBELET_TIMEOUT,
    POD_TIMEOUT,
    Data,
    Node,
    Step,
    crishim_socket,
    restore_original,
    save_original,
)
from crishim.node.files import file_digest, write_atomic

__all__ = ["KubeletStep", "kubelet_cgroup_driver", "kubelet_on_crishim", "kubelet_setup"]


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
        save_original(node, setup.path)
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
                restore_original(node, setup.path)
                said.append(f"{setup.path} restored")
            else:
                # Changed since: put back only the endpoints, keep the rest of the change.
                edited = _edit(setup, target.read_text(), data["before"])
                write_atomic(target, edited.encode(), stat.S_IMODE(target.stat().st_mode))
                saved.unlink(missing_ok=True)
                said.append(f"{setup.path} changed since install: only its endpoints put back")

        switched = _switch_kubelet(node, f"unix://{crishim_socket(node)}", switch_back)
        return f"{said[0]}; {switched}"
