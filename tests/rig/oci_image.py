"""Pure-Python writer for OCI / Docker schema2 test images, plus a tiny registry client.

Everything here is built in memory with the standard library (tarfile, gzip,
hashlib, json, urllib) and ``zstandard``; no umoci or skopeo is needed to make
or push an image.

Output is deterministic: tar entries carry fixed mtimes and empty user/group
names, gzip headers have mtime 0, JSON documents are serialised with sorted keys
and no whitespace.  The same description therefore always yields the same
digests, which lets tests pin digests and compare runs.

Layers may contain hostile entries (``../escape``, absolute names, symlinks
that point outside the rootfs, hardlinks to ``../../etc/passwd``) through
:meth:`LayerBuilder.raw`, so extractor hardening can be tested against a real
registry.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import platform as _platform
import posixpath
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import zstandard

__all__ = [
    "ALL_MANIFEST_MEDIA_TYPES",
    "BUSYBOX_APPLETS",
    "DEFAULT_MTIME",
    "DEFAULT_PATH_ENV",
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_LAYER_TAR",
    "DOCKER_LAYER_ZSTD",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "EPOCH",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "Compression",
    "Entry",
    "EntryKind",
    "Flavor",
    "Image",
    "Index",
    "Layer",
    "LayerBuilder",
    "RegistryClient",
    "RegistryError",
    "Response",
    "busybox_image",
    "compress",
    "decompress",
    "host_platform",
    "opaque_name",
    "push",
    "sha256_digest",
    "whiteout_name",
    "write_oci_layout",
]

# --- media types -----------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# Not in the original schema2 spec, but what containerd/moby use for these.
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"

ALL_MANIFEST_MEDIA_TYPES: tuple[str, ...] = (
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
)

Compression = Literal["gzip", "zstd", "none"]
Flavor = Literal["oci", "docker"]
EntryKind = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]

_LAYER_MEDIA_TYPES: dict[tuple[Flavor, Compression], str] = {
    ("oci", "gzip"): OCI_LAYER_GZIP,
    ("oci", "zstd"): OCI_LAYER_ZSTD,
    ("oci", "none"): OCI_LAYER_TAR,
    ("docker", "gzip"): DOCKER_LAYER_GZIP,
    ("docker", "zstd"): DOCKER_LAYER_ZSTD,
    ("docker", "none"): DOCKER_LAYER_TAR,
}

_KIND_TO_TARTYPE: dict[EntryKind, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}

#: mtime given to every entry unless told otherwise (2000-01-01T00:00:00Z);
#: non-zero so that "mtime preserved" checks can tell it from "unset".
DEFAULT_MTIME = 946684800
#: ``created`` timestamp written into configs and history.
EPOCH = "1970-01-01T00:00:00Z"

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"


def sha256_digest(data: bytes) -> str:
    """Return the OCI digest string ``sha256:<hex>`` of *data*."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(obj: Any) -> bytes:
    # Sorted keys and no whitespace: the same document always hashes the same.
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def compress(data: bytes, compression: Compression) -> bytes:
    """Compress a tar stream deterministically."""
    if compression == "gzip":
        # mtime=0 keeps the gzip header free of the wall clock.
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def decompress(blob: bytes, compression_or_media_type: str) -> bytes:
    """Undo :func:`compress`; accepts a compression name or a layer media type."""
    c = compression_or_media_type
    if c == "gzip" or c.endswith("gzip"):
        return gzip.decompress(blob)
    if c == "zstd" or c.endswith("zstd"):
        # Stream reader: works whether or not the frame records its content size.
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob)) as r:
            return r.read()
    if c == "none" or c.endswith(".tar"):
        return blob
    raise ValueError(f"cannot tell the compression of {c!r}")


def host_platform() -> tuple[str, str | None]:
    """Return the OCI ``(architecture, variant)`` of this machine."""
    machine = _platform.machine().lower()
    table: dict[str, tuple[str, str | None]] = {
        "x86_64": ("amd64", None),
        "amd64": ("amd64", None),
        "aarch64": ("arm64", "v8"),
        "arm64": ("arm64", "v8"),
        "armv7l": ("arm", "v7"),
        "armv6l": ("arm", "v6"),
        "i386": ("386", None),
        "i686": ("386", None),
        "ppc64le": ("ppc64le", None),
        "s390x": ("s390x", None),
        "riscv64": ("riscv64", None),
    }
    return table.get(machine, (machine, None))


# --- layers ----------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar entry.

    ``name`` and ``linkname`` are written verbatim; normalisation (and the
    refusal of ``..``) happens in :class:`LayerBuilder`, except for entries
    added with :meth:`LayerBuilder.raw`.  Note that :mod:`tarfile` appends a
    ``/`` to directory names when it writes them.
    """

    name: str
    kind: EntryKind | bytes = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    uname: str = ""
    gname: str = ""
    xattrs: Mapping[str, bytes | str] = field(default_factory=dict)
    #: extra PAX records, written as given (e.g. to test odd headers)
    pax: Mapping[str, str] = field(default_factory=dict)
    raw: bool = False

    @property
    def typeflag(self) -> bytes:
        if isinstance(self.kind, bytes):
            return self.kind
        return _KIND_TO_TARTYPE[self.kind]

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.name)
        ti.type = self.typeflag
        ti.mode = self.mode
        ti.uid = self.uid
        ti.gid = self.gid
        ti.uname = self.uname
        ti.gname = self.gname
        ti.mtime = self.mtime
        ti.linkname = self.linkname
        ti.devmajor = self.devmajor
        ti.devminor = self.devminor
        ti.size = len(self.data) if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        pax: dict[str, str] = dict(self.pax)
        for key, value in sorted(self.xattrs.items()):
            # tarfile wants str; surrogateescape carries arbitrary bytes through
            # and makes tarfile mark the header hdrcharset=BINARY.
            if isinstance(value, bytes):
                value = value.decode("utf-8", "surrogateescape")
            pax["SCHILY.xattr." + key] = value
        ti.pax_headers = pax
        return ti


def _clean(path: str) -> str:
    """Normalise a rootfs path to the relative form used in layer tars."""
    p = posixpath.normpath("/" + path.lstrip("/")).lstrip("/")
    if not p or p == ".":
        raise ValueError(f"empty path {path!r}")
    if ".." in path.split("/"):
        # Hostile names must be asked for explicitly.
        raise ValueError(f"path {path!r} contains '..'; use LayerBuilder.raw() for hostile entries")
    return p


def _path_key(name: str) -> tuple[str, ...]:
    # Component-wise order puts every directory before its children.
    return tuple(name.rstrip("/").split("/"))


class LayerBuilder:
    """Collects tar entries and builds a :class:`Layer`.

    With ``sort=True`` (the default) entries are written in path order, with
    hardlinks moved after their targets; with ``sort=False`` they are written
    exactly in the order added, which hostile layers need (e.g. a symlink
    followed by a file written "through" it).  Every adder returns ``self`` so
    calls chain.
    """

    def __init__(self, *, sort: bool = True, mtime: int = DEFAULT_MTIME) -> None:
        self.sort = sort
        self.mtime = mtime
        self._entries: list[Entry] = []

    # -- ordinary entries (paths normalised, '..' refused) --

    def add(self, entry: Entry) -> LayerBuilder:
        self._entries.append(entry)
        return self

    def file(
        self,
        path: str,
        data: bytes | str = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
        xattrs: Mapping[str, bytes | str] | None = None,
    ) -> LayerBuilder:
        payload = data.encode() if isinstance(data, str) else data
        return self.add(
            Entry(
                _clean(path),
                "file",
                payload,
                mode,
                uid,
                gid,
                self._mt(mtime),
                xattrs=dict(xattrs or {}),
            )
        )

    def dir(
        self,
        path: str,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
        xattrs: Mapping[str, bytes | str] | None = None,
    ) -> LayerBuilder:
        return self.add(
            Entry(
                _clean(path),
                "dir",
                b"",
                mode,
                uid,
                gid,
                self._mt(mtime),
                xattrs=dict(xattrs or {}),
            )
        )

    def symlink(
        self,
        path: str,
        target: str,
        *,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
    ) -> LayerBuilder:
        # The target is stored as given: absolute or dangling targets are legal.
        return self.add(
            Entry(
                _clean(path),
                "symlink",
                b"",
                0o777,
                uid,
                gid,
                self._mt(mtime),
                linkname=target,
            )
        )

    def hardlink(
        self,
        path: str,
        target: str,
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
    ) -> LayerBuilder:
        """Hardlink *path* to *target*, an earlier entry in the same layer."""
        return self.add(
            Entry(
                _clean(path),
                "hardlink",
                b"",
                mode,
                uid,
                gid,
                self._mt(mtime),
                linkname=_clean(target),
            )
        )

    def char_device(
        self,
        path: str,
        major: int,
        minor: int,
        *,
        mode: int = 0o666,
        uid: int = 0,
        gid: int = 0,
    ) -> LayerBuilder:
        return self.add(
            Entry(
                _clean(path),
                "char",
                b"",
                mode,
                uid,
                gid,
                self.mtime,
                devmajor=major,
                devminor=minor,
            )
        )

    def block_device(
        self,
        path: str,
        major: int,
        minor: int,
        *,
        mode: int = 0o660,
        uid: int = 0,
        gid: int = 0,
    ) -> LayerBuilder:
        return self.add(
            Entry(
                _clean(path),
                "block",
                b"",
                mode,
                uid,
                gid,
                self.mtime,
                devmajor=major,
                devminor=minor,
            )
        )

    def fifo(self, path: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0) -> LayerBuilder:
        return self.add(Entry(_clean(path), "fifo", b"", mode, uid, gid, self.mtime))

    def whiteout(self, path: str) -> LayerBuilder:
        """Delete *path* of lower layers: adds ``<dir>/.wh.<name>``."""
        return self.add(Entry(whiteout_name(path), "file", b"", 0o644, 0, 0, self.mtime))

    def opaque(self, directory: str) -> LayerBuilder:
        """Hide all lower-layer content of *directory*: adds ``<dir>/.wh..wh..opq``."""
        return self.add(Entry(opaque_name(directory), "file", b"", 0o644, 0, 0, self.mtime))

    # -- hostile entries --

    def raw(
        self,
        name: str,
        kind: EntryKind | bytes = "file",
        *,
        data: bytes | str = b"",
        linkname: str = "",
        mode: int | None = None,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
        devmajor: int = 0,
        devminor: int = 0,
        xattrs: Mapping[str, bytes | str] | None = None,
        pax: Mapping[str, str] | None = None,
    ) -> LayerBuilder:
        """Add an entry whose name and link target are written verbatim.

        For hostile layers: ``raw("../escape")``, ``raw("/abs")``,
        ``raw("evil", "symlink", linkname="/")`` then ``raw("evil/etc/x")``,
        ``raw("pw", "hardlink", linkname="../../etc/passwd")``.  Use
        ``LayerBuilder(sort=False)`` when the order matters.
        """
        payload = data.encode() if isinstance(data, str) else data
        if mode is None:
            mode = 0o755 if kind == "dir" else 0o777 if kind == "symlink" else 0o644
        return self.add(
            Entry(
                name,
                kind,
                payload,
                mode,
                uid,
                gid,
                self._mt(mtime),
                linkname=linkname,
                devmajor=devmajor,
                devminor=devminor,
                xattrs=dict(xattrs or {}),
                pax=dict(pax or {}),
                raw=True,
            )
        )

    # -- output --

    @property
    def entries(self) -> list[Entry]:
        """The entries in the order they will be written."""
        if not self.sort:
            return list(self._entries)
        ordered = sorted(self._entries, key=lambda e: _path_key(e.name))
        # A hardlink must follow its target or extractors cannot resolve it.
        out: list[Entry] = []
        pending: dict[str, list[Entry]] = {}
        seen: set[str] = set()
        names = {e.name.rstrip("/") for e in ordered}
        for e in ordered:
            target = e.linkname.rstrip("/")
            if e.typeflag == tarfile.LNKTYPE and target in names and target not in seen:
                pending.setdefault(target, []).append(e)
                continue
            out.append(e)
            seen.add(e.name.rstrip("/"))
            out.extend(pending.pop(e.name.rstrip("/"), []))
        for rest in pending.values():
            out.extend(rest)
        return out

    def tar_bytes(self) -> bytes:
        """The uncompressed layer tar."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for e in self.entries:
                ti = e.tarinfo()
                tf.addfile(ti, io.BytesIO(e.data) if ti.size else None)
        return buf.getvalue()

    def build(self, compression: Compression = "gzip", *, media_type: str | None = None) -> Layer:
        return Layer.from_tar(self.tar_bytes(), compression, media_type=media_type)

    def _mt(self, mtime: int | None) -> int:
        return self.mtime if mtime is None else mtime


def whiteout_name(path: str) -> str:
    """``etc/foo`` -> ``etc/.wh.foo``."""
    p = _clean(path)
    head, tail = posixpath.split(p)
    return posixpath.join(head, WHITEOUT_PREFIX + tail)


def opaque_name(directory: str) -> str:
    """``var/lib`` -> ``var/lib/.wh..wh..opq``."""
    return posixpath.join(_clean(directory), OPAQUE_WHITEOUT)


@dataclass(frozen=True)
class Layer:
    """A built layer: the uncompressed tar and its (possibly compressed) blob.

    ``media_type`` overrides the type derived from compression and the image
    flavor (e.g. to test how unknown media types are handled).
    """

    tar: bytes
    blob: bytes
    compression: Compression
    media_type: str | None = None

    @classmethod
    def from_tar(
        cls,
        tar: bytes,
        compression: Compression = "gzip",
        *,
        media_type: str | None = None,
    ) -> Layer:
        """Wrap any tar stream (including hand-broken ones) as a layer."""
        return cls(tar, compress(tar, compression), compression, media_type)

    @cached_property
    def diff_id(self) -> str:
        """Digest of the uncompressed tar, as listed in ``rootfs.diff_ids``."""
        return sha256_digest(self.tar)

    @cached_property
    def digest(self) -> str:
        """Digest of the blob as stored in the registry."""
        return sha256_digest(self.blob)

    @property
    def size(self) -> int:
        return len(self.blob)

    def media_type_for(self, flavor: Flavor) -> str:
        return self.media_type or _LAYER_MEDIA_TYPES[(flavor, self.compression)]

    def descriptor(self, flavor: Flavor = "oci") -> dict[str, Any]:
        return {
            "mediaType": self.media_type_for(flavor),
            "digest": self.digest,
            "size": self.size,
        }

    def members(self) -> list[tarfile.TarInfo]:
        """Parse the tar back (for assertions)."""
        with tarfile.open(fileobj=io.BytesIO(self.tar), mode="r:") as tf:
            return tf.getmembers()


# --- images ----------------------------------------------------------------


@dataclass
class Image:
    """A single-platform image: layers plus the runtime config.

    Optional fields left as ``None`` (or empty) are omitted from the config
    JSON, so "unset" can be told from "set to empty" by passing ``[]``/``""``
    through ``config_extra``.
    """

    layers: list[Layer] = field(default_factory=list)
    architecture: str = "amd64"
    os: str = "linux"
    variant: str | None = None
    user: str | None = None
    env: list[str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    working_dir: str | None = None
    labels: dict[str, str] | None = None
    stop_signal: str | None = None
    exposed_ports: list[str] | None = None
    volumes: list[str] | None = None
    #: one history item per layer is generated when None
    history: list[dict[str, Any]] | None = None
    created: str = EPOCH
    flavor: Flavor = "oci"
    annotations: dict[str, str] | None = None
    #: merged into the "config" object of the config JSON (for odd values)
    config_extra: dict[str, Any] | None = None
    #: merged into the top level of the config JSON
    top_extra: dict[str, Any] | None = None

    # -- config --

    def config_dict(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        if self.user is not None:
            cfg["User"] = self.user
        if self.env is not None:
            cfg["Env"] = list(self.env)
        if self.entrypoint is not None:
            cfg["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            cfg["Cmd"] = list(self.cmd)
        if self.working_dir is not None:
            cfg["WorkingDir"] = self.working_dir
        if self.labels is not None:
            cfg["Labels"] = dict(self.labels)
        if self.stop_signal is not None:
            cfg["StopSignal"] = self.stop_signal
        if self.exposed_ports is not None:
            cfg["ExposedPorts"] = {p: {} for p in self.exposed_ports}
        if self.volumes is not None:
            cfg["Volumes"] = {v: {} for v in self.volumes}
        if self.config_extra:
            cfg.update(self.config_extra)
        history = self.history
        if history is None:
            history = [
                {"created": self.created, "created_by": f"crishim test rig: layer {i}"}
                for i in range(len(self.layers))
            ]
        doc: dict[str, Any] = {
            "created": self.created,
            "architecture": self.architecture,
            "os": self.os,
            "config": cfg,
            "rootfs": {
                "type": "layers",
                "diff_ids": [layer.diff_id for layer in self.layers],
            },
            "history": history,
        }
        if self.variant is not None:
            doc["variant"] = self.variant
        if self.top_extra:
            doc.update(self.top_extra)
        return doc

    @property
    def config_bytes(self) -> bytes:
        return _canonical_json(self.config_dict())

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config_bytes)

    @property
    def config_media_type(self) -> str:
        return OCI_CONFIG if self.flavor == "oci" else DOCKER_CONFIG

    # -- manifest --

    @property
    def media_type(self) -> str:
        return OCI_MANIFEST if self.flavor == "oci" else DOCKER_MANIFEST

    def manifest_dict(self) -> dict[str, Any]:
        config = self.config_bytes
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": {
                "mediaType": self.config_media_type,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [layer.descriptor(self.flavor) for layer in self.layers],
        }
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc

    @property
    def manifest_bytes(self) -> bytes:
        return _canonical_json(self.manifest_dict())

    @property
    def digest(self) -> str:
        """The manifest digest (what a registry returns as Docker-Content-Digest)."""
        return sha256_digest(self.manifest_bytes)

    def platform(self) -> dict[str, str]:
        p = {"architecture": self.architecture, "os": self.os}
        if self.variant is not None:
            p["variant"] = self.variant
        return p

    def descriptor(self, *, with_platform: bool = False) -> dict[str, Any]:
        body = self.manifest_bytes
        d: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": sha256_digest(body),
            "size": len(body),
        }
        if with_platform:
            d["platform"] = self.platform()
        return d

    def blobs(self) -> dict[str, bytes]:
        """Config and layer blobs keyed by digest (config first)."""
        out = {self.config_digest: self.config_bytes}
        for layer in self.layers:
            out.setdefault(layer.digest, layer.blob)
        return out


@dataclass
class Index:
    """A multi-platform image: an OCI index or a Docker manifest list.

    Each child's ``platform`` comes from its image config (os/architecture/variant).
    """

    manifests: list[Image] = field(default_factory=list)
    flavor: Flavor = "oci"
    annotations: dict[str, str] | None = None

    @property
    def media_type(self) -> str:
        return OCI_INDEX if self.flavor == "oci" else DOCKER_MANIFEST_LIST

    def index_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "manifests": [img.descriptor(with_platform=True) for img in self.manifests],
        }
        if self.annotations:
            doc["annotations"] = dict(self.annotations)
        return doc

    @property
    def manifest_bytes(self) -> bytes:
        return _canonical_json(self.index_dict())

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest_bytes)

    def blobs(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for img in self.manifests:
            for d, b in img.blobs().items():
                out.setdefault(d, b)
        return out


# --- busybox ---------------------------------------------------------------

#: applets linked into /bin by :func:`busybox_image`
BUSYBOX_APPLETS: tuple[str, ...] = (
    "sh", "ls", "cat", "echo", "sleep", "id", "env", "top",
    "true", "false", "test", "mkdir", "rm", "touch", "ln", "stat", "pwd",
    "hostname", "whoami", "ps", "kill", "grep", "head", "wc", "mount", "printf",
)  # fmt: skip

_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "www-data:x:33:33:www-data:/var/www:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
_GROUP = "root:x:0:\nwww-data:x:33:\nnobody:x:65534:\n"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def busybox_image(
    *,
    busybox_path: str | os.PathLike[str] = "/bin/busybox",
    links: Literal["symlink", "hardlink"] = "symlink",
    applets: Sequence[str] = BUSYBOX_APPLETS,
    compression: Compression = "gzip",
    flavor: Flavor = "oci",
    architecture: str | None = None,
    variant: str | None = None,
    extra_layers: Iterable[Layer] = (),
    **config: Any,
) -> Image:
    """A minimal runnable image around the host's static busybox.

    One layer: ``/bin/busybox`` plus an applet link per name in *applets*,
    ``/etc/passwd`` and ``/etc/group`` (root 0, www-data 33, nobody 65534),
    ``/tmp`` mode 1777, ``/root`` 0700.  Default ``Cmd ["sh"]`` and a standard
    PATH.  The architecture defaults to the host's, since the binary is the
    host's.  Extra keyword arguments are :class:`Image` fields (cmd, user, ...).
    """
    binary = Path(busybox_path).read_bytes()
    lb = LayerBuilder()
    for d in ("bin", "etc", "usr", "usr/bin", "var", "var/www"):
        lb.dir(d, uid=33 if d == "var/www" else 0, gid=33 if d == "var/www" else 0)
    lb.dir("root", mode=0o700)
    lb.dir("tmp", mode=0o1777)
    lb.file("bin/busybox", binary, mode=0o755)
    for name in applets:
        if name == "busybox":
            continue
        if links == "symlink":
            lb.symlink(f"bin/{name}", "busybox")
        else:
            lb.hardlink(f"bin/{name}", "bin/busybox", mode=0o755)
    lb.file("etc/passwd", _PASSWD)
    lb.file("etc/group", _GROUP)
    host_arch, host_variant = host_platform()
    config.setdefault("cmd", ["sh"])
    config.setdefault("env", [DEFAULT_PATH_ENV])
    return Image(
        layers=[lb.build(compression), *extra_layers],
        architecture=architecture or host_arch,
        variant=variant if architecture else (variant or host_variant),
        flavor=flavor,
        **config,
    )


# --- OCI image layout ------------------------------------------------------


def write_oci_layout(path: str | os.PathLike[str], obj: Image | Index, tag: str = "latest") -> Path:
    """Write *obj* as an OCI image layout directory (for umoci/skopeo checks)."""
    root = Path(path)
    blobdir = root / "blobs" / "sha256"
    blobdir.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> None:
        (blobdir / sha256_digest(data).split(":", 1)[1]).write_bytes(data)

    for data in obj.blobs().values():
        put(data)
    if isinstance(obj, Index):
        for img in obj.manifests:
            put(img.manifest_bytes)
    put(obj.manifest_bytes)
    desc: dict[str, Any] = {
        "mediaType": obj.media_type,
        "digest": obj.digest,
        "size": len(obj.manifest_bytes),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    (root / "oci-layout").write_bytes(_canonical_json({"imageLayoutVersion": "1.0.0"}))
    (root / "index.json").write_bytes(
        _canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]})
    )
    return root


# --- registry client -------------------------------------------------------


class RegistryError(RuntimeError):
    """A registry answered with an unexpected status."""

    def __init__(self, message: str, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # keys lower-cased
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.body)


class RegistryClient:
    """Minimal OCI distribution client over urllib (plain HTTP, basic auth)."""

    def __init__(
        self, url: str, auth: tuple[str, str] | None = None, *, timeout: float = 60.0
    ) -> None:
        self.url = url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        # No proxies: a stray http_proxy in the environment must not capture loopback.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        auth: tuple[str, str] | Literal[False] | None = None,
    ) -> Response:
        """Send a request; never raises for HTTP error statuses.

        ``auth=False`` sends no credentials even if the client has some.
        """
        url = path_or_url if "://" in path_or_url else self.url + path_or_url
        req = urllib.request.Request(url, data=data, method=method)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        creds = self.auth if auth is None else (auth or None)
        if creds is not None:
            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return Response(
                    resp.status,
                    {k.lower(): v for k, v in resp.headers.items()},
                    resp.read(),
                )
        except urllib.error.HTTPError as e:
            body = e.read()
            return Response(e.code, {k.lower(): v for k, v in e.headers.items()}, body)

    def _expect(self, resp: Response, ok: Iterable[int], what: str) -> Response:
        if resp.status not in tuple(ok):
            raise RegistryError(
                f"{what}: HTTP {resp.status}: {resp.body[:500].decode(errors='replace')}",
                resp.status,
                resp.body,
            )
        return resp

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        if resp.status == 404:
            return False
        self._expect(resp, (200,), f"HEAD blob {digest}")
        return True

    def push_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """Upload *data* (POST then one monolithic PUT); returns its digest."""
        digest = digest or sha256_digest(data)
        resp = self._expect(
            self.request("POST", f"/v2/{repo}/blobs/uploads/"),
            (202,),
            f"start upload to {repo}",
        )
        location = resp.header("Location")
        if not location:
            raise RegistryError("upload start answered without a Location header", resp.status)
        location = urllib.parse.urljoin(self.url + "/", location)
        sep = "&" if "?" in location else "?"
        put_url = f"{location}{sep}digest={urllib.parse.quote(digest, safe='')}"
        resp = self._expect(
            self.request(
                "PUT",
                put_url,
                data=data,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(data)),
                },
            ),
            (201,),
            f"PUT blob {digest}",
        )
        got = resp.header("Docker-Content-Digest")
        if got and got != digest:
            raise RegistryError(f"registry stored blob as {got}, expected {digest}", resp.status)
        return digest

    def ensure_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        digest = digest or sha256_digest(data)
        if not self.blob_exists(repo, digest):
            self.push_blob(repo, data, digest)
        return digest

    def push_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        resp = self._expect(
            self.request(
                "PUT",
                f"/v2/{repo}/manifests/{reference}",
                data=body,
                headers={"Content-Type": media_type},
            ),
            (201,),
            f"PUT manifest {repo}:{reference}",
        )
        digest = sha256_digest(body)
        got = resp.header("Docker-Content-Digest")
        if got and got != digest:
            raise RegistryError(
                f"registry stored manifest as {got}, expected {digest}", resp.status
            )
        return digest

    def get_manifest(
        self,
        repo: str,
        reference: str,
        accept: Iterable[str] = ALL_MANIFEST_MEDIA_TYPES,
    ) -> Response:
        return self._expect(
            self.request(
                "GET",
                f"/v2/{repo}/manifests/{reference}",
                headers={"Accept": ", ".join(accept)},
            ),
            (200,),
            f"GET manifest {repo}:{reference}",
        )

    def get_blob(self, repo: str, digest: str) -> bytes:
        return self._expect(
            self.request("GET", f"/v2/{repo}/blobs/{digest}"),
            (200,),
            f"GET blob {digest}",
        ).body

    def push_image(self, repo: str, reference: str | None, image: Image) -> str:
        for digest, data in image.blobs().items():
            self.ensure_blob(repo, data, digest)
        return self.push_manifest(
            repo, reference or image.digest, image.manifest_bytes, image.media_type
        )

    def push(self, repo: str, tag: str | None, obj: Image | Index) -> str:
        """Push an image or index; children of an index go first, by digest."""
        if isinstance(obj, Image):
            return self.push_image(repo, tag, obj)
        for img in obj.manifests:
            self.push_image(repo, None, img)
        return self.push_manifest(repo, tag or obj.digest, obj.manifest_bytes, obj.media_type)


def push(
    registry_url: str,
    repo: str,
    tag: str | None,
    obj: Image | Index,
    auth: tuple[str, str] | None = None,
) -> str:
    """Push *obj* to ``<registry_url>/v2/<repo>``; returns the manifest digest.

    With ``tag=None`` the manifest is pushed by digest only.
    """
    return RegistryClient(registry_url, auth).push(repo, tag, obj)
