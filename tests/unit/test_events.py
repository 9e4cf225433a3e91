"""The event bus: order, fan-out, and slow subscribers dropped instead of blocking."""

from __future__ import annotations

import asyncio

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
