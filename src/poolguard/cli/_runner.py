"""Running ``poolguard bench``: one run of a pool size x concurrency, measured.

:func:`run_one` drives the workload with closed-loop worker threads through a
guarded engine and returns a :class:`Result`; :func:`cells` groups the runs
of one pool size x concurrency into a :class:`Cell` (medians and spread);
:class:`ServerConnections` counts the connections as the server sees them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import queue
import random
import statistics
import threading
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import poolguard

from ._db import create_engine
from ._output import percentile, rounded

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._bouncer import AdminConsole
    from ._workload import Statement

__all__ = ["Cell", "Result", "ServerConnections", "cells", "run_one"]

#: How often a run samples the pool and the server (seconds).
SAMPLE_EVERY = 0.2


@dataclasses.dataclass(frozen=True)
class _Measured:
    """What a run measures and a cell reports, for one pool size x concurrency."""

    pool_size: int
    concurrency: int
    #: Requests served per second (a cell: its median run's).
    throughput: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    wait_p50_ms: float
    wait_p99_ms: float
    timeouts: int
    rejections: int
    errors: int
    #: Most connections the server saw (None: SQLite).
    server_connections: int | None
    peak_in_use: int
    #: Mean time a connection was held, ms (checkout to checkin).
    mean_hold_ms: float
    #: Little's law: connections busy on average = throughput x mean hold time
    #: (exactly the two figures shown: ``throughput * mean_hold_ms / 1000``).
    busy_connections: float


@dataclasses.dataclass(frozen=True)
class Result(_Measured):
    """One run: a pool size, a concurrency, what was measured."""

    duration_s: float
    requests: int
    served: int
    error_types: dict[str, int]


@dataclasses.dataclass(frozen=True)
class Cell(_Measured):
    """One pool size x concurrency over its ``--repeat`` runs: medians, and the spread.

    Throughput, hold time and busy connections are those of the median run
    (by throughput; the lower middle one of an even number), so that busy =
    req/s x hold holds for the cell as for each run and never exceeds the
    pool: medians taken apart would not (throughput and hold time move in
    opposite directions on a full pool). Latencies and waits are the medians
    of the runs'; failures are summed; ``server_connections`` and
    ``peak_in_use`` are the most of any run.
    """

    runs: int
    throughput_min: float
    throughput_max: float
    #: Half the range of the runs' throughput, in % of the median (0 for one run).
    spread_pct: float


def _median_of(values: Sequence[float | None]) -> float | None:
    """The median of the runs that measured something, to 3 decimals."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _busy(throughput: float, mean_hold_ms: float) -> float:
    return round(throughput * mean_hold_ms / 1000, 2)


def cells(results: Sequence[Result]) -> list[Cell]:
    """The runs grouped by pool size x concurrency (in the order first seen)."""
    groups: dict[tuple[int, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.pool_size, r.concurrency), []).append(r)
    out = []
    for (pool, c), runs in groups.items():
        tps = [r.throughput for r in runs]
        middle = sorted(runs, key=lambda r: r.throughput)[(len(runs) - 1) // 2]
        tp, hold = middle.throughput, middle.mean_hold_ms
        servers = [r.server_connections for r in runs if r.server_connections is not None]
        out.append(Cell(
            pool_size=pool, concurrency=c, runs=len(runs), throughput=tp,
            throughput_min=min(tps), throughput_max=max(tps),
            spread_pct=round((max(tps) - min(tps)) / 2 / tp * 100, 1) if tp > 0 else 0.0,
            p50_ms=_median_of([r.p50_ms for r in runs]),
            p95_ms=_median_of([r.p95_ms for r in runs]),
            p99_ms=_median_of([r.p99_ms for r in runs]),
            wait_p50_ms=round(statistics.median(r.wait_p50_ms for r in runs), 3),
            wait_p99_ms=round(statistics.median(r.wait_p99_ms for r in runs), 3),
            timeouts=sum(r.timeouts for r in runs),
            rejections=sum(r.rejections for r in runs),
            errors=sum(r.errors for r in runs),
            server_connections=max(servers) if servers else None,
            peak_in_use=max(r.peak_in_use for r in runs),
            mean_hold_ms=hold,
            busy_connections=middle.busy_connections,
        ))
    return out


class ServerConnections:
    """Counts the run's connections as the database server sees them.

    Behind PgBouncer (``console``: its admin console), the server connections
    of the URL's pool as PgBouncer counts them (``SHOW POOLS``): the
    connections the database sees, whichever client uses them.
    """

    def __init__(
        self, url: sa.URL, dialect_name: str, console: AdminConsole | None = None
    ) -> None:
        self.dialect_name = dialect_name
        self.console = console
        self.pool = (url.database, url.username)
        self.engine: sa.Engine | None = None
        self.conn: sa.Connection | None = None
        if dialect_name == "postgresql":
            self.engine = create_engine(
                url, poolclass=sa.NullPool,
                connect_args={"application_name": "poolguard-bench-monitor"},
            )
        elif dialect_name in ("mysql", "mariadb"):
            self.engine = create_engine(url, poolclass=sa.NullPool)
        if self.engine is not None:
            self.conn = self.engine.connect()

    def count(self, application_name: str, ids: set[int]) -> int | None:
        if self.console is not None:
            return self.console.server_connections(*self.pool)
        conn = self.conn
        if conn is None:
            return None
        if self.dialect_name == "postgresql":
            value = conn.execute(
                sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                {"n": application_name},
            ).scalar_one()
        else:
            if not ids:
                return 0
            listed = ",".join(str(int(i)) for i in sorted(ids))
            value = conn.exec_driver_sql(
                f"SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID IN ({listed})"  # noqa: S608 - integers only
            ).scalar_one()
        conn.rollback()  # a fresh snapshot next time (pg_stat_activity is per transaction)
        return int(value)

    def max_connections(self) -> dict[str, int] | None:
        conn = self.conn
        if conn is None:
            return None
        if self.dialect_name == "postgresql":
            most = int(conn.exec_driver_sql("SHOW max_connections").scalar_one())
            reserved = int(conn.exec_driver_sql("SHOW superuser_reserved_connections").scalar_one())
            conn.rollback()
            return {"max_connections": most, "reserved": reserved}
        most = int(conn.exec_driver_sql("SELECT @@max_connections").scalar_one())
        conn.rollback()
        return {"max_connections": most, "reserved": 0}

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
        if self.conn is not None:
            self.conn.close()
        if self.engine is not None:
            self.engine.dispose()


class _Workers:
    """``concurrency`` closed-loop threads running the workload until ``end_at``."""

    def __init__(
        self, engine: sa.Engine, workload: Sequence[Statement], concurrency: int, seed: int
    ) -> None:
        self.engine = engine
        self.workload = workload
        self.cum_weights = list(itertools.accumulate(s.weight for s in workload))
        self.seed = seed
        self.latencies: list[list[float]] = [[] for _ in range(concurrency)]
        self.failures: list[dict[str, int]] = [{} for _ in range(concurrency)]
        #: When each worker's last request ended (perf_counter()).
        self.last_end = [0.0] * concurrency
        self.stop = threading.Event()
        self.end_at = 0.0
        self.threads = [
            threading.Thread(target=self._work, args=(i,), name=f"bench-{i}", daemon=True)
            for i in range(concurrency)
        ]

    def start(self, end_at: float) -> None:
        self.end_at = end_at
        for thread in self.threads:
            thread.start()

    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def served(self) -> int:
        return sum(len(x) for x in self.latencies)

    def _work(self, i: int) -> None:
        rng = random.Random(self.seed * 100_003 + i)
        mine, failed = self.latencies[i], self.failures[i]
        engine, stop = self.engine, self.stop
        while not stop.is_set():
            began = perf_counter()
            if began >= self.end_at:
                return
            statement = rng.choices(self.workload, cum_weights=self.cum_weights)[0]
            outcome, backoff = _request(engine, statement)
            ended = self.last_end[i] = perf_counter()
            if outcome is None:
                mine.append(ended - began)
            else:
                failed[outcome] = failed.get(outcome, 0) + 1
            if backoff:
                stop.wait(backoff)

    def outcomes(self) -> tuple[list[float], dict[str, int]]:
        """Served latencies (ms, sorted) and the failures by kind."""
        served = sorted(x * 1000 for lat in self.latencies for x in lat)
        merged: dict[str, int] = {}
        for failed in self.failures:
            for key, n in failed.items():
                merged[key] = merged.get(key, 0) + n
        return served, merged


def _request(engine: sa.Engine, statement: Statement) -> tuple[str | None, float]:
    """One request in its own transaction: (failure kind or None, back-off seconds)."""
    try:
        with poolguard.request(priority=statement.priority, tag=statement.tag), \
                engine.begin() as conn:
            result = conn.exec_driver_sql(statement.sql)
            if result.returns_rows:
                result.fetchall()
    except poolguard.Rejected as exc:
        return "rejected", min(0.1, exc.retry_after)
    except sa.exc.TimeoutError:
        return "timeout", 0.0
    except Exception as exc:  # noqa: BLE001 - counted by type
        # The driver's own class says more than SQLAlchemy's wrapper
        # (InvalidSqlStatementName, not ProgrammingError).
        orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else None
        name = type(orig if isinstance(orig, BaseException) else exc).__name__
        return f"error:{name}", 0.05  # a failing statement must not spin
    return None, 0.0


@dataclasses.dataclass
class _Raw:
    """What one process of a run measured, before the replicas are merged."""

    served_ms: list[float]
    failed: dict[str, int]
    elapsed: float
    wait_p50_ms: float
    wait_p99_ms: float
    #: Connections checked out and returned, and their summed hold time (ms).
    uses: int
    hold_total_ms: float
    peak_in_use: int


def _drive(
    url: sa.URL,
    *,
    pool_size: int,
    concurrency: int,
    duration: float,
    workload: Sequence[Statement],
    options: dict[str, Any],
    connect_args: dict[str, Any],
    app_name: str,
    ids: set[int] | None,
    seed: int,
    ready: Callable[[], None],
    sample: Callable[[float, int], None],
) -> _Raw:
    """One guarded engine driven by closed-loop workers (one process of a run).

    ``ready`` is called once the pool's connections are open, before the clock
    starts (replicas wait there for each other); ``sample(elapsed, served)``
    every :data:`SAMPLE_EVERY` while the workers run.
    """
    extra = {"application_name": app_name} if url.get_backend_name() == "postgresql" else {}
    engine = create_engine(url, poolclass=sa.QueuePool, pool_size=pool_size, max_overflow=0,
                           connect_args={**extra, **connect_args})
    if ids is not None:

        @sa.event.listens_for(engine, "connect")
        def _remember_id(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT CONNECTION_ID()")
            ids.add(int(cursor.fetchone()[0]))
            cursor.close()

    try:
        # Open the connections the run can use before the clock starts.
        conns = [engine.connect() for _ in range(min(pool_size, concurrency))]
        for conn in conns:
            conn.close()
        poolguard.wrap(engine, name=f"bench-{pool_size}x{concurrency}", **options)
        guard = poolguard.get_guard(engine)
        workers = _Workers(engine, workload, concurrency, seed)
        ready()
        start = perf_counter()
        end_at = start + duration
        workers.start(end_at)
        peak_in_use = 0
        give_up = end_at + (options.get("acquire_timeout") or 30.0) + 60.0
        while workers.alive() and perf_counter() < give_up:
            peak_in_use = max(peak_in_use, guard.gate.in_use)
            sample(perf_counter() - start, workers.served())
            time.sleep(SAMPLE_EVERY)
        workers.stop.set()
        finished = perf_counter()
        stats = guard.stats()
    finally:
        engine.dispose()
    # Requests running when the time is up finish and count: the rate is over
    # the time they took, not over --duration alone (else busy > pool size).
    served, failed = workers.outcomes()
    return _Raw(
        served_ms=served,
        failed=failed,
        elapsed=max(min(finished, end_at), *workers.last_end) - start,
        wait_p50_ms=stats.wait_time.p50 * 1000,
        wait_p99_ms=stats.wait_time.p99 * 1000,
        uses=stats.use_time.count,
        hold_total_ms=stats.use_time.mean * stats.use_time.count * 1000,
        peak_in_use=peak_in_use,
    )


def _replica(
    url: sa.URL,
    kwargs: dict[str, Any],
    index: int,
    barrier: Any,
    served: Any,
    results: Any,
) -> None:
    """One replica process of ``run_one(replicas=N)``: its own engine and workers."""
    try:

        def progress(elapsed: float, count: int) -> None:
            served[index] = count

        raw = _drive(url, ids=None, ready=lambda: barrier.wait(_START_TIMEOUT),
                     sample=progress, **kwargs)
        results.put((index, raw, None))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put((index, None, f"{type(exc).__name__}: {exc}"))


#: Seconds the replicas of a run may take to open their pools and meet.
_START_TIMEOUT = 60.0


def _run_replicas(
    url: sa.URL,
    replicas: int,
    kwargs: dict[str, Any],
    sample: Callable[[float, int], None],
) -> list[_Raw]:
    """``replicas`` processes, each :func:`_drive`; sampled from here while they run."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(replicas + 1)
    served = ctx.Array("q", replicas, lock=False)
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_replica, args=(url, kwargs, i, barrier, served, results),
                    name=f"poolguard-bench-replica-{i}", daemon=True)
        for i in range(replicas)
    ]
    for process in processes:
        process.start()
    raws: dict[int, _Raw] = {}
    errors: list[str] = []
    try:
        with contextlib.suppress(threading.BrokenBarrierError):
            # A replica that failed to start broke the barrier: its error is queued.
            barrier.wait(_START_TIMEOUT)
        start = perf_counter()
        give_up = start + kwargs["duration"] + (kwargs["options"].get("acquire_timeout")
                                                or 30.0) + 90.0
        while len(raws) + len(errors) < replicas and perf_counter() < give_up:
            sample(perf_counter() - start, sum(served))
            try:
                index, raw, error = results.get(timeout=SAMPLE_EVERY)
            except queue.Empty:
                continue
            if raw is not None:
                raws[index] = raw
            else:
                errors.append(f"replica {index}: {error}")
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        results.close()
    if errors or len(raws) < replicas:
        from ._db import CliError

        raise CliError("a replica process of the run failed: "
                       + ("; ".join(errors) or "it did not finish in time"))
    return [raws[i] for i in sorted(raws)]


def run_one(
    url: sa.URL,
    *,
    pool_size: int,
    concurrency: int,
    duration: float,
    workload: Sequence[Statement],
    options: dict[str, Any],
    monitor: ServerConnections,
    seed: int = 1,
    tick: Callable[[float, int], None] | None = None,
    replicas: int = 1,
    connect_args: dict[str, Any] | None = None,
) -> Result:
    """Drive ``workload`` with ``concurrency`` closed-loop workers through a guarded
    pool of ``pool_size`` connections for ``duration`` seconds.

    With ``replicas`` > 1, that many processes do so at once, each with its own
    engine, pool and workers (a fleet of the service): the result merges them
    (throughput and busy connections are the fleet's; acquire wait p50 is the
    median of the replicas', p99 the worst replica's; ``peak_in_use`` sums the
    replicas' peaks).
    """
    app_name = f"poolguard-bench-{os.getpid()}-{pool_size}x{concurrency}"
    ids: set[int] | None = set() if monitor.dialect_name in ("mysql", "mariadb") else None
    most: list[int] = []

    def sample(elapsed: float, served: int) -> None:
        if elapsed < duration + SAMPLE_EVERY:
            seen = monitor.count(app_name, ids or set())
            if seen is not None:
                most.append(seen)
        if tick is not None:
            tick(elapsed, served)

    kwargs: dict[str, Any] = {
        "pool_size": pool_size, "concurrency": concurrency, "duration": duration,
        "workload": list(workload), "options": options, "connect_args": connect_args or {},
        "app_name": app_name, "seed": seed,
    }
    if replicas == 1:
        raws = [_drive(url, ids=ids, ready=lambda: None, sample=sample, **kwargs)]
    else:
        # One seed per replica, so the replicas do not pick the same statements.
        raws = _run_replicas(url, replicas, {**kwargs, "seed": seed * 1009}, sample)
    served = sorted(x for raw in raws for x in raw.served_ms)
    failed: dict[str, int] = {}
    for raw in raws:
        for key, n in raw.failed.items():
            failed[key] = failed.get(key, 0) + n
    elapsed = max(raw.elapsed for raw in raws)
    timeouts = failed.pop("timeout", 0)
    rejected = failed.pop("rejected", 0)
    throughput = round(len(served) / elapsed, 2)
    uses = sum(raw.uses for raw in raws)
    hold_ms = round(sum(raw.hold_total_ms for raw in raws) / uses, 3) if uses else 0.0
    return Result(
        pool_size=pool_size,
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=len(served) + timeouts + rejected + sum(failed.values()),
        served=len(served),
        throughput=throughput,
        p50_ms=rounded(percentile(served, 50), 3),
        p95_ms=rounded(percentile(served, 95), 3),
        p99_ms=rounded(percentile(served, 99), 3),
        wait_p50_ms=round(statistics.median(raw.wait_p50_ms for raw in raws), 3),
        wait_p99_ms=round(max(raw.wait_p99_ms for raw in raws), 3),
        timeouts=timeouts,
        rejections=rejected,
        errors=sum(failed.values()),
        error_types=failed,
        server_connections=max(most) if most else None,
        peak_in_use=sum(raw.peak_in_use for raw in raws),
        mean_hold_ms=hold_ms,
        busy_connections=_busy(throughput, hold_ms),
    )
