"""The uninstaller's removal of the rootfs from a DaemonSet's pod (root; crishim.node.files).

A pod's mount namespace keeps its copies of private mounts after the node unmounts them,
so the rootfs looked still mounted to the hand-off that runs in the pod's namespace.
Here a private mount namespace plays the pod and the test's own plays the node (PID 1's
on a real node): the pod's own mounts under a directory the node has nothing mounted in are
detached and the tree is removed; a path the node still has mounts under is refused, and
nothing is detached.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]

POD = r"""
import os, subprocess, sys
from pathlib import Path
from crishim.errors import FailedPrecondition
from crishim.node.files import mount_points, release_stale_mounts, remove_tree
rootfs = Path(sys.argv[1])
(rootfs / "run").mkdir(parents=True)
subprocess.run(["mount", "--bind", str(rootfs), str(rootfs)], check=True)
subprocess.run(["mount", "-t", "tmpfs", "run", str(rootfs / "run")], check=True)
(rootfs / "run" / "file").write_text("x")
try:
    release_stale_mounts(Path("/proc"), "/proc", os.getppid())
except FailedPrecondition as exc:
    print("refused:", exc)
print("still-mounted:", [p for p in mount_points() if p.startswith(str(rootfs))])
released = release_stale_mounts(rootfs, str(rootfs), os.getppid())
print("released:", released)
print("removed:", remove_tree(rootfs), rootfs.exists())
"""


def test_a_pods_stale_copies_are_detached_and_the_nodes_own_mounts_refused(
    tmp_path: Path,
) -> None:
    rootfs = tmp_path / "opt-crishim-rootfs"
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", POD,
         str(rootfs)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, (out, result.stderr)
    assert "refused: /proc: still mounted on the node: /proc" in out, out
    # the refusal detached nothing
    assert f"still-mounted: ['{rootfs}', '{rootfs}/run']" in out, out
    assert f"released: ['{rootfs}']" in out, out
    assert "removed: True False" in out, out
