"""Reading image archives: docker-archive and OCI layouts, names, platforms, hostile input."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from crishim.errors import DataLoss, InvalidArgument, Unimplemented
from crishim.images import archive
from crishim.images.archive import ChunkReader, read_archive
from crishim.images.archive_formats import ImportPlan, plan_import
from crishim.images.content import ContentStore
from crishim.images.manifest import Platform
from tests.rig.archives import (
    IMAGE_NAME,
    REF_NAME,
    ArchiveMember,
    docker25_archive,
    docker_archive,
    oci_archive,
    tar_bytes,
)
from tests.rig.oci_image import Image, Index, LayerBuilder, sha256_digest

HOST = Platform("linux", "amd64")
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"


def small_image(text: str = "hello", **config: object) -> Image:
    base = LayerBuilder().dir("etc").file("etc/base", b"base\n").build("gzip")
    top = LayerBuilder().file("etc/greeting", text.encode()).build("zstd")
    return Image([base, top], architecture="amd64", **config)  # type: ignore[arg-type]


def content_store(tmp_path: Path) -> ContentStore:
    store = ContentStore(tmp_path / "content")
    store.recover()
    return store


def ingest_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "content" / "ingest").iterdir())


def plan_of(
    tmp_path: Path, data: bytes | list[ArchiveMember], platform: Platform = HOST
) -> ImportPlan:
    """Read and plan an archive (its staged files are gone afterwards)."""
    raw = data if isinstance(data, bytes) else tar_bytes(data)
    store = content_store(tmp_path)
    with store.staging() as staging:
        contents = read_archive(io.BytesIO(raw), staging)
        return plan_import(contents, platform)


# --- docker-archive -----------------------------------------------------------------------


def test_docker_archive_gets_a_manifest_and_normalised_tags(tmp_path: Path) -> None:
    image = small_image()
    plan = plan_of(tmp_path, docker_archive([(image, ["busybox:v1", "example.com/a/b:2"])]))
    (planned,) = plan.images
    assert [str(n) for n in planned.names] == [
        "docker.io/library/busybox:v1",
        "example.com/a/b:2",
    ]
    assert planned.config.digest == image.config_digest
    assert [layer.descriptor.media_type for layer in planned.layers] == [OCI_TAR, OCI_TAR]
    assert [layer.diff_id for layer in planned.layers] == [x.diff_id for x in image.layers]
    (manifest_digest, manifest) = next(iter(planned.written.items()))
    assert planned.manifest_digest == planned.top_digest == manifest_digest
    assert sha256_digest(manifest) == manifest_digest
    document = json.loads(manifest)
    assert document["config"]["digest"] == image.config_digest
    assert [d["digest"] for d in document["layers"]] == [x.diff_id for x in image.layers]
    assert planned.metadata_digests == [manifest_digest, image.config_digest]
    assert plan.notes == []


def test_docker_archive_manifest_is_the_same_every_time(tmp_path: Path) -> None:
    members = docker_archive([(small_image(), ["a:1"])])
    first = plan_of(tmp_path / "1", members).images[0].manifest_digest
    second = plan_of(tmp_path / "2", members).images[0].manifest_digest
    assert first == second


def test_docker_archive_with_compressed_layers(tmp_path: Path) -> None:
    image = small_image()
    plan = plan_of(tmp_path, docker_archive([(image, ["a:1"])], compressed_layers=True))
    types = [layer.descriptor.media_type for layer in plan.images[0].layers]
    assert types == [f"{OCI_TAR}+gzip", f"{OCI_TAR}+zstd"]
    assert [layer.descriptor.digest for layer in plan.images[0].layers] == [
        x.digest for x in image.layers
    ]


def test_docker_archive_with_several_images_and_an_untagged_one(tmp_path: Path) -> None:
    one, two = small_image("one"), small_image("two")
    plan = plan_of(tmp_path, docker_archive([(one, ["one:latest"]), (two, [])]))
    assert [p.config.digest for p in plan.images] == [one.config_digest, two.config_digest]
    assert [len(p.names) for p in plan.images] == [1, 0]


def test_whole_archive_gzip_is_read(tmp_path: Path) -> None:
    raw = tar_bytes(docker_archive([(small_image(), ["a:1"])]), compression="gzip")
    assert plan_of(tmp_path, raw).images[0].names[0].path == "library/a"


def test_docker_archive_paths_may_start_with_dot_slash(tmp_path: Path) -> None:
    members = [
        ArchiveMember(f"./{m.name}", m.data, m.kind, m.linkname)
        for m in docker_archive([(small_image(), ["a:1"])])
    ]
    assert len(plan_of(tmp_path, members).images) == 1


def test_docker_archive_layer_through_a_legacy_symlink(tmp_path: Path) -> None:
    members = docker_archive([(small_image(), ["a:1"])])
    document = json.loads(next(m for m in members if m.name == "manifest.json").data)
    document[0]["Layers"] = [f"legacy0-{i}/layer.tar" for i in range(2)]
    members = [m for m in members if m.name != "manifest.json"]
    members.append(ArchiveMember("manifest.json", json.dumps(document).encode()))
    assert len(plan_of(tmp_path, members).images[0].layers) == 2


# --- OCI layouts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({IMAGE_NAME: "registry.test/app:1", REF_NAME: "1"}, ["registry.test/app:1"]),
        ({REF_NAME: "busybox:v2"}, ["docker.io/library/busybox:v2"]),
        ({REF_NAME: "docker.io/library/busybox:v2"}, ["docker.io/library/busybox:v2"]),
        ({REF_NAME: "registry.test/app"}, ["registry.test/app:latest"]),
        ({IMAGE_NAME: "sha256:" + "ab" * 32}, []),
        ({}, []),
    ],
)
def test_oci_archive_names(
    tmp_path: Path, annotations: dict[str, str], expected: list[str]
) -> None:
    image = small_image()
    plan = plan_of(tmp_path, oci_archive([(image, annotations)]))
    (planned,) = plan.images
    assert [str(n) for n in planned.names] == expected
    assert planned.manifest_digest == planned.top_digest == image.digest
    assert planned.metadata_digests == [image.digest, image.config_digest]
    assert [layer.descriptor.digest for layer in planned.layers] == [x.digest for x in image.layers]


def test_oci_archive_named_only_by_a_tag_is_imported_without_a_name(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, oci_archive([(small_image(), {REF_NAME: "latest"})]))
    assert plan.images[0].names == ()
    assert plan.notes == [
        'index.json entry 0 is named only by the tag "latest", without a repository: '
        "imported without a name (list it by its ID)"
    ]


def test_oci_index_resolves_to_this_platform(tmp_path: Path) -> None:
    here = small_image("amd64")
    there = Image(small_image("arm").layers, architecture="arm64", variant="v8")
    index = Index([there, here])
    plan = plan_of(tmp_path, oci_archive([(index, {IMAGE_NAME: "multi:1"})]))
    (planned,) = plan.images
    assert planned.config.digest == here.config_digest
    assert planned.top_digest == index.digest
    assert planned.manifest_digest == here.digest
    assert planned.metadata_digests == [index.digest, here.digest, here.config_digest]


def test_index_missing_other_platforms_blobs_still_imports(tmp_path: Path) -> None:
    """``docker save`` with containerd's store keeps the whole index but only this
    platform's blobs."""
    here = small_image("amd64")
    there = Image(small_image("arm").layers, architecture="arm64")
    members = oci_archive([(Index([there, here]), {IMAGE_NAME: "multi:1"})])
    keep = {
        f"blobs/sha256/{d.removeprefix('sha256:')}" for d in set(there.blobs()) - set(here.blobs())
    }
    keep.add(f"blobs/sha256/{there.digest.removeprefix('sha256:')}")
    members = [m for m in members if m.name not in keep]
    assert plan_of(tmp_path, members).images[0].config.digest == here.config_digest


def test_archive_with_no_image_for_this_platform_is_refused(tmp_path: Path) -> None:
    foreign = Index([Image(small_image().layers, architecture="s390x")])
    with pytest.raises(InvalidArgument, match=r"no image to import for linux/amd64.*s390x"):
        plan_of(tmp_path, oci_archive([(foreign, {IMAGE_NAME: "alien:1"})]))


def test_foreign_entries_are_skipped_with_a_note(tmp_path: Path) -> None:
    here, foreign = small_image("here"), Index([Image(small_image().layers, architecture="s390x")])
    plan = plan_of(tmp_path, oci_archive([(foreign, {IMAGE_NAME: "alien:1"}), (here, {})]))
    assert [p.config.digest for p in plan.images] == [here.config_digest]
    assert "index.json entry 0 (docker.io/library/alien:1) skipped" in plan.notes[0]


def test_docker25_save_names_from_both_index_and_manifest_json(tmp_path: Path) -> None:
    image = small_image()
    members = docker25_archive(image, ["busybox:latest", "busybox:also"])
    plan = plan_of(tmp_path, members)
    (planned,) = plan.images
    assert [str(n) for n in planned.names] == [
        "docker.io/library/busybox:latest",
        "docker.io/library/busybox:also",
    ]
    assert planned.manifest_digest == image.digest


def test_blob_already_in_the_store_is_verified_not_staged(tmp_path: Path) -> None:
    image = small_image()
    store = content_store(tmp_path)
    layer = image.layers[0]
    store.path(layer.digest).write_bytes(layer.blob)
    with store.staging() as staging:
        contents = read_archive(io.BytesIO(tar_bytes(oci_archive([(image, {})]))), staging)
        member = contents.members[f"blobs/sha256/{layer.digest.removeprefix('sha256:')}"]
        assert not member.staged
        assert member.path == store.path(layer.digest)
        staged = ingest_files(tmp_path)
        assert len(staged) == len(contents.members) - 1
    assert ingest_files(tmp_path) == []


def test_adopted_blobs_move_into_the_store_and_the_rest_is_removed(tmp_path: Path) -> None:
    image = small_image()
    store = content_store(tmp_path)
    with store.staging() as staging:
        contents = read_archive(io.BytesIO(tar_bytes(oci_archive([(image, {})]))), staging)
        plan = plan_import(contents, HOST)
        for layer in plan.images[0].layers:
            staging.adopt(layer.member.blob)
    assert store.digests() == {layer.digest for layer in image.layers}
    assert ingest_files(tmp_path) == []


def test_chunk_reader_reassembles_chunks_of_any_size() -> None:
    chunks = iter([b"ab", b"cdefg", b"h"])
    reader = io.BufferedReader(ChunkReader(lambda: next(chunks, b"")), buffer_size=3)
    assert reader.read() == b"abcdefgh"


# --- refused archives ---------------------------------------------------------------------


def valid_members() -> list[ArchiveMember]:
    return oci_archive([(small_image(), {IMAGE_NAME: "a:1"})])


def blob_name(digest: str) -> str:
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


HOSTILE: dict[str, tuple[list[ArchiveMember], type[Exception], str]] = {
    "dotdot": (
        [ArchiveMember("../escape", b"x")],
        InvalidArgument,
        'archive member "../escape": the name climbs out of the archive',
    ),
    "dotdot-inside": (
        [ArchiveMember("blobs/../../escape", b"x")],
        InvalidArgument,
        "climbs out of the archive",
    ),
    "absolute": (
        [ArchiveMember("/etc/passwd", b"x")],
        InvalidArgument,
        'archive member "/etc/passwd": absolute name',
    ),
    "symlink-absolute": (
        [ArchiveMember("index.json", kind="symlink", linkname="/etc/passwd")],
        InvalidArgument,
        'archive member "index.json" is a symlink out of the archive \\(to "/etc/passwd"\\)',
    ),
    "symlink-up": (
        [ArchiveMember("dir/index.json", kind="symlink", linkname="../../secret")],
        InvalidArgument,
        "is a symlink out of the archive",
    ),
    "hardlink-up": (
        [ArchiveMember("index.json", kind="hardlink", linkname="../etc/shadow")],
        InvalidArgument,
        "is a hardlink out of the archive",
    ),
    "fifo": (
        [ArchiveMember("pipe", kind="fifo")],
        InvalidArgument,
        'archive member "pipe" is a fifo: image archives hold only files',
    ),
    "device": (
        [ArchiveMember("dev", kind="char")],
        InvalidArgument,
        "is a character device",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_members_are_refused_and_nothing_stays_staged(tmp_path: Path, name: str) -> None:
    extra, error, message = HOSTILE[name]
    with pytest.raises(error, match=message):
        plan_of(tmp_path, extra + valid_members())
    assert ingest_files(tmp_path) == []


def test_two_members_of_one_name_are_refused(tmp_path: Path) -> None:
    members = valid_members()
    with pytest.raises(InvalidArgument, match=r'two members named "index\.json"'):
        plan_of(tmp_path, [*members, ArchiveMember("index.json", b"{}")])


def test_links_inside_the_archive_are_followed_only_so_deep(tmp_path: Path) -> None:
    members = [m for m in valid_members() if m.name != "index.json"]
    index = next(m for m in valid_members() if m.name == "index.json")
    members.append(ArchiveMember("real-index", index.data))
    members.append(ArchiveMember("index.json", kind="symlink", linkname="real-index"))
    assert len(plan_of(tmp_path / "ok", members).images) == 1
    loop = [
        ArchiveMember("index.json", kind="symlink", linkname="a"),
        ArchiveMember("a", kind="symlink", linkname="index.json"),
    ]
    with pytest.raises(InvalidArgument, match="more than 16 links deep"):
        plan_of(tmp_path / "loop", loop)


def test_too_many_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "MAX_MEMBERS", 3)
    with pytest.raises(InvalidArgument, match="more than 3 members"):
        plan_of(tmp_path, valid_members())
    assert ingest_files(tmp_path) == []


def test_huge_manifest_is_refused(tmp_path: Path) -> None:
    huge = b"[" + b" " * archive.MAX_DOCUMENT + b"]"
    with pytest.raises(InvalidArgument, match=r'manifest.json \("manifest.json"\) is \d+ bytes'):
        plan_of(tmp_path, [ArchiveMember("manifest.json", huge)])


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (b"not json", "manifest.json .* is not valid JSON"),
        (b'{"Config": "x"}', "manifest.json is not a JSON list"),
        (b"[42]", "manifest.json entry 0 is not an object"),
        (b'[{"Layers": []}]', 'manifest.json entry 0 has no "Config" path'),
        (b'[{"Config": "c.json", "Layers": [1]}]', '"Layers" is not a list of paths'),
        (b'[{"Config": "c.json", "RepoTags": ["UPPER/Case:x"], "Layers": []}]', "invalid image"),
        (b'[{"Config": "missing.json", "Layers": []}]', 'lacks the config of .*"missing.json"'),
    ],
)
def test_bogus_manifest_json_is_refused(tmp_path: Path, manifest: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        plan_of(tmp_path, [ArchiveMember("manifest.json", manifest)])


def test_missing_layer_blob_is_named(tmp_path: Path) -> None:
    image = small_image()
    missing = blob_name(image.layers[1].digest)
    members = [m for m in valid_members() if m.name != missing]
    with pytest.raises(InvalidArgument, match=f"lacks blob {image.layers[1].digest} \\(layer 1 of"):
        plan_of(tmp_path, members)
    assert ingest_files(tmp_path) == []


def test_blob_not_matching_its_digest_is_refused_by_name(tmp_path: Path) -> None:
    image = small_image()
    target = blob_name(image.layers[0].digest)
    members = [
        ArchiveMember(m.name, m.data[:-1] + bytes([m.data[-1] ^ 1])) if m.name == target else m
        for m in valid_members()
    ]
    with pytest.raises(DataLoss, match=f'archive member "{target}": its content has digest'):
        plan_of(tmp_path, members)
    assert ingest_files(tmp_path) == []


def test_docker_config_not_matching_its_name_is_refused(tmp_path: Path) -> None:
    members = docker_archive([(small_image(), ["a:1"])])
    config = next(m for m in members if m.name.endswith(".json") and m.name != "manifest.json")
    members = [
        ArchiveMember(m.name, m.data.replace(b"amd64", b"AMD64")) if m is config else m
        for m in members
    ]
    with pytest.raises(DataLoss, match=f'archive member "{config.name}" \\(the config of'):
        plan_of(tmp_path, members)


def test_docker_layer_not_matching_its_diff_id_is_refused_by_name(tmp_path: Path) -> None:
    image = small_image()
    members = docker_archive([(image, ["a:1"])])
    path = f"{image.layers[1].diff_id.removeprefix('sha256:')}.tar"
    members = [
        ArchiveMember(m.name, m.data + b"\x00" * 512) if m.name == path else m for m in members
    ]
    with pytest.raises(DataLoss, match=f'archive member "{path}" \\(layer 1 of .*diff ID'):
        plan_of(tmp_path, members)


def test_blob_size_must_match_its_descriptor(tmp_path: Path) -> None:
    image = small_image()
    members = valid_members()
    index = json.loads(next(m for m in members if m.name == "index.json").data)
    index["manifests"][0]["size"] += 1
    members = [m for m in members if m.name != "index.json"]
    members.append(ArchiveMember("index.json", json.dumps(index).encode()))
    with pytest.raises(DataLoss, match=f"blob {image.digest} .*holds \\d+ bytes, its descriptor"):
        plan_of(tmp_path, members)


def test_indexes_nested_too_deep_are_refused(tmp_path: Path) -> None:
    image = small_image()
    members = oci_archive([(image, {})])
    top: dict[str, object] = {
        "mediaType": image.media_type,
        "digest": image.digest,
        "size": len(image.manifest_bytes),
    }
    for _ in range(6):
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": [{**top, "platform": {"os": "linux", "architecture": "amd64"}}],
            }
        ).encode()
        members.append(ArchiveMember(blob_name(sha256_digest(body)), body))
        top = {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": sha256_digest(body),
            "size": len(body),
        }
    members = [m for m in members if m.name != "index.json"]
    members.append(
        ArchiveMember("index.json", json.dumps({"schemaVersion": 2, "manifests": [top]}).encode())
    )
    with pytest.raises(InvalidArgument, match="nested more than 4 deep"):
        plan_of(tmp_path, members)


def test_unknown_layout_version_is_refused(tmp_path: Path) -> None:
    members = [m for m in valid_members() if m.name != "oci-layout"]
    members.append(ArchiveMember("oci-layout", b'{"imageLayoutVersion": "2.0.0"}'))
    with pytest.raises(Unimplemented, match=r"imageLayoutVersion '2\.0\.0'"):
        plan_of(tmp_path, members)


def test_neither_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"neither index\.json .* nor manifest\.json"):
        plan_of(tmp_path, [ArchiveMember("hello.txt", b"hi")])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "not a readable tar archive"),
        (b"this is not a tar archive at all" * 40, "not a readable tar archive"),
        (gzip.compress(b"x" * 2000), "not a readable tar archive"),
    ],
)
def test_not_a_tar_is_refused(tmp_path: Path, raw: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        plan_of(tmp_path, raw)


def test_truncated_archive_is_refused_and_nothing_stays_staged(tmp_path: Path) -> None:
    raw = tar_bytes(valid_members())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        largest = max(tar.getmembers(), key=lambda m: m.size)
    cut = largest.offset_data + largest.size // 2
    with pytest.raises(InvalidArgument, match="the archive is damaged: unexpected end of data"):
        plan_of(tmp_path, raw[:cut])
    assert ingest_files(tmp_path) == []


def test_damaged_header_after_the_first_member_is_not_taken_for_the_end(tmp_path: Path) -> None:
    raw = bytearray(tar_bytes(valid_members()))
    second_header = 512  # after the "blobs" directory's header
    raw[second_header + 148 : second_header + 156] = b"garbage!"  # its checksum field
    with pytest.raises(InvalidArgument, match="the archive is damaged: bad tar header"):
        plan_of(tmp_path, bytes(raw))
