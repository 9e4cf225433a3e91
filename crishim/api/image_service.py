"""The CRI ImageService servicer. Every RPC answers UNIMPLEMENTED until the image issue."""

from __future__ import annotations

from grpclib.const import Handler

from crishim.api import v1
from crishim.api.instrument import CallTracker, build_mapping


class ImageServicer(v1.ImageServiceBase):
    """ImageService over crishim's services."""

    def __init__(self, tracker: CallTracker) -> None:
        self._tracker = tracker

    def __mapping__(self) -> dict[str, Handler]:
        return build_mapping(self, v1.ImageServiceBase, self._tracker)
