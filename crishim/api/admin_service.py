"""crishim's Admin service (``protos/crishim/admin/v1/admin.proto``): image import and tag.

It is served on the CRI socket beside RuntimeService and ImageService, through the same
instrumented mapping (error statuses, logging, draining), so it needs no listener, socket
or permission model of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from grpclib.const import Handler

from crishim.api import admin_v1
from crishim.api.instrument import CallTracker, build_mapping
from crishim.model import Image
from crishim.services.images import ImageService


def summary(image: Image) -> admin_v1.ImageSummary:
    """An image record as the admin API reports it."""
    return admin_v1.ImageSummary(
        id=image.id,
        repo_tags=list(image.repo_tags),
        repo_digests=list(image.repo_digests),
        size=image.size,
    )


class AdminServicer(admin_v1.AdminBase):
    """The Admin service over crishim's image service."""

    def __init__(self, images: ImageService, tracker: CallTracker) -> None:
        self._images = images
        self._tracker = tracker

    def __mapping__(self) -> dict[str, Handler]:
        return build_mapping(self, admin_v1.AdminBase, self._tracker)

    async def import_image(
        self, messages: AsyncIterator[admin_v1.ImportImageRequest]
    ) -> admin_v1.ImportImageResponse:
        async def chunks() -> AsyncIterator[bytes]:
            async for message in messages:
                yield message.data

        result = await self._images.import_archive(chunks())
        return admin_v1.ImportImageResponse(
            images=[summary(image) for image in result.images], notes=result.notes
        )

    async def tag_image(self, message: admin_v1.TagImageRequest) -> admin_v1.TagImageResponse:
        image = await self._images.tag(message.source, message.target)
        return admin_v1.TagImageResponse(image=summary(image))
