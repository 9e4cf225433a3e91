"""Image use cases: pull, import, tag, status, list, remove with garbage collection,
filesystem usage.

A pull resolves the reference (mirrors first), picks this host's platform from an index,
downloads the config and all layers in parallel (bounded), and unpacks each layer into the
snapshotter while it downloads, side by side with the layers below it where the
snapshotter allows, committing them parent-first (``pull_layers``). Each blob is downloaded once
even when pulls overlap, each layer is unpacked once even when images share it, and two
pulls of the same reference share one operation. The image record is written last, so an
interrupted pull leaves no image behind, only verified blobs and committed layers that the
next pull reuses; but when the disk is full, those are removed too, to give the room back
(after an import as well).

An import reads a docker or OCI archive (:mod:`crishim.images.archive`) into the same
content store and snapshots: every file is staged and verified while the archive streams
through, the images are planned, their layers unpacked as a pull's are, the blobs they need
adopted into the store, and the records written last. A failed import leaves no record and
no staged file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.from_thread
import anyio.to_thread

from crishim.errors import (
    CrishimError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from crishim.images.archive import ChunkReader, read_archive
from crishim.images.archive_formats import ImportPlan, PlannedImage, plan_import
from crishim.images.auth import Credentials
from crishim.images.content import ContentStore, Staging
from crishim.images.manifest import (
    ACCEPT,
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    Platform,
    chain_ids,
    choose_from_index,
    media_type_of,
    parse_config,
    parse_manifest,
)
from crishim.images.reference import IdQuery, Reference, parse_image_query, parse_reference
from crishim.images.registry import RegistryClient
from crishim.images.snapshots.base import Snapshotter
from crishim.model import Image, ImageLayer
from crishim.services.pull_layers import LayerUnpacker, PulledLayer
from crishim.services.pull_progress import PullMetrics, PullProgress
from crishim.store import ObjectStore
from crishim.util.tasks import join_shared

log = logging.getLogger(__name__)

# Layers downloaded at once per pull (containerd's default is 3).
MAX_PARALLEL_DOWNLOADS = 3
# A blob whose stream breaks or arrives corrupt is fetched again this many times.
BLOB_ATTEMPTS = 3
# How long a walk of the image store's disk usage is reused.
FS_USAGE_TTL_SECONDS = 30.0


@dataclass(frozen=True)
class ImportResult:
    """The images an import recorded, and notes on what the archive held but was left out."""

    images: list[Image]
    notes: list[str]


@dataclass(frozen=True)
class FsUsage:
    """Bytes and inodes used by the image store, and where it lives."""

    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp: int


class ImageService:
    """Images on this node."""

    def __init__(
        self,
        store: ObjectStore[Image],
        content: ContentStore,
        snapshotter: Snapshotter,
        registry: RegistryClient,
        platform: Platform,
    ) -> None:
        self._store = store
        self._content = content
        self._snapshotter = snapshotter
        self._registry = registry
        self._platform = platform
        self._pulls: dict[tuple[str, str], asyncio.Task[Image]] = {}
        self._imports = 0
        self._layers = LayerUnpacker(content, snapshotter)
        # Serialises changes to image records with garbage collection.
        self._meta_lock = asyncio.Lock()
        self.metrics = PullMetrics()
        self._fs_cache: tuple[float, FsUsage] | None = None

    @property
    def snapshotter(self) -> Snapshotter:
        """Where image layers are unpacked."""
        return self._snapshotter

    # ---- pull ---------------------------------------------------------------------------

    async def pull(self, reference: str, creds: Credentials) -> Image:
        """Pull ``reference``; concurrent pulls of the same reference share the work."""
        ref = parse_reference(reference)
        key = (str(ref), creds.cache_key())
        task = self._pulls.get(key)
        if task is None:
            task = asyncio.create_task(self._timed_pull(ref, creds))
            self._pulls[key] = task
            task.add_done_callback(lambda _: self._pulls.pop(key, None))
        return await join_shared(task, f"pull of {ref}")

    async def _timed_pull(self, ref: Reference, creds: Credentials) -> Image:
        start = time.monotonic()
        ok = False
        try:
            image = await self._pull(ref, creds)
            ok = True
            return image
        except ResourceExhausted:
            await self._give_back_space(f"pull of {ref}")
            raise
        finally:
            self.metrics.observe(time.monotonic() - start, ok)

    async def _give_back_space(self, what: str) -> None:
        """After a pull or import failed on a full disk: remove the blobs and layers it
        wrote that no image needs. The node needs the room more than a part of an image;
        a retry fetches it again."""
        try:
            await self.collect_garbage(besides=asyncio.current_task())
        except Exception:
            log.exception("removing what the failed %s left", what)

    async def _fetch_document(
        self, ref: Reference, target: str, creds: Credentials, stores: list[asyncio.Task[Path]]
    ) -> tuple[str, str, bytes]:
        """A manifest or index, verified; stored by a task added to ``stores``."""
        fetched = await self._registry.fetch_manifest(ref, target, ACCEPT, creds)
        digest = "sha256:" + hashlib.sha256(fetched.content).hexdigest()
        if target.startswith("sha256:") and digest != target:
            raise DataLoss(f"{ref}: manifest {target} arrived with digest {digest}")
        if fetched.digest and fetched.digest != digest:
            raise DataLoss(
                f"{ref}: registry says the manifest is {fetched.digest}, its content is {digest}"
            )
        media_type = media_type_of(fetched.content, fetched.media_type)
        stores.append(asyncio.create_task(self._content.put(digest, fetched.content)))
        return digest, media_type, fetched.content

    async def _pull(self, ref: Reference, creds: Credentials) -> Image:
        started = time.monotonic()
        target = ref.digest or ref.tag or "latest"
        # Manifests being stored, layers downloading and unpacking: all go on side by
        # side, and all are done (every blob stored and durable) before the image
        # record names them.
        stores: list[asyncio.Task[Path]] = []
        downloads: list[asyncio.Task[Path]] = []
        unpacks: list[asyncio.Task[None]] = []
        try:
            top_digest, media_type, content = await self._fetch_document(ref, target, creds, stores)
            metadata = [top_digest]
            manifest_digest = top_digest
            if media_type in INDEX_TYPES:
                chosen = choose_from_index(content, self._platform)
                manifest_digest, media_type, content = await self._fetch_document(
                    ref, chosen.digest, creds, stores
                )
                metadata.append(manifest_digest)
            if media_type not in MANIFEST_TYPES:
                raise InvalidArgument(f"{ref}: unsupported manifest media type {media_type!r}")
            manifest = parse_manifest(content)
            progress = PullProgress(str(ref), list(manifest.layers), self.metrics)
            transfers = asyncio.Semaphore(MAX_PARALLEL_DOWNLOADS)
            # The layers need only the manifest to start downloading; the config is
            # fetched meanwhile.
            downloads = [
                asyncio.create_task(self._fetch_blob(ref, desc, creds, progress, transfers))
                for desc in manifest.layers
            ]
            config_path = await self._fetch_blob(ref, manifest.config, creds, None, None)
            config_bytes = await anyio.to_thread.run_sync(config_path.read_bytes)
            config = parse_config(config_bytes)
            metadata.append(manifest.config.digest)
            if len(config.diff_ids) != len(manifest.layers):
                raise InvalidArgument(
                    f"{ref}: the config lists {len(config.diff_ids)} diff IDs for "
                    f"{len(manifest.layers)} layers"
                )
            chains = chain_ids(config.diff_ids)
            parent: str | None = None
            for desc, diff_id, chain_id, task in zip(
                manifest.layers, config.diff_ids, chains, downloads, strict=True
            ):
                layer = PulledLayer(chain_id, parent, desc, diff_id, task, progress)
                below = unpacks[-1] if unpacks else None
                unpacks.append(asyncio.create_task(self._layers.unpack_pulled(layer, below)))
                parent = chain_id
            if unpacks:
                await asyncio.wait(unpacks, return_when=asyncio.FIRST_EXCEPTION)
            for unpack in unpacks:
                await unpack
            await asyncio.gather(*downloads, *stores)
        finally:
            for unpack in unpacks:
                unpack.cancel()
            for task in (*downloads, *stores):
                task.cancel()
            await asyncio.gather(*unpacks, *downloads, *stores, return_exceptions=True)
        image = Image(
            id=manifest.config.digest,
            repo_tags=[] if ref.tag is None or ref.digest else [str(ref)],
            repo_digests=[f"{ref.name}@{top_digest}"],
            size=manifest.config.size + sum(d.size for d in manifest.layers),
            manifest_digest=manifest_digest,
            metadata_blobs=metadata,
            layers=[
                ImageLayer(
                    digest=d.digest,
                    size=d.size,
                    media_type=d.media_type,
                    diff_id=diff_id,
                    chain_id=chain,
                )
                for d, diff_id, chain in zip(manifest.layers, config.diff_ids, chains, strict=True)
            ],
            user=config.user,
            pulled_at=time.time_ns(),
        )
        if ref.tag and ref.digest:
            image = image.model_copy(update={"repo_tags": [f"{ref.name}:{ref.tag}"]})
        stored = await self._record(image)
        progress.log()
        log.info("pulled %s as %s in %.2fs", ref, stored.id, time.monotonic() - started)
        return stored

    async def _fetch_blob(
        self,
        ref: Reference,
        desc: Descriptor,
        creds: Credentials,
        progress: PullProgress | None,
        transfers: asyncio.Semaphore | None,
    ) -> Path:
        def source() -> AsyncGenerator[bytes, None]:
            return self._transfer(ref, desc.digest, creds, progress, transfers)

        for attempt in range(1, BLOB_ATTEMPTS + 1):
            try:
                return await self._content.ensure(desc.digest, desc.size, source)
            except (DataLoss, Unavailable) as exc:
                if attempt == BLOB_ATTEMPTS:
                    raise
                log.warning("%s: blob %s failed (%s); fetching it again", ref, desc.digest, exc)
        raise AssertionError("unreachable")

    async def _transfer(
        self,
        ref: Reference,
        digest: str,
        creds: Credentials,
        progress: PullProgress | None,
        transfers: asyncio.Semaphore | None,
    ) -> AsyncGenerator[bytes, None]:
        """The blob's bytes as they arrive, counted. A slot of ``transfers`` is held while
        they arrive, not while the content store writes the last ones down and syncs."""
        async with (
            transfers or contextlib.nullcontext(),
            contextlib.aclosing(self._registry.stream_blob(ref, digest, creds)) as chunks,
        ):
            async for chunk in chunks:
                if progress is not None:
                    progress.add(len(chunk))
                yield chunk

    # ---- import and tag -----------------------------------------------------------------

    async def import_archive(self, chunks: AsyncIterator[bytes]) -> ImportResult:
        """Import every image of the archive arriving as ``chunks`` (see the module doc)."""
        try:
            return await self._import_archive(chunks)
        except ResourceExhausted:
            await self._give_back_space("import")
            raise

    async def _import_archive(self, chunks: AsyncIterator[bytes]) -> ImportResult:
        started = time.monotonic()
        async with self._meta_lock:  # lets a running garbage collection finish first
            self._imports += 1
        try:
            with self._content.staging() as staging:
                reader = ChunkReader(_chunks_from_loop(chunks))
                contents = await anyio.to_thread.run_sync(read_archive, reader, staging)
                plan = await anyio.to_thread.run_sync(plan_import, contents, self._platform)
                read = time.monotonic() - started
                for planned in plan.images:
                    await self._unpack_planned(planned)
                images = await anyio.to_thread.run_sync(self._adopt, staging, plan)
                async with self._meta_lock:
                    records = [await self._record_locked(image) for image in images]
        finally:
            self._imports -= 1
        # Entries of one archive may be the same image (one config under two manifests):
        # each image once, as last recorded.
        stored = list({image.id: image for image in records}.values())
        for image in stored:
            log.info("imported %s as %s", ", ".join(image.repo_tags) or "an image", image.id)
        log.info(
            "imported %d image(s) from %.1f MB in %.2fs (%.2fs reading the archive)",
            len(stored),
            reader.size / 1e6,
            time.monotonic() - started,
            read,
        )
        return ImportResult(stored, plan.notes)

    async def _unpack_planned(self, planned: PlannedImage) -> None:
        parent: str | None = None
        for number, layer in enumerate(planned.layers):
            try:
                await self._layers.unpack_file(
                    layer.chain_id, parent, layer.member.path, layer.descriptor, layer.diff_id
                )
            except CrishimError as exc:
                raise type(exc)(
                    f'{planned.label}, layer {number} (archive member "{layer.member.name}"): {exc}'
                ) from None
            parent = layer.chain_id

    def _adopt(self, staging: Staging, plan: ImportPlan) -> list[Image]:
        """Move what the planned images need into the store; their records (blocking)."""
        images = []
        for planned in plan.images:
            for member in (*planned.documents, *(layer.member for layer in planned.layers)):
                staging.adopt(member.blob)
            for digest, document in planned.written.items():
                staging.add(digest, document)
            names = [ref.name for ref in planned.names]
            images.append(
                Image(
                    id=planned.config.digest,
                    repo_tags=[str(ref) for ref in planned.names],
                    repo_digests=[f"{name}@{planned.top_digest}" for name in dict.fromkeys(names)],
                    size=planned.config.size + sum(x.descriptor.size for x in planned.layers),
                    manifest_digest=planned.manifest_digest,
                    metadata_blobs=planned.metadata_digests,
                    layers=[
                        ImageLayer(
                            digest=x.descriptor.digest,
                            size=x.descriptor.size,
                            media_type=x.descriptor.media_type,
                            diff_id=x.diff_id,
                            chain_id=x.chain_id,
                        )
                        for x in planned.layers
                    ],
                    user=planned.user,
                    pulled_at=time.time_ns(),
                )
            )
        return images

    async def tag(self, source: str, target: str) -> Image:
        """Tag the image ``source`` names (an ID or a reference) as ``target``, taking the
        tag from any image that held it."""
        ref = parse_reference(target)
        if ref.digest is not None:
            raise InvalidArgument(f"{target!r} is not a tag: it names a digest")
        async with self._meta_lock:
            image = self.status(source)
            if image is None:
                raise NotFound(f"image {source!r} not found")
            return await self._record_locked(
                image.model_copy(
                    update={"repo_tags": [str(ref)], "repo_digests": [], "metadata_blobs": []}
                )
            )

    async def _record(self, pulled: Image) -> Image:
        """Store the image, moving its tags away from any image that held them."""
        async with self._meta_lock:
            return await self._record_locked(pulled)

    async def _record_locked(self, pulled: Image) -> Image:
        for tag in pulled.repo_tags:
            for other in self._store.list():
                if other.id != pulled.id and tag in other.repo_tags:
                    await self._store.update(other.id, _without_tag(tag))
        existing = self._store.find(pulled.id)
        if existing is None:
            return await self._store.add(pulled)

        def merge(current: Image) -> Image:
            return current.model_copy(
                update={
                    "repo_tags": _union(current.repo_tags, pulled.repo_tags),
                    "repo_digests": _union(current.repo_digests, pulled.repo_digests),
                    "metadata_blobs": _union(current.metadata_blobs, pulled.metadata_blobs),
                    "pulled_at": pulled.pulled_at,
                }
            )

        return await self._store.update(pulled.id, merge)

    # ---- queries ------------------------------------------------------------------------

    def find(self, query: str) -> tuple[Image | None, Reference | None]:
        """The image named by an id (full or 'sha256:'-less), a tag or a digest reference."""
        parsed = parse_image_query(query)
        if isinstance(parsed, IdQuery):
            return self._store.find(parsed.image_id), None
        ref = parsed.ref
        if ref.digest is None:
            tag = str(ref)
            for image in self._store.list():
                if tag in image.repo_tags:
                    return image, ref
        else:
            digest = f"{ref.name}@{ref.digest}"
            for image in self._store.list():
                if digest in image.repo_digests:
                    return image, ref
        return None, ref

    def status(self, query: str) -> Image | None:
        """The image, or None when it is not here (not an error, per the CRI)."""
        return self.find(query)[0]

    def list(self, query: str = "") -> list[Image]:
        """Every image, or the one ``query`` names."""
        if query:
            found = self.status(query)
            return [found] if found else []
        return sorted(self._store.list(), key=lambda i: i.pulled_at)

    def count(self) -> int:
        """How many images are here."""
        return len(self._store)

    def ids(self) -> tuple[str, ...]:
        """The id of every image."""
        return tuple(i.id for i in self._store.list())

    def config(self, image: Image) -> dict[str, object]:
        """The image's config document as stored."""
        config_digest = image.id
        data = json.loads(self._content.read(config_digest))
        assert isinstance(data, dict)
        return data

    async def remove(self, query: str) -> None:
        """Remove by id or digest (whole image) or by tag (that tag; the image goes with
        its last tag). Removing an image that is not here is not an error."""
        image, ref = self.find(query)
        if image is None:
            return
        if ref is not None and ref.digest is None and len(image.repo_tags) > 1:
            async with self._meta_lock:
                await self._store.update(image.id, _without_tag(str(ref)))
            return
        async with self._meta_lock:
            await self._store.delete(image.id)
        await self.collect_garbage()

    async def collect_garbage(self, *, besides: asyncio.Task[Any] | None = None) -> None:
        """Delete blobs and layers no image needs (layers in use by containers stay).

        Nothing is deleted while a pull other than ``besides`` runs.
        """
        async with self._meta_lock:
            images = self._store.list()
            wanted_blobs = set().union(*(i.blobs() for i in images)) if images else set()
            wanted_layers = {c for i in images for c in i.chain()}
            inflight = any(task is not besides for task in self._pulls.values())
            if inflight or self._imports:
                # A running pull or import has blobs and layers no record names yet: keep
                # everything.
                return
            for digest in self._content.digests() - wanted_blobs:
                self._content.delete(digest)
            await anyio.to_thread.run_sync(
                self._remove_layers, self._snapshotter.layers() - wanted_layers
            )

    def _remove_layers(self, unwanted: set[str]) -> None:
        # Children before parents: keep trying until no more can go.
        pending = set(unwanted)
        while pending:
            removed = set()
            for chain_id in pending:
                try:
                    self._snapshotter.remove_layer(chain_id)
                    removed.add(chain_id)
                except FailedPrecondition:
                    continue
            if not removed:
                log.info("keeping %d unreferenced layer(s) still in use", len(pending))
                return
            pending -= removed

    async def fs_usage(self) -> FsUsage:
        """Bytes and inodes used by blobs and layers.

        Walking the store is the costliest thing kubelet's polling asks for, so a result
        is reused for FS_USAGE_TTL_SECONDS (containerd refreshes its figures once a minute).
        """
        cached = self._fs_cache
        if cached is not None and time.monotonic() - cached[0] < FS_USAGE_TTL_SECONDS:
            return cached[1]
        usage = await anyio.to_thread.run_sync(self._fs_usage)
        self._fs_cache = (time.monotonic(), usage)
        return usage

    def _fs_usage(self) -> FsUsage:
        content_bytes, content_inodes = self._content.usage()
        snap_bytes, snap_inodes = self._snapshotter.usage()
        return FsUsage(
            mountpoint=self._snapshotter.mountpoint(),
            used_bytes=content_bytes + snap_bytes,
            inodes_used=content_inodes + snap_inodes,
            timestamp=time.time_ns(),
        )


def _chunks_from_loop(chunks: AsyncIterator[bytes]) -> Callable[[], bytes]:
    """For a worker thread: the next non-empty chunk (b"" at the end), awaited on the loop."""

    async def next_chunk() -> bytes:
        async for chunk in chunks:
            if chunk:
                return chunk
        return b""

    return lambda: anyio.from_thread.run(next_chunk)


def _without_tag(tag: str) -> Callable[[Image], Image]:
    def change(image: Image) -> Image:
        return image.model_copy(update={"repo_tags": [t for t in image.repo_tags if t != tag]})

    return change


def _union(first: list[str], second: list[str]) -> list[str]:
    return first + [x for x in second if x not in first]
