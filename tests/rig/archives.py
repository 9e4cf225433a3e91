"""Image archives written in memory for import tests: ``docker save`` tars and OCI layouts.

Each builder returns a list of :class:`ArchiveMember` (so a test can corrupt, drop or add
members, hostile ones included) that :func:`tar_bytes` turns into a tar, plain or gzip'd.
The layouts follow what the real tools write:

- :func:`docker_archive`: ``docker save`` up to Docker 24 and skopeo's ``docker-archive:``:
  ``<config hex>.json``, one ``<diff ID hex>.tar`` per layer, a legacy ``<n>/layer.tar``
  symlink to it, then ``manifest.json`` and ``repositories`` last.
- :func:`oci_archive`: an OCI image layout (``blobs/sha256/<hex>``, ``index.json``,
  ``oci-layout``), as skopeo's ``oci-archive:`` and ``ctr export`` write it; each entry
  carries the annotations given. :func:`docker25_archive` adds the ``manifest.json`` that
  ``docker save`` writes next to the layout since Docker 25.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tests.rig.oci_image import Image, Index, sha256_digest

__all__ = [
    "IMAGE_NAME",
    "REF_NAME",
    "ArchiveMember",
    "docker25_archive",
    "docker_archive",
    "oci_archive",
    "tar_bytes",
]

IMAGE_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"
MemberKind = Literal["file", "dir", "symlink", "hardlink", "fifo", "char"]
_TYPES: dict[MemberKind, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "fifo": tarfile.FIFOTYPE,
    "char": tarfile.CHRTYPE,
}


@dataclass(frozen=True)
class ArchiveMember:
    """One tar entry of an archive, written verbatim (hostile names included)."""

    name: str
    data: bytes = b""
    kind: MemberKind = "file"
    linkname: str = ""


def tar_bytes(
    members: Iterable[ArchiveMember], compression: Literal["none", "gzip"] = "none"
) -> bytes:
    """The members as one tar stream, optionally gzip'd as a whole."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = _TYPES[member.kind]
            info.mode = 0o755 if member.kind == "dir" else 0o644
            info.mtime = 0
            info.linkname = member.linkname
            info.size = len(member.data) if member.kind == "file" else 0
            tar.addfile(info, io.BytesIO(member.data) if member.kind == "file" else None)
    data = out.getvalue()
    return gzip.compress(data, mtime=0) if compression == "gzip" else data


def _json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _blob(data: bytes) -> ArchiveMember:
    return ArchiveMember(f"blobs/sha256/{sha256_digest(data).removeprefix('sha256:')}", data)


def oci_archive(entries: Sequence[tuple[Image | Index, Mapping[str, str]]]) -> list[ArchiveMember]:
    """An OCI layout holding each (image or index, annotations of its index.json entry)."""
    blobs: dict[str, bytes] = {}
    descriptors = []
    for obj, entry_annotations in entries:
        blobs.update(obj.blobs())
        if isinstance(obj, Index):
            for image in obj.manifests:
                blobs[image.digest] = image.manifest_bytes
        blobs[obj.digest] = obj.manifest_bytes
        descriptor: dict[str, Any] = {
            "mediaType": obj.media_type,
            "digest": obj.digest,
            "size": len(obj.manifest_bytes),
        }
        if entry_annotations:
            descriptor["annotations"] = dict(entry_annotations)
        descriptors.append(descriptor)
    members = [ArchiveMember("blobs", kind="dir"), ArchiveMember("blobs/sha256", kind="dir")]
    members += [_blob(data) for data in blobs.values()]
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descriptors,
    }
    members.append(ArchiveMember("index.json", _json(index)))
    members.append(ArchiveMember("oci-layout", _json({"imageLayoutVersion": "1.0.0"})))
    return members


def docker_archive(
    entries: Sequence[tuple[Image, Sequence[str]]], *, compressed_layers: bool = False
) -> list[ArchiveMember]:
    """``docker save`` of each (image, repo tags); layers as plain tars unless
    ``compressed_layers`` (then each layer's blob as the image holds it)."""
    members: list[ArchiveMember] = []
    manifest = []
    repositories: dict[str, dict[str, str]] = {}
    written: set[str] = set()
    for number, (image, tags) in enumerate(entries):
        config_name = f"{image.config_digest.removeprefix('sha256:')}.json"
        if config_name not in written:
            members.append(ArchiveMember(config_name, image.config_bytes))
            written.add(config_name)
        paths = []
        for position, layer in enumerate(image.layers):
            data = layer.blob if compressed_layers else layer.tar
            path = f"{sha256_digest(data).removeprefix('sha256:')}.tar"
            if path not in written:
                members.append(ArchiveMember(path, data))
                legacy = f"legacy{number}-{position}"
                members.append(ArchiveMember(legacy, kind="dir"))
                members.append(ArchiveMember(f"{legacy}/VERSION", b"1.0"))
                members.append(
                    ArchiveMember(f"{legacy}/layer.tar", kind="symlink", linkname=f"../{path}")
                )
                written.add(path)
            paths.append(path)
        manifest.append({"Config": config_name, "RepoTags": list(tags), "Layers": paths})
        for tag in tags:
            repo, _, version = tag.rpartition(":")
            repositories.setdefault(repo, {})[version] = config_name.removesuffix(".json")
    members.append(ArchiveMember("manifest.json", _json(manifest)))
    members.append(ArchiveMember("repositories", _json(repositories)))
    return members


def docker25_archive(image: Image, tags: Sequence[str]) -> list[ArchiveMember]:
    """``docker save`` since Docker 25: an OCI layout whose index entry names the image by
    containerd's annotation, plus ``manifest.json`` pointing into ``blobs/``."""
    name = tags[0] if tags else ""
    annotations = {IMAGE_NAME: name, REF_NAME: name.rpartition(":")[2]} if name else {}
    members = oci_archive([(image, annotations)])
    manifest = [
        {
            "Config": f"blobs/sha256/{image.config_digest.removeprefix('sha256:')}",
            "RepoTags": list(tags),
            "Layers": [
                f"blobs/sha256/{layer.digest.removeprefix('sha256:')}" for layer in image.layers
            ],
        }
    ]
    members.append(ArchiveMember("manifest.json", _json(manifest)))
    return members
