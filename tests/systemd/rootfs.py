"""The Debian 12 root file system the systemd test bed boots, built once and cached.

Built with ``debootstrap --variant=minbase`` plus systemd, dbus, the runtimes (runc, crun),
conmon, catatonit, the CNI plugins and a Python venv at ``/opt/crishim`` holding crishim's
dependencies (wheels built on the host, installed offline). crishim itself is not in the
cache: each run installs it from the checkout into an overlay over the cached tree, so code
changes never rebuild the rootfs.

The cache lives outside the checkout, in ``$CRISHIM_TEST_CACHE`` (default
``/var/cache/crishim-tests``), as ``systemd-rootfs-<key>`` where the key hashes everything
that goes in (suite, packages, dependencies, the init wrapper, this recipe's version); a
stale tree is simply never used again. Building takes about three minutes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["INIT", "REPO", "cache_dir", "ensure_rootfs", "rootfs_key"]

REPO = Path(__file__).resolve().parents[2]
RECIPE_VERSION = "1"
SUITE = "bookworm"
MIRROR = os.environ.get("CRISHIM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "runc",
    "crun",
    "conmon",
    "catatonit",
    "containernetworking-plugins",
    "python3-venv",
    "iproute2",
    "iptables",
)
VENV = "/opt/crishim"
INIT = "/usr/local/sbin/crishim-testbed-init"
# systemd-nspawn mounts the v1 controller hierarchies read-only when the container has no
# user namespace, so systemd inside could not create cgroups there, nor could runc or crun.
# Made writable before systemd starts (the container sees only its own subtree through its
# cgroup namespace), and /proc/sys and /sys too, which CNI plugins write to. This is what a
# privileged container (kind's nodes) gets.
INIT_SCRIPT = """#!/bin/sh
# crishim's systemd test bed: writable cgroups, /proc/sys and /sys, then systemd as PID 1.
for d in /sys/fs/cgroup/*/; do mount -o remount,bind,rw "$d"; done
mount -o remount,bind,rw /proc/sys
mount -o remount,bind,rw /sys
exec /lib/systemd/systemd "$@"
"""
_CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def cache_dir() -> Path:
    """Where built trees are kept between runs."""
    return Path(os.environ.get("CRISHIM_TEST_CACHE", "/var/cache/crishim-tests"))


def requirements() -> list[str]:
    """crishim's runtime dependencies (from pyproject.toml) and what installing it needs."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], "setuptools>=68", "wheel"]


def rootfs_key() -> str:
    """A short hash of everything the cached tree is made of."""
    recipe = {
        "version": RECIPE_VERSION,
        "suite": SUITE,
        "packages": PACKAGES,
        "requirements": requirements(),
        "init": INIT_SCRIPT,
        "python": sys.version_info[:2],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def run(*argv: str, log: Path, env: dict[str, str] | None = None) -> None:
    """Run a build step, its output appended to ``log``; fail with the log's end."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{argv[0]} exited {result.returncode}:\n{tail}")


def chroot(root: Path, *argv: str, log: Path) -> None:
    """Run a command inside ``root`` with a clean environment (no host pip settings)."""
    run("chroot", str(root), *argv, log=log, env=_CHROOT_ENV)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(target: Path, log: Path) -> None:
    run(
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(target),
        MIRROR,
        log=log,
    )
    wheels = target / "tmp" / "crishim-wheels"
    # The host's pip (its index and settings); the rootfs has the same Python minor version.
    run(sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), *requirements(), log=log)
    chroot(target, "python3", "-m", "venv", VENV, log=log)
    chroot(
        target,
        f"{VENV}/bin/pip",
        "install",
        "-q",
        "--no-index",
        "--find-links",
        "/tmp/crishim-wheels",
        *requirements(),
        log=log,
    )
    shutil.rmtree(wheels)
    init = target / INIT.lstrip("/")
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    chroot(target, "apt-get", "clean", log=log)


def ensure_rootfs() -> Path:
    """The cached root file system, built first if missing (one builder at a time)."""
    base = cache_dir()
    target = base / f"systemd-rootfs-{rootfs_key()}"
    done = target / ".crishim-complete"
    if done.exists():
        return target
    with _locked(base / "build.lock"):
        if done.exists():
            return target
        building = target.with_name(target.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        log = base / f"{target.name}.log"
        log.write_text("")
        _build(building, log)
        building.rename(target)
        done.touch()
    return target
