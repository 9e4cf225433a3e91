"""Mounting and unmounting on the host: container root filesystems, a pod's /dev/shm."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from crishim.errors import Internal


@dataclass(frozen=True)
class MountRequest:
    """One mount as ``mount -t type -o options source target`` would make it."""

    type: str
    source: str
    options: tuple[str, ...] = ()


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    return proc.returncode or 0, err.decode(errors="replace").strip()


async def mount_all(mounts: Sequence[MountRequest], target: Path) -> None:
    """Mount ``mounts`` in order on ``target``, creating the directory."""
    target.mkdir(parents=True, exist_ok=True)
    for mount in mounts:
        options = [o for o in mount.options if o not in ("bind", "rbind")]
        if mount.type == "bind":
            flag = "--rbind" if "rbind" in mount.options else "--bind"
            code, err = await _run("mount", flag, mount.source, str(target))
            if code == 0 and "ro" in options:
                code, err = await _run("mount", "-o", "remount,bind,ro", str(target))
        else:
            argv = ["mount", "-t", mount.type, mount.source, str(target)]
            if options:
                argv[1:1] = ["-o", ",".join(options)]
            code, err = await _run(*argv)
        if code != 0:
            raise Internal(f"mounting {mount.type} {mount.source} on {target}: {err}")


async def unmount(target: Path) -> None:
    """Unmount everything on ``target`` (lazily when busy); nothing mounted is fine."""
    if not os.path.ismount(target):
        return
    code, err = await _run("umount", "-R", str(target))
    if code != 0:
        code, err = await _run("umount", "-l", "-R", str(target))
        if code != 0:
            raise Internal(f"unmounting {target}: {err}")
