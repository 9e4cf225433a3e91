"""Version, Status and RuntimeConfig: what crishim says about itself."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from crishim import __version__
from crishim.config import Config
from crishim.model import HandlerFeatures, RuntimeCondition, RuntimeStatus
from crishim.model.runtime import NETWORK_READY, RUNTIME_READY
from crishim.network.cni import choose_network, missing_plugins
from crishim.network.default_network import default_network
from crishim.runtime.binaries import probe_binary, resolve_binary
from crishim.runtime.idmap import idmapped_mounts_supported

log = logging.getLogger(__name__)

RUNTIME_NAME = "crishim"
# NetworkReady's reason while pods join the built-in network (true, but worth a look).
DEFAULT_NETWORK_REASON = "DefaultNetworkInUse"
RUNTIME_API_VERSION = "v1"


@dataclass(frozen=True)
class VersionInfo:
    """The runtime's name and versions, as Version reports them."""

    runtime_name: str
    runtime_version: str
    runtime_api_version: str


class RuntimeInfo:
    """Answers the runtime's self-description calls from the configuration and the host."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._userns_problem = "not probed yet"

    async def probe_user_namespaces(self, snapshots: Path) -> None:
        """Find out whether pods can have user namespaces of their own here: crishim makes
        ID-mapped mounts of the image layers under ``snapshots`` and of volumes itself, and
        runc (>= 1.1) and crun (>= 1.8) both join a user namespace given by path, so this
        holds for every handler alike."""
        self._userns_problem = await idmapped_mounts_supported(snapshots)
        if self._userns_problem:
            log.warning("pods cannot have user namespaces here: %s", self._userns_problem)

    def userns_support(self, handler: str) -> str:
        """Why ``handler`` cannot run pods in user namespaces of their own ("" = it can)."""
        return self._userns_problem

    def version(self) -> VersionInfo:
        """crishim's name, its version and the CRI version it serves."""
        return VersionInfo(RUNTIME_NAME, __version__, RUNTIME_API_VERSION)

    def cgroup_driver(self) -> str:
        """The cgroup driver kubelet must match: "cgroupfs" or "systemd"."""
        return self._config.cgroup_driver

    def runtime_condition(self) -> RuntimeCondition:
        """RuntimeReady: the default runtime and conmon are present."""
        default = self._config.default_runtime
        missing = [
            f"runtime {default!r} ({path})"
            for path in [self._config.runtimes[default].path]
            if resolve_binary(path) is None
        ]
        conmon = self._config.conmon
        if resolve_binary(conmon) is None:
            missing.append(f"container monitor ({conmon})")
        if missing:
            return RuntimeCondition(
                type=RUNTIME_READY,
                status=False,
                reason="RuntimeBinaryNotFound",
                message="not found on this host: " + ", ".join(missing),
            )
        return RuntimeCondition(type=RUNTIME_READY, status=True)

    def network_condition(self) -> RuntimeCondition:
        """NetworkReady: a valid CNI config exists (or the built-in default serves while the
        conf dir holds none) and its plugins are installed."""
        cni = self._config.cni
        default = default_network(self._config)
        search = choose_network(cni.conf_dir, default)
        if search.config is None:
            return RuntimeCondition(
                type=NETWORK_READY,
                status=False,
                reason="NetworkPluginNotReady",
                message=search.reason(cni.conf_dir),
            )
        missing = missing_plugins(search.config, cni.bin_dirs)
        if missing:
            return RuntimeCondition(
                type=NETWORK_READY,
                status=False,
                reason="NetworkPluginNotReady",
                message=(
                    f"CNI plugin(s) {', '.join(missing)} of {search.config.source} not found in "
                    + ", ".join(cni.bin_dirs)
                ),
            )
        if search.config.path is None and default is not None:
            return RuntimeCondition(
                type=NETWORK_READY,
                status=True,
                reason=DEFAULT_NETWORK_REASON,
                message=(
                    f"no CNI network config in {cni.conf_dir}: new pods join "
                    f"{default.describe()} until a network plugin writes one"
                ),
            )
        return RuntimeCondition(type=NETWORK_READY, status=True)

    async def status(self, verbose: bool) -> RuntimeStatus:
        """Both conditions, the runtime handlers and, if verbose, debug info."""
        # runc >= 1.1 and crun >= 1.8 apply "rro" with mount_setattr (Linux >= 5.12).
        userns = not self._userns_problem
        handlers = [
            HandlerFeatures(name=name, recursive_read_only_mounts=True, user_namespaces=userns)
            for name in ["", *self._config.runtimes]
        ]
        info = await self._verbose_info() if verbose else {}
        return RuntimeStatus(
            conditions=[self.runtime_condition(), self.network_condition()],
            handlers=handlers,
            supplemental_groups_policy=True,
            info=info,
        )

    async def _verbose_info(self) -> dict[str, str]:
        config = self._config
        search = choose_network(config.cni.conf_dir, default_network(config))
        cni: dict[str, object] = {"confDir": config.cni.conf_dir, "binDirs": config.cni.bin_dirs}
        if search.config is not None:
            cni |= {
                "config": search.config.source,
                "network": search.config.name,
                "plugins": list(search.config.plugin_types),
            }
            if search.config.builtin is not None:
                cni["conflist"] = search.config.builtin
        if search.problems:
            cni["problems"] = search.problems
        binaries = {}
        for name, handler in config.runtimes.items():
            binaries[name] = await probe_binary(handler.path)
        binaries["conmon"] = await probe_binary(config.conmon)
        versions = {
            name: {"path": b.path, "version": b.version, "error": b.error}
            for name, b in binaries.items()
        }
        return {
            "config": config.model_dump_json(),
            "cni": json.dumps(cni),
            "binaries": json.dumps(versions),
        }
