"""Unpacking the layers of a pull, and of an import, into the snapshotter.

A layer of a pull is unpacked while its blob downloads (the content store lets a reader
follow a download; what it reads ends only once the digest matched). With a snapshotter
whose layers are independent directories (overlay), layers are unpacked side by side,
ahead of the layers below them, and each is committed once the layer below it is:
commits stay parent-first. A layer the layers below make a difference to (a symlink or a
file where it needs a directory), or that fails ahead of them, is unpacked again on top
of them, so results and errors are those of unpacking in turn. Each layer is unpacked
once even when pulls and imports share it (a lock per chain ID).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import anyio.to_thread

from crishim.images.content import BlobAborted, ContentStore
from crishim.images.manifest import Descriptor
from crishim.images.snapshots.base import Snapshotter, StagedLayer
from crishim.images.unpack import Readable, UnpackError
from crishim.services.pull_progress import PullProgress

__all__ = ["MAX_PARALLEL_UNPACKS", "LayerUnpacker", "PulledLayer"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Layers unpacked at once, ahead of the layers below them, when the snapshotter can.
MAX_PARALLEL_UNPACKS = 3


@dataclass(frozen=True)
class PulledLayer:
    """One layer of a pull: where it goes, and its download."""

    chain_id: str
    parent: str | None  # chain ID of the layer below
    desc: Descriptor
    diff_id: str
    download: asyncio.Task[Path]
    progress: PullProgress


class LayerUnpacker:
    """Layers into the snapshotter, each once."""

    def __init__(self, content: ContentStore, snapshotter: Snapshotter) -> None:
        self._content = content
        self._snapshotter = snapshotter
        self._locks: dict[str, asyncio.Lock] = {}
        # Layers unpacked ahead at once (each a thread, busy while its bytes arrive).
        self._staging = asyncio.Semaphore(MAX_PARALLEL_UNPACKS)

    async def unpack_pulled(self, layer: PulledLayer, below: asyncio.Task[None] | None) -> None:
        """Unpack a layer of a pull while its download arrives, and commit it once the
        layer below it is committed (``below``, the task of that layer).

        With a snapshotter that can, the layer is unpacked ahead of the layers below it,
        so layers unpack side by side; otherwise once the layer below is committed.
        """
        lock = self._locks.setdefault(layer.chain_id, asyncio.Lock())
        async with lock:
            if not self._snapshotter.has_layer(layer.chain_id):
                if self._snapshotter.unpacks_ahead:
                    await self._unpack_ahead(layer, below)
                else:
                    if below is not None:
                        await below
                    await self._from_download(layer, partial(self._unpack, layer))
        layer.progress.done_layers += 1

    async def _unpack_ahead(self, layer: PulledLayer, below: asyncio.Task[None] | None) -> None:
        """Unpack the layer ahead, commit it on top of the layer below once that is
        committed; unpack it again on top of it when the layers below make a difference
        (a symlink or a file where the layer needs a directory: they would have been
        followed or refused). An error of the unpack ahead counts only then, too: the
        layers below may be why."""
        staged: StagedLayer | None = None
        async with self._staging:
            try:
                staged = await self._from_download(layer, partial(self._stage, layer))
            except UnpackError as exc:
                log.info("layer %s failed ahead of the layers below (%s)", layer.chain_id, exc)
        try:
            if below is not None:
                await below
            committed = staged is not None and await anyio.to_thread.run_sync(
                self._snapshotter.commit_staged, staged, layer.chain_id, layer.parent
            )
        finally:
            if staged is not None:
                await anyio.to_thread.run_sync(staged.discard)
        if not committed:
            log.info("layer %s: unpacking it on top of the layers below", layer.chain_id)
            await self._unpack(layer, await layer.download)

    async def _from_download(
        self, layer: PulledLayer, use: Callable[[Path | Readable], Awaitable[T]]
    ) -> T:
        """``use`` the layer's blob while it downloads (so unpacking overlaps the
        transfer). What it reads ends only once the bytes matched the digest; when the
        download breaks, ``use`` starts over on the next attempt."""
        digest = layer.desc.digest
        while True:
            reader = await self._content.open_stream(digest, layer.download)
            if reader is None:  # the download is over and left no blob: why
                return await use(await layer.download)
            with closing(reader):
                try:
                    return await use(reader)
                except BlobAborted:
                    log.info("the download of %s broke while it was unpacked", digest)

    async def _stage(self, layer: PulledLayer, blob: Path | Readable) -> StagedLayer:
        return await anyio.to_thread.run_sync(
            self._snapshotter.stage_layer,
            layer.chain_id,
            blob,
            layer.desc.media_type,
            layer.diff_id,
        )

    async def _unpack(self, layer: PulledLayer, blob: Path | Readable) -> None:
        await anyio.to_thread.run_sync(
            self._snapshotter.unpack_layer,
            layer.chain_id,
            layer.parent,
            blob,
            layer.desc.media_type,
            layer.diff_id,
        )

    async def unpack_file(
        self, chain_id: str, parent: str | None, blob: Path, desc: Descriptor, diff_id: str
    ) -> None:
        """Unpack a layer from a file once its parent is committed (an import's)."""
        lock = self._locks.setdefault(chain_id, asyncio.Lock())
        async with lock:
            if self._snapshotter.has_layer(chain_id):
                return
            await anyio.to_thread.run_sync(
                self._snapshotter.unpack_layer, chain_id, parent, blob, desc.media_type, diff_id
            )
