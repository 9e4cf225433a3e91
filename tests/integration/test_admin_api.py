"""crishim's Admin service through real stubs (grpclib's ChannelFor, no socket)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from crishim.api import admin_v1, v1
from tests.rig.archives import REF_NAME, ArchiveMember, docker_archive, oci_archive, tar_bytes
from tests.rig.crishim_fixtures import InMemoryApi
from tests.rig.oci_image import Image, LayerBuilder


def image(text: str) -> Image:
    return Image([LayerBuilder().dir("etc").file("etc/text", text.encode()).build("gzip")])


def messages(data: bytes, size: int = 4096) -> Iterator[admin_v1.ImportImageRequest]:
    for start in range(0, len(data), size):
        yield admin_v1.ImportImageRequest(data=data[start : start + size])


async def test_import_then_list_and_tag(api: InMemoryApi) -> None:
    admin = admin_v1.AdminStub(api.client.channel)
    one, two = image("one"), image("two")
    archive = tar_bytes(docker_archive([(one, ["one:1"]), (two, ["two:1", "two:latest"])]))
    reply = await admin.import_image(messages(archive))
    assert [(i.id, i.repo_tags) for i in reply.images] == [
        (one.config_digest, ["docker.io/library/one:1"]),
        (two.config_digest, ["docker.io/library/two:1", "docker.io/library/two:latest"]),
    ]
    assert reply.notes == []
    listed = await api.client.images.list_images(v1.ListImagesRequest())
    assert {i.id for i in listed.images} == {one.config_digest, two.config_digest}
    tagged = await admin.tag_image(admin_v1.TagImageRequest(source="two:1", target="one:1"))
    assert tagged.image is not None
    assert tagged.image.repo_tags == [
        "docker.io/library/two:1",
        "docker.io/library/two:latest",
        "docker.io/library/one:1",
    ]
    status = await api.client.images.image_status(
        v1.ImageStatusRequest(image=v1.ImageSpec(image=one.config_digest))
    )
    assert status.image is not None
    assert status.image.repo_tags == []


async def test_notes_come_back_with_the_images(api: InMemoryApi) -> None:
    admin = admin_v1.AdminStub(api.client.channel)
    reply = await admin.import_image(
        messages(tar_bytes(oci_archive([(image("tagless"), {REF_NAME: "v1"})])))
    )
    assert reply.images[0].repo_tags == []
    assert reply.notes == [
        'index.json entry 0 is named only by the tag "v1", without a repository: imported '
        "without a name (list it by its ID)"
    ]


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", Status.INVALID_ARGUMENT, "not a readable tar archive"),
        (
            tar_bytes([ArchiveMember("../../etc/passwd", b"x")]),
            Status.INVALID_ARGUMENT,
            'archive member "../../etc/passwd": the name climbs out of the archive',
        ),
        (
            tar_bytes([ArchiveMember("blobs/sha256/" + "0" * 64, b"x")]),
            Status.DATA_LOSS,
            f'archive member "blobs/sha256/{"0" * 64}": its content has digest',
        ),
    ],
)
async def test_refusals_carry_their_status_and_message(
    api: InMemoryApi, data: bytes, status: Status, message: str
) -> None:
    admin = admin_v1.AdminStub(api.client.channel)
    with pytest.raises(GRPCError) as info:
        await admin.import_image(messages(data))
    assert info.value.status is status
    assert info.value.message is not None
    assert info.value.message.startswith(message)
    assert (await api.client.images.list_images(v1.ListImagesRequest())).images == []


async def test_tag_of_a_missing_image_is_not_found(api: InMemoryApi) -> None:
    admin = admin_v1.AdminStub(api.client.channel)
    with pytest.raises(GRPCError) as info:
        await admin.tag_image(admin_v1.TagImageRequest(source="absent:1", target="x:1"))
    assert info.value.status is Status.NOT_FOUND
