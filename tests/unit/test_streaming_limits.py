"""The streaming server's limit keeping, without sockets: the request-head gate and the
log tally."""

from __future__ import annotations

import time

from crishim.streaming.limits import HandshakeGate, LogTally


class FakeTransport:
    def __init__(self, name: str) -> None:
        self.name = name
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


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
