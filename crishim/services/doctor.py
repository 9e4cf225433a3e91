"""``crishim doctor``: checks that this host can run pods with the configuration given.

Each check yields one line with a level: OK, WARN (works, but something is missing or
degraded) or FAIL (crishim cannot do its job). The command exits non-zero on any FAIL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from crishim.config import Config
from crishim.errors import CrishimError
from crishim.images.snapshots.overlay import overlay_supported, probe_overlay_mount
from crishim.network.cni import choose_network, find_plugin
from crishim.network.default_network import default_network
from crishim.runtime.binaries import probe_binary
from crishim.runtime.cgroups import CgroupMode, detect_layout
from crishim.runtime.systemd_dbus import SystemdManager
from crishim.util.sockets import unix_socket_answers

# Plugins a default bridge network needs; checked when no config names its own.
STANDARD_CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")


class Level(StrEnum):
    """How bad a finding is."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    """The result of one check."""

    level: Level
    subject: str
    detail: str

    def line(self) -> str:
        """The finding as the command prints it."""
        return f"{self.level.value:<4}  {self.subject}: {self.detail}"


async def _runtimes(config: Config) -> list[Finding]:
    findings = []
    for name, handler in config.runtimes.items():
        info = await probe_binary(handler.path)
        subject = f"runtime {name}"
        if info.found and not info.error:
            findings.append(Finding(Level.OK, subject, f"{info.path}, {info.version}"))
        else:
            level = Level.FAIL if name == config.default_runtime else Level.WARN
            note = " (the default runtime)" if level is Level.FAIL else ""
            findings.append(Finding(level, subject, info.error + note))
    catatonit = await probe_binary("catatonit")
    if catatonit.found:
        findings.append(Finding(Level.OK, "catatonit", f"{catatonit.path}"))
    else:
        findings.append(
            Finding(
                Level.WARN,
                "catatonit",
                "not found; pods sharing one PID namespace cannot run (apt: catatonit)",
            )
        )
    conmon = await probe_binary(config.conmon)
    if conmon.found and not conmon.error:
        findings.append(Finding(Level.OK, "conmon", f"{conmon.path}, {conmon.version}"))
    else:
        findings.append(
            Finding(Level.FAIL, "conmon", f"{conmon.error}; containers need it (apt: conmon)")
        )
    return findings


def _cgroups(config: Config) -> Finding:
    layout = detect_layout()
    if layout.mode is CgroupMode.V2:
        return Finding(Level.OK, "cgroups", f"v2 (unified) at {layout.v2_mount}")
    if layout.mode is CgroupMode.V1:
        return Finding(Level.OK, "cgroups", "v1")
    detail = (
        f"hybrid: v1 controllers ({', '.join(sorted(layout.v1_controllers))}) and v2 at "
        f"{layout.v2_mount}"
    )
    uses_crun = any(Path(h.path).name == "crun" for h in config.runtimes.values())
    if uses_crun and layout.hugetlb_only_on_v2:
        return Finding(
            Level.WARN,
            "cgroups",
            f"{detail}; crun refuses this while hugetlb is bound to v2 only: run "
            "'mkdir -p /sys/fs/cgroup/hugetlb && "
            "mount -t cgroup -o hugetlb none /sys/fs/cgroup/hugetlb'",
        )
    return Finding(Level.OK, "cgroups", f"{detail}; runc and crun both work")


async def _cgroup_driver(config: Config) -> Finding:
    subject = f"cgroup driver {config.cgroup_driver}"
    if config.cgroup_driver != "systemd":
        return Finding(Level.OK, subject, "cgroups as directories; kubelet's must be cgroupfs")
    manager = SystemdManager()
    try:
        via = await manager.ping()
    except CrishimError as exc:
        return Finding(Level.FAIL, subject, f"{exc}; pods need systemd to make their scopes")
    finally:
        await manager.close()
    return Finding(Level.OK, subject, f"systemd answers on its {via}; kubelet's must be systemd")


async def _overlay(config: Config) -> Finding:
    if not overlay_supported():
        return Finding(
            Level.WARN, "overlayfs", "not in /proc/filesystems; the copying snapshotter is used"
        )
    if os.geteuid() != 0:
        return Finding(Level.OK, "overlayfs", "supported by the kernel (mount not tried: not root)")
    error = await probe_overlay_mount(Path(config.root))
    if error:
        return Finding(
            Level.WARN,
            "overlayfs",
            f"mount under {config.root} failed ({error}); the copying snapshotter is used",
        )
    return Finding(Level.OK, "overlayfs", f"mounts under {config.root}")


def _cni(config: Config) -> list[Finding]:
    cni = config.cni
    default = default_network(config)
    search = choose_network(cni.conf_dir, default)
    findings = []
    if search.config is None:
        disabled = (
            " (the built-in default network is off: [cni.default_network] enabled = false)"
            if default is None and not search.problems
            else ""
        )
        findings.append(
            Finding(
                Level.WARN,
                "cni config",
                search.reason(cni.conf_dir) + disabled + "; NetworkReady "
                "stays false and only host-network pods can run",
            )
        )
        wanted: tuple[str, ...] = STANDARD_CNI_PLUGINS
    elif search.config.path is None and default is not None:
        findings.append(
            Finding(
                Level.OK,
                "cni config",
                f"none in {cni.conf_dir}: new pods join {default.describe()} "
                "until a network plugin writes its config there",
            )
        )
        wanted = search.config.required_plugins
    else:
        cfg = search.config
        findings.append(
            Finding(
                Level.OK,
                "cni config",
                f"{cfg.source}: network {cfg.name!r}, plugins {', '.join(cfg.plugin_types)}",
            )
        )
        wanted = cfg.required_plugins
    found = {t: find_plugin(cni.bin_dirs, t) for t in wanted}
    missing = [t for t, path in found.items() if path is None]
    if missing:
        # Only a config from the conf dir makes missing plugins fatal: a fresh node may get
        # its plugins with its network plugin.
        level = Level.WARN if search.config is None or search.config.path is None else Level.FAIL
        findings.append(
            Finding(
                level, "cni plugins", f"{', '.join(missing)} not found in {', '.join(cni.bin_dirs)}"
            )
        )
    else:
        dirs = sorted({os.path.dirname(p) for p in found.values() if p})
        findings.append(
            Finding(Level.OK, "cni plugins", f"{', '.join(wanted)} in {', '.join(dirs)}")
        )
    return findings


async def _socket(config: Config) -> Finding:
    path = Path(config.socket)
    if path.exists() and await unix_socket_answers(path):
        return Finding(Level.OK, "socket", f"{path}: a CRI server is answering on it")
    directory = path.parent
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return Finding(Level.FAIL, "socket", f"cannot create {path}: {existing} is not writable")
    if path.exists():
        return Finding(
            Level.WARN, "socket", f"{path} exists but nobody answers (stale); serve will replace it"
        )
    return Finding(Level.OK, "socket", f"{path} can be created")


async def run_checks(config: Config) -> list[Finding]:
    """Every check, in the order they are printed."""
    findings = await _runtimes(config)
    findings.append(_cgroups(config))
    findings.append(await _cgroup_driver(config))
    findings.append(await _overlay(config))
    findings.extend(_cni(config))
    findings.append(await _socket(config))
    return findings
