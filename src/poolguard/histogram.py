"""A fixed-bucket histogram cheap enough for the hot path.

Buckets grow geometrically by 25% from 25 µs to about 100 s, so any
quantile read from it is within about 12% of the true value. ``add`` is one
``bisect`` and three in-place updates, with no lock: under CPython's GIL the
updates of one call cannot interleave with another thread's (no call or
backward jump between them), so counts are exact there; on a free-threaded
build an increment can be lost under heavy contention.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_left

__all__ = ["BOUNDS", "Histogram", "HistogramSnapshot"]


def _bounds(start: float = 25e-6, factor: float = 1.25, stop: float = 100.0) -> tuple[float, ...]:
    bounds = [start]
    while bounds[-1] < stop:
        bounds.append(bounds[-1] * factor)
    return tuple(bounds)


#: Upper bounds (inclusive) of the buckets, in seconds; one more bucket above.
BOUNDS = _bounds()


@dataclasses.dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """Summary of a histogram: count, sum and max are exact, quantiles estimated."""

    count: int
    sum: float
    max: float
    p50: float
    p95: float
    p99: float

    @property
    def mean(self) -> float:
        """Mean of the values (0 when empty)."""
        return self.sum / self.count if self.count else 0.0


class Histogram:
    """Counts of values (seconds) in :data:`BOUNDS` buckets, plus sum and max."""

    __slots__ = ("counts", "max", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0
        self.max = 0.0

    def add(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect_left(BOUNDS, value)] += 1
        self.sum += value
        if value > self.max:
            self.max = value

    @property
    def count(self) -> int:
        """Number of values counted."""
        return sum(self.counts)

    def quantile(self, q: float, counts: list[int] | None = None) -> float:
        """Estimate the ``q`` quantile (0..1), interpolating inside the bucket."""
        counts = self.counts if counts is None else counts
        total = sum(counts)
        if total == 0:
            return 0.0
        rank = q * total
        seen = 0
        for i, n in enumerate(counts):
            if n and seen + n >= rank:
                low = BOUNDS[i - 1] if i > 0 else 0.0
                high = BOUNDS[i] if i < len(BOUNDS) else max(self.max, low)
                estimate = low + (high - low) * ((rank - seen) / n)
                return min(estimate, self.max) if self.max else estimate
            seen += n
        return self.max

    def snapshot(self, extra_zeros: int = 0) -> HistogramSnapshot:
        """A consistent summary (``extra_zeros`` adds values of 0 not counted yet)."""
        counts = list(self.counts)
        counts[0] += extra_zeros
        return HistogramSnapshot(
            count=sum(counts),
            sum=self.sum,
            max=self.max,
            p50=self.quantile(0.50, counts),
            p95=self.quantile(0.95, counts),
            p99=self.quantile(0.99, counts),
        )
