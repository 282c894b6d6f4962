"""``poolguard bench``: size a pool against a real database, through a guarded engine.

For each pool size and each concurrency, ``--concurrency`` worker threads run
the workload in a closed loop (each sends its next request as soon as the
last one ends) through ``poolguard.wrap(engine)`` for ``--duration``, and the
run measures: throughput, request latency p50/p95/p99 (checkout included),
acquire-wait p50/p99 (``guard.stats().wait_time``), timeouts, rejections,
errors, the mean time a connection is held, and the connections the server
saw (PostgreSQL ``pg_stat_activity`` by ``application_name``, MariaDB/MySQL
``information_schema.PROCESSLIST`` by connection id; SQLite: n/a).

It ends with a recommendation and its reasoning: the knee of the throughput
curve (the smallest pool reaching 90% of the best throughput at each
concurrency), Little's law from the measured hold times (connections busy =
throughput x mean hold time), and a warning when ``--replicas`` x pool size
exceeds the server's ``max_connections``.

``--hot-path`` instead runs the acquire/release microbenchmark
(``poolguard.hotpath``): plain SQLAlchemy against guarded, one process,
alternating rounds, with the ratio guarded/plain per case.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import poolguard
from poolguard.config import Config
from poolguard.policies import NORMAL, PRIORITIES

from ._db import (
    CliError,
    UsageError,
    create_engine,
    describe_error,
    parse_url,
    ping,
    shown,
    sleep_sql,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Sequence

__all__ = [
    "EPILOG",
    "KNEE_SHARE",
    "Result",
    "Statement",
    "UsageError",
    "add_arguments",
    "default_workload",
    "format_workload",
    "parse_duration",
    "parse_sizes",
    "parse_workload",
    "recommend",
    "run",
]

#: The knee: the smallest pool whose throughput reaches this share of the best.
KNEE_SHARE = 0.9
#: Default guard options of the benchmark's engines (``--option`` overrides them).
DEFAULT_OPTIONS: dict[str, Any] = {"acquire_timeout": 2.0}
_SAMPLE_EVERY = 0.2

EPILOG = """\
workload file (--workload FILE): one statement per line,

    weight [priority [tag]] | SQL

  weight    a number > 0: how often the statement is picked, relative to the others
  priority  critical, normal (default), background or health (poolguard.request priority)
  tag       the poolguard.request tag ("-" for none)
  SQL       sent as-is (no bind parameters), in its own transaction (committed)

Blank lines and lines starting with # are ignored. On SQLite, sleep(seconds) is
available to make a statement slow. 'poolguard bench --print-workload' prints
the built-in workload for the database in this format.

examples:
  poolguard bench                                   # embedded SQLite, built-in workload
  poolguard bench --url postgresql+psycopg://app@db/app --pool-sizes 5,10,20,40 \\
      --concurrency 16,64 --duration 20s --replicas 6 --plot bench.png
  poolguard bench --hot-path                        # the guard's overhead on this machine
"""


# -- arguments ------------------------------------------------------------------


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min)?\s*$")
_UNIT = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0}


def parse_duration(text: str) -> float:
    """``20s``, ``1.5s``, ``500ms``, ``2m`` or a number of seconds; must be > 0."""
    import argparse

    match = _DURATION.match(text)
    seconds = float(match.group(1)) * _UNIT[match.group(2)] if match else -1.0
    if not match or not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected a positive time such as 20s, 500ms or 2m"
        )
    return seconds


def parse_sizes(text: str) -> list[int]:
    """``5,10,20``: whole numbers >= 1, in the order given, without repeats."""
    import argparse

    sizes: list[int] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(
                f"invalid list {text!r}: expected comma-separated whole numbers >= 1, "
                "e.g. 5,10,20,40"
            )
        if int(part) not in sizes:
            sizes.append(int(part))
    return sizes


def _positive_int(text: str) -> int:
    import argparse

    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number >= 1")
    return int(text)


def _option(text: str) -> tuple[str, str]:
    import argparse

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"invalid option {text!r}: expected NAME=VALUE, e.g. reserved_critical=2"
        )
    return key.strip(), value.strip()


def guard_options(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``poolguard.wrap`` options from ``--option NAME=VALUE`` pairs, checked by
    :class:`poolguard.Config` (values are written as in ``POOLGUARD_*`` variables)."""
    known = Config.option_names()
    options = dict(DEFAULT_OPTIONS)
    for key, raw in pairs:
        if key not in known or key in ("meter_provider", "breaker_classifier", "name"):
            raise UsageError(
                f"unknown guard option {key!r} in --option (see the README's options table)"
            )
        try:
            config = Config.from_env({f"POOLGUARD_{key.upper()}": raw})
        except ValueError as exc:
            # "environment variable POOLGUARD_X='v': why" -> "why"
            reason = str(exc).split("': ", 1)[-1]
            raise UsageError(f"--option {key}={raw}: {reason}") from None
        options[key] = getattr(config, key)
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``poolguard bench``."""
    parser.add_argument(
        "--url", help="database URL (e.g. postgresql+psycopg://user@host/db, "
        "mysql+pymysql://user@host/db); default: a SQLite file in a temporary folder",
    )
    parser.add_argument("--pool-sizes", type=parse_sizes, default=[5, 10, 20, 40],
                        metavar="N,N,...", help="pool sizes to measure (default 5,10,20,40)")
    parser.add_argument("--concurrency", type=parse_sizes, default=[16, 64], metavar="N,N,...",
                        help="worker threads, each a closed loop (default 16,64)")
    parser.add_argument("--duration", type=parse_duration, default=10.0, metavar="TIME",
                        help="length of each run: 20s, 500ms, 2m (default 10s)")
    parser.add_argument("--workload", type=Path, metavar="FILE",
                        help="statements to run, with weights (format below); "
                        "default: a built-in mix of fast reads and a few slower statements")
    parser.add_argument("--print-workload", action="store_true",
                        help="print the workload (built-in, or --workload) and exit")
    parser.add_argument("--replicas", type=_positive_int, default=1, metavar="N",
                        help="instances of the service sharing the database (default 1): "
                        "warns when replicas x pool size exceeds max_connections")
    parser.add_argument("--option", type=_option, action="append", default=[],
                        metavar="NAME=VALUE",
                        help="a poolguard.wrap option of the engines, e.g. reserved_critical=2 "
                        "(repeatable; default acquire_timeout=2)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON (no progress)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="save throughput and p99 against pool size (needs matplotlib: "
                        "pip install 'poolguard[plot]')")
    parser.add_argument("--seed", type=int, default=1, help="seed of the statement choice")
    parser.add_argument("--hot-path", action="store_true",
                        help="run the acquire/release microbenchmark instead: plain vs guarded")
    parser.add_argument("--rounds", type=_positive_int, default=20,
                        help="--hot-path: alternating rounds (default 20)")
    parser.add_argument("--iterations", type=_positive_int, default=2000,
                        help="--hot-path: cycles per round (default 2000)")
    # --hot-path --contention: poolguard.hotpath.contention_main (helper H1's part).
    parser.add_argument("--contention", action="store_true",
                        help="--hot-path: plain vs guarded with 1-256 threads and asyncio tasks "
                        "sharing a pool of 8")
    parser.add_argument("--quick", action="store_true",
                        help="--hot-path --contention: a short smoke run, not a measurement")


# -- the workload -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Statement:
    """One statement of the workload."""

    weight: float
    priority: str
    tag: str | None
    sql: str


def parse_workload(text: str, source: str = "workload") -> list[Statement]:
    """Parse the workload format (see :data:`EPILOG`); :class:`UsageError` names the line."""
    statements = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source}:{number}"
        head, sep, sql = stripped.partition("|")
        if not sep or not sql.strip():
            raise UsageError(f"{where}: expected 'weight [priority [tag]] | SQL'")
        words = head.split()
        if not words or len(words) > 3:
            raise UsageError(f"{where}: expected 'weight [priority [tag]]' before '|'")
        try:
            weight = float(words[0])
        except ValueError:
            weight = -1.0
        if not math.isfinite(weight) or weight <= 0:
            raise UsageError(f"{where}: weight {words[0]!r} is not a number > 0")
        priority = words[1] if len(words) > 1 else NORMAL
        if priority not in PRIORITIES:
            raise UsageError(
                f"{where}: priority {priority!r} is not one of {', '.join(PRIORITIES)}"
            )
        tag = words[2] if len(words) > 2 and words[2] != "-" else None
        statements.append(Statement(weight, priority, tag, sql.strip()))
    if not statements:
        raise UsageError(f"{source}: no statements (expected 'weight [priority [tag]] | SQL')")
    return statements


def default_workload(dialect_name: str) -> list[Statement]:
    """A mix of fast reads and a few slower statements, for this backend."""
    count = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {}) "
        "SELECT count(*) FROM n"
    )
    return [
        Statement(60, NORMAL, "point-read", "SELECT 1"),
        Statement(25, NORMAL, "small-scan", count.format(200)),
        Statement(10, NORMAL, "scan", count.format(5000)),
        Statement(4, NORMAL, "io-wait", f"SELECT {sleep_sql(dialect_name, 0.005)}"),
        # Rarer than 1 in 100, so that p99 shows queueing rather than this statement.
        Statement(0.5, "background", "report", f"SELECT {sleep_sql(dialect_name, 0.05)}"),
    ]


def format_workload(statements: Sequence[Statement]) -> str:
    """The workload in its file format."""
    lines = ["# weight priority tag | SQL"]
    lines += [f"{s.weight:g} {s.priority} {s.tag or '-'} | {s.sql}" for s in statements]
    return "\n".join(lines) + "\n"


def _check_workload(engine: sa.Engine, statements: Sequence[Statement], source: str) -> None:
    """Run each statement once (rolled back), so a typo fails before the benchmark."""
    for i, s in enumerate(statements, 1):
        error = _try(engine, s.sql)
        if error is not None:
            raise UsageError(f"{source}: statement {i} ({s.sql[:60]!r}) failed: {error}")


def _try(engine: sa.Engine, sql: str) -> str | None:
    """Run ``sql`` once and roll back; the error in one line, or None."""
    try:
        with engine.connect() as conn:
            result = conn.exec_driver_sql(sql)
            if result.returns_rows:
                result.fetchall()
            conn.rollback()
    except Exception as exc:  # noqa: BLE001 - reported in one line
        return describe_error(exc)
    return None


# -- one run ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    """One run: a pool size, a concurrency, what was measured."""

    pool_size: int
    concurrency: int
    duration_s: float
    requests: int
    served: int
    throughput: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    wait_p50_ms: float
    wait_p99_ms: float
    timeouts: int
    rejections: int
    errors: int
    error_types: dict[str, int]
    #: Most connections the server saw from this run (None: SQLite).
    server_connections: int | None
    peak_in_use: int
    #: Mean time a connection was held, ms (checkout to checkin).
    mean_hold_ms: float
    #: Little's law: connections busy on average = checkouts/s x mean hold time.
    busy_connections: float


class _ServerConnections:
    """Counts the run's connections as the database server sees them."""

    def __init__(self, url: sa.URL, dialect_name: str) -> None:
        self.dialect_name = dialect_name
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
        if self.conn is not None:
            self.conn.close()
        if self.engine is not None:
            self.engine.dispose()


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


class _Workers:
    """``concurrency`` closed-loop threads running the workload until ``end_at``."""

    def __init__(
        self, engine: sa.Engine, workload: Sequence[Statement], concurrency: int, seed: int
    ) -> None:
        self.engine = engine
        self.workload = workload
        self.cum_weights = _accumulate([s.weight for s in workload])
        self.seed = seed
        self.latencies: list[list[float]] = [[] for _ in range(concurrency)]
        self.failures: list[dict[str, int]] = [{} for _ in range(concurrency)]
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
            if outcome is None:
                mine.append(perf_counter() - began)
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
        return f"error:{type(exc).__name__}", 0.05  # a failing statement must not spin
    return None, 0.0


def run_one(
    url: sa.URL,
    *,
    pool_size: int,
    concurrency: int,
    duration: float,
    workload: Sequence[Statement],
    options: dict[str, Any],
    monitor: _ServerConnections,
    seed: int = 1,
    tick: Callable[[float, int], None] | None = None,
) -> Result:
    """Drive ``workload`` with ``concurrency`` closed-loop workers through a guarded
    pool of ``pool_size`` connections for ``duration`` seconds."""
    app_name = f"poolguard-bench-{os.getpid()}-{pool_size}x{concurrency}"
    connect_args = {"application_name": app_name} if monitor.dialect_name == "postgresql" else {}
    engine = create_engine(url, poolclass=sa.QueuePool, pool_size=pool_size, max_overflow=0,
                           connect_args=connect_args)
    ids: set[int] = set()
    if monitor.dialect_name in ("mysql", "mariadb"):

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
        start = perf_counter()
        end_at = start + duration
        workers.start(end_at)
        most_server: int | None = None
        peak_in_use = 0
        give_up = end_at + (options.get("acquire_timeout") or 30.0) + 60.0
        while workers.alive() and perf_counter() < give_up:
            now = perf_counter()
            peak_in_use = max(peak_in_use, guard.gate.in_use)
            if now < end_at + _SAMPLE_EVERY:
                seen = monitor.count(app_name, ids)
                if seen is not None:
                    most_server = seen if most_server is None else max(most_server, seen)
            if tick is not None:
                tick(now - start, workers.served())
            time.sleep(_SAMPLE_EVERY)
        workers.stop.set()
        finished = perf_counter()
        stats = guard.stats()
    finally:
        engine.dispose()
    elapsed = min(finished, end_at) - start
    # Checkouts per second over the whole time they ran (in-flight requests end after end_at).
    checkouts = stats.acquisitions / (finished - start)
    hold = stats.use_time.mean
    served, failed = workers.outcomes()
    timeouts = failed.pop("timeout", 0)
    rejected = failed.pop("rejected", 0)
    return Result(
        pool_size=pool_size,
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=len(served) + timeouts + rejected + sum(failed.values()),
        served=len(served),
        throughput=round(len(served) / elapsed, 2),
        p50_ms=_round(_percentile(served, 50)),
        p95_ms=_round(_percentile(served, 95)),
        p99_ms=_round(_percentile(served, 99)),
        wait_p50_ms=round(stats.wait_time.p50 * 1000, 3),
        wait_p99_ms=round(stats.wait_time.p99 * 1000, 3),
        timeouts=timeouts,
        rejections=rejected,
        errors=sum(failed.values()),
        error_types=failed,
        server_connections=most_server,
        peak_in_use=peak_in_use,
        mean_hold_ms=round(hold * 1000, 3),
        busy_connections=round(checkouts * hold, 2),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _accumulate(weights: Sequence[float]) -> list[float]:
    total, out = 0.0, []
    for w in weights:
        total += w
        out.append(total)
    return out


# -- the recommendation -------------------------------------------------------------


def _knee(c: int, rows: list[Result]) -> tuple[Result | None, list[str]]:
    """The knee of one concurrency's throughput curve (rows by pool size), and why."""
    best = max(rows, key=lambda r: r.throughput)
    if best.throughput <= 0:
        return None, [f"{c} workers: no request was served; no knee."]
    knee = next(r for r in rows if r.throughput >= KNEE_SHARE * best.throughput)
    text = (
        f"{c} workers: throughput reaches {KNEE_SHARE:.0%} of its best "
        f"({best.throughput:,.0f} req/s at pool {best.pool_size}) with pool "
        f"{knee.pool_size} ({knee.throughput:,.0f} req/s, p99 {_fmt_ms(knee.p99_ms)})"
    )
    if len(rows) == 1:
        text += "; only one pool size was measured, so this is no knee"
    elif knee.pool_size >= c:
        text += f"; every worker has a connection there: {c} workers never use more than {c}"
    elif knee is rows[0]:
        text += "; it is the smallest size measured: try smaller ones"
    elif knee is rows[-1]:
        text += "; it still grows at the largest size measured: try larger ones"
    else:
        gain = best.throughput / knee.throughput - 1
        text += (f"; beyond it, more connections add {gain:.0%} at most, "
                 f"p99 at pool {rows[-1].pool_size}: {_fmt_ms(rows[-1].p99_ms)}")
    # Little's law where the pool is least the limit: the largest pool measured.
    free = rows[-1]
    return knee, [
        text + ".",
        f"{c} workers, Little's law at pool {free.pool_size} (the least limited): "
        f"L = {free.throughput:,.0f} req/s x {free.mean_hold_ms:.2f} ms mean hold = "
        f"{free.busy_connections:.1f} connections busy on average.",
    ]


def _server_check(
    results: Sequence[Result], recommended: int | None, replicas: int, server: dict[str, int]
) -> tuple[dict[str, int], list[str], list[str]]:
    """``replicas`` x pool size against the server's max_connections: (limit, notes, warnings)."""
    usable = server["max_connections"] - server.get("reserved", 0)
    limit = {**server, "usable": usable}
    reserved = (f" less {server['reserved']} reserved for superusers"
                if server.get("reserved") else "")
    notes: list[str] = []
    warnings: list[str] = []
    if recommended is not None:
        total = replicas * recommended
        if total > usable:
            warnings.append(
                f"replicas x pool size = {replicas} x {recommended} = {total} connections, "
                f"more than the server's max_connections {server['max_connections']}{reserved} "
                f"({usable}): lower the pool size to {max(1, usable // replicas)} or put a "
                "connection pooler (PgBouncer, ProxySQL) in front."
            )
        else:
            notes.append(
                f"{replicas} replica(s) x pool {recommended} = {total} connections, within the "
                f"server's {usable} usable (max_connections {server['max_connections']}); "
                "other clients need room too."
            )
    over = sorted({r.pool_size for r in results if replicas * r.pool_size > usable})
    if over and (recommended is None or replicas * recommended <= usable):
        warnings.append(
            f"pool sizes {', '.join(map(str, over))} x {replicas} replica(s) would exceed the "
            f"server's {usable} usable connections."
        )
    return limit, notes, warnings


def recommend(
    results: Sequence[Result], *, replicas: int = 1, server_limit: dict[str, int] | None = None
) -> dict[str, Any]:
    """The pool size to use, and why: the throughput knee, Little's law, max_connections."""
    reasoning: list[str] = []
    warnings: list[str] = []
    by_c: dict[int, list[Result]] = {}
    for r in results:
        by_c.setdefault(r.concurrency, []).append(r)
    knees: dict[int, Result] = {}
    for c, rows in sorted(by_c.items()):
        rows.sort(key=lambda r: r.pool_size)
        knee, why = _knee(c, rows)
        reasoning += why
        if knee is not None:
            knees[c] = knee
    recommended = max((k.pool_size for k in knees.values()), default=None)
    if recommended is not None:
        peak = max(knees, key=lambda c: (knees[c].pool_size, c))
        row = knees[peak]
        share = row.busy_connections / recommended
        reasoning.append(
            f"Recommended pool size: {recommended} (the largest knee, at {peak} workers); "
            f"there {row.busy_connections:.1f} of {recommended} connections are busy on "
            f"average ({share:.0%}), acquire wait p99 {row.wait_p99_ms:.1f} ms."
        )
        reasoning.append(
            f"For another rate, Little's law with this hold time: each 1,000 req/s keeps "
            f"{row.mean_hold_ms:.2f} connections busy on average (pool >= rate x "
            f"{row.mean_hold_ms / 1000:.5f} s, plus headroom for bursts)."
        )
        if row.timeouts or row.rejections:
            warnings.append(
                f"at pool {recommended} x {peak} workers, {row.timeouts} checkouts timed out "
                f"and {row.rejections} were rejected: the database, not the pool, is the limit "
                "at that concurrency; bound the concurrency (or the waits) instead."
            )
    limit = None
    if server_limit is not None:
        limit, notes, more = _server_check(results, recommended, replicas, server_limit)
        reasoning += notes
        warnings += more
    return {
        "recommended_pool_size": recommended,
        "knee_share": KNEE_SHARE,
        "knees": {str(c): k.pool_size for c, k in knees.items()},
        "littles_law": {
            str(c): {
                "pool_size": rows[-1].pool_size,
                "throughput": rows[-1].throughput,
                "mean_hold_ms": rows[-1].mean_hold_ms,
                "busy_connections": rows[-1].busy_connections,
            }
            for c, rows in sorted(by_c.items())
        },
        "replicas": replicas,
        "server_limit": limit,
        "reasoning": reasoning,
        "warnings": warnings,
    }


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


# -- output ----------------------------------------------------------------------


_HEAD = (
    f"{'pool':>5} {'workers':>7} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
    f"{'wait p50':>9} {'wait p99':>9} {'timeouts':>8} {'rejected':>8} {'errors':>6} "
    f"{'server':>6} {'hold ms':>8} {'busy':>5}"
)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_row(r: Result) -> str:
    """One result as a table row (see the header)."""
    server = "n/a" if r.server_connections is None else str(r.server_connections)
    return (
        f"{r.pool_size:>5} {r.concurrency:>7} {r.throughput:>9,.1f} {_ms(r.p50_ms):>8} "
        f"{_ms(r.p95_ms):>8} {_ms(r.p99_ms):>8} {r.wait_p50_ms:>9.2f} {r.wait_p99_ms:>9.2f} "
        f"{r.timeouts:>8} {r.rejections:>8} {r.errors:>6} {server:>6} {r.mean_hold_ms:>8.2f} "
        f"{r.busy_connections:>5.1f}"
    )


def plot(results: Sequence[Result], recommended: int | None, path: Path, title: str) -> None:
    """Throughput and p99 against pool size, one line per concurrency, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    pools = sorted({r.pool_size for r in results})
    for c in sorted({r.concurrency for r in results}):
        rows = sorted((r for r in results if r.concurrency == c), key=lambda r: r.pool_size)
        xs = [r.pool_size for r in rows]
        left.plot(xs, [r.throughput for r in rows], marker="o", label=f"{c} workers")
        right.plot(xs, [r.p99_ms if r.p99_ms is not None else float("nan") for r in rows],
                   marker="o", label=f"{c} workers")
    for ax, label in ((left, "throughput (requests/s)"), (right, "latency p99 (ms)")):
        ax.set_xlabel("pool size")
        ax.set_ylabel(label)
        if len(pools) > 1 and pools[-1] / pools[0] >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(pools)
        ax.set_xticklabels([str(p) for p in pools])
        ax.grid(True, alpha=0.3)
        if recommended is not None:
            ax.axvline(recommended, color="grey", linestyle="--", linewidth=1)
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    left.legend(loc="lower right")
    if recommended is not None:
        left.set_title(f"recommended pool size: {recommended}", fontsize=10)
    right.set_title("request latency, checkout included", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Progress:
    """A live line on a terminal; nothing otherwise (rows are printed as they finish)."""

    def __init__(self, quiet: bool) -> None:
        self.on = not quiet and sys.stdout.isatty()
        self.label = ""
        self.duration = 0.0

    def tick(self, elapsed: float, served: int) -> None:
        if self.on:
            width = shutil.get_terminal_size().columns - 1
            line = (f"  {self.label}: {min(elapsed, self.duration):5.1f}/{self.duration:g} s, "
                    f"{served:,} requests served")
            sys.stdout.write("\r" + line[:width].ljust(width))
            sys.stdout.flush()

    def clear(self) -> None:
        if self.on:
            sys.stdout.write("\r" + " " * (shutil.get_terminal_size().columns - 1) + "\r")


# -- the command --------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``poolguard bench``: the hot path, or pool sizes x concurrency."""
    if args.hot_path:
        return _hot_path(args)
    _check_plot(args.plot)
    options = guard_options(args.option)
    workload_text = _read_workload(args.workload)
    with tempfile.TemporaryDirectory(prefix="poolguard-bench-") as tmp:
        raw = args.url or f"sqlite:///{os.path.join(tmp, 'bench.db')}"
        url = parse_url(raw)
        dialect_name = url.get_backend_name()
        if workload_text is not None:
            workload = parse_workload(workload_text, str(args.workload))
        else:
            workload = default_workload(dialect_name)
        if args.print_workload:
            sys.stdout.write(format_workload(workload))
            return 0
        server = ping(url)
        report = _bench(args, url, server, workload, options)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(_format_recommendation(report))
    if args.plot is not None:
        title = (f"poolguard bench: {report['database']['server']}, "
                 f"{args.duration:g} s per run")
        plot([Result(**r) for r in report["results"]],
             report["recommendation"]["recommended_pool_size"], args.plot, title)
        if not args.json:
            sys.stdout.write(f"plot saved to {args.plot}\n")
    return 0


def _check_plot(path: Path | None) -> None:
    """Fail before measuring anything if the plot cannot be made."""
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise CliError("--plot needs matplotlib: pip install 'poolguard[plot]' "
                       "(or pip install matplotlib)")
    if not path.resolve().parent.is_dir():
        raise UsageError(f"--plot {path}: folder {path.parent} does not exist")


def _read_workload(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"--workload {path}: {reason}") from None


def _bench(
    args: argparse.Namespace,
    url: sa.URL,
    server: str,
    workload: list[Statement],
    options: dict[str, Any],
) -> dict[str, Any]:
    where = shown(url) if args.url else "SQLite, a file in a temporary folder"
    source = str(args.workload) if args.workload else "built-in workload"
    check = create_engine(url, poolclass=sa.NullPool)
    try:
        _check_workload(check, workload, source)
    finally:
        check.dispose()
    monitor = _ServerConnections(url, url.get_backend_name())
    try:
        limit = monitor.max_connections()
        runs = [(p, c) for c in args.concurrency for p in args.pool_sizes]
        out = sys.stdout
        if not args.json:
            total = len(runs) * args.duration
            out.write(
                f"poolguard bench: {where} ({server}); {len(runs)} runs of {args.duration:g} s "
                f"(about {_about(total)}); workload: {source}, {len(workload)} statements; "
                f"guard options: {' '.join(f'{k}={v}' for k, v in options.items())}\n\n"
                f"{_HEAD}\n{'-' * len(_HEAD)}\n"
            )
            out.flush()
        progress = _Progress(args.json)
        progress.duration = args.duration
        results = []
        for i, (pool_size, concurrency) in enumerate(runs, 1):
            progress.label = f"[{i}/{len(runs)}] pool {pool_size}, {concurrency} workers"
            result = run_one(
                url, pool_size=pool_size, concurrency=concurrency, duration=args.duration,
                workload=workload, options=options, monitor=monitor, seed=args.seed,
                tick=progress.tick,
            )
            results.append(result)
            progress.clear()
            if not args.json:
                out.write(format_row(result) + "\n")
                out.flush()
    finally:
        monitor.close()
    recommendation = recommend(results, replicas=args.replicas, server_limit=limit)
    return {
        "command": "bench",
        "database": {"where": where, "server": server, "backend": url.get_backend_name()},
        "meta": {
            "python": platform.python_version(),
            "sqlalchemy": sa.__version__,
            "poolguard": poolguard.__version__,
            "duration_s": args.duration,
            "pool_sizes": args.pool_sizes,
            "concurrency": args.concurrency,
            "seed": args.seed,
        },
        "guard_options": options,
        "workload": {"source": source,
                     "statements": [dataclasses.asdict(s) for s in workload]},
        "results": [dataclasses.asdict(r) for r in results],
        "recommendation": recommendation,
    }


def _about(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _format_recommendation(report: dict[str, Any]) -> str:
    rec = report["recommendation"]
    lines = ["", "columns: wait = acquire wait (ms); server = most connections the server saw; "
             "hold = mean time a connection was held; busy = req/s x hold (Little's law)", ""]
    size = rec["recommended_pool_size"]
    lines.append(f"Recommendation: pool_size={size}" if size is not None
                 else "Recommendation: none (nothing was served)")
    lines += [f"  - {line}" for line in rec["reasoning"]]
    lines += [f"  WARNING: {w}" for w in rec["warnings"]]
    return "\n".join(lines) + "\n"


def _hot_path(args: argparse.Namespace) -> int:
    from poolguard import hotpath

    if args.contention:
        return hotpath.contention_main(as_json=args.json, quick=args.quick)
    url = None
    if args.url:
        url = args.url
        ping(url)
    results = hotpath.run(rounds=args.rounds, iterations=args.iterations, processes=1, url=url)
    meta = {
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "poolguard": poolguard.__version__,
        "machine": platform.machine(),
        "rounds": args.rounds,
        "iterations": args.iterations,
        "processes": 1,
        "database": shown(url) if url else "SQLite, a file in a temporary folder",
    }
    if args.json:
        payload = {"command": "bench --hot-path", "meta": meta,
                   "results": [dataclasses.asdict(r) for r in results]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return 0
    sys.stdout.write(
        f"poolguard bench --hot-path: python {meta['python']}, sqlalchemy {meta['sqlalchemy']}, "
        f"{args.rounds} rounds x {args.iterations} cycles, one process\n\n"
        f"{hotpath.format_table(results)}\n\n"
        "ratio = guarded / plain time per cycle (median of alternating rounds; 1.00: no "
        "overhead).\nFor a steadier figure: more --rounds, or the repository's "
        "benchmarks/bench_hot_path.py (several fresh processes).\n"
    )
    return 0
