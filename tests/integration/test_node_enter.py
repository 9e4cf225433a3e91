"""``crishim node enter``: the installed crishim's rootfs as the root of its own mount
namespace (root; crishim.node.enter).

Everything runs in a private mount namespace of the test, its "host". There a tmpfs stands
for ``/opt/crishim/rootfs``, with the host's directories bound in and a marker file only
it has, and a shared directory is bound in as ``crishim-rootfs.service`` binds
``/var/lib/kubelet``. The host's ``chroot`` starts ``crishim node enter``, which runs a
program that mounts below the shared directory and waits.

What is checked: whoever joins the program's mount namespace (as ``runc exec`` joins a
container's, which starts as a copy of crishim's) lands in the rootfs, where a plain chroot
leaves it at the host's root (the control); the program's mount reaches the host; the
host loses none of its mounts; and the refusals name their cause.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]

SCRIPT = r"""
set -eu
PY=$1
W=/mnt
mount -t tmpfs enter-test "$W"
R=$W/rootfs S=$W/shared
mkdir "$R" "$S" "$W/plain"
mount -t tmpfs rootfs "$R"
for d in /*; do
    name=${d#/}
    [ "$name" = mnt ] && continue
    if [ -L "$d" ]; then cp -P "$d" "$R/"; continue; fi
    [ -d "$d" ] || continue
    mkdir "$R/$name"
    mount --rbind "$d" "$R/$name"
done
touch "$R/marker-of-the-rootfs"
mount -t tmpfs shared "$S"
mount --make-shared "$S"
mkdir "$R/shared"
mount --bind "$S" "$R/shared"
awk '{print $5}' /proc/self/mountinfo | sort > "$W/before"

wait_for() {  # file pid
    i=0
    while [ ! -e "$1" ]; do
        kill -0 "$2" 2>/dev/null || { echo "exited before $1"; exit 1; }
        i=$((i + 1)); [ $i -lt 300 ] || { echo "timeout waiting for $1"; exit 1; }
        sleep 0.1
    done
}
joined_root() {
    if nsenter -t "$1" -m test -e /marker-of-the-rootfs; then echo rootfs; else echo host; fi
}

# The control: a plain chroot shares the host's namespace, whose root is the host's.
chroot "$R" sleep 60 &
control=$!
echo "control-root=$(joined_root $control)"
kill $control

PIN=$W/pins/mnt
INNER='
import os, subprocess, time
os.mkdir("/shared/made-inside")
subprocess.run(["mount", "-t", "tmpfs", "inside", "/shared/made-inside"], check=True)
os.mkdir("/kept")
subprocess.run(["mount", "-t", "tmpfs", "kept", "/kept"], check=True)
open("/kept/file", "w").close()
open("/shared/ready", "w").close()
time.sleep(60)
'
chroot "$R" "$PY" -m crishim.cli node enter --rootfs "$R" --pin "$PIN" -- "$PY" -c "$INNER" &
entered=$!
wait_for "$S/ready" $entered
echo "entered-root=$(joined_root $entered)"
if mountpoint -q "$S/made-inside"; then echo "propagated=yes"; else echo "propagated=no"; fi
if mountpoint -q "$R/kept"; then echo "kept-leaked=yes"; else echo "kept-leaked=no"; fi
kill $entered
wait $entered || true

# A restart joins the kept namespace, with what only it has (a mount of the rootfs's own).
AGAIN='
import os
print("rejoined=" + ("yes" if os.path.exists("/kept/file") else "no"), flush=True)
open("/shared/again", "w").close()
'
chroot "$R" "$PY" -m crishim.cli node enter --rootfs "$R" --pin "$PIN" -- "$PY" -c "$AGAIN"
awk '{print $5}' /proc/self/mountinfo | sort > "$W/after"
echo "lost-mounts=$(comm -23 "$W/before" "$W/after" | wc -l)"

# Refusals: not a mount point; started from another mount namespace.
"$PY" -m crishim.cli node enter --rootfs "$W/plain" --pin "$W/pins2/mnt" -- /bin/true 2>&1 || true
pinned=no; mountpoint -q "$W/pins2/mnt" 2>/dev/null && pinned=yes
echo "refused-pinned=$pinned"
unshare --mount "$PY" -m crishim.cli node enter --rootfs "$R" --pin "$PIN" -- /bin/true 2>&1 || true
"""


def test_enter_makes_the_rootfs_the_namespace_root_and_keeps_propagation(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            SCRIPT,
            "enter-test",
            sys.executable,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    out = result.stdout
    assert result.returncode == 0, (out, result.stderr)
    assert "control-root=host" in out, out
    assert "entered-root=rootfs" in out, out
    assert "propagated=yes" in out, out
    assert "kept-leaked=no" in out, out
    assert "rejoined=yes" in out, out
    assert "lost-mounts=0" in out, out
    assert "/mnt/plain is not a mount point" in out, out
    # a refused enter keeps no namespace for the next one to join
    assert "refused-pinned=no" in out, out
    assert "is in another mount namespace" in out, out
