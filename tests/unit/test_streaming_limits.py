"""The streaming server's limit keeping, without sockets: the request-head gate, the log
tally, the idle watch, and the limits crishim serve builds from its configuration."""

from __future__ import annotations

import asyncio
import time

import pytest

from crishim.app import streaming_limits
from crishim.config import Config, StreamingConfig
from crishim.streaming.limits import HandshakeGate, LogTally, StreamingLimits, idle_timeout


class FakeTransport:
    def __init__(self, name: str) -> None:
        self.name = name
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class FakeSession:
    def __init__(self) -> None:
        self.last_activity = time.monotonic()
        self.expired: list[str] = []

    async def expire(self, reason: str) -> None:
        self.expired.append(reason)


def test_gate_drops_the_connection_that_has_waited_longest() -> None:
    gate = HandshakeGate(2)
    first, second, third = FakeTransport("1"), FakeTransport("2"), FakeTransport("3")
    with gate.waiting(first), gate.waiting(second):
        with gate.waiting(third):
            assert first.aborted
            assert not second.aborted
            assert len(gate) == 2
        assert len(gate) == 1
    assert len(gate) == 0  # the dropped one leaving is harmless


def test_gate_drops_nothing_while_under_its_limit() -> None:
    gate = HandshakeGate(2)
    transports = [FakeTransport(str(n)) for n in range(5)]
    for transport in transports:
        with gate.waiting(transport):
            pass
    assert not any(t.aborted for t in transports)


def test_tally_reports_the_first_event_then_a_count_per_interval() -> None:
    tally = LogTally(interval=0.05)
    assert tally.add() == 1
    assert tally.add() == 0
    assert tally.add() == 0
    time.sleep(0.06)
    assert tally.add() == 3


async def test_idle_session_is_expired_with_the_reason() -> None:
    session = FakeSession()
    async with idle_timeout(session, 0.05):
        await asyncio.sleep(0.2)
    assert session.expired == ["no traffic for 0.05 seconds"]


async def test_activity_postpones_expiry() -> None:
    session = FakeSession()
    async with idle_timeout(session, 0.1):
        for _ in range(10):
            await asyncio.sleep(0.03)
            session.last_activity = time.monotonic()
    assert session.expired == []


async def test_zero_idle_timeout_never_expires() -> None:
    session = FakeSession()
    session.last_activity = 0.0
    async with idle_timeout(session, 0):
        await asyncio.sleep(0.05)
    assert session.expired == []


async def test_watch_ends_with_its_block() -> None:
    session = FakeSession()
    before = asyncio.all_tasks()
    async with idle_timeout(session, 60):
        assert len(asyncio.all_tasks() - before) == 1
    assert asyncio.all_tasks() == before


async def test_cancelling_the_session_task_is_not_swallowed_by_the_watch() -> None:
    session = FakeSession()

    async def serve() -> None:
        async with idle_timeout(session, 60):
            await asyncio.sleep(60)

    task = asyncio.create_task(serve())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_config_defaults_are_the_servers_defaults() -> None:
    assert streaming_limits(Config().streaming) == StreamingLimits()


def test_each_streaming_key_reaches_its_limit() -> None:
    section = StreamingConfig(max_sessions=1, max_handshakes=2, request_timeout=3, idle_timeout=4)
    assert streaming_limits(section) == StreamingLimits(
        max_sessions=1, max_handshakes=2, request_timeout=3, idle_timeout=4
    )
