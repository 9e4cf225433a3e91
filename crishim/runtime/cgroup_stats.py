"""Resource usage of cgroups (v1, v2 or hybrid) and of directories, for the CRI stats calls.

Where a cgroup lives: ``/proc/<pid>/cgroup`` names the cgroup of a process in each
hierarchy (``id:controllers:path`` for v1, ``0::path`` for v2), ``/proc/self/mountinfo``
tells where each hierarchy is mounted. Both are parameters so tests can point at fake trees.

What is read, per metric the v1 controller when it is mounted (on a hybrid host the v1
controllers hold the accounting) and otherwise the v2 files:

- cpu: ``cpuacct.usage`` (ns) | ``cpu.stat`` usage_usec;
- memory: ``memory.usage_in_bytes`` | ``memory.current``, ``memory.stat`` (inactive file
  pages, rss, page faults), the limit, and swap (``memsw`` minus memory | ``memory.swap.*``);
- pids: ``pids.current``; hugetlb: ``hugetlb.<size>.usage_in_bytes`` | ``.current``.

Every file may be missing (a controller not mounted, a cgroup gone meanwhile): that field is
None then, never an error.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CgroupMounts",
    "CgroupPaths",
    "CgroupSample",
    "HierarchyMount",
    "cgroup_for_path",
    "combine",
    "find_cgroup",
    "read_stats",
]

# The v1 controllers whose files are read here.
_CONTROLLERS = frozenset({"cpu", "cpuacct", "memory", "pids", "hugetlb"})
# A v1 limit at or above this is "no limit" (the kernel reports PAGE_COUNTER_MAX pages).
_UNLIMITED = 1 << 62
_HUGETLB_FILE = re.compile(r"hugetlb\.([^.]+)\.(usage_in_bytes|current)")
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class HierarchyMount:
    """One mounted cgroup hierarchy: where, and which of its cgroups is the mount's root."""

    mountpoint: Path
    root: str


@dataclass(frozen=True)
class CgroupMounts:
    """Where the cgroup hierarchies are mounted: v1 per controller, and the v2 one."""

    v1: Mapping[str, HierarchyMount] = field(default_factory=dict)
    v2: HierarchyMount | None = None

    @classmethod
    def parse(cls, mountinfo: str) -> CgroupMounts:
        """From ``/proc/self/mountinfo`` text; the first mount of each hierarchy wins."""
        v1: dict[str, HierarchyMount] = {}
        v2: HierarchyMount | None = None
        for line in mountinfo.splitlines():
            fields = line.split()
            if "-" not in fields[6:]:
                continue
            sep = fields.index("-", 6)
            if len(fields) < sep + 4:
                continue
            mount = HierarchyMount(Path(_unescape(fields[4])), _unescape(fields[3]))
            fstype, super_options = fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup2" and v2 is None:
                v2 = mount
            elif fstype == "cgroup":
                for controller in _CONTROLLERS.intersection(super_options):
                    v1.setdefault(controller, mount)
        return cls(v1=v1, v2=v2)

    @classmethod
    def read(cls, mountinfo: Path = Path("/proc/self/mountinfo")) -> CgroupMounts:
        """This process's view of the host's cgroup mounts."""
        return cls.parse(mountinfo.read_text())

    @classmethod
    def at(cls, root: Path, v1: Iterable[str] = (), v2: str | None = None) -> CgroupMounts:
        """Hierarchies mounted at ``root/<name>``: the named v1 controllers each under its
        own name, the v2 one under ``v2`` (a fake tree for tests, or a known layout)."""
        return cls(
            v1={c: HierarchyMount(root / c, "/") for c in v1},
            v2=None if v2 is None else HierarchyMount(root / v2, "/"),
        )

    def paths(self, v1: Mapping[str, str], v2: str | None) -> CgroupPaths:
        """The directories of a cgroup given its path in each hierarchy."""
        return CgroupPaths(
            v1={c: _join(self.v1[c], p) for c, p in v1.items() if c in self.v1},
            v2=None if v2 is None or self.v2 is None else _join(self.v2, v2),
        )


@dataclass(frozen=True)
class CgroupPaths:
    """The directories of one cgroup: per v1 controller, and in the v2 hierarchy."""

    v1: Mapping[str, Path] = field(default_factory=dict)
    v2: Path | None = None

    def exists(self) -> bool:
        """True when the cgroup has a directory in some hierarchy."""
        return any(d.is_dir() for d in self._dirs())

    def names(self) -> set[str]:
        """Every path component of the cgroup's directories (to recognise whose it is)."""
        return {part for d in self._dirs() for part in d.parts}

    def _dirs(self) -> list[Path]:
        return [*self.v1.values(), *([self.v2] if self.v2 is not None else [])]

    def directory_for(self, controller: str) -> tuple[Path | None, bool]:
        """The directory to read ``controller`` from and whether it is a v1 one."""
        v1 = self.v1.get(controller)
        if v1 is not None and v1.is_dir():
            return v1, True
        return self.v2, False


@dataclass(frozen=True)
class CgroupSample:
    """One reading of a cgroup's counters; None where the value is unknown (or unlimited,
    for the limits)."""

    timestamp: int  # nanoseconds since the epoch
    cpu_usage_core_nanoseconds: int | None = None
    memory_usage_bytes: int | None = None
    working_set_bytes: int | None = None  # usage minus inactive file pages, as kubelet says
    rss_bytes: int | None = None
    page_faults: int | None = None
    major_page_faults: int | None = None
    memory_limit_bytes: int | None = None
    swap_usage_bytes: int | None = None
    swap_limit_bytes: int | None = None
    pids_current: int | None = None
    hugetlb_usage_bytes: Mapping[str, int] = field(default_factory=dict)  # page size -> bytes

    @property
    def available_bytes(self) -> int | None:
        """Memory left before the limit: limit minus working set (None without a limit)."""
        if self.memory_limit_bytes is None or self.working_set_bytes is None:
            return None
        return max(self.memory_limit_bytes - self.working_set_bytes, 0)

    @property
    def swap_available_bytes(self) -> int | None:
        """Swap left before the swap limit (None without one)."""
        if self.swap_limit_bytes is None or self.swap_usage_bytes is None:
            return None
        return max(self.swap_limit_bytes - self.swap_usage_bytes, 0)


def find_cgroup(
    pid: int, *, mounts: CgroupMounts | None = None, proc: Path = Path("/proc")
) -> CgroupPaths:
    """The cgroup of process ``pid``, from ``/proc/<pid>/cgroup``.

    Raises ProcessLookupError when the process is gone.
    """
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(f"process {pid} is gone") from None
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2 = path
        else:
            v1.update((c, path) for c in controllers.split(",") if c in _CONTROLLERS)
    return (mounts or CgroupMounts.read()).paths(v1, v2)


def cgroup_for_path(cgroups_path: str, *, mounts: CgroupMounts | None = None) -> CgroupPaths:
    """The cgroup at a path below each hierarchy's root (``/kubepods/burstable/pod<uid>``,
    or a slice's nested directories as the cgroup driver names them), in every hierarchy."""
    path = "/" + cgroups_path.strip("/")
    mounts = mounts or CgroupMounts.read()
    return mounts.paths(dict.fromkeys(mounts.v1, path), path)


def read_stats(paths: CgroupPaths, *, clock: int | None = None) -> CgroupSample:
    """Read the cgroup's counters now (``clock``: the timestamp to record instead)."""
    timestamp = time.time_ns() if clock is None else clock
    memory = _read_memory(paths)
    pids_dir, _ = paths.directory_for("pids")
    return CgroupSample(
        timestamp=timestamp,
        cpu_usage_core_nanoseconds=_read_cpu(paths),
        memory_usage_bytes=memory.usage,
        working_set_bytes=memory.working_set,
        rss_bytes=memory.rss,
        page_faults=memory.faults,
        major_page_faults=memory.major_faults,
        memory_limit_bytes=memory.limit,
        swap_usage_bytes=memory.swap,
        swap_limit_bytes=memory.swap_limit,
        pids_current=_read_int(pids_dir, "pids.current"),
        hugetlb_usage_bytes=_read_hugetlb(paths),
    )


def combine(samples: Sequence[CgroupSample], *, clock: int | None = None) -> CgroupSample:
    """The sum of several cgroups' samples (a pod without a cgroup of its own).

    Counters add up over the samples that know them (nothing to add gives 0); a limit is
    known only when every sample has one.
    """
    timestamp = time.time_ns() if clock is None else clock
    hugetlb: dict[str, int] = {}
    for sample in samples:
        for size, used in sample.hugetlb_usage_bytes.items():
            hugetlb[size] = hugetlb.get(size, 0) + used

    def total(value: Callable[[CgroupSample], int | None]) -> int | None:
        known = [v for s in samples if (v := value(s)) is not None]
        return sum(known) if known or not samples else None

    def limit(value: Callable[[CgroupSample], int | None]) -> int | None:
        limits = [value(s) for s in samples]
        known = [v for v in limits if v is not None]
        return sum(known) if known and len(known) == len(limits) else None

    return CgroupSample(
        timestamp=timestamp,
        cpu_usage_core_nanoseconds=total(lambda s: s.cpu_usage_core_nanoseconds),
        memory_usage_bytes=total(lambda s: s.memory_usage_bytes),
        working_set_bytes=total(lambda s: s.working_set_bytes),
        rss_bytes=total(lambda s: s.rss_bytes),
        page_faults=total(lambda s: s.page_faults),
        major_page_faults=total(lambda s: s.major_page_faults),
        memory_limit_bytes=limit(lambda s: s.memory_limit_bytes),
        swap_usage_bytes=total(lambda s: s.swap_usage_bytes),
        swap_limit_bytes=limit(lambda s: s.swap_limit_bytes),
        pids_current=total(lambda s: s.pids_current),
        hugetlb_usage_bytes=hugetlb,
    )


# ---- readers ------------------------------------------------------------------------------


def _read_cpu(paths: CgroupPaths) -> int | None:
    directory, v1 = paths.directory_for("cpuacct")
    if v1:
        return _read_int(directory, "cpuacct.usage")
    usage_usec = _read_flat(directory, "cpu.stat").get("usage_usec")
    return None if usage_usec is None else usage_usec * 1000


@dataclass(frozen=True)
class _Memory:
    usage: int | None
    working_set: int | None
    rss: int | None
    faults: int | None
    major_faults: int | None
    limit: int | None
    swap: int | None
    swap_limit: int | None


def _read_memory(paths: CgroupPaths) -> _Memory:
    directory, v1 = paths.directory_for("memory")
    if v1:
        usage = _read_int(directory, "memory.usage_in_bytes")
        stats = _read_flat(directory, "memory.stat")
        limit = _limit(_read_int(directory, "memory.limit_in_bytes"))
        memsw_usage = _read_int(directory, "memory.memsw.usage_in_bytes")
        memsw_limit = _limit(_read_int(directory, "memory.memsw.limit_in_bytes"))
        return _Memory(
            usage=usage,
            working_set=_working_set(usage, stats.get("total_inactive_file")),
            rss=stats.get("total_rss"),
            faults=stats.get("total_pgfault"),
            major_faults=stats.get("total_pgmajfault"),
            limit=limit,
            swap=None if memsw_usage is None or usage is None else max(memsw_usage - usage, 0),
            swap_limit=None if memsw_limit is None or limit is None else memsw_limit - limit,
        )
    usage = _read_int(directory, "memory.current")
    stats = _read_flat(directory, "memory.stat")
    return _Memory(
        usage=usage,
        working_set=_working_set(usage, stats.get("inactive_file")),
        rss=stats.get("anon"),
        faults=stats.get("pgfault"),
        major_faults=stats.get("pgmajfault"),
        limit=_read_int(directory, "memory.max"),
        swap=_read_int(directory, "memory.swap.current"),
        swap_limit=_read_int(directory, "memory.swap.max"),
    )


def _working_set(usage: int | None, inactive_file: int | None) -> int | None:
    """kubelet's working set: usage minus inactive file pages, never below 0."""
    return None if usage is None else max(usage - (inactive_file or 0), 0)


def _read_hugetlb(paths: CgroupPaths) -> dict[str, int]:
    directory, _ = paths.directory_for("hugetlb")
    if directory is None:
        return {}
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    usage: dict[str, int] = {}
    for name in names:
        match = _HUGETLB_FILE.fullmatch(name)
        if match:
            value = _read_int(directory, name)
            if value is not None:
                usage[match[1]] = value
    return usage


def _limit(value: int | None) -> int | None:
    return None if value is None or value >= _UNLIMITED else value


def _read_text(directory: Path | None, name: str) -> str | None:
    if directory is None:
        return None
    try:
        return (directory / name).read_text()
    except OSError:
        return None


def _read_int(directory: Path | None, name: str) -> int | None:
    """A file holding one number; None when missing, unreadable or "max"."""
    text = _read_text(directory, name)
    try:
        return None if text is None else int(text.strip())
    except ValueError:
        return None


def _read_flat(directory: Path | None, name: str) -> dict[str, int]:
    """A flat-keyed file (``key value`` per line) such as memory.stat or cpu.stat."""
    values: dict[str, int] = {}
    for line in (_read_text(directory, name) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            values[parts[0]] = int(parts[1])
    return values


# ---- paths --------------------------------------------------------------------------------


def _join(mount: HierarchyMount, path: str) -> Path:
    """The directory of the cgroup ``path`` in a hierarchy mounted at ``mount``."""
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return mount.mountpoint.joinpath(*[p for p in path.split("/") if p])


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m[1], 8)), text)
