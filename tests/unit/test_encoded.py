"""Pre-encoded list replies must be byte-for-byte what betterproto2 would send."""

from __future__ import annotations

from crishim.api import convert, v1
from crishim.api.encoded import PRUNE_SLACK, EncodedItems, frame_field
from crishim.model import Container, ContainerMetadata, ContainerState


def make(index: int, **changes: object) -> Container:
    base = Container(
        id=f"{index:064x}",
        sandbox_id="s" * 64,
        metadata=ContainerMetadata(name=f"c{index}"),
        image="sha256:" + "a" * 64,
        state=ContainerState.RUNNING,
        created_at=10**18 + index,
        labels={"io.kubernetes.pod.name": "p" * 200},
        annotations={"k": "v"},
    )
    return base.model_copy(update=changes)


def cache() -> EncodedItems[Container]:
    return EncodedItems(1, lambda c: bytes(convert.container(c)))


def test_join_equals_encoding_the_whole_reply() -> None:
    items = [make(i) for i in range(20)]
    expected = bytes(v1.ListContainersResponse(containers=[convert.container(c) for c in items]))
    assert cache().join(items) == expected
    decoded = v1.ListContainersResponse.parse(cache().join(items))
    assert [c.id for c in decoded.containers] == [c.id for c in items]


def test_empty_list_is_empty_bytes() -> None:
    assert cache().join([]) == b""
    assert bytes(v1.ListContainersResponse()) == b""


def test_long_payload_gets_a_multibyte_length() -> None:
    framed = frame_field(1, b"x" * 300)
    assert framed[:3] == bytes([0x0A, 0xAC, 0x02])
    assert len(framed) == 303


def test_a_new_revision_is_encoded_again() -> None:
    c = cache()
    first = make(1)
    c.join([first])
    changed = make(1, state=ContainerState.EXITED, revision=1)
    decoded = v1.ListContainersResponse.parse(c.join([changed]))
    assert decoded.containers[0].state is v1.ContainerState.CONTAINER_EXITED


def test_prune_forgets_removed_objects() -> None:
    c = cache()
    c.join([make(1), make(2), make(3)])
    c.prune([make(2).id])
    assert len(c) == 1


class Source:
    """The records a service has (what pruning asks of it)."""

    def __init__(self, items: list[Container]) -> None:
        self.items = items

    def count(self) -> int:
        return len(self.items)

    def ids(self) -> list[str]:
        return [c.id for c in self.items]


def test_a_cache_with_a_source_forgets_removed_objects_past_the_slack() -> None:
    live = [make(0)]
    c: EncodedItems[Container] = EncodedItems(
        1, lambda c: bytes(convert.container(c)), Source(live)
    )
    c.join(live)
    # Objects come and go; each join asks about one of them, as status calls do.
    for index in range(1, PRUNE_SLACK + 1):
        c.join([make(index)])
    assert len(c) == 1 + PRUNE_SLACK  # up to the slack, kept
    c.join([make(PRUNE_SLACK + 1)])
    assert len(c) == 1  # one more: only what the source still has
    assert c.join(live) == frame_field(1, bytes(convert.container(live[0])))
    # without a source nothing is pruned
    unpruned = cache()
    for index in range(PRUNE_SLACK + 2):
        unpruned.join([make(index)])
    assert len(unpruned) == PRUNE_SLACK + 2
