"""The copying ("native") snapshotter: the fallback where overlayfs cannot be mounted.

Every committed layer is a complete root filesystem: a copy of its parent with the layer
applied on top (whiteouts delete). A writable snapshot is one more copy, bind-mounted; a
view bind-mounts the layer read-only. Simple and slow, and it costs disk per layer.
"""

from __future__ import annotations

from pathlib import Path

from crishim.errors import Internal, ResourceExhausted
from crishim.images.snapshots.base import Mount, Snapshotter
from crishim.images.unpack import LayerResult, Readable, WhiteoutStyle, apply_layer
from crishim.util.proc import run_blocking

__all__ = ["CopySnapshotter"]


class CopySnapshotter(Snapshotter):
    """Full copies per layer and per container, bind-mounted."""

    name = "native"

    def _unpack(
        self, fs: Path, lowers: list[Path], blob: Path | Readable, media_type: str
    ) -> LayerResult:
        if lowers:
            _copy_tree(lowers[0], fs)
        return apply_layer(blob, media_type, fs, whiteouts=WhiteoutStyle.DELETE)

    def _make_active(self, directory: Path, lowers: list[Path]) -> None:
        if lowers:
            _copy_tree(lowers[0], directory / "fs")

    def _active_mounts(self, directory: Path, lowers: list[Path]) -> list[Mount]:
        return [Mount("bind", str(directory / "fs"), ("rbind", "rw"))]


def _copy_tree(source: Path, destination: Path) -> None:
    """Copy the contents and attributes of ``source`` into the existing ``destination``.

    cp -a keeps what a root filesystem needs (owners, modes, times, hardlinks, xattrs,
    devices) and shares blocks where the file system can (reflinks).
    """
    argv = ["cp", "-a", "--reflink=auto", "--", f"{source}/.", str(destination)]
    done = run_blocking(argv, what="cp (the copying snapshotter)", remedy="install coreutils")
    if done.returncode:
        error = done.stderr.decode(errors="replace").strip() or f"cp exited {done.returncode}"
        failure = f"copying {source} to {destination}: {error}"
        if "No space left on device" in error or "Disk quota exceeded" in error:
            raise ResourceExhausted(f"{failure} (the disk is full)")
        raise Internal(failure)
