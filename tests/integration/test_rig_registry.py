"""The registry rig against a real distribution registry (and skopeo/umoci as outside judges)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.rig.fixtures import AUTH_PASSWORD, AUTH_USER, PushedImage
from tests.rig.oci_image import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Compression,
    Flavor,
    Image,
    Index,
    LayerBuilder,
    RegistryClient,
    RegistryError,
    decompress,
    push,
    sha256_digest,
)
from tests.rig.registry import Registry


def _verify_image(client: RegistryClient, repo: str, reference: str, accept: str) -> dict[str, Any]:
    """Fetch a manifest and check every digest and size against what came back."""
    resp = client.get_manifest(repo, reference, accept=[accept])
    assert resp.header("Content-Type") == accept
    digest = sha256_digest(resp.body)
    assert resp.header("Docker-Content-Digest") == digest
    if reference.startswith("sha256:"):
        assert digest == reference
    manifest: dict[str, Any] = resp.json()
    config = client.get_blob(repo, manifest["config"]["digest"])
    assert sha256_digest(config) == manifest["config"]["digest"]
    assert len(config) == manifest["config"]["size"]
    diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    assert len(diff_ids) == len(manifest["layers"])
    for desc, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        blob = client.get_blob(repo, desc["digest"])
        assert sha256_digest(blob) == desc["digest"]
        assert len(blob) == desc["size"]
        assert sha256_digest(decompress(blob, desc["mediaType"])) == diff_id
    return manifest


def test_busybox_round_trip(
    registry: Registry, busybox_pushed: PushedImage, busybox_ref: str
) -> None:
    assert busybox_ref == f"{registry.host}/library/busybox:latest"
    assert busybox_pushed.digest == busybox_pushed.image.digest
    client = registry.client()
    manifest = _verify_image(client, "library/busybox", "latest", OCI_MANIFEST)
    assert manifest["mediaType"] == OCI_MANIFEST
    # Also reachable by digest, with identical bytes.
    by_tag = client.get_manifest("library/busybox", "latest", accept=[OCI_MANIFEST]).body
    by_digest = client.get_manifest(
        "library/busybox", busybox_pushed.digest, accept=[OCI_MANIFEST]
    ).body
    assert by_tag == by_digest == busybox_pushed.image.manifest_bytes


def test_push_is_idempotent(registry: Registry, busybox_pushed: PushedImage) -> None:
    # Second push skips existing blobs (HEAD) and yields the same digest.
    again = push(registry.url, busybox_pushed.repo, busybox_pushed.tag, busybox_pushed.image)
    assert again == busybox_pushed.digest


@pytest.mark.parametrize(
    ("flavor", "index_type", "child_type"),
    [("oci", OCI_INDEX, OCI_MANIFEST), ("docker", DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)],
)
def test_index_round_trip(
    registry: Registry, flavor: Flavor, index_type: str, child_type: str
) -> None:
    shared = LayerBuilder().dir("etc").file("etc/os-release", b"ID=rig\n").build("gzip")
    amd = Image(
        layers=[shared, LayerBuilder().file("arch", b"amd64\n").build("gzip")],
        architecture="amd64",
        flavor=flavor,
    )
    arm = Image(
        layers=[shared, LayerBuilder().file("arch", b"arm64\n").build("gzip")],
        architecture="arm64",
        variant="v8",
        flavor=flavor,
    )
    idx = Index(manifests=[amd, arm], flavor=flavor)
    repo = f"rig/multi-{flavor}"
    digest = push(registry.url, repo, "v1", idx)
    assert digest == idx.digest
    client = registry.client()
    resp = client.get_manifest(repo, "v1", accept=[index_type])
    assert resp.header("Content-Type") == index_type
    assert sha256_digest(resp.body) == digest == resp.header("Docker-Content-Digest")
    children = resp.json()["manifests"]
    assert [c["platform"] for c in children] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm64", "os": "linux", "variant": "v8"},
    ]
    for child, image in zip(children, [amd, arm], strict=True):
        assert child["mediaType"] == child_type
        manifest = _verify_image(client, repo, child["digest"], child_type)
        config = json.loads(client.get_blob(repo, manifest["config"]["digest"]))
        assert config["architecture"] == image.architecture
        assert config.get("variant") == image.variant


@pytest.mark.parametrize("flavor", ["oci", "docker"])
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_layer_compressions_push(
    registry: Registry, compression: Compression, flavor: Flavor
) -> None:
    layer = LayerBuilder().dir("data").file("data/blob", b"x" * 5000).build(compression)
    image = Image(layers=[layer], flavor=flavor)
    repo = f"rig/comp-{compression}-{flavor}"
    digest = push(registry.url, repo, None, image)  # by digest, no tag
    manifest = _verify_image(registry.client(), repo, digest, image.media_type)
    assert manifest["layers"][0]["mediaType"] == layer.media_type_for(flavor)


def test_basic_auth(auth_registry: Registry) -> None:
    anon = RegistryClient(auth_registry.url)
    resp = anon.request("GET", "/v2/")
    assert resp.status == 401
    assert (resp.header("WWW-Authenticate") or "").lower().startswith("basic")
    wrong = RegistryClient(auth_registry.url, (AUTH_USER, "wrong")).request("GET", "/v2/")
    assert wrong.status == 401
    good = RegistryClient(auth_registry.url, (AUTH_USER, AUTH_PASSWORD))
    assert good.request("GET", "/v2/").status == 200

    image = Image(layers=[LayerBuilder().file("f", b"auth").build("gzip")])
    with pytest.raises(RegistryError) as exc:
        push(auth_registry.url, "rig/private", "latest", image)
    assert exc.value.status == 401
    assert auth_registry.auth == (AUTH_USER, AUTH_PASSWORD)
    digest = push(auth_registry.url, "rig/private", "latest", image, auth=auth_registry.auth)
    assert anon.request("GET", f"/v2/rig/private/manifests/{digest}").status == 401
    token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    fetched = anon.request(
        "GET",
        f"/v2/rig/private/manifests/{digest}",
        headers={"Authorization": f"Basic {token}", "Accept": OCI_MANIFEST},
        auth=False,
    )
    assert fetched.status == 200
    assert sha256_digest(fetched.body) == digest


def test_registry_stop_kills_process_and_removes_storage() -> None:
    reg = Registry().start()
    proc = reg._proc
    assert proc is not None
    storage = reg.storage_dir
    assert storage.is_dir()
    reg.stop()
    assert proc.poll() is not None
    assert not storage.exists()
    reg.stop()  # idempotent


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="install the Debian package 'skopeo'")
def test_skopeo_inspects_busybox(busybox_pushed: PushedImage, busybox_ref: str) -> None:
    out = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{busybox_ref}"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    info = json.loads(out)
    assert info["Digest"] == busybox_pushed.digest
    assert info["Architecture"] == busybox_pushed.image.architecture
    assert info["Os"] == "linux"
    assert info["Layers"] == [layer.digest for layer in busybox_pushed.image.layers]


@pytest.mark.skipif(
    shutil.which("skopeo") is None or shutil.which("umoci") is None,
    reason="install the Debian packages 'skopeo' and 'umoci'",
)
def test_skopeo_copy_then_umoci_unpack(
    busybox_pushed: PushedImage, busybox_ref: str, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            f"docker://{busybox_ref}",
            f"oci:{layout}:latest",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # skopeo kept our manifest bytes, so the digest survives the copy.
    top = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in top["manifests"]] == [busybox_pushed.digest]
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    rootfs = bundle / "rootfs"
    assert (rootfs / "bin" / "busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert (rootfs / "bin" / "sh").is_symlink()
    assert (rootfs / "tmp").stat().st_mode & 0o7777 == 0o1777
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"] == ["sh"]


def test_hostile_layer_is_pushed_verbatim(registry: Registry) -> None:
    hostile = (
        LayerBuilder(sort=False)
        .raw("../escape", data="escaped\n")
        .raw("/abs", data="absolute\n")
        .raw("evil", "symlink", linkname="/")
        .raw("evil/tmp/written-through-symlink", data="owned\n")
        .raw("passwd-link", "hardlink", linkname="../../etc/passwd")
        .build("gzip")
    )
    image = Image(layers=[hostile])
    digest = push(registry.url, "rig/hostile", "latest", image)
    client = registry.client()
    manifest = client.get_manifest("rig/hostile", digest, accept=[OCI_MANIFEST]).json()
    (desc,) = manifest["layers"]
    blob = client.get_blob("rig/hostile", desc["digest"])
    raw = decompress(blob, desc["mediaType"])
    assert hashlib.sha256(raw).hexdigest() == hostile.diff_id.split(":")[1]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert list(members) == [
        "../escape",
        "/abs",
        "evil",
        "evil/tmp/written-through-symlink",
        "passwd-link",
    ]
    assert members["evil"].issym()
    assert members["evil"].linkname == "/"
    assert members["passwd-link"].islnk()
    assert members["passwd-link"].linkname == "../../etc/passwd"
