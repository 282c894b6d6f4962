"""Immutable snapshots: :class:`PoolStats` from :meth:`poolguard.Guard.stats`
and :class:`QueryStats` rows from :meth:`poolguard.Guard.top_queries`."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ._histogram import HistogramSnapshot

if TYPE_CHECKING:
    from ._recorder import QueryStat

__all__ = ["HistogramSnapshot", "PoolStats", "QueryStats"]


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    """One reading of a guarded pool. Gauges are read at snapshot time;
    counters count since the guard was created. The README documents every
    field."""

    name: str
    pool_class: str
    pool_size: int | None
    max_overflow: int | None
    capacity: int | None
    in_use: int
    idle: int
    waiting: int
    permits: int
    acquisitions: int
    waits: int
    wait_time_total: float
    wait_time_max: float
    timeouts: int
    connections_opened: int
    connections_closed: int
    connections_invalidated: int
    leak_warnings: int
    use_time: HistogramSnapshot
    wait_time: HistogramSnapshot
    create_time: HistogramSnapshot

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a plain ``dict`` (for logs and JSON)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class QueryStats:
    """One statement shape's totals (times in seconds).

    ``held_time`` is connection-seconds: the time connections were held by
    checkouts whose longest statement was this shape.
    """

    fingerprint: str
    statement: str
    summary: str
    calls: int
    errors: int
    rows: int
    total_time: float
    mean_time: float
    max_time: float
    p95_time: float
    p99_time: float
    held_time: float

    @classmethod
    def of(cls, stat: QueryStat) -> QueryStats:
        """Snapshot a recorder row."""
        snap = stat.hist.snapshot()
        return cls(
            fingerprint=stat.fp.id,
            statement=stat.fp.text,
            summary=stat.fp.summary,
            calls=snap.count,
            errors=stat.errors,
            rows=stat.rows,
            total_time=snap.sum,
            mean_time=snap.mean,
            max_time=snap.max,
            p95_time=snap.p95,
            p99_time=snap.p99,
            held_time=stat.held,
        )
