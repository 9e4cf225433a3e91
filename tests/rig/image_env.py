"""An in-process image service over a real registry, for pull tests that inspect the store."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crishim.images.content import ContentStore
from crishim.images.manifest import host_platform
from crishim.images.registry import RegistryClient
from crishim.images.snapshots.base import Mount, Snapshotter
from crishim.images.snapshots.copy import CopySnapshotter
from crishim.images.snapshots.overlay import OverlaySnapshotter, overlay_supported
from crishim.model import Image
from crishim.services.images import ImageService
from crishim.store import ObjectStore

FAST_BACKOFF = (0.01, 0.02, 0.05)


@dataclass
class ImageEnv:
    """The image service and the stores behind it, under one temporary root."""

    root: Path
    service: ImageService
    content: ContentStore
    snapshotter: Snapshotter
    store: ObjectStore[Image]
    certs_d: Path

    def files_outside_store(self) -> set[str]:
        """Everything under the test's base dir that is not the image root (for escapes)."""
        base = self.root.parent
        found: set[str] = set()
        for directory, dirs, files in os.walk(base):
            if Path(directory).is_relative_to(self.root):
                dirs.clear()
                continue
            found.update(os.path.join(directory, n) for n in dirs + files)
        return found


def make_env(base: Path, kind: str = "overlayfs") -> tuple[ImageEnv, RegistryClient]:
    """An image service under ``base/images`` with its own certs.d."""
    root = base / "images"
    certs_d = base / "certs.d"
    certs_d.mkdir(parents=True, exist_ok=True)
    content = ContentStore(root / "content")
    content.recover()
    snapshotter: Snapshotter
    if kind == "overlayfs":
        snapshotter = OverlaySnapshotter(root / "snapshots" / "overlayfs")
    else:
        snapshotter = CopySnapshotter(root / "snapshots" / "native")
    snapshotter.recover()
    store: ObjectStore[Image] = ObjectStore(root / "records", "image", Image)
    store.load()
    registry = RegistryClient(str(certs_d), retry_backoff=FAST_BACKOFF)
    service = ImageService(store, content, snapshotter, registry, host_platform())
    return ImageEnv(root, service, content, snapshotter, store, certs_d), registry


def snapshotter_kinds() -> list[str]:
    """Both snapshotters where the kernel has overlayfs; say so when it does not."""
    return ["overlayfs", "native"] if overlay_supported() else ["native"]


@contextlib.asynccontextmanager
async def image_env(base: Path, kind: str = "overlayfs") -> AsyncIterator[ImageEnv]:
    """``make_env`` with the registry client closed afterwards."""
    if kind == "overlayfs" and not overlay_supported():
        pytest.skip("overlayfs is not in /proc/filesystems on this host")
    env, registry = make_env(base, kind)
    try:
        yield env
    finally:
        await registry.close()


@contextlib.contextmanager
def mounted(mounts: list[Mount]) -> Iterator[Path]:
    """Mount a snapshot's mounts on a scratch dir for the duration of the block."""
    target = Path(tempfile.mkdtemp(prefix="crishim-mnt-"))
    (mount,) = mounts
    options = ",".join(mount.options)
    argv = ["mount", "-t", mount.type, mount.source, str(target)]
    if options:
        argv[1:1] = ["-o", options]
    if mount.type == "bind":
        argv = ["mount", "--bind", mount.source, str(target)]
    subprocess.run(argv, check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)
        target.rmdir()
