"""Immutable snapshots of a guard: :class:`PoolStats` and :class:`QueryStats` rows.

:func:`pool_stats` reads them for :meth:`poolguard.Guard.stats`,
:func:`top_queries` ranks the rows for :meth:`poolguard.Guard.top_queries`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ._compat import pool_gauges
from ._histogram import HistogramSnapshot

if TYPE_CHECKING:
    from sqlalchemy.pool import Pool

    from ._gate import Gate
    from ._pgbouncer import PgBouncerStats
    from ._recorder import QueryTotals, Recorder

__all__ = ["HistogramSnapshot", "PoolStats", "QueryStats", "pool_stats", "top_queries"]


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
    pooler_saturations: int
    connections_opened: int
    connections_closed: int
    connections_invalidated: int
    leak_warnings: int
    use_time: HistogramSnapshot
    wait_time: HistogramSnapshot
    create_time: HistogramSnapshot
    #: PgBouncer's numbers for this pool (``pgbouncer_admin_url``); None when off.
    pgbouncer: PgBouncerStats | None = None

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
    def of(cls, stat: QueryTotals) -> QueryStats:
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


def pool_stats(
    name: str,
    pool: Pool | None,
    gate: Gate,
    recorder: Recorder,
    connections: tuple[int, int, int],
    leak_warnings: int,
    pgbouncer: PgBouncerStats | None = None,
) -> PoolStats:
    """One :class:`PoolStats` reading of ``pool`` behind ``gate``.

    ``connections``: opened, closed and invalidated so far.
    """
    pool_size, max_overflow, idle, in_use = pool_gauges(pool, gate.in_use)
    permits = gate.in_use
    acquisitions = gate.acquired
    with gate._lock:
        waiting = gate.waiting
        waits = gate.waits
    # Every wait, granted or not, plus the checkouts that never waited as
    # 0 s: returned ones and those out now, less those that waited (the
    # exporter counts alike). wait_time_total and wait_time_max are read
    # from it, so they are the histogram's sum and max by construction.
    wait_time = recorder.wait_snapshot(
        max(0, recorder.use.count + len(gate.out) - recorder.wait.count)
    )
    opened, closed, invalidated = connections
    return PoolStats(
        name=name,
        pool_class=type(pool).__name__ if pool is not None else "",
        pool_size=pool_size,
        max_overflow=max_overflow,
        capacity=gate.capacity,
        in_use=in_use,
        idle=idle,
        waiting=waiting,
        permits=permits,
        acquisitions=acquisitions,
        waits=waits,
        wait_time_total=wait_time.sum,
        wait_time_max=wait_time.max,
        # PoolTimeouts raised: the gate's own count also has queue_delay
        # sheds, which are rejections.
        timeouts=recorder.timeouts,
        pooler_saturations=recorder.pooler_saturations,
        connections_opened=opened,
        connections_closed=closed,
        connections_invalidated=invalidated,
        leak_warnings=leak_warnings,
        use_time=recorder.use.snapshot(),
        wait_time=wait_time,
        create_time=recorder.create.snapshot(),
        pgbouncer=pgbouncer,
    )


def top_queries(stats: list[QueryTotals], n: int, by: str) -> list[QueryStats]:
    """The ``n`` rows of ``stats`` with the most ``by`` (a :class:`QueryStats` field)."""
    names = [f.name for f in dataclasses.fields(QueryStats)]
    if by not in names:  # checked whatever the data: a typo fails on an idle guard too
        expected = ", ".join(names)
        raise ValueError(f"top_queries by={by!r} is invalid: expected one of {expected}")
    rows = [QueryStats.of(stat) for stat in stats]
    rows.sort(key=lambda r: getattr(r, by), reverse=True)
    return rows[:n]
