"""The protobuf codec of the gRPC server: fast encoding, and bytes encoded ahead of time.

Replies are encoded by :mod:`crishim.api.wire` (the same bytes as betterproto2, an order
of magnitude sooner). Encoding long lists still costs; kubelet asks for them every
second. Handlers that keep each item's encoded form send a ``PreEncoded`` reply, which
this codec passes through untouched.
"""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec

from crishim.api import wire


class PreEncoded:
    """A reply message already serialised to protobuf wire bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class CriCodec(ProtoCodec):
    """grpclib's protobuf codec, encoding with :func:`wire.encode`; ``PreEncoded`` as is."""

    def encode(self, message: Any, message_type: Any) -> bytes:
        if type(message) is PreEncoded:
            return message.data
        if not isinstance(message, message_type):
            raise TypeError(
                f"reply must be a {message_type.__name__}, not {type(message).__name__}"
            )
        return wire.encode(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return wire.decode(data, message_type)
