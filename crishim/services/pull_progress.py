"""A pull's progress: its log lines while it runs, and the pull counters of /metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from crishim.images.manifest import Descriptor

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 5.0
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class PullMetrics:
    """Counters for the metrics endpoint: bytes, pulls, failures and a duration histogram."""

    bytes_total: int = 0
    pulls_total: int = 0
    failures_total: int = 0
    duration_sum: float = 0.0
    duration_buckets: dict[float, int] = field(
        default_factory=lambda: dict.fromkeys(DURATION_BUCKETS, 0)
    )

    def observe(self, seconds: float, ok: bool) -> None:
        """Count one finished pull."""
        self.pulls_total += 1
        if not ok:
            self.failures_total += 1
        self.duration_sum += seconds
        for bound in self.duration_buckets:
            if seconds <= bound:
                self.duration_buckets[bound] += 1


class PullProgress:
    """Logs a pull's progress at info level, at most every few seconds."""

    def __init__(self, ref: str, layers: list[Descriptor], metrics: PullMetrics) -> None:
        self._ref = ref
        self._total = sum(d.size for d in layers)
        self._count = len(layers)
        self._metrics = metrics
        self.done_bytes = 0
        self.done_layers = 0
        self._start = time.monotonic()
        self._last_log = self._start

    def add(self, count: int) -> None:
        """Count ``count`` more bytes downloaded; log when the interval has passed."""
        self.done_bytes += count
        self._metrics.bytes_total += count
        now = time.monotonic()
        if now - self._last_log >= PROGRESS_INTERVAL_SECONDS:
            self._last_log = now
            self.log()

    def log(self) -> None:
        """Log where the pull stands."""
        elapsed = max(time.monotonic() - self._start, 1e-6)
        log.info(
            "pulling %s: %d/%d layers, %.1f/%.1f MB, %.1f MB/s",
            self._ref,
            self.done_layers,
            self._count,
            self.done_bytes / 1e6,
            self._total / 1e6,
            self.done_bytes / 1e6 / elapsed,
        )
