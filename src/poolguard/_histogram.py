"""A fixed-bucket histogram cheap enough for the hot path.

Buckets grow geometrically by 25% from 25 µs to about 100 s, so any
quantile read from it is within about 12% of the true value, and always
within what was observed: never above the largest value, never below the
smallest (when :meth:`Histogram.add` kept it), and 0 while it falls among
values known to be 0. ``add`` is one ``bisect`` and a few in-place updates,
with no lock: under CPython's GIL the
updates of one call cannot interleave with another thread's (no call or
backward jump between them), so counts are exact there; on a free-threaded
build an increment can be lost under heavy contention.
"""

from __future__ import annotations

import dataclasses
import math
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
    """Counts of values (seconds) in :data:`BOUNDS` buckets, plus sum, max and min.

    The hot path updates ``counts``, ``sum`` and ``max`` of some histograms
    inline and leaves ``min`` alone (one comparison less per statement), so
    ``min`` bounds the quantiles only of a histogram made with
    ``track_min=True``, all of whose values go through :meth:`add`; the
    others fall back to the lower edge of the lowest bucket.
    """

    __slots__ = ("counts", "max", "min", "sum", "track_min")

    def __init__(self, *, track_min: bool = False) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.sum = 0.0
        self.max = 0.0
        self.min = math.inf
        self.track_min = track_min

    def add(self, value: float) -> None:
        """Count one value."""
        self.counts[bisect_left(BOUNDS, value)] += 1
        self.sum += value
        if value > self.max:
            self.max = value
        if value < self.min:
            self.min = value

    @property
    def count(self) -> int:
        """Number of values counted."""
        return sum(self.counts)

    def quantile(self, q: float, counts: list[int] | None = None, zeros: int = 0) -> float:
        """Estimate the ``q`` quantile (0..1), interpolating inside the bucket.

        ``zeros`` values of exactly 0 come first (they are also in
        ``counts[0]``). The estimate is clamped to the values observed: a
        bucket's interpolation must not report a value nobody saw.
        """
        counts = self.counts if counts is None else counts
        total = sum(counts)
        if total == 0:
            return 0.0
        rank = q * total
        if rank <= zeros:
            return 0.0
        top = self.max
        bottom = 0.0 if zeros or not self.track_min or self.min == math.inf else self.min
        seen = zeros
        for i, count in enumerate(counts):
            n = count - zeros if i == 0 else count  # the zeros are ranked already
            if n > 0 and seen + n >= rank:
                low = BOUNDS[i - 1] if i > 0 else 0.0
                high = BOUNDS[i] if i < len(BOUNDS) else max(top, low)
                estimate = low + (high - low) * ((rank - seen) / n)
                return min(max(estimate, bottom), top)
            seen += max(n, 0)
        return top

    def snapshot(self, extra_zeros: int = 0) -> HistogramSnapshot:
        """A consistent summary (``extra_zeros`` adds values of 0 not counted yet)."""
        return self.merged((), extra_zeros)

    def merged(self, others: tuple[Histogram, ...], extra_zeros: int = 0) -> HistogramSnapshot:
        """A summary of this histogram and ``others`` together (plus ``extra_zeros``)."""
        counts = list(self.counts)
        total, top, bottom = self.sum, self.max, self.min
        exact = self.track_min
        for other in others:
            for i, n in enumerate(other.counts):
                counts[i] += n
            total += other.sum
            top = max(top, other.max)
            bottom = min(bottom, other.min)
            exact = exact and other.track_min
        counts[0] += extra_zeros
        whole = Histogram(track_min=exact)
        whole.counts, whole.sum, whole.max, whole.min = counts, total, top, bottom
        return HistogramSnapshot(
            count=sum(counts),
            sum=total,
            max=top,
            p50=whole.quantile(0.50, counts, extra_zeros),
            p95=whole.quantile(0.95, counts, extra_zeros),
            p99=whole.quantile(0.99, counts, extra_zeros),
        )
