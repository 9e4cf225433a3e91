"""Image manifests, indexes and configs: media types, parsing, platform choice, chain IDs.

Docker schema 2 and OCI documents are accepted; Docker schema 1 is refused (it is signed
JSON with no config blob, deprecated for years, and registries no longer serve it).
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from typing import Any

from crishim.errors import InvalidArgument, Unimplemented

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = (*INDEX_TYPES, *MANIFEST_TYPES)
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    # Not in the schema 2 spec, but what moby and containerd write for layers they store
    # uncompressed (docker save since Docker 25, images imported from docker archives) or
    # compress with zstd.
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
)


@dataclass(frozen=True)
class Platform:
    """An OS/architecture/variant triple, as in image indexes."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a blob: its media type, digest and size."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None


@dataclass(frozen=True)
class Manifest:
    """An image manifest: one config and its layers, bottom first."""

    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config crishim uses."""

    diff_ids: tuple[str, ...]
    user: str = ""
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    working_dir: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    stop_signal: str = ""
    volumes: tuple[str, ...] = ()
    platform: Platform = Platform("linux", "")


_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
    "i386": "386",
}
_VARIANT = {"aarch64": "v8", "arm64": "v8", "armv7l": "v7", "armv6l": "v6"}


def host_platform() -> Platform:
    """This machine's platform in OCI terms."""
    machine = platform.machine().lower()
    return Platform("linux", _ARCH.get(machine, machine), _VARIANT.get(machine, ""))


def _load(content: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(content)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{what} is not a JSON object")
    return data


def parse_descriptor(raw: Any, what: str) -> Descriptor:
    """A descriptor object (sha256 digests only); InvalidArgument naming ``what``."""
    if not isinstance(raw, dict):
        raise InvalidArgument(f"{what}: descriptor is not an object")
    digest, size, media_type = raw.get("digest"), raw.get("size"), raw.get("mediaType", "")
    if not isinstance(digest, str) or not digest.startswith("sha256:") or len(digest) != 71:
        raise InvalidArgument(f"{what}: descriptor has an unsupported digest {digest!r}")
    if not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"{what}: descriptor of {digest} has no valid size")
    plat = raw.get("platform")
    found = None
    if isinstance(plat, dict):
        found = Platform(
            str(plat.get("os", "")), str(plat.get("architecture", "")), str(plat.get("variant", ""))
        )
    return Descriptor(str(media_type), digest, size, found)


def media_type_of(content: bytes, served_as: str) -> str:
    """The document's media type: its own mediaType field, else what the server said."""
    data = _load(content, "manifest")
    declared = data.get("mediaType")
    media_type = declared if isinstance(declared, str) and declared else served_as
    if media_type in DOCKER_SCHEMA1 or data.get("schemaVersion") == 1:
        raise Unimplemented(
            "Docker image manifest schema 1 is not supported (deprecated; push the image "
            "again with a current client to get schema 2 or OCI)"
        )
    if not media_type:
        media_type = OCI_INDEX if "manifests" in data else OCI_MANIFEST
    return media_type


def choose_from_index(content: bytes, want: Platform) -> Descriptor:
    """The manifest of an index that best matches ``want`` (exact variant first)."""
    data = _load(content, "image index")
    entries = data.get("manifests")
    if not isinstance(entries, list):
        raise InvalidArgument("image index has no manifests list")
    candidates = [parse_descriptor(e, "image index") for e in entries]
    matching = [
        d
        for d in candidates
        if d.platform is not None
        and d.platform.os == want.os
        and d.platform.architecture == want.architecture
    ]
    for d in matching:
        if d.platform is not None and d.platform.variant == want.variant:
            return d
    for d in matching:
        if d.platform is not None and not d.platform.variant:
            return d
    if matching:
        return matching[0]
    offered = ", ".join(str(d.platform) for d in candidates if d.platform) or "none"
    raise InvalidArgument(f"image index has no manifest for {want} (it offers: {offered})")


def parse_manifest(content: bytes) -> Manifest:
    """The config and layer descriptors of an image manifest."""
    data = _load(content, "image manifest")
    layers_raw = data.get("layers")
    if not isinstance(layers_raw, list):
        raise InvalidArgument("image manifest has no layers list")
    config = parse_descriptor(data.get("config"), "image manifest config")
    layers = tuple(
        parse_descriptor(raw, f"image manifest layer {i}") for i, raw in enumerate(layers_raw)
    )
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise Unimplemented(
                f"layer {layer.digest} has unsupported media type {layer.media_type!r}"
            )
    return Manifest(config, layers)


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value) if isinstance(value, list) else ()


def parse_config(content: bytes) -> ImageConfig:
    """The image config's runtime settings and diff IDs."""
    data = _load(content, "image config")
    rootfs = data.get("rootfs")
    diff_ids = _strings(rootfs.get("diff_ids")) if isinstance(rootfs, dict) else ()
    cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
    assert isinstance(cfg, dict)
    labels = cfg.get("Labels") if isinstance(cfg.get("Labels"), dict) else {}
    volumes = cfg.get("Volumes") if isinstance(cfg.get("Volumes"), dict) else {}
    return ImageConfig(
        diff_ids=diff_ids,
        user=str(cfg.get("User") or ""),
        env=_strings(cfg.get("Env")),
        entrypoint=_strings(cfg.get("Entrypoint")),
        cmd=_strings(cfg.get("Cmd")),
        working_dir=str(cfg.get("WorkingDir") or ""),
        labels={str(k): str(v) for k, v in (labels or {}).items()},
        stop_signal=str(cfg.get("StopSignal") or ""),
        volumes=tuple(sorted(str(v) for v in (volumes or {}))),
        platform=Platform(
            str(data.get("os", "")), str(data.get("architecture", "")), str(data.get("variant", ""))
        ),
    )


def chain_ids(diff_ids: tuple[str, ...]) -> list[str]:
    """OCI chain IDs: each layer's ID names the whole stack below and including it."""
    chain: list[str] = []
    for diff_id in diff_ids:
        if not chain:
            chain.append(diff_id)
        else:
            joined = f"{chain[-1]} {diff_id}".encode()
            chain.append("sha256:" + hashlib.sha256(joined).hexdigest())
    return chain
