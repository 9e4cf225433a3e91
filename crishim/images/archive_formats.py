"""What an image archive holds: docker-archive and OCI-archive images, planned for import.

Two formats, told apart by their top-level files:

- **OCI image layout** (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``): written by
  skopeo's and buildah's ``oci-archive:``, ``ctr export``, and ``docker save`` since Docker 25
  (which adds a ``manifest.json`` beside it). Each entry of ``index.json`` is an image: its
  descriptor points at a manifest, or at an index resolved to this host's platform. Its
  names come from the ``io.containerd.image.name`` annotation (a full reference), else from
  ``org.opencontainers.image.ref.name`` when that is a reference rather than a bare tag
  (containerd's rule: it contains ``/``, ``:`` or ``@``), plus the ``RepoTags`` a
  ``manifest.json`` beside it gives the same config. Content is addressed by digest.
- **docker-archive** (``manifest.json`` alone: ``docker save`` up to Docker 24, skopeo's
  ``docker-archive:``): a list of ``{"Config", "RepoTags", "Layers"}`` with paths into the
  archive. Layers are tars, plain or compressed (told by their first bytes). Such an image
  has no manifest, so one is written here (an OCI manifest in canonical JSON: the same
  archive always gives the same manifest digest) and stored like a pulled one.

Names are normalised as a pull normalises them (``busybox:1`` is
``docker.io/library/busybox:1``). An entry with no image for this platform is skipped with
a note; an archive with no image left is refused. Everything an image needs must be in the
archive and match its digest and declared size; every JSON document is read under
``MAX_DOCUMENT``, indexes are followed at most ``MAX_INDEX_DEPTH`` deep.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ParamSpec, TypeVar

from crishim.errors import CrishimError, DataLoss, InvalidArgument, Unimplemented
from crishim.images.archive import ArchiveContents, Member
from crishim.images.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    chain_ids,
    choose_from_index,
    media_type_of,
    parse_config,
    parse_descriptor,
    parse_manifest,
)
from crishim.images.reference import Reference, parse_reference

__all__ = ["MAX_INDEX_DEPTH", "ImportPlan", "PlannedImage", "PlannedLayer", "plan_import"]

IMAGE_NAME_ANNOTATION = "io.containerd.image.name"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_INDEX_DEPTH = 4
_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_IMAGE_ID = re.compile(r"^sha256:[a-f0-9]{64}$")
_HEX_NAME = re.compile(r"^(?:.*/)?([a-f0-9]{64})(?:\.json)?$")
_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True)
class PlannedLayer:
    """One layer to unpack: its descriptor, the archive file holding it, its IDs."""

    descriptor: Descriptor
    member: Member
    diff_id: str
    chain_id: str


@dataclass(frozen=True)
class PlannedImage:
    """One image of the archive, checked and ready to unpack and record."""

    label: str
    names: tuple[Reference, ...]
    top_digest: str
    manifest_digest: str
    config: Descriptor
    user: str
    layers: tuple[PlannedLayer, ...]
    #: archive files to keep: indexes and manifest on the way, and the config
    documents: tuple[Member, ...]
    #: documents written here, by digest (a docker-archive image's manifest)
    written: dict[str, bytes] = field(default_factory=dict)

    @property
    def metadata_digests(self) -> list[str]:
        """Indexes, manifest and config, top first (an image record's metadata blobs)."""
        digests = [m.digest for m in self.documents if m.digest != self.config.digest]
        digests += [d for d in self.written if d not in digests]
        return [*digests, self.config.digest]


@dataclass
class ImportPlan:
    """The images an archive holds for this platform, and notes on what was left out."""

    images: list[PlannedImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_import(contents: ArchiveContents, platform: Platform) -> ImportPlan:
    """The images of a read archive (blocking: it reads staged documents)."""
    if contents.has("index.json"):
        plan = _plan_oci(contents, platform)
    elif contents.has("manifest.json"):
        plan = _plan_docker(contents)
    else:
        raise InvalidArgument(
            "not an image archive: it has neither index.json (OCI layout) nor manifest.json "
            "(docker save)"
        )
    if not plan.images:
        why = "; ".join(plan.notes) or "its index lists no image"
        raise InvalidArgument(f"the archive holds no image to import for {platform}: {why}")
    return plan


# --- OCI image layout -------------------------------------------------------------------


def _plan_oci(contents: ArchiveContents, platform: Platform) -> ImportPlan:
    if contents.has("oci-layout"):
        layout = _object(contents, "oci-layout", "oci-layout")
        version = layout.get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise Unimplemented(f"oci-layout: unsupported imageLayoutVersion {version!r}")
    index = _object(contents, "index.json", "index.json")
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise InvalidArgument('index.json has no "manifests" list')
    docker_tags = _docker_tags_by_config(contents) if contents.has("manifest.json") else {}
    plan = ImportPlan()
    for number, raw in enumerate(entries):
        label = f"index.json entry {number}"
        descriptor = parse_descriptor(raw, label)
        names = _annotated_names(raw, label, plan.notes)
        if names:
            label = f"{label} ({names[0]})"
        wanted = descriptor.platform
        if wanted is not None and not _runs_here(wanted, platform):
            plan.notes.append(f"{label} skipped: it is for {wanted}")
            continue
        try:
            documents, manifest_digest, manifest = _resolve(contents, descriptor, label, platform)
        except _NoPlatform as exc:
            plan.notes.append(f"{label} skipped: {exc}")
            continue
        image = _image(contents, label, descriptor.digest, manifest_digest, manifest, documents)
        extra = tuple(n for n in docker_tags.get(image.config.digest, ()) if n not in names)
        plan.images.append(replace(image, names=names + extra))
    return plan


class _NoPlatform(Exception):
    """An index has no manifest for this platform."""


def _resolve(
    contents: ArchiveContents, descriptor: Descriptor, label: str, platform: Platform
) -> tuple[list[Member], str, bytes]:
    """Follow indexes down to this platform's manifest: (documents passed, its digest, it)."""
    documents: list[Member] = []
    current = descriptor
    for _ in range(MAX_INDEX_DEPTH + 1):
        member = _sized_blob(contents, current, f"the manifest of {label}")
        content = contents.document(member, f"the manifest of {label}")
        media_type = _wrap(label, media_type_of, content, current.media_type)
        documents.append(member)
        if media_type in MANIFEST_TYPES:
            return documents, current.digest, content
        if media_type not in INDEX_TYPES:
            raise Unimplemented(f"{label}: unsupported manifest media type {media_type!r}")
        try:
            current = choose_from_index(content, platform)
        except InvalidArgument as exc:
            raise _NoPlatform(str(exc)) from None
    raise InvalidArgument(f"{label}: indexes nested more than {MAX_INDEX_DEPTH} deep")


def _image(
    contents: ArchiveContents,
    label: str,
    top_digest: str,
    manifest_digest: str,
    manifest_bytes: bytes,
    documents: list[Member],
) -> PlannedImage:
    manifest = _wrap(label, parse_manifest, manifest_bytes)
    config_member = _sized_blob(contents, manifest.config, f"the config of {label}")
    config = _wrap(label, parse_config, contents.document(config_member, f"the config of {label}"))
    layers = [
        (desc, _sized_blob(contents, desc, f"layer {i} of {label}"))
        for i, desc in enumerate(manifest.layers)
    ]
    return PlannedImage(
        label=label,
        names=(),
        top_digest=top_digest,
        manifest_digest=manifest_digest,
        config=manifest.config,
        user=config.user,
        layers=_layers(label, layers, config.diff_ids),
        documents=(*documents, config_member),
    )


def _sized_blob(contents: ArchiveContents, descriptor: Descriptor, what: str) -> Member:
    member = contents.blob(descriptor.digest, what)
    if member.size != descriptor.size:
        raise DataLoss(
            f"blob {descriptor.digest} ({what}): the archive holds {member.size} bytes, its "
            f"descriptor says {descriptor.size}"
        )
    return member


def _annotated_names(raw: Any, label: str, notes: list[str]) -> tuple[Reference, ...]:
    annotations = raw.get("annotations") if isinstance(raw, dict) else None
    if not isinstance(annotations, dict):
        return ()
    full = annotations.get(IMAGE_NAME_ANNOTATION)
    if isinstance(full, str) and full:
        return _names([full], f"{label} annotation {IMAGE_NAME_ANNOTATION}")
    ref_name = annotations.get(REF_NAME_ANNOTATION)
    if not isinstance(ref_name, str) or not ref_name:
        return ()
    if any(c in ref_name for c in "/:@"):
        return _names([ref_name], f"{label} annotation {REF_NAME_ANNOTATION}")
    notes.append(
        f'{label} is named only by the tag "{ref_name}", without a repository: imported '
        "without a name (list it by its ID)"
    )
    return ()


def _runs_here(wanted: Platform, platform: Platform) -> bool:
    return (wanted.os, wanted.architecture) == (platform.os, platform.architecture)


# --- docker-archive -----------------------------------------------------------------------


@dataclass(frozen=True)
class _DockerEntry:
    label: str
    config: Member
    names: tuple[Reference, ...]
    layer_paths: tuple[str, ...]


def _docker_entries(contents: ArchiveContents) -> list[_DockerEntry]:
    member = contents.find("manifest.json", "manifest.json")
    entries = contents.json(member, "manifest.json")
    if not isinstance(entries, list):
        raise InvalidArgument("manifest.json is not a JSON list")
    found = []
    for number, raw in enumerate(entries):
        label = f"manifest.json entry {number}"
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{label} is not an object")
        config_path, tags, layers = raw.get("Config"), raw.get("RepoTags"), raw.get("Layers")
        if not isinstance(config_path, str):
            raise InvalidArgument(f'{label} has no "Config" path')
        if tags is None:
            tags = []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidArgument(f'{label}: "RepoTags" is not a list of strings')
        if not isinstance(layers, list) or not all(isinstance(p, str) for p in layers):
            raise InvalidArgument(f'{label}: "Layers" is not a list of paths')
        names = _names(tags, f"{label} RepoTags")
        if names:
            label = f"{label} ({names[0]})"
        config = contents.find(config_path, f"the config of {label}")
        named = _HEX_NAME.match(config.name)
        if named and config.digest != f"sha256:{named.group(1)}":
            raise DataLoss(
                f'archive member "{config.name}" (the config of {label}): its content has '
                f"digest {config.digest}, its name says sha256:{named.group(1)}"
            )
        found.append(_DockerEntry(label, config, names, tuple(layers)))
    return found


def _docker_tags_by_config(contents: ArchiveContents) -> dict[str, tuple[Reference, ...]]:
    tags: dict[str, tuple[Reference, ...]] = {}
    for entry in _docker_entries(contents):
        tags[entry.config.digest] = tags.get(entry.config.digest, ()) + entry.names
    return tags


def _plan_docker(contents: ArchiveContents) -> ImportPlan:
    plan = ImportPlan()
    for entry in _docker_entries(contents):
        label = entry.label
        config = _wrap(
            label, parse_config, contents.document(entry.config, f"the config of {label}")
        )
        members = [
            contents.find(path, f"layer {i} of {label}") for i, path in enumerate(entry.layer_paths)
        ]
        descriptors = [Descriptor(_layer_media_type(m), m.digest, m.size) for m in members]
        layers = _layers(label, list(zip(descriptors, members, strict=True)), config.diff_ids)
        for i, layer in enumerate(layers):
            # A plain tar's digest is its diff ID: a damaged one is named here, by its path.
            if layer.descriptor.media_type == _LAYER_TAR and layer.member.digest != layer.diff_id:
                raise DataLoss(
                    f'archive member "{layer.member.name}" (layer {i} of {label}): its content '
                    f"has digest {layer.member.digest}, the config's diff ID is {layer.diff_id}"
                )
        config_descriptor = Descriptor(OCI_CONFIG, entry.config.digest, entry.config.size)
        manifest = _canonical(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": _descriptor_json(config_descriptor),
                "layers": [_descriptor_json(d) for d in descriptors],
            }
        )
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        plan.images.append(
            PlannedImage(
                label=label,
                names=entry.names,
                top_digest=manifest_digest,
                manifest_digest=manifest_digest,
                config=config_descriptor,
                user=config.user,
                layers=layers,
                documents=(entry.config,),
                written={manifest_digest: manifest},
            )
        )
    return plan


def _layer_media_type(member: Member) -> str:
    if member.head.startswith(_GZIP_MAGIC):
        return f"{_LAYER_TAR}+gzip"
    if member.head.startswith(_ZSTD_MAGIC):
        return f"{_LAYER_TAR}+zstd"
    return _LAYER_TAR


def _descriptor_json(descriptor: Descriptor) -> dict[str, Any]:
    return {
        "mediaType": descriptor.media_type,
        "digest": descriptor.digest,
        "size": descriptor.size,
    }


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


# --- shared -------------------------------------------------------------------------------


def _layers(
    label: str, layers: list[tuple[Descriptor, Member]], diff_ids: tuple[str, ...]
) -> tuple[PlannedLayer, ...]:
    if len(diff_ids) != len(layers):
        raise InvalidArgument(
            f"{label}: the config lists {len(diff_ids)} diff IDs for {len(layers)} layers"
        )
    return tuple(
        PlannedLayer(desc, member, diff_id, chain_id)
        for (desc, member), diff_id, chain_id in zip(
            layers, diff_ids, chain_ids(diff_ids), strict=True
        )
    )


def _names(texts: list[str], where: str) -> tuple[Reference, ...]:
    """Tags as references normalised like a pull's. Digest-only references name no tag, nor
    does an image ID (containerd names images by their ID too, and exports that name)."""
    found: list[Reference] = []
    for text in texts:
        if _IMAGE_ID.match(text):
            continue
        ref = _wrap(where, parse_reference, text)
        if ref.tag is None:
            continue
        tagged = ref.with_tag(ref.tag)
        if tagged not in found:
            found.append(tagged)
    return tuple(found)


def _object(contents: ArchiveContents, name: str, what: str) -> dict[str, Any]:
    data = contents.json(contents.find(name, what), what)
    if not isinstance(data, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return data


def _wrap(label: str, parse: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """``parse(*args)``, its errors prefixed with what was being read."""
    try:
        return parse(*args, **kwargs)
    except CrishimError as exc:
        raise type(exc)(f"{label}: {exc}") from None
