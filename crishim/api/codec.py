"""A protobuf codec that also sends bytes encoded ahead of time.

Encoding long lists with betterproto2 costs tens of milliseconds; kubelet asks for them
every second. Handlers that keep each item's encoded form send a ``PreEncoded`` reply,
which this codec passes through untouched.
"""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec


class PreEncoded:
    """A reply message already serialised to protobuf wire bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class CriCodec(ProtoCodec):
    """grpclib's protobuf codec, plus pass-through of ``PreEncoded`` replies."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if type(message) is PreEncoded:
            return message.data
        return super().encode(message, message_type)
