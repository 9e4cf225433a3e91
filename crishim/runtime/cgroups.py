"""How cgroups are laid out on this host: v1, v2 (unified) or hybrid.

Hybrid hosts mount v1 controllers under /sys/fs/cgroup and a v2 hierarchy at
/sys/fs/cgroup/unified. crun refuses such a host while a controller it needs (hugetlb) is
bound to v2 only; binding hugetlb to a v1 hierarchy first makes it work.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import anyio.to_thread

from crishim.errors import Internal, NotFound

CGROUP_V2_MAGIC_TYPE = "cgroup2"
# Options of a v1 cgroup mount that are not controller names ("name=..." are skipped too).
_V1_MOUNT_OPTIONS = frozenset(
    {"rw", "ro", "nosuid", "nodev", "noexec", "relatime", "noatime", "xattr", "clone_children"}
)


class CgroupMode(StrEnum):
    """The three ways a Linux host can mount cgroups."""

    V1 = "v1"
    V2 = "v2"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class CgroupLayout:
    """Which hierarchies exist and which controllers each one holds."""

    mode: CgroupMode
    v1_controllers: frozenset[str] = field(default_factory=frozenset)
    v2_controllers: frozenset[str] = field(default_factory=frozenset)
    v2_mount: str = ""

    @property
    def hugetlb_only_on_v2(self) -> bool:
        """True on a hybrid host where hugetlb is not bound to any v1 hierarchy.

        crun fails there; ``mount -t cgroup -o hugetlb none <dir>`` fixes it.
        """
        return self.mode is CgroupMode.HYBRID and "hugetlb" not in self.v1_controllers


def parse_mounts(mounts: str) -> CgroupLayout:
    """Classify the layout from /proc/self/mounts text (pure, for tests)."""
    v1: set[str] = set()
    v2_mount = ""
    fs_root_is_v2 = False
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        _, mountpoint, fstype, options = parts[:4]
        if fstype == CGROUP_V2_MAGIC_TYPE:
            v2_mount = v2_mount or mountpoint
            fs_root_is_v2 = fs_root_is_v2 or mountpoint == "/sys/fs/cgroup"
        elif fstype == "cgroup":
            v1.update(o for o in options.split(",") if "=" not in o and o not in _V1_MOUNT_OPTIONS)
    if fs_root_is_v2 and not v1:
        mode = CgroupMode.V2
    elif v2_mount:
        mode = CgroupMode.HYBRID if v1 else CgroupMode.V2
    else:
        mode = CgroupMode.V1
    return CgroupLayout(mode=mode, v1_controllers=frozenset(v1), v2_mount=v2_mount)


def detect_layout(proc_mounts: Path = Path("/proc/self/mounts")) -> CgroupLayout:
    """The layout of this host, with the v2 hierarchy's available controllers."""
    layout = parse_mounts(proc_mounts.read_text())
    if not layout.v2_mount:
        return layout
    try:
        text = (Path(layout.v2_mount) / "cgroup.controllers").read_text()
    except OSError:
        text = ""
    return CgroupLayout(
        mode=layout.mode,
        v1_controllers=layout.v1_controllers,
        v2_controllers=frozenset(text.split()),
        v2_mount=layout.v2_mount,
    )


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise Internal(f"writing {value!r} to {path}: {exc.strerror}") from exc


def _apply(
    parent: str, cpu_shares: int, cpu_quota: int, cpu_period: int, memory_limit: int
) -> None:
    layout = detect_layout()
    relative = parent.strip("/")
    v1 = Path("/sys/fs/cgroup")
    if layout.mode is CgroupMode.V2 or "memory" not in layout.v1_controllers:
        group = Path(layout.v2_mount) / relative
        if not group.is_dir():
            raise NotFound(f"pod cgroup {group} does not exist")
        if cpu_shares:
            # The v2 weight that v1 shares map to (the mapping runc and crun use).
            _write(group / "cpu.weight", str(1 + ((cpu_shares - 2) * 9999) // 262142))
        if cpu_quota or cpu_period:
            quota = str(cpu_quota) if cpu_quota > 0 else "max"
            _write(group / "cpu.max", f"{quota} {cpu_period or 100000}")
        if memory_limit:
            _write(group / "memory.max", str(memory_limit))
        return
    for controller, files in (
        (
            "cpu",
            {
                "cpu.shares": cpu_shares,
                "cpu.cfs_period_us": cpu_period,
                "cpu.cfs_quota_us": cpu_quota,
            },
        ),
        ("memory", {"memory.limit_in_bytes": memory_limit}),
    ):
        group = v1 / controller / relative
        wanted = {name: value for name, value in files.items() if value}
        if not wanted:
            continue
        if not group.is_dir():
            raise NotFound(f"pod cgroup {group} does not exist")
        for name, value in wanted.items():
            _write(group / name, str(value))


async def apply_cgroup_resources(
    parent: str, *, cpu_shares: int, cpu_quota: int, cpu_period: int, memory_limit: int
) -> None:
    """Set CPU and memory limits on an existing cgroup (v1 or v2); 0 leaves a value alone."""
    await anyio.to_thread.run_sync(_apply, parent, cpu_shares, cpu_quota, cpu_period, memory_limit)


def _cgroup_mounts(proc_mounts: Path = Path("/proc/self/mounts")) -> list[Path]:
    found = []
    for line in proc_mounts.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] in ("cgroup", CGROUP_V2_MAGIC_TYPE):
            found.append(Path(parts[1]))
    return found


def _remove_group(directory: Path) -> None:
    for _ in range(50):
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise Internal(f"removing cgroup {directory}: {exc.strerror}") from None
        # Processes are still inside (a runtime killed half-way through a create left them
        # where no runtime knows them): the container is gone, so they go too.
        try:
            pids = (directory / "cgroup.procs").read_text().split()
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.02)
    raise Internal(f"removing cgroup {directory}: still busy")


def _remove_cgroup(cgroups_path: str) -> None:
    relative = cgroups_path.strip("/")
    for mount in _cgroup_mounts():
        _remove_group(mount / relative)


async def remove_cgroup(cgroups_path: str) -> None:
    """Remove a container's cgroup (``/parent/crishim-<id>``) from every hierarchy, killing
    what is left inside; a missing one is fine. The runtime's delete does this for the
    containers it knows; this is for those it never finished creating."""
    if not cgroups_path.startswith("/"):
        return  # a systemd unit (slice:prefix:name): systemd removes it with the unit
    await anyio.to_thread.run_sync(_remove_cgroup, cgroups_path)
