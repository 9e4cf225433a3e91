"""Removing the cgroup of a container that no runtime finished creating (root)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from crishim.runtime.cgroups import remove_cgroup

pytestmark = pytest.mark.root


def hierarchies() -> list[Path]:
    return [
        Path(line.split()[1])
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[2] in ("cgroup", "cgroup2")
    ]


async def test_a_leftover_cgroup_goes_with_what_is_inside() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make cgroups")
    relative = f"crishim-cleanup-test-{uuid.uuid4().hex[:8]}"
    sleeper = subprocess.Popen(["sleep", "300"])  # noqa: ASYNC220 - a bystander, not awaited
    made = []
    try:
        for hierarchy in hierarchies():
            group = hierarchy / relative
            try:
                group.mkdir()
            except OSError:
                continue  # a hierarchy this host does not let us write (a named one)
            made.append(group)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if (group / name).exists():
                    (group / name).write_text((hierarchy / name).read_text())
            (group / "cgroup.procs").write_text(str(sleeper.pid))
        assert made, "no cgroup hierarchy to test with"
        await remove_cgroup(f"/{relative}")
        assert [g for g in made if g.exists()] == []
        assert sleeper.wait(5) == -9
        await remove_cgroup(f"/{relative}")  # gone already: fine
    finally:
        sleeper.kill()
        sleeper.wait()
        for group in made:
            if group.exists():
                group.rmdir()
