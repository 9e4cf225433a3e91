"""Manifests, indexes and configs: parsing, platform choice, chain IDs, refusals."""

from __future__ import annotations

import hashlib
import json

import pytest

from crishim.errors import InvalidArgument, Unimplemented
from crishim.images.manifest import (
    DOCKER_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Platform,
    chain_ids,
    choose_from_index,
    media_type_of,
    parse_config,
    parse_manifest,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def index(*platforms: dict[str, str]) -> bytes:
    manifests = [
        {"mediaType": OCI_MANIFEST, "digest": f"sha256:{i:064x}", "size": 10, "platform": p}
        for i, p in enumerate(platforms)
    ]
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()


def test_platform_choice_prefers_the_exact_variant() -> None:
    doc = index(
        {"os": "linux", "architecture": "arm64"},
        {"os": "linux", "architecture": "arm64", "variant": "v8"},
        {"os": "linux", "architecture": "amd64"},
    )
    assert choose_from_index(doc, Platform("linux", "arm64", "v8")).digest == f"sha256:{1:064x}"
    assert choose_from_index(doc, Platform("linux", "amd64")).digest == f"sha256:{2:064x}"


def test_platform_missing_from_index_names_what_is_offered() -> None:
    doc = index(
        {"os": "linux", "architecture": "s390x"}, {"os": "windows", "architecture": "amd64"}
    )
    with pytest.raises(
        InvalidArgument,
        match=r"no manifest for linux/amd64 \(it offers: linux/s390x, windows/amd64\)",
    ):
        choose_from_index(doc, Platform("linux", "amd64"))


def test_media_type_from_the_document_or_the_server() -> None:
    assert media_type_of(index(), "") == OCI_INDEX
    bare = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert media_type_of(bare, DOCKER_LIST) == DOCKER_LIST


@pytest.mark.parametrize(
    "doc",
    [
        {"schemaVersion": 1, "name": "x", "fsLayers": []},
        {"mediaType": "application/vnd.docker.distribution.manifest.v1+prettyjws"},
    ],
)
def test_schema1_is_refused_clearly(doc: dict[str, object]) -> None:
    with pytest.raises(Unimplemented, match="schema 1 is not supported"):
        media_type_of(json.dumps(doc).encode(), "")


def test_manifest_layers_and_config() -> None:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": D1,
            "size": 5,
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 7},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": D3, "size": 9},
        ],
    }
    manifest = parse_manifest(json.dumps(doc).encode())
    assert manifest.config.digest == D1
    assert [(d.digest, d.size) for d in manifest.layers] == [(D2, 7), (D3, 9)]


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
    ],
)
def test_docker_layer_types_moby_and_containerd_write_are_accepted(media_type: str) -> None:
    doc = {
        "config": {"digest": D1, "size": 1},
        "layers": [{"mediaType": media_type, "digest": D2, "size": 1}],
    }
    assert parse_manifest(json.dumps(doc).encode()).layers[0].media_type == media_type


@pytest.mark.parametrize(
    ("layer", "error"),
    [
        ({"mediaType": "application/x-foo", "digest": D2, "size": 1}, "unsupported media type"),
        (
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "md5:abc", "size": 1},
            "unsupported digest",
        ),
        (
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": D2, "size": -1},
            "no valid size",
        ),
    ],
)
def test_bad_layer_descriptors_are_refused(layer: dict[str, object], error: str) -> None:
    doc = {"config": {"digest": D1, "size": 1}, "layers": [layer]}
    with pytest.raises((InvalidArgument, Unimplemented), match=error):
        parse_manifest(json.dumps(doc).encode())


def test_config_fields() -> None:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": "1000:1000",
            "Env": ["A=1"],
            "Entrypoint": ["/bin/sh"],
            "Cmd": ["-c", "x"],
            "WorkingDir": "/w",
            "Labels": {"l": "v"},
            "StopSignal": "SIGINT",
            "Volumes": {"/data": {}},
        },
        "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
    }
    config = parse_config(json.dumps(doc).encode())
    assert config.diff_ids == (D1, D2)
    assert (config.user, config.env, config.entrypoint, config.cmd) == (
        "1000:1000",
        ("A=1",),
        ("/bin/sh",),
        ("-c", "x"),
    )
    assert (config.working_dir, config.labels, config.stop_signal, config.volumes) == (
        "/w",
        {"l": "v"},
        "SIGINT",
        ("/data",),
    )
    assert config.platform == Platform("linux", "amd64")


def test_chain_ids_follow_the_oci_definition() -> None:
    second = "sha256:" + hashlib.sha256(f"{D1} {D2}".encode()).hexdigest()
    third = "sha256:" + hashlib.sha256(f"{second} {D3}".encode()).hexdigest()
    assert chain_ids((D1, D2, D3)) == [D1, second, third]
    assert chain_ids(()) == []
