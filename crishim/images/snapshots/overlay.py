"""The overlayfs snapshotter (filled in by the image service); here: can it work at all."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path


def overlay_supported(proc_filesystems: Path = Path("/proc/filesystems")) -> bool:
    """True when the kernel lists overlay among its filesystems."""
    try:
        text = proc_filesystems.read_text()
    except OSError:
        return False
    return any(line.split()[-1:] == ["overlay"] for line in text.splitlines())


async def probe_overlay_mount(parent: Path) -> str:
    """Try a real overlay mount in a scratch directory under ``parent``.

    Returns "" on success, else why it failed (for example overlay on top of overlay).
    """
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".overlay-probe-", dir=parent))
    try:
        for name in ("lower", "upper", "work", "merged"):
            (scratch / name).mkdir()
        options = (
            f"lowerdir={scratch / 'lower'},upperdir={scratch / 'upper'},workdir={scratch / 'work'}"
        )
        error = await _run(
            "mount", "-t", "overlay", "overlay", "-o", options, str(scratch / "merged")
        )
        if not error:
            await _run("umount", str(scratch / "merged"))
        return error
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


async def _run(*argv: str) -> str:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return f"{argv[0]}: {exc.strerror}"
    _, err = await proc.communicate()
    if proc.returncode:
        return err.decode(errors="replace").strip() or f"{argv[0]} exited {proc.returncode}"
    return ""
