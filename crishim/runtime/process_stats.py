"""Resource use of crishim's own process, and counts of helper processes, read from /proc.

These feed the standard ``process_*`` metrics (resident memory, open file descriptors, CPU
seconds, start time) and ``crishim_conmon_processes``. Every reader takes the /proc root so
tests can point it at a fake tree; the defaults read the live system.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "COMM_LENGTH",
    "count_processes",
    "cpu_seconds",
    "open_fds",
    "resident_memory_bytes",
    "start_time_seconds",
]

PROC = Path("/proc")
# The kernel keeps a task's command name (comm) to 15 characters.
COMM_LENGTH = 15
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# Field numbers (1-based, as in proc(5)) of /proc/<pid>/stat.
_UTIME, _STIME, _STARTTIME = 14, 15, 22


def _stat_fields(proc: Path, pid: str) -> list[str]:
    """The fields of /proc/<pid>/stat, numbered from 1 as in proc(5): index 0 is the pid.

    The command name (field 2) may hold spaces and parentheses, so the fields after it are
    split from the last closing parenthesis.
    """
    text = (proc / pid / "stat").read_text()
    head, _, tail = text.rpartition(")")
    pid_field, _, comm = head.partition(" (")
    return [pid_field, comm, *tail.split()]


def resident_memory_bytes(proc: Path = PROC, pid: str = "self") -> int:
    """Resident set size of the process, in bytes (/proc/<pid>/statm, second field)."""
    pages = int((proc / pid / "statm").read_text().split()[1])
    return pages * _PAGE_SIZE


def open_fds(proc: Path = PROC, pid: str = "self") -> int:
    """How many file descriptors the process has open (entries of /proc/<pid>/fd)."""
    return sum(1 for _ in (proc / pid / "fd").iterdir())


def cpu_seconds(proc: Path = PROC, pid: str = "self") -> float:
    """User plus system CPU time the process has used, in seconds."""
    fields = _stat_fields(proc, pid)
    return (int(fields[_UTIME - 1]) + int(fields[_STIME - 1])) / _CLOCK_TICKS


def start_time_seconds(proc: Path = PROC, pid: str = "self") -> float:
    """When the process started, in seconds since the epoch (boot time plus start ticks)."""
    ticks = int(_stat_fields(proc, pid)[_STARTTIME - 1])
    return _boot_time(proc) + ticks / _CLOCK_TICKS


def _boot_time(proc: Path) -> int:
    """The ``btime`` line of /proc/stat: when the system booted, seconds since the epoch."""
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise ValueError(f"no btime line in {proc / 'stat'}")


def count_processes(name: str, proc: Path = PROC) -> int:
    """How many processes have the command name ``name`` (compared as the kernel keeps it).

    Processes that exit during the scan, or whose entries cannot be read, are not counted.
    """
    wanted = name[:COMM_LENGTH]
    count = 0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text()
        except OSError:
            continue
        if comm.rstrip("\n") == wanted:
            count += 1
    return count
