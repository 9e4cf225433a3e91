"""Bounds for tests that feed hostile input: a hard time limit and a memory peak.

A parser that hangs must fail the test, not stall it: :func:`time_limit` interrupts the
code under test with SIGALRM (so it works on pure-Python loops; main thread only), and
:func:`outcome` runs one call under it, handing back the result or the expected error.
:func:`allocation_peak` measures the largest amount of memory the Python allocators held
at once while a block ran, to check that a declared size is not allocated up front.
"""

from __future__ import annotations

import signal
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TypeVar

__all__ = ["AllocationPeak", "TooSlow", "allocation_peak", "outcome", "time_limit"]

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


class TooSlow(AssertionError):
    """The code under test ran past its time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TooSlow` inside the block once it has run for ``seconds``."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise TooSlow(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call: Callable[[], T], expected: type[E], seconds: float) -> T | E:
    """Run ``call`` within ``seconds``: its result, or the ``expected`` exception it raised
    (returned, so the test checks it outside an ``except`` block)."""
    with time_limit(seconds):
        try:
            return call()
        except expected as exc:
            return exc


@dataclass
class AllocationPeak:
    """Bytes allocated at the peak of the block, above what was held when it began."""

    bytes: int = 0


@contextmanager
def allocation_peak() -> Iterator[AllocationPeak]:
    """Trace allocations during the block; the result is filled in when it ends."""
    result = AllocationPeak()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        yield result
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        result.bytes = max(0, peak - start)
