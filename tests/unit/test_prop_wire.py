"""crishim.api.wire encodes every CRI message to exactly the bytes betterproto2 writes.

Messages of every generated class are drawn with arbitrary field values (defaults, edge
integers, unicode, nested messages, maps, packed and unpacked repeated fields, unknown
fields) and encoded both ways.
"""

from __future__ import annotations

import dataclasses
import inspect
import struct
from typing import Any

import betterproto2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crishim.api import convert, v1, wire
from crishim.api.codec import CriCodec, PreEncoded
from crishim.model import Container, ContainerMetadata, ContainerState

MESSAGES = sorted(
    (
        cls
        for _, cls in inspect.getmembers(v1, inspect.isclass)
        if issubclass(cls, betterproto2.Message) and cls is not betterproto2.Message
    ),
    key=lambda cls: cls.__name__,
)
_INT_RANGES = {
    betterproto2.TYPE_INT32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_SINT32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_INT64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_SINT64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_UINT32: (0, 2**32 - 1),
    betterproto2.TYPE_FIXED32: (0, 2**32 - 1),
    betterproto2.TYPE_UINT64: (0, 2**64 - 1),
    betterproto2.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(proto_type: str, cls: Any) -> st.SearchStrategy[Any]:
    if proto_type in _INT_RANGES:
        low, high = _INT_RANGES[proto_type]
        return st.one_of(st.sampled_from([0, 1, low, high, 127, 128]), st.integers(low, high))
    if proto_type == betterproto2.TYPE_BOOL:
        return st.booleans()
    if proto_type == betterproto2.TYPE_STRING:
        return st.text(max_size=40)
    if proto_type == betterproto2.TYPE_BYTES:
        return st.binary(max_size=40)
    if proto_type == betterproto2.TYPE_DOUBLE:
        return st.floats(allow_nan=False)
    if proto_type == betterproto2.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=False)
    if proto_type == betterproto2.TYPE_ENUM:
        return st.sampled_from(list(cls))
    raise AssertionError(f"no strategy for {proto_type}")


def messages(cls: type, depth: int = 0) -> st.SearchStrategy[Any]:
    """Instances of ``cls`` with any subset of fields set."""
    meta = cls._betterproto  # type: ignore[attr-defined]
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in dataclasses.fields(cls):
        fm = meta.meta_by_field_name[field.name]
        field_cls = meta.cls_by_field[field.name]
        if fm.map_meta is not None:
            key_cls = field_cls.__dataclass_fields__["key"].type
            value_cls = meta.cls_by_field[f"{field.name}.value"]
            value = _value(fm.map_meta[1].proto_type, value_cls, depth)
            fields[field.name] = st.dictionaries(
                _scalar(fm.map_meta[0].proto_type, key_cls), value, max_size=3
            )
        elif fm.repeated:
            fields[field.name] = st.lists(_value(fm.proto_type, field_cls, depth), max_size=3)
        else:
            value = _value(fm.proto_type, field_cls, depth)
            fields[field.name] = st.none() | value if fm.optional else value
    unknown = st.sampled_from([b"", b"\xf8\x3f\x01"])  # field 1023, varint 1
    return st.builds(_make, st.just(cls), st.fixed_dictionaries({}, optional=fields), unknown)


def _value(proto_type: str, cls: Any, depth: int) -> st.SearchStrategy[Any]:
    if proto_type == betterproto2.TYPE_MESSAGE:
        if depth >= 2:
            return st.builds(cls)
        return st.deferred(lambda: messages(cls, depth + 1))
    return _scalar(proto_type, cls)


def _make(cls: type, values: dict[str, Any], unknown: bytes) -> Any:
    message = cls(**values)
    message._unknown_fields = unknown
    return message


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_every_message_encodes_as_betterproto2_does(cls: type, data: st.DataObject) -> None:
    message = data.draw(messages(cls))
    assert wire.encode(message) == bytes(message)


def test_negative_varints_take_ten_bytes_and_too_small_ones_are_refused() -> None:
    assert wire.varint(-1) == b"\xff" * 9 + b"\x01"
    with pytest.raises(ValueError, match="64-bit"):
        wire.varint(-(2**63) - 1)


def test_floats_keep_their_width() -> None:
    reply = v1.CpuUsage(timestamp=1)
    assert wire.encode(reply) == bytes(reply)
    assert struct.calcsize("<f") == 4


def test_codec_sends_pre_encoded_bytes_as_they_are_and_checks_reply_types() -> None:
    codec = CriCodec()
    assert codec.encode(PreEncoded(b"\x0a\x00"), v1.ListContainersResponse) == b"\x0a\x00"
    status = v1.ContainerStatusResponse(
        status=convert.container_status(
            Container(
                id="c" * 64,
                sandbox_id="s" * 64,
                metadata=ContainerMetadata(name="main"),
                image="busybox",
                state=ContainerState.RUNNING,
                created_at=10**18,
                labels={"a": "b"},
            )
        )
    )
    assert codec.encode(status, v1.ContainerStatusResponse) == bytes(status)
    with pytest.raises(TypeError, match="ContainerStatusResponse"):
        codec.encode(v1.VersionResponse(), v1.ContainerStatusResponse)
