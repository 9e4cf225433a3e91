"""The overlayfs snapshotter, and the checks `crishim doctor` runs to see if it can work.

Each committed layer directory holds only that layer's changes, unpacked with overlayfs
whiteouts; a container's root filesystem is one overlay mount with the layer chain as
``lowerdir`` and a fresh upper and work dir. Layers are shared by every image and
container that uses them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from crishim.errors import ConfigError, FailedPrecondition
from crishim.images.snapshots.base import Mount, Snapshotter
from crishim.images.unpack import (
    LayerResult,
    ParentGuesses,
    Readable,
    WhiteoutStyle,
    apply_layer,
    apply_layer_ahead,
)
from crishim.util import proc

__all__ = ["OverlaySnapshotter", "overlay_supported", "probe_overlay_mount"]


class OverlaySnapshotter(Snapshotter):
    """Layers as overlay lower dirs; containers as overlay mounts with their own upper."""

    name = "overlayfs"
    unpacks_ahead = True

    def __init__(self, root: Path) -> None:
        # Mount options are split at "," and lowerdir at ":": a root holding either
        # would give mounts the kernel reads differently.
        if any(sep in str(root) for sep in ",:"):
            raise ConfigError(f"overlay snapshotter root {root}: path may not contain ',' or ':'")
        super().__init__(root)

    def _unpack(
        self, fs: Path, lowers: list[Path], blob: Path | Readable, media_type: str
    ) -> LayerResult:
        return apply_layer(blob, media_type, fs, lowers=lowers, whiteouts=WhiteoutStyle.OVERLAY)

    def _unpack_ahead(
        self, fs: Path, blob: Path | Readable, media_type: str
    ) -> tuple[LayerResult, ParentGuesses]:
        return apply_layer_ahead(blob, media_type, fs)

    def _make_active(self, directory: Path, lowers: list[Path]) -> None:
        (directory / "work").mkdir(mode=0o700)

    def _active_mounts(self, directory: Path, lowers: list[Path]) -> list[Mount]:
        upper = directory / "fs"
        if not lowers:
            # overlayfs needs a lower dir: a rootfs from scratch is a plain writable bind.
            return [Mount("bind", str(upper), ("rbind", "rw"))]
        options = (_lowerdir(lowers), f"upperdir={upper}", f"workdir={directory / 'work'}")
        return [Mount("overlay", "overlay", options)]

    def _view_mounts(self, directory: Path, lowers: list[Path]) -> list[Mount]:
        if len(lowers) < 2:
            # Without an upper dir overlayfs wants two lower dirs; one layer is a ro bind.
            return super()._view_mounts(directory, lowers)
        return [Mount("overlay", "overlay", (_lowerdir(lowers),))]


def _lowerdir(lowers: list[Path]) -> str:
    return "lowerdir=" + ":".join(str(lower) for lower in lowers)


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
        done = await proc.run(argv, what="the overlay mount probe")
    except FailedPrecondition as exc:
        return str(exc)
    if done.returncode:
        return done.stderr.decode(errors="replace").strip() or f"{argv[0]} exited {done.returncode}"
    return ""
