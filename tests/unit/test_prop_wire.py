"""crishim.api.wire encodes every CRI message to exactly the bytes betterproto2 writes,
and decodes any bytes to what betterproto2 parses from them.

Messages of every generated class are drawn with arbitrary field values (defaults, edge
integers, unicode, nested messages, maps, packed and unpacked repeated fields, unknown
fields) and encoded both ways; their bytes, and arbitrary or damaged bytes, are decoded
both ways.
"""

from __future__ import annotations

import dataclasses
import inspect
import struct
import time
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


def _parsed(cls: type, data: bytes) -> tuple[str, Any]:
    """What betterproto2 makes of ``data``: the message or the error's type."""
    try:
        return "message", cls.parse(data)  # type: ignore[attr-defined]
    except Exception as exc:
        return "error", type(exc)


def _decoded(cls: type, data: bytes) -> tuple[str, Any]:
    try:
        return "message", wire.decode(data, cls)
    except Exception as exc:
        return "error", type(exc)


def _unknown(value: Any) -> Any:
    """The unknown fields of a message and of every message inside it."""
    if isinstance(value, betterproto2.Message):
        names = [field.name for field in dataclasses.fields(value)]  # type: ignore[arg-type]
        inner = {name: _unknown(getattr(value, name)) for name in names}
        return (value._unknown_fields, {k: v for k, v in inner.items() if v is not None})
    if isinstance(value, list):
        return [_unknown(item) for item in value] or None
    if isinstance(value, dict):
        return {k: _unknown(v) for k, v in value.items()} or None
    return None


def _assert_same(ours: tuple[str, Any], theirs: tuple[str, Any]) -> None:
    assert ours == theirs
    if ours[0] == "message":
        # Message equality leaves out unknown fields, at any depth. (They are not compared
        # by encoding: what betterproto2 parses from odd input it may not encode sanely, a
        # varint in a message field becomes bytes(n), n zero bytes.)
        assert _unknown(ours[1]) == _unknown(theirs[1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("cls", MESSAGES, ids=lambda cls: cls.__name__)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_every_message_encodes_and_decodes_as_betterproto2_does(
    cls: type, data: st.DataObject
) -> None:
    message = data.draw(messages(cls))
    encoded = bytes(message)
    assert wire.encode(message) == encoded
    decoded: Any = wire.decode(encoded, cls)
    assert decoded == message
    _assert_same(("message", decoded), _parsed(cls, encoded))


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


# the requests kubelet sends most, and ones with maps, enums and repeated numbers
_FUZZED = [
    v1.ImageStatusRequest,
    v1.ContainerStatusRequest,
    v1.ListContainersRequest,
    v1.ListPodSandboxRequest,
    v1.LinuxContainerSecurityContext,
    v1.LinuxContainerResources,
    v1.PodSandboxConfig,
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("cls", _FUZZED, ids=lambda cls: cls.__name__)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_damaged_and_arbitrary_bytes_decode_as_betterproto2_or_are_refused(
    cls: type, data: st.DataObject
) -> None:
    encoded = bytes(data.draw(messages(cls)))
    damaged = data.draw(
        st.one_of(
            st.binary(max_size=60),
            # cut short
            st.integers(0, len(encoded)).map(lambda n: encoded[:n]),
            # one byte changed: wire types, lengths and varints go wrong
            st.tuples(st.integers(0, max(len(encoded) - 1, 0)), st.integers(0, 255)).map(
                lambda change: encoded[: change[0]] + bytes([change[1]]) + encoded[change[0] + 1 :]
            ),
            # a field of any number and wire type appended
            st.binary(min_size=1, max_size=12).map(lambda tail: encoded + tail),
        )
    )
    ours, theirs = _decoded(cls, damaged), _parsed(cls, damaged)
    if ours[0] == "error":
        # Refused, with a ValueError naming the message (betterproto2 may have kept garbage).
        assert ours[1] is ValueError
        with pytest.raises(ValueError, match=r"^[A-Z][A-Za-z0-9]+: "):
            wire.decode(damaged, cls)
    else:
        # What is decoded is what betterproto2 makes of it; what it refuses, so do we.
        _assert_same(ours, theirs)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_well_formed_messages_are_decoded_without_betterproto2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = v1.ListContainersRequest(
        filter=v1.ContainerFilter(
            id="c1",
            state=v1.ContainerStateValue(state=v1.ContainerState.CONTAINER_EXITED),
            label_selector={"app": "web", "tier": ""},
        )
    )
    context = v1.LinuxContainerSecurityContext(
        supplemental_groups=[1, 2**40, -5], run_as_user=v1.Int64Value(value=-1)
    )
    image = v1.ImageStatusRequest(image=v1.ImageSpec(image="busybox"), verbose=True)
    encoded = [(m, bytes(m)) for m in (request, context, image)]

    def refuse(cls: type, data: bytes) -> None:
        raise AssertionError(f"betterproto2 was asked to parse a {cls.__name__}")

    monkeypatch.setattr(betterproto2.Message, "parse", classmethod(refuse))
    for message, data in encoded:
        assert wire.decode(data, type(message)) == message
    # repeated numbers arrive packed (as encoded) or one by one: both are read
    unpacked = b"".join(b"\x40" + wire.varint(n) for n in (7, 8))  # field 8, varint
    assert wire.decode(unpacked, v1.LinuxContainerSecurityContext).supplemental_groups == [7, 8]
    state = wire.decode(b"\x08\x63", v1.ContainerStateValue).state  # an unknown enum value
    assert state == 99
    assert isinstance(state, v1.ContainerState)
    decoded = wire.decode(b"\x0a\x01x\xf8\x3f\x01", v1.ContainerStatusRequest)
    assert decoded.container_id == "x"
    assert decoded._unknown_fields == b"\xf8\x3f\x01"


@pytest.mark.parametrize(
    ("cls", "data", "why"),
    [
        # ContainerStatusRequest.container_id (1) is a string: betterproto2 keeps the int
        (v1.ContainerStatusRequest, b"\x08\x05", "field 1 under wire type 0, not its own"),
        # ImageStatusRequest.image (1) as a varint of 2**34: betterproto2 keeps the int, and
        # encoding it again would make bytes(2**34)
        (
            v1.ImageStatusRequest,
            b"\x08\x80\x80\x80\x80\x40",
            "field 1 under wire type 0, not its own",
        ),
        # field 1 of wire type 6: betterproto2 sets container_id to None
        (v1.ContainerStatusRequest, b"\x0e", "field 1 under wire type 6, not its own"),
        (v1.ContainerStatusRequest, b"\x0a\x05ab", "a value runs past the end of its message"),
        (v1.ContainerStatusRequest, b"\x0a\x01\xff", "a string field is not UTF-8"),
        (v1.ContainerStatusRequest, b"\x10" + b"\xff" * 10 + b"\x01", "ten bytes"),
        (v1.ContainerStatusRequest, b"\x0a", "truncated"),
        (v1.ContainerStatusRequest, b"\xfb\x3f", "an unknown field of wire type 3"),
        # PsiData.avg_10 (2) is a double: 8 bytes, here 3
        (v1.PsiData, b"\x11abc", "a fixed-size number is cut short"),
        # a nested message names itself
        (v1.ImageStatusRequest, b"\x0a\x02\x0a\x05", "ImageSpec: a value runs past"),
        # unknown fields, then the odd one: refused at any size, in linear time
        (
            v1.ContainerStatusRequest,
            b"\xf8\x3f\x01" * 100_000 + b"\x08\x05",
            "field 1 under wire type 0",
        ),
    ],
    ids=[
        "varint-for-string",
        "varint-for-message",
        "wire-type-6",
        "cut-string",
        "not-utf8",
        "long-varint",
        "cut-tag",
        "group",
        "cut-double",
        "nested",
        "large",
    ],
)
def test_malformed_input_is_refused_naming_the_problem(
    monkeypatch: pytest.MonkeyPatch, cls: type, data: bytes, why: str
) -> None:
    def refuse(cls: type, data: bytes) -> None:
        raise AssertionError(f"betterproto2 was asked to parse a {cls.__name__}")

    monkeypatch.setattr(betterproto2.Message, "parse", classmethod(refuse))
    with pytest.raises(ValueError, match=r"^[A-Z][A-Za-z0-9]+: ") as refused:
        wire.decode(data, cls)
    assert why in str(refused.value)


def test_many_unknown_fields_are_kept_in_linear_time() -> None:
    # 350,000 unknown fields: kept one by one in a bytes value (as betterproto2 does), this
    # takes about 15 s of CPU here; as runs of the input joined once, well under 1 s.
    data = b"\x0a\x01x" + b"\xf8\x3f\x01" * 350_000
    start = time.process_time()
    decoded = wire.decode(data, v1.ContainerStatusRequest)
    assert time.process_time() - start < 5
    assert decoded.container_id == "x"
    assert decoded._unknown_fields == data[3:]
    # runs split by a known field are joined in order
    split = b"\xf8\x3f\x01\x0a\x01y\xf8\x3f\x02"
    decoded = wire.decode(split, v1.ContainerStatusRequest)
    assert decoded._unknown_fields == b"\xf8\x3f\x01\xf8\x3f\x02"
    assert decoded._unknown_fields == v1.ContainerStatusRequest.parse(split)._unknown_fields


def test_codec_decodes_with_the_fast_decoder() -> None:
    request = v1.PodSandboxStatusRequest(pod_sandbox_id="p" * 64, verbose=True)
    assert CriCodec().decode(bytes(request), v1.PodSandboxStatusRequest) == request
