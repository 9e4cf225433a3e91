"""Looking at the host from tests: tools, iptables, conmons, mounts, cgroups, state files.

Small helpers the pod rigs and tests use to see what crishim did to the host (and what it
left behind), without going through crishim itself.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

from tests.rig.crishim_proc import CrishimProcess

__all__ = [
    "active_snapshots",
    "cgroups_of",
    "conmons_of",
    "drop_chain",
    "entries",
    "iptables_chains",
    "iptables_rules",
    "mounts_below",
    "mounts_under",
    "run",
]


def run(*argv: str, check: bool = True) -> str:
    """Run a host tool; its stdout."""
    return subprocess.run(argv, capture_output=True, text=True, check=check).stdout


def iptables_rules(table: str) -> list[str]:
    return run("iptables", "-t", table, "-S").splitlines()


def iptables_chains(table: str) -> set[str]:
    return {line.split()[1] for line in iptables_rules(table) if line.startswith("-N ")}


def drop_chain(table: str, chain: str) -> None:
    """Delete the rules jumping to ``chain``, then the chain itself."""
    for line in iptables_rules(table):
        words = shlex.split(line)
        if words[0] == "-A" and words[-2:] == ["-j", chain]:
            run("iptables", "-t", table, "-D", *words[1:], check=False)
    run("iptables", "-t", table, "-F", chain, check=False)
    run("iptables", "-t", table, "-X", chain, check=False)


def conmons_of(proc: CrishimProcess) -> list[int]:
    """Pids of conmon processes whose command line names this instance's state directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            argv
            and argv[0].endswith(b"conmon")
            and any(str(proc.state).encode() in a for a in argv)
        ):
            found.append(int(entry.name))
    return sorted(found)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = str(path)
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=len, reverse=True)


def mounts_below(path: Path) -> list[str]:
    """Mount points strictly below ``path`` (not ``path`` itself), deepest first."""
    return [point for point in mounts_under(path) if point != str(path)]


def cgroups_of(ids: set[str]) -> list[str]:
    """Cgroup directories (any v1 hierarchy) of these pods' or containers' processes or
    their conmons (``/crishim-<id>``, ``/crishim-conmon-<id>``: the pods' cgroup parent is
    "")."""
    root = Path("/sys/fs/cgroup")
    found = []
    for hierarchy in root.iterdir():
        for cid in ids:
            for name in (f"crishim-{cid}", f"crishim-conmon-{cid}"):
                if (hierarchy / name).is_dir():
                    found.append(f"{hierarchy.name}/{name[:28]}")
    return sorted(found)


def entries(directory: Path) -> list[str]:
    """The names in a directory (none when it does not exist)."""
    return sorted(os.listdir(directory)) if directory.is_dir() else []


def active_snapshots(root: Path) -> list[str]:
    """The keys of containers' writable snapshots, in any snapshotter under ``root``."""
    names = []
    for meta in (root / "images" / "snapshots").glob("*/snapshots/*/meta.json"):
        try:
            doc = json.loads(meta.read_text())
        except FileNotFoundError:
            continue  # removed meanwhile (containers are released in the background)
        if doc.get("kind") == "active":
            names.append(str(doc["name"]))
    return sorted(names)
