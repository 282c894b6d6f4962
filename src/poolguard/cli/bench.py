"""``poolguard bench``: size a pool against a real database, through a guarded engine.

For each pool size and each concurrency, ``--concurrency`` worker threads run
the workload in a closed loop (each sends its next request as soon as the
last one ends) through ``poolguard.wrap(engine)`` for ``--duration``, and the
run measures: throughput, request latency p50/p95/p99 (checkout included),
acquire-wait p50/p99 (``guard.stats().wait_time``), timeouts, rejections,
errors, the mean time a connection is held, and the connections the server
saw (PostgreSQL ``pg_stat_activity`` by ``application_name``, MariaDB/MySQL
``information_schema.PROCESSLIST`` by connection id; SQLite: n/a).

Each pool size x concurrency cell runs ``--repeat`` times, round after round
over all the cells; a cell is the median of its runs, with their spread. It
ends with a recommendation and its reasoning: the knee of the throughput
curve (the smallest pool reaching 90% of the best median throughput at each
concurrency, or whose runs cannot be told from the best's), which sizes
differ by less than the noise between runs, Little's law from the measured
hold times (connections busy = throughput x mean hold time), and warnings
when the runs are noisy, when ``--replicas`` x pool size exceeds the server's
``max_connections``, and always on the default SQLite file (it tells nothing
about a real server).

Progress goes to stderr (a live line on a terminal, plain lines otherwise),
results to stdout, within 80 columns.

``--hot-path`` instead runs the acquire/release microbenchmark
(``poolguard.hotpath``): plain SQLAlchemy against guarded, one process,
alternating rounds, with the ratio guarded/plain per case (``--otel``: with
the guarded engine reporting to an OpenTelemetry SDK).
"""

from __future__ import annotations

import dataclasses
import difflib
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
import textwrap
import threading
import time
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, TextIO

import sqlalchemy as sa

import poolguard
from poolguard.config import Config
from poolguard.policies import NORMAL, PRIORITIES

from ._db import (
    CliError,
    UsageError,
    create_engine,
    describe_error,
    install_hint,
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
    "Cell",
    "Result",
    "Statement",
    "UsageError",
    "add_arguments",
    "cells",
    "default_workload",
    "format_hot_path",
    "format_report",
    "format_workload",
    "parse_duration",
    "parse_sizes",
    "parse_workload",
    "recommend",
    "resolve_defaults",
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

  weight    a number > 0: how often the statement is picked, relative to the
            others
  priority  critical, normal (default), background or health (the
            poolguard.request priority)
  tag       the poolguard.request tag ("-" for none)
  SQL       sent as-is (no bind parameters), in its own transaction (committed)

Blank lines and lines starting with # are ignored. On SQLite, sleep(seconds) is
available to make a statement slow. 'poolguard bench --print-workload' prints
the built-in workload for the database in this format.

examples:
  poolguard bench                 # embedded SQLite: shows how it works
  poolguard bench --url postgresql+psycopg://app@db/app --pool-sizes 5,10,20 \\
      --concurrency 16,64 --duration 10s --repeat 5 --replicas 6 --plot b.png
  poolguard bench --hot-path      # the guard's overhead on this machine
  poolguard bench --hot-path --otel   # ... reporting to OpenTelemetry
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
    known = [k for k in Config.option_names() if k not in _NOT_OPTIONS]
    options = dict(DEFAULT_OPTIONS)
    for key, raw in pairs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"unknown guard option {key!r} in --option{hint}; "
                "see the README's options table"
            )
        try:
            config = Config.from_env({f"POOLGUARD_{key.upper()}": raw})
        except ValueError as exc:
            # "environment variable POOLGUARD_X='v': why" -> "why"
            reason = str(exc).split("': ", 1)[-1]
            raise UsageError(f"--option {key}={raw}: {reason}") from None
        options[key] = getattr(config, key)
    return options


#: Options of the sweep (the default when not given), which --hot-path does not take.
SWEEP_DEFAULTS: dict[str, Any] = {
    "pool_sizes": [5, 10, 20, 40],
    "concurrency": [16, 64],
    "duration": 3.0,
    "repeat": 3,
    "workload": None,
    "print_workload": False,
    "replicas": 1,
    "option": [],
    "plot": None,
    "seed": 1,
}
#: Options only --hot-path takes (the default when not given).
HOT_PATH_DEFAULTS: dict[str, Any] = {"rounds": 20, "iterations": 2000, "otel": False}
#: Config fields that are no ``--option``: set by the benchmark itself, or not text.
_NOT_OPTIONS = ("meter_provider", "breaker_classifier", "name")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def resolve_defaults(args: argparse.Namespace) -> None:
    """Refuse the options the chosen mode ignores; fill in the defaults of the others.

    The options default to ``None`` in the parser, so that a given one is told
    apart from a default: ``--hot-path --duration 20s`` would otherwise run
    the microbenchmark and silently drop the duration.
    """
    if args.hot_path:
        ignored, defaults = SWEEP_DEFAULTS, HOT_PATH_DEFAULTS
        mode = "--hot-path (the acquire/release microbenchmark)"
        allowed = "--url, --rounds, --iterations, --otel, --json, --quiet"
    else:
        ignored, defaults = HOT_PATH_DEFAULTS, SWEEP_DEFAULTS
        mode = "the pool-size sweep (without --hot-path)"
        allowed = "every option but --rounds, --iterations and --otel"
    given = [_flag(dest) for dest in ignored if getattr(args, dest) not in (None, False, [])]
    if given:
        raise UsageError(f"{mode} does not use {', '.join(given)}; it takes {allowed}")
    for dest, default in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``poolguard bench``."""
    sweep = SWEEP_DEFAULTS
    parser.add_argument(
        "--url", help="database URL (e.g. postgresql+psycopg://user@host/db, "
        "mysql+pymysql://user@host/db); default: a SQLite file in a temporary folder, "
        "which tells nothing about a real server",
    )
    parser.add_argument("--pool-sizes", type=parse_sizes, metavar="N,N,...",
                        help="pool sizes to measure (default "
                        f"{','.join(map(str, sweep['pool_sizes']))})")
    parser.add_argument("--concurrency", type=parse_sizes, metavar="N,N,...",
                        help="worker threads, each a closed loop (default "
                        f"{','.join(map(str, sweep['concurrency']))})")
    parser.add_argument("--duration", type=parse_duration, metavar="TIME",
                        help="length of each run: 20s, 500ms, 2m "
                        f"(default {sweep['duration']:g}s)")
    parser.add_argument("--repeat", type=_positive_int, metavar="N",
                        help="runs of each pool size x concurrency, interleaved, for the "
                        f"spread between runs (default {sweep['repeat']})")
    parser.add_argument("--workload", type=Path, metavar="FILE",
                        help="statements to run, with weights (format below); "
                        "default: a built-in mix of fast reads and a few slower statements")
    parser.add_argument("--print-workload", action="store_true", default=None,
                        help="print the workload (built-in, or --workload) and exit")
    parser.add_argument("--replicas", type=_positive_int, metavar="N",
                        help="instances of the service sharing the database (default 1): "
                        "warns when replicas x pool size exceeds max_connections")
    parser.add_argument("--option", type=_option, action="append", metavar="NAME=VALUE",
                        help="a poolguard.wrap option of the engines, e.g. reserved_critical=2 "
                        "(repeatable; default acquire_timeout=2)")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress on stderr")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="save throughput and p99 against pool size (.png, .svg, .pdf; "
                        f"needs matplotlib: {install_hint('plot')})")
    parser.add_argument("--seed", type=int, help="seed of the statement choice (default 1)")
    parser.add_argument("--hot-path", action="store_true",
                        help="run the acquire/release microbenchmark instead: plain vs guarded")
    parser.add_argument("--rounds", type=_positive_int,
                        help="--hot-path: alternating rounds (default 20)")
    parser.add_argument("--iterations", type=_positive_int,
                        help="--hot-path: cycles per round (default 2000)")
    parser.add_argument("--otel", action="store_true", default=None,
                        help="--hot-path: the guarded engine reports to an OpenTelemetry SDK; "
                        "the +export column is the CPU of collecting it")


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
    #: Little's law: connections busy on average = throughput x mean hold time
    #: (exactly the two figures shown: ``throughput * mean_hold_ms / 1000``).
    busy_connections: float


@dataclasses.dataclass(frozen=True)
class Cell:
    """One pool size x concurrency over its ``--repeat`` runs: medians, and the spread.

    Latencies, waits and hold times are the medians of the runs'; failures are
    summed; ``server_connections`` and ``peak_in_use`` are the most of any run.
    """

    pool_size: int
    concurrency: int
    runs: int
    #: Median throughput of the runs, requests/s.
    throughput: float
    throughput_min: float
    throughput_max: float
    #: Half the range of the runs' throughput, in % of the median (0 for one run).
    spread_pct: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    wait_p50_ms: float
    wait_p99_ms: float
    timeouts: int
    rejections: int
    errors: int
    server_connections: int | None
    peak_in_use: int
    mean_hold_ms: float
    #: ``throughput * mean_hold_ms / 1000``: Little's law with the figures shown.
    busy_connections: float


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


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
        tp = round(statistics.median(tps), 2)
        hold = round(statistics.median(r.mean_hold_ms for r in runs), 3)
        servers = [r.server_connections for r in runs if r.server_connections is not None]
        out.append(Cell(
            pool_size=pool, concurrency=c, runs=len(runs), throughput=tp,
            throughput_min=min(tps), throughput_max=max(tps),
            spread_pct=round((max(tps) - min(tps)) / 2 / tp * 100, 1) if tp > 0 else 0.0,
            p50_ms=_round(_median([r.p50_ms for r in runs])),
            p95_ms=_round(_median([r.p95_ms for r in runs])),
            p99_ms=_round(_median([r.p99_ms for r in runs])),
            wait_p50_ms=round(statistics.median(r.wait_p50_ms for r in runs), 3),
            wait_p99_ms=round(statistics.median(r.wait_p99_ms for r in runs), 3),
            timeouts=sum(r.timeouts for r in runs),
            rejections=sum(r.rejections for r in runs),
            errors=sum(r.errors for r in runs),
            server_connections=max(servers) if servers else None,
            peak_in_use=max(r.peak_in_use for r in runs),
            mean_hold_ms=hold,
            busy_connections=_busy(tp, hold),
        ))
    return out


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
    served, failed = workers.outcomes()
    timeouts = failed.pop("timeout", 0)
    rejected = failed.pop("rejected", 0)
    throughput = round(len(served) / elapsed, 2)
    hold_ms = round(stats.use_time.mean * 1000, 3)
    return Result(
        pool_size=pool_size,
        concurrency=concurrency,
        duration_s=round(elapsed, 3),
        requests=len(served) + timeouts + rejected + sum(failed.values()),
        served=len(served),
        throughput=throughput,
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
        mean_hold_ms=hold_ms,
        busy_connections=_busy(throughput, hold_ms),
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


def _indistinct(cell: Cell, best: Cell) -> bool:
    """Whether the runs cannot tell ``cell`` from ``best``: their throughputs overlap."""
    return cell.runs > 1 and best.runs > 1 and cell.throughput_max >= best.throughput_min


def _knee(c: int, rows: list[Cell]) -> tuple[Cell | None, list[str]]:
    """The knee of one concurrency's throughput curve (rows by pool size), and why."""
    best = max(rows, key=lambda r: r.throughput)
    if best.throughput <= 0:
        return None, [f"{c} workers: no request was served; no knee."]
    knee = next(r for r in rows
                if r.throughput >= KNEE_SHARE * best.throughput or _indistinct(r, best))
    runs = f", median of {best.runs} runs, spread {best.spread_pct:.1f}%" if best.runs > 1 else ""
    by_noise = knee is not best and knee.throughput < KNEE_SHARE * best.throughput
    if by_noise:
        within = (f"the noise of it (its best run, {knee.throughput_max:,.0f} req/s, beat the "
                  f"worst run at pool {best.pool_size}, {best.throughput_min:,.0f} req/s)")
    else:
        within = f"{KNEE_SHARE:.0%} of it"
    text = (
        f"{c} workers: throughput is best at pool {best.pool_size} "
        f"({best.throughput:,.0f} req/s{runs}); the smallest pool within {within} is "
        f"{knee.pool_size} ({knee.throughput:,.0f} req/s, p99 {_fmt_ms(knee.p99_ms)})"
    )
    if len(rows) == 1:
        text += "; only one pool size was measured, so this is no knee"
    elif by_noise:
        text += ("; the runs vary too much to rank the sizes above it: a longer --duration "
                 "or more --repeat would")
    elif knee.pool_size >= c:
        text += f"; every worker has a connection there: {c} workers never use more than {c}"
    elif knee is rows[0]:
        text += "; it is the smallest size measured: try smaller ones"
    elif knee is rows[-1]:
        text += "; it still grows at the largest size measured: try larger ones"
    elif knee is best:
        text += (f"; no larger pool did better (p99 at pool {rows[-1].pool_size}: "
                 f"{_fmt_ms(rows[-1].p99_ms)})")
    else:
        gain = best.throughput / knee.throughput - 1
        text += (f"; beyond it, more connections add {gain:.0%} at most, "
                 f"p99 at pool {rows[-1].pool_size}: {_fmt_ms(rows[-1].p99_ms)}")
    # Little's law where the pool is least the limit: the largest pool measured.
    free = rows[-1]
    return knee, [
        text + ".",
        _noise(c, rows, best),
        f"{c} workers, Little's law at pool {free.pool_size} (the least limited): "
        f"L = {free.throughput:,.0f} req/s x {free.mean_hold_ms:.2f} ms mean hold = "
        f"{free.busy_connections:.1f} connections busy on average.",
    ]


def _noise(c: int, rows: list[Cell], best: Cell) -> str:
    """What the spread between runs allows one to conclude at this concurrency."""
    if best.runs == 1:
        return (f"{c} workers: one run per pool size, so no spread was measured: a difference "
                "of a few percent may be noise (--repeat 3 or more).")
    tied = [r.pool_size for r in rows if r is not best and _indistinct(r, best)]
    if tied:
        sizes = ", ".join(map(str, sorted([*tied, best.pool_size])))
        return (f"{c} workers: pools {sizes} differ by less than the noise between runs "
                "(their throughput ranges overlap): these runs cannot tell them apart.")
    widest = max(r.spread_pct for r in rows)
    return (f"{c} workers: every other pool size is outside the noise of the best "
            f"(spread between runs at most {widest:.1f}%).")


def _server_check(
    results: Sequence[Cell], recommended: int | None, replicas: int, server: dict[str, int]
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


#: A spread between runs above this (% of the median) gets a warning.
NOISY_PCT = 10.0
#: Said of every result measured on the default SQLite file.
SQLITE_WARNING = (
    "this ran on SQLite (the default without --url): a file database inside this process, "
    "with no server, no network and one writer at a time. These figures show how the command "
    "works and tell nothing about the pool size for a real database server: run it with "
    "--url against yours (a staging copy), from a machine like the service's."
)


def recommend(
    results: Sequence[Result],
    *,
    replicas: int = 1,
    server_limit: dict[str, int] | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """The pool size to use, and why: the throughput knee within the noise between
    runs, Little's law, max_connections. ``results`` may hold several runs per cell."""
    reasoning: list[str] = []
    warnings: list[str] = []
    by_c: dict[int, list[Cell]] = {}
    for cell in cells(results):
        by_c.setdefault(cell.concurrency, []).append(cell)
    knees: dict[int, Cell] = {}
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
        all_cells = [cell for rows in by_c.values() for cell in rows]
        limit, notes, more = _server_check(all_cells, recommended, replicas, server_limit)
        reasoning += notes
        warnings += more
    noisiest = max((cell for rows in by_c.values() for cell in rows),
                   key=lambda cell: cell.spread_pct, default=None)
    if noisiest is not None and noisiest.spread_pct > NOISY_PCT:
        warnings.append(
            f"the same pool size and concurrency varied by up to +/-{noisiest.spread_pct:.0f}% "
            f"between runs (pool {noisiest.pool_size}, {noisiest.concurrency} workers): the "
            "machine is noisy (other load?), and differences smaller than that mean nothing. "
            "Take a longer --duration or more --repeat on a quieter machine before trusting "
            "the recommendation."
        )
    if backend == "sqlite":
        warnings.append(SQLITE_WARNING)
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

#: Text output stays within this many columns (an 80-column terminal).
WIDTH = 79
#: Without a terminal, a progress line at most this often (and one per run).
PLAIN_EVERY = 5.0

_HEAD = (
    f"{'pool':>4} {'wrk':>4} {'req/s':>9} {'spread':>6} {'p50 ms':>7} {'p99 ms':>7} "
    f"{'wait p99':>8} {'fail':>5} {'server':>6} {'hold ms':>7} {'busy':>5}"
)
LEGEND = (
    "wrk = worker threads; req/s = median of the runs; spread = half the range of req/s "
    "over the --repeat runs, in % of the median; wait = acquire wait; fail = timeouts + "
    "rejected + errors (by kind in --json); server = most connections the server saw; "
    "hold = mean time a connection was held; busy = req/s x hold (Little's law: "
    "connections busy on average)."
)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 1000 else f"{value:.0f}"


def format_row(r: Cell) -> str:
    """One cell as a table row (see the header)."""
    server = "n/a" if r.server_connections is None else str(r.server_connections)
    spread = f"{r.spread_pct:.1f}%" if r.runs > 1 else "-"
    return (
        f"{r.pool_size:>4} {r.concurrency:>4} {r.throughput:>9,.1f} {spread:>6} "
        f"{_ms(r.p50_ms):>7} {_ms(r.p99_ms):>7} {_ms(r.wait_p99_ms):>8} "
        f"{r.timeouts + r.rejections + r.errors:>5} {server:>6} {_ms(r.mean_hold_ms):>7} "
        f"{r.busy_connections:>5.1f}"
    )


def plot(results: Sequence[Cell], recommended: int | None, path: Path, title: str) -> None:
    """Throughput (with the runs' range) and p99 against pool size, one line per
    concurrency, saved as an image (the format from the file name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    pools = sorted({r.pool_size for r in results})
    for c in sorted({r.concurrency for r in results}):
        rows = sorted((r for r in results if r.concurrency == c), key=lambda r: r.pool_size)
        xs = [r.pool_size for r in rows]
        spread = [[r.throughput - r.throughput_min for r in rows],
                  [r.throughput_max - r.throughput for r in rows]]
        left.errorbar(xs, [r.throughput for r in rows], yerr=spread, marker="o", capsize=3,
                      label=f"{c} workers")
        right.plot(xs, [r.p99_ms if r.p99_ms is not None else float("nan") for r in rows],
                   marker="o", label=f"{c} workers")
    for ax, label in ((left, "throughput (requests/s; bars: range of runs)"),
                      (right, "latency p99 (ms)")):
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


def _columns(stream: TextIO) -> int:
    """Columns of the terminal ``stream`` writes to (less one: no wrap at the edge)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns - 1
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns - 1


class _Progress:
    """Progress on stderr, results stay on stdout: a live line on a terminal;
    otherwise a plain line every :data:`PLAIN_EVERY` s. Either way, one line per run."""

    def __init__(self, quiet: bool, stream: TextIO | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.on = not quiet
        self.tty = self.on and self.stream.isatty()
        self.label = ""
        self.duration = 0.0
        self._last_plain = perf_counter()
        self._live = False

    def tick(self, elapsed: float, served: int) -> None:
        if not self.on:
            return
        line = (f"{self.label}: {min(elapsed, self.duration):.1f}/{self.duration:g} s, "
                f"{served:,} served")
        if self.tty:
            width = _columns(self.stream)
            self.stream.write("\r" + line[:width].ljust(width))
            self._live = True
        elif perf_counter() - self._last_plain >= PLAIN_EVERY:
            self._last_plain = perf_counter()
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self, r: Result) -> None:
        if not self.on:
            return
        if self._live:
            self.stream.write("\r" + " " * _columns(self.stream) + "\r")
            self._live = False
        failed = r.timeouts + r.rejections + r.errors
        self.stream.write(f"{self.label}: {r.throughput:,.1f} req/s, p99 {_fmt_ms(r.p99_ms)}"
                          f"{f', {failed} failed' if failed else ''}\n")
        self._last_plain = perf_counter()
        self.stream.flush()


def _wrap(text: str, first: str = "", rest: str = "") -> str:
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False, break_long_words=False)


# -- the command --------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``poolguard bench``: the hot path, or pool sizes x concurrency."""
    resolve_defaults(args)
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
        sys.stdout.write(format_report(report))
    if args.plot is not None:
        title = (f"poolguard bench: {report['database']['server']}, "
                 f"{args.repeat} x {args.duration:g} s per pool size")
        plot([Cell(**r) for r in report["results"]],
             report["recommendation"]["recommended_pool_size"], args.plot, title)
        if not args.json:
            sys.stdout.write(f"plot saved to {args.plot}\n")
    return 0


def _check_plot(path: Path | None) -> None:
    """Fail before measuring anything if the plot cannot be made."""
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise CliError(f"--plot needs matplotlib: {install_hint('plot')} "
                       "(or pip install matplotlib)")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        what = f"'.{suffix}' is no image format matplotlib writes" if suffix else (
            "the file name has no extension to tell the image format")
        raise UsageError(f"--plot {path}: {what}; use one of "
                         f"{', '.join('.' + f for f in formats)} (e.g. bench.png)")
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
    backend = url.get_backend_name()
    where = shown(url) if args.url else "SQLite, a file in a temporary folder"
    source = str(args.workload) if args.workload else "built-in workload"
    check = create_engine(url, poolclass=sa.NullPool)
    try:
        _check_workload(check, workload, source)
    finally:
        check.dispose()
    monitor = _ServerConnections(url, backend)
    try:
        limit = monitor.max_connections()
        # Round after round over every cell: a drift of the machine's speed
        # spreads over all of them instead of favouring the first ones.
        runs = [(rep, p, c) for rep in range(args.repeat)
                for c in args.concurrency for p in args.pool_sizes]
        if not args.json:
            total = len(runs) * args.duration
            cells_n = len(args.concurrency) * len(args.pool_sizes)
            sys.stdout.write(_wrap(
                f"poolguard bench: {where} ({server}); {cells_n} pool size x concurrency "
                f"cells, {args.repeat} run(s) of {args.duration:g} s each (about "
                f"{_about(total)}); workload: {source}, {len(workload)} statements; guard "
                f"options: {' '.join(f'{k}={v}' for k, v in options.items())}"
            ) + "\n")
            sys.stdout.flush()
        progress = _Progress(args.quiet)
        progress.duration = args.duration
        results = []
        for i, (rep, pool_size, concurrency) in enumerate(runs, 1):
            progress.label = f"[{i}/{len(runs)}] pool {pool_size}, {concurrency} workers"
            if args.repeat > 1:
                progress.label += f", run {rep + 1}/{args.repeat}"
            result = run_one(
                url, pool_size=pool_size, concurrency=concurrency, duration=args.duration,
                workload=workload, options=options, monitor=monitor, seed=args.seed + rep,
                tick=progress.tick,
            )
            results.append(result)
            progress.done(result)
    finally:
        monitor.close()
    recommendation = recommend(results, replicas=args.replicas, server_limit=limit,
                               backend=backend)
    return {
        "command": "bench",
        "database": {"where": where, "server": server, "backend": backend},
        "meta": {
            "python": platform.python_version(),
            "sqlalchemy": sa.__version__,
            "poolguard": poolguard.__version__,
            "duration_s": args.duration,
            "repeat": args.repeat,
            "pool_sizes": args.pool_sizes,
            "concurrency": args.concurrency,
            "seed": args.seed,
        },
        "guard_options": options,
        "workload": {"source": source,
                     "statements": [dataclasses.asdict(s) for s in workload]},
        "results": [dataclasses.asdict(c) for c in cells(results)],
        "runs": [dataclasses.asdict(r) for r in results],
        "recommendation": recommendation,
    }


def _about(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def format_report(report: dict[str, Any]) -> str:
    """The table of cells, its legend and the recommendation, within :data:`WIDTH`."""
    rows = [format_row(Cell(**r)) for r in report["results"]]
    lines = ["", _HEAD, "-" * len(_HEAD), *rows, "", _wrap(LEGEND), ""]
    rec = report["recommendation"]
    size = rec["recommended_pool_size"]
    lines.append(f"Recommendation: pool_size={size}" if size is not None
                 else "Recommendation: none (nothing was served)")
    lines += [_wrap(line, "  - ", "    ") for line in rec["reasoning"]]
    lines += [_wrap(w, "  WARNING: ", "    ") for w in rec["warnings"]]
    return "\n".join(lines) + "\n"


def _hot_path(args: argparse.Namespace) -> int:
    from poolguard import hotpath

    url = None
    if args.url:
        url = args.url
        ping(url)
    results = hotpath.run(rounds=args.rounds, iterations=args.iterations, processes=1, url=url,
                          otel=args.otel)
    meta = {
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "poolguard": poolguard.__version__,
        "machine": platform.machine(),
        "rounds": args.rounds,
        "iterations": args.iterations,
        "processes": 1,
        "otel": args.otel,
        "database": shown(url) if url else "SQLite, a file in a temporary folder",
    }
    if args.json:
        payload = {"command": "bench --hot-path", "meta": meta,
                   "results": [dataclasses.asdict(r) for r in results]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return 0
    export = (" +export = CPU of one OpenTelemetry collection, per guarded cycle (us)."
              if args.otel else " Add --otel to measure the guard reporting to an "
              "OpenTelemetry SDK (+export: the CPU of collecting it).")
    sys.stdout.write(
        _wrap(f"poolguard bench --hot-path: python {meta['python']}, sqlalchemy "
              f"{meta['sqlalchemy']}, {args.rounds} rounds x {args.iterations} cycles, one "
              f"process{', OpenTelemetry SDK' if args.otel else ''}") + "\n\n"
        f"{format_hot_path(results, otel=args.otel)}\n\n"
        + _wrap("ratio = guarded / plain time per cycle (median of alternating rounds; 1.00: "
                "no overhead); cpu = the same for CPU time." + export + " For a steadier "
                "figure: more --rounds, or the repository's benchmarks/bench_hot_path.py "
                "(several fresh processes).") + "\n"
    )
    return 0


def format_hot_path(results: Sequence[Any], *, otel: bool) -> str:
    """The microbenchmark as a table within :data:`WIDTH` (+export only with ``otel``)."""
    head = (f"{'case':<22} {'plain us':>8} {'guarded us':>10} {'ratio':>6} "
            f"{'p25-p75':>11} {'cpu':>6}")
    if otel:
        head += f" {'+export':>8}"
    rows = []
    for r in results:
        cpu = r.guarded_cpu_us / r.plain_cpu_us if r.plain_cpu_us > 0 else float("nan")
        row = (f"{r.case:<22} {r.plain_us:>8.2f} {r.guarded_us:>10.2f} {r.ratio:>6.3f} "
               f"{f'{r.ratio_p25:.2f}-{r.ratio_p75:.2f}':>11} {cpu:>6.3f}")
        if otel:
            row += f" {r.export_cpu_us:>8.2f}"
        rows.append(row)
    return "\n".join([head, "-" * len(head), *rows])
