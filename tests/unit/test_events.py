"""The event bus: order, fan-out, and slow subscribers dropped instead of blocking."""

from __future__ import annotations

import asyncio

from crishim.model import Container, ContainerMetadata, PodMetadata, Sandbox
from crishim.model.events import EventType, LifecycleEvent
from crishim.services.events import EventBus


async def collect(bus: EventBus, count: int, out: list[LifecycleEvent]) -> None:
    async for event in bus.subscribe():
        out.append(event)
        if len(out) == count:
            return


async def test_every_subscriber_gets_every_event_in_order() -> None:
    bus = EventBus()
    first: list[LifecycleEvent] = []
    second: list[LifecycleEvent] = []
    tasks = [asyncio.create_task(collect(bus, 4, out)) for out in (first, second)]
    await asyncio.sleep(0)
    for kind in EventType:
        bus.publish("c1", "s1", kind)
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert [e.type for e in first] == list(EventType)
    assert [e.type for e in second] == list(EventType)
    assert all(e.container_id == "c1" and e.sandbox_id == "s1" for e in first)
    assert bus.subscribers == 0


async def test_a_slow_subscriber_is_dropped_and_publishing_never_waits() -> None:
    bus = EventBus(backlog=3)
    stream = bus.subscribe()

    async def next_event() -> LifecycleEvent:
        return await anext(stream)

    first = asyncio.create_task(next_event())
    await asyncio.sleep(0)
    bus.publish("c", "s", EventType.CREATED)
    assert (await first).type is EventType.CREATED
    for _ in range(10):  # nobody reads: the subscriber falls behind
        bus.publish("c", "s", EventType.STARTED)
    assert bus.subscribers == 0
    received = [event async for event in stream]
    assert len(received) == 2  # what fit before the end marker took the last slot


SANDBOX = Sandbox(id="s", metadata=PodMetadata(name="p", uid="u", namespace="n"), created_at=1)
CONTAINER = Container(
    id="c", sandbox_id="s", metadata=ContainerMetadata(name="c"), image="i", created_at=2
)


async def first_event(bus: EventBus) -> LifecycleEvent:
    async for event in bus.subscribe():
        return event
    raise AssertionError("the stream ended")


async def test_an_event_carries_the_pod_state_read_when_it_was_published() -> None:
    bus = EventBus()
    reads: list[str] = []

    def pod_state(sandbox_id: str) -> tuple[Sandbox | None, list[Container]]:
        reads.append(sandbox_id)
        return SANDBOX, [CONTAINER]

    bus.pod_state = pod_state
    bus.publish("c", "s", EventType.CREATED)
    assert reads == []  # nobody listens: nothing is read
    first = asyncio.create_task(first_event(bus))
    await asyncio.sleep(0)
    bus.publish("c", "s", EventType.STARTED)
    assert reads == ["s"]  # read at publish time, not when the subscriber gets to it
    event = await first
    assert event.sandbox == SANDBOX
    assert event.containers == (CONTAINER,)


async def test_a_removed_sandbox_event_carries_its_last_state() -> None:
    bus = EventBus()
    first = asyncio.create_task(first_event(bus))
    await asyncio.sleep(0)
    bus.publish("s", "s", EventType.DELETED, removed_sandbox=SANDBOX)
    event = await first
    assert event.sandbox == SANDBOX
    assert event.containers == ()
