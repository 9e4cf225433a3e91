"""A client of a running crishim, for the command line: image import, tag and list.

It talks to the server over the CRI socket (the Admin service for import and tag, the CRI's
ImageService for listing). A gRPC error status comes back as the crishim error it was made
from, with the server's message, so the command reports it as the server said it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO, TypeVar

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality
from grpclib.exceptions import StreamTerminatedError
from h2.exceptions import StreamClosedError

from crishim import errors
from crishim.api import admin_v1, v1
from crishim.api.instrument import STATUS_FOR_ERROR

__all__ = ["IMPORT_CHUNK", "import_archive", "list_images", "tag_image"]

#: bytes per ImportImage message: big enough to keep per-message costs small, far below any
#: HTTP/2 frame or message size limit that matters
IMPORT_CHUNK = 1024 * 1024
#: seconds a short call (tag, list) may take
CALL_TIMEOUT = 60.0
IMPORT_IMAGE = "/crishim.admin.v1.Admin/ImportImage"

_ERROR_FOR_STATUS = {
    status: error for error, status in STATUS_FOR_ERROR.items() if error is not errors.ConfigError
}
_T = TypeVar("_T")


async def import_archive(socket: Path, source: BinaryIO) -> admin_v1.ImportImageResponse:
    """Stream the archive ``source`` (a file or a pipe) to crishim's ImportImage."""
    async with _channel(socket) as channel:
        return await _call(socket, _send_archive(channel, source))


async def _send_archive(channel: Channel, source: BinaryIO) -> admin_v1.ImportImageResponse:
    # Not the generated stub: crishim may refuse the archive before it has all of it (a
    # hostile first member), ending the call while the archive is still being sent. Sending
    # then fails; the status crishim answered with is what to report.
    async with channel.request(
        IMPORT_IMAGE,
        Cardinality.STREAM_UNARY,
        admin_v1.ImportImageRequest,
        admin_v1.ImportImageResponse,
    ) as stream:
        await stream.send_request()
        try:
            while data := await asyncio.to_thread(source.read, IMPORT_CHUNK):
                await stream.send_message(admin_v1.ImportImageRequest(data=data))
            await stream.end()
        except (StreamClosedError, StreamTerminatedError):
            pass  # refused early: recv_message raises the status
        reply = await stream.recv_message()
    assert reply is not None
    return reply


async def tag_image(socket: Path, source: str, target: str) -> admin_v1.ImageSummary:
    """Tag the image ``source`` names as ``target``; the image as recorded."""
    request = admin_v1.TagImageRequest(source=source, target=target)
    async with _channel(socket) as channel:
        reply = await _call(
            socket, admin_v1.AdminStub(channel).tag_image(request, timeout=CALL_TIMEOUT)
        )
    assert reply.image is not None
    return reply.image


async def list_images(socket: Path) -> list[v1.Image]:
    """Every image crishim has (CRI ListImages)."""
    async with _channel(socket) as channel:
        reply = await _call(
            socket,
            v1.ImageServiceStub(channel).list_images(v1.ListImagesRequest(), timeout=CALL_TIMEOUT),
        )
    return list(reply.images)


@asynccontextmanager
async def _channel(socket: Path) -> AsyncIterator[Channel]:
    channel = Channel(path=str(socket))
    try:
        yield channel
    finally:
        channel.close()


async def _call(socket: Path, call: Awaitable[_T]) -> _T:
    try:
        return await call
    except GRPCError as exc:
        error = _ERROR_FOR_STATUS.get(exc.status, errors.CrishimError)
        raise error(exc.message or exc.status.name) from None
    except (ConnectionError, FileNotFoundError) as exc:
        raise errors.Unavailable(
            f"cannot reach crishim on {socket} ({exc.strerror or exc}): is `crishim serve` "
            "running, and is this the socket of its config?"
        ) from None
