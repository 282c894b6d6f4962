"""Admission policies of the gate, as pure functions of state and a clock.

The gate enforces them (gate.py); here is only the arithmetic, so that each
policy is unit-tested without threads or sleeping:

- priorities and reserved capacity: which caller may take a free permit;
- bounded waiting per priority (psycopg_pool's ``max_waiting``, per class);
- CoDel on the acquire queue (Facebook's "Fail at Scale": target 5 ms,
  interval 100 ms) and, while overloaded, adaptive LIFO;
- bulkheads: how many connections one request tag may hold;
- an adaptive limit (Gradient2) below the pool's capacity, driven by hold times.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "BACKGROUND",
    "CRITICAL",
    "HEALTH",
    "NORMAL",
    "PRIORITIES",
    "Admission",
    "Codel",
    "Gradient2",
    "may_take",
    "rank",
    "reserve_size",
    "tag_limit",
]

CRITICAL = "critical"
NORMAL = "normal"
BACKGROUND = "background"
#: Health and readiness checks: never wait, never take the critical reserve.
HEALTH = "health"
PRIORITIES = (CRITICAL, NORMAL, BACKGROUND, HEALTH)
_RANK = {CRITICAL: 0, HEALTH: 1, NORMAL: 2, BACKGROUND: 3}


def rank(priority: str) -> int:
    """Serving order: lower first."""
    return _RANK[priority]


def reserve_size(reserved: float, capacity: int) -> int:
    """Permits kept for critical callers: a count (>= 1) or a share of capacity (< 1)."""
    if reserved <= 0:
        return 0
    count = reserved if reserved >= 1 else math.ceil(reserved * capacity)
    return min(int(count), capacity)


def may_take(priority: str, free: int, reserved: int, critical_held: int = 0) -> bool:
    """Whether a caller of ``priority`` may take one of ``free`` permits now.

    The reserve is a guarantee, not idle headroom: a non-critical caller
    leaves the last ``reserved`` free permits, less those critical callers
    hold already (``critical_held``). Critical requests that hold their
    share wait for the next permit released, first in line; permits kept
    free beside them would only idle while others queue.
    """
    if free <= 0:
        return False
    if priority == CRITICAL:
        return True
    return free > reserved - critical_held


def tag_limit(limit: float, capacity: int) -> int:
    """Connections one tag may hold: a count (>= 1) or a share of capacity (< 1)."""
    if limit >= 1:
        return int(limit)
    return max(1, math.floor(limit * capacity))


def parse_tag_limits(text: str) -> dict[str, float]:
    """``"reports=2,search=0.25"`` -> ``{"reports": 2.0, "search": 0.25}``."""
    limits: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        tag, sep, value = part.partition("=")
        if not sep or not tag.strip():
            raise ValueError(f"expected tag=limit pairs separated by commas, got {part!r}")
        try:
            limits[tag.strip()] = float(value)
        except ValueError:
            raise ValueError(
                f"limit of tag {tag.strip()!r} must be a number, got {value.strip()!r}"
            ) from None
    return limits


def check_tag_limits(limits: Mapping[str, float]) -> dict[str, float]:
    """Validate a tag -> limit mapping (limits > 0; counts are whole numbers)."""
    checked = {}
    for tag, limit in limits.items():
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag {tag!r} must be a non-empty string")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise ValueError(f"limit of tag {tag!r} must be a number, got {limit!r}")
        if not (0 < limit < 1 or (limit >= 1 and float(limit).is_integer())):
            raise ValueError(
                f"limit of tag {tag!r} is {limit!r}: expected a share of the pool "
                "(0 < x < 1) or a whole number of connections (>= 1)"
            )
        checked[tag] = float(limit)
    return checked


class Codel:
    """Controlled delay on the acquire queue.

    The queue is *overloaded* once the shortest wait seen during a whole
    ``interval`` exceeded ``target``: a standing queue, not a burst. While
    overloaded, a new waiter may wait at most ``2 * target`` (its caller is
    likely gone by the time an old request would be served), and the gate
    serves the newest waiter first (adaptive LIFO). It goes back to normal
    after an interval whose shortest wait met the target, or when the queue
    empties.

    The gate feeds it the waits of non-critical callers (the ones it sheds)
    and a wait of 0 only for a permit taken while nobody is queued: a
    critical caller passing a standing queue says nothing about it.
    """

    __slots__ = ("_interval_end", "_min_wait", "interval", "overloaded", "target")

    def __init__(self, target: float = 0.005, interval: float = 0.1) -> None:
        self.target = target
        self.interval = interval
        self.overloaded = False
        self._interval_end: float | None = None
        self._min_wait = math.inf

    @property
    def slough_timeout(self) -> float:
        """Longest wait allowed while overloaded."""
        return 2 * self.target

    def on_grant(self, waited: float, now: float) -> None:
        """A waiter got a permit after ``waited`` seconds (0 for no wait)."""
        if self._interval_end is None:
            self._interval_end = now + self.interval
        self._min_wait = min(self._min_wait, waited)
        if now >= self._interval_end:
            self.overloaded = self._min_wait > self.target
            self._min_wait = math.inf
            self._interval_end = now + self.interval

    def on_empty(self, now: float) -> None:
        """The queue drained: a standing queue is gone."""
        self.overloaded = False
        self._min_wait = math.inf
        self._interval_end = now + self.interval


class Gradient2:
    """An adaptive concurrency limit in the style of Netflix's Gradient2.

    It compares a short-term average of the hold time with a long-term one:
    when connections are held longer than usual (the database slows down),
    the limit shrinks; when hold times are back to normal, it grows again by
    about the square root of the limit per update. The limit never leaves
    ``[min_limit, max_limit]``. Pure: feed it samples with :meth:`update`.
    """

    __slots__ = (
        "_long",
        "_short",
        "limit",
        "long_window",
        "max_limit",
        "min_limit",
        "smoothing",
        "tolerance",
    )

    def __init__(
        self,
        max_limit: int,
        *,
        min_limit: int = 1,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
        long_window: int = 600,
    ) -> None:
        self.max_limit = max_limit
        self.min_limit = min(min_limit, max_limit)
        self.tolerance = tolerance
        self.smoothing = smoothing
        self.long_window = long_window
        self.limit = float(max_limit)
        self._long: float | None = None
        self._short: float | None = None

    def update(self, rtt: float) -> int:
        """Take one hold-time sample (seconds); return the new limit."""
        short = rtt if self._short is None else self._short * 0.9 + rtt * 0.1
        self._short = short
        if self._long is None:
            self._long = rtt
        else:
            # Exponential average over about long_window samples.
            self._long += (rtt - self._long) / self.long_window
            if self._long > short:
                # Recover quickly once the short term is better than the long.
                self._long = self._long * 0.9 + short * 0.1
        gradient = max(0.5, min(1.0, self.tolerance * self._long / short)) if short > 0 else 1.0
        new_limit = self.limit * gradient + math.sqrt(self.limit)
        limit = self.limit * (1 - self.smoothing) + new_limit * self.smoothing
        self.limit = max(float(self.min_limit), min(float(self.max_limit), limit))
        return int(self.limit)


class Admission:
    """One admission policy: its settings and the decisions they make.

    The gate holds one (``Gate.admission``) only while a policy is on, and
    consults it under its lock; the permits, the waiters and the wake-ups
    stay the gate's. With none, the gate's fast path never looks here.

    Args:
        reserved: permits kept for critical callers (:func:`reserve_size`, :func:`may_take`).
        max_waiting: most waiters per priority (``None``: unbounded).
        codel: CoDel on the queue, or None.
        tag_limits: most connections a request tag may hold (:func:`tag_limit`).
        adaptive: the adaptive limit below capacity for non-critical callers.
    """

    __slots__ = ("adaptive", "codel", "max_waiting", "reserved", "tag_limits")

    def __init__(
        self,
        *,
        reserved: int = 0,
        max_waiting: Mapping[str, int | None] | None = None,
        codel: Codel | None = None,
        tag_limits: Mapping[str, int] | None = None,
        adaptive: Gradient2 | None = None,
    ) -> None:
        self.reserved = reserved
        self.max_waiting: dict[str, int | None] = dict(max_waiting or {})
        self.codel = codel
        self.tag_limits: dict[str, int] = dict(tag_limits or {})
        self.adaptive = adaptive

    @property
    def on(self) -> bool:
        """Some setting shapes admission (else the gate needs no policy)."""
        return bool(self.shapes_grants or any(v is not None for v in self.max_waiting.values()))

    @property
    def shapes_grants(self) -> bool:
        """Some setting decides who may take a free permit (bounded queues only decide
        who may wait: with nobody waiting, a free permit needs no lock)."""
        return bool(self.reserved or self.codel or self.tag_limits or self.adaptive)

    @property
    def on_checkin(self) -> bool:
        """A checkin matters to the policy (a tag's slot, a hold-time sample)."""
        return bool(self.tag_limits) or self.adaptive is not None

    def eligible(self, priority: str, free: int, capacity: int, critical_held: int = 0) -> bool:
        """Whether ``priority`` may take one of ``free`` permits (reserve, adaptive limit).

        ``critical_held``: permits critical callers hold, which count toward
        the reserve (:func:`may_take`); the gate counts them only when
        ``free`` is within the reserve.
        """
        # may_take(), inline: this runs on every policy checkout and dispatch.
        if free <= 0 or (priority != CRITICAL and free <= self.reserved - critical_held):
            return False
        adaptive = self.adaptive
        if adaptive is None or priority == CRITICAL:
            return True
        return capacity - free < int(adaptive.limit)

    def tag_full(self, tag: str | None, in_use: Mapping[str, int], queued: int = 0) -> bool:
        """Whether ``tag`` holds its cap (``in_use`` by tag, plus ``queued`` of its waiters)."""
        cap = self.tag_limits.get(tag) if tag is not None else None
        return cap is not None and in_use.get(tag, 0) + queued >= cap  # type: ignore[arg-type]

    def queue_full(self, priority: str, queued: int) -> bool:
        """Whether a caller of ``priority`` finds its queue full (``queued`` wait there)."""
        limit = self.max_waiting.get(priority)
        return limit is not None and queued >= limit
