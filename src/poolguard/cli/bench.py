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

This module is the command: its options, the sweep's order and its report.
The pieces live apart: the workload in :mod:`._workload`, a measured run in
:mod:`._runner`, the recommendation in :mod:`._recommend`, the image in
:mod:`._plot`, option values in :mod:`._args`, and how text is written in
:mod:`._output`.

``--hot-path`` instead runs the acquire/release microbenchmark
(``poolguard.cli._hotpath``): plain SQLAlchemy against guarded, one process,
alternating rounds, with the ratio guarded/plain per case (``--otel``: with
the guarded engine reporting to an OpenTelemetry SDK).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import poolguard

from ._args import (
    connect_arg,
    guard_options,
    option_pair,
    parse_duration,
    parse_sizes,
    positive_int,
)
from ._bouncer import AdminConsole, PgBouncerInfo, admin_url_for, detect_pgbouncer
from ._db import UsageError, create_engine, install_hint, parse_url, ping, shown
from ._output import StatusLine, ms_cell, ms_text, wrap
from ._plot import check_plot, plot
from ._recommend import KNEE_SHARE, recommend
from ._runner import Cell, Result, ServerConnections, cells, run_one
from ._workload import (
    Statement,
    check_workload,
    default_workload,
    format_workload,
    parse_workload,
    read_workload,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

# The pieces, under the names the tests and users of this module know.
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
    "format_row",
    "format_workload",
    "guard_options",
    "parse_duration",
    "parse_sizes",
    "parse_workload",
    "recommend",
    "resolve_defaults",
    "run",
    "run_one",
]

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
    "connect_arg": [],
    "pgbouncer_admin_url": None,
    "plot": None,
    "seed": 1,
}
#: Options only --hot-path takes (the default when not given).
HOT_PATH_DEFAULTS: dict[str, Any] = {"rounds": 20, "iterations": 2000, "otel": False,
                                     "contention": False, "quick": False}
#: What ``--hot-path --contention`` does not use (it sizes its own runs; on
#: SQLite unless ``--url`` is given).
CONTENTION_IGNORES = ("rounds", "iterations", "otel")


#: The most ``--replicas``: each is a process on this machine.
MAX_REPLICAS = 32


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
        allowed = ("--url, --rounds, --iterations, --otel, --contention, --quick, --json, "
                   "--quiet")
    else:
        ignored, defaults = HOT_PATH_DEFAULTS, SWEEP_DEFAULTS
        mode = "the pool-size sweep (without --hot-path)"
        allowed = "every option but --rounds, --iterations, --otel, --contention and --quick"
    given = [_flag(dest) for dest in ignored if getattr(args, dest) not in (None, False, [])]
    if given:
        raise UsageError(f"{mode} does not use {', '.join(given)}; it takes {allowed}")
    if args.hot_path and args.contention:
        given = [_flag(d) for d in CONTENTION_IGNORES if getattr(args, d) not in (None, False)]
        if given:
            raise UsageError(f"--hot-path --contention does not use {', '.join(given)}; "
                             "it takes --url, --quick, --json, --quiet")
    elif args.hot_path and args.quick:
        raise UsageError("--quick goes with --hot-path --contention")
    for dest, default in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
    if not args.hot_path and args.replicas > MAX_REPLICAS:
        raise UsageError(f"--replicas {args.replicas}: at most {MAX_REPLICAS}; each replica is a "
                         "process of its own on this machine, with its own pool and workers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``poolguard bench``."""
    sweep = SWEEP_DEFAULTS
    parser.add_argument(
        "--url", help="database URL (e.g. postgresql+psycopg://user@host/db, "
        "mysql+pymysql://user@host/db); default: a SQLite file in a temporary folder, "
        "which tells nothing about a real server",
    )
    for dest, what in (("pool_sizes", "pool sizes to measure"),
                       ("concurrency", "worker threads, each a closed loop")):
        parser.add_argument(_flag(dest), type=parse_sizes, metavar="N,N,...",
                            help=f"{what} (default {','.join(map(str, sweep[dest]))})")
    parser.add_argument("--duration", type=parse_duration, metavar="TIME",
                        help="length of each run: 20s, 500ms, 2m "
                        f"(default {sweep['duration']:g}s)")
    parser.add_argument("--repeat", type=positive_int, metavar="N",
                        help="runs of each pool size x concurrency, interleaved, for the "
                        f"spread between runs (default {sweep['repeat']})")
    parser.add_argument("--workload", type=Path, metavar="FILE",
                        help="statements to run, with weights (format below); "
                        "default: a built-in mix of fast reads and a few slower statements")
    parser.add_argument("--print-workload", action="store_true", default=None,
                        help="print the workload (built-in, or --workload) and exit")
    parser.add_argument("--replicas", type=positive_int, metavar="N",
                        help="instances of the service sharing the database (default 1): runs "
                        "N processes at once, each with its own engine, pool and workers, and "
                        "checks replicas x pool size against max_connections, or PgBouncer's "
                        "max_client_conn")
    parser.add_argument("--connect-arg", type=connect_arg, action="append",
                        metavar="NAME=VALUE",
                        help="a driver option (SQLAlchemy connect_args), e.g. "
                        "prepare_threshold=None for psycopg behind PgBouncer (repeatable; "
                        "None, true/false and numbers are read as such, '5' stays text)")
    parser.add_argument("--pgbouncer-admin-url", metavar="URL",
                        help="PgBouncer's admin console, e.g. postgresql://stats@host:6432/"
                        "pgbouncer (default: tried on the --url's host and port)")
    parser.add_argument("--option", type=option_pair, action="append", metavar="NAME=VALUE",
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
    parser.add_argument("--rounds", type=positive_int,
                        help="--hot-path: alternating rounds (default 20)")
    parser.add_argument("--iterations", type=positive_int,
                        help="--hot-path: cycles per round (default 2000)")
    parser.add_argument("--otel", action="store_true", default=None,
                        help="--hot-path: the guarded engine reports to an OpenTelemetry SDK; "
                        "the +export column is the CPU of collecting it")
    parser.add_argument("--contention", action="store_true",
                        help="--hot-path: plain vs guarded with 1-256 threads and asyncio tasks "
                        "sharing a pool of 8")
    parser.add_argument("--quick", action="store_true",
                        help="--hot-path --contention: a short smoke run, not a measurement")


# -- output ----------------------------------------------------------------------

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


def format_row(r: Cell) -> str:
    """One cell as a table row (see the header)."""
    server = "n/a" if r.server_connections is None else str(r.server_connections)
    spread = f"{r.spread_pct:.1f}%" if r.runs > 1 else "-"
    return (
        f"{r.pool_size:>4} {r.concurrency:>4} {r.throughput:>9,.1f} {spread:>6} "
        f"{ms_cell(r.p50_ms):>7} {ms_cell(r.p99_ms):>7} {ms_cell(r.wait_p99_ms):>8} "
        f"{r.timeouts + r.rejections + r.errors:>5} {server:>6} {ms_cell(r.mean_hold_ms):>7} "
        f"{r.busy_connections:>5.1f}"
    )


# -- the command --------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """``poolguard bench``: the hot path, or pool sizes x concurrency."""
    resolve_defaults(args)
    if args.hot_path:
        return _hot_path(args)
    check_plot(args.plot)
    options = guard_options(args.option)
    workload_text = read_workload(args.workload)
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
        connect_args = dict(args.connect_arg)
        server = ping(url, connect_args)
        admin = parse_url(args.pgbouncer_admin_url) if args.pgbouncer_admin_url else None
        pooler = detect_pgbouncer(url, admin, connect_args)
        report = _bench(args, url, server, workload, options, connect_args, pooler)
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
    return 0 if report["recommendation"]["valid"] else INVALID_STATUS


#: The exit status of a sweep whose requests failed: it ran, and recommends nothing.
INVALID_STATUS = 3


def _bench(
    args: argparse.Namespace,
    url: sa.URL,
    server: str,
    workload: list[Statement],
    options: dict[str, Any],
    connect_args: dict[str, Any],
    pooler: PgBouncerInfo | None,
) -> dict[str, Any]:
    backend = url.get_backend_name()
    where = shown(url) if args.url else "SQLite, a file in a temporary folder"
    source = str(args.workload) if args.workload else "built-in workload"
    check = create_engine(url, poolclass=sa.NullPool, connect_args=connect_args)
    try:
        check_workload(check, workload, source)
    finally:
        check.dispose()
    console = None
    if pooler is not None and pooler.admin_url is not None:
        console = AdminConsole(parse_url(args.pgbouncer_admin_url) if args.pgbouncer_admin_url
                               else admin_url_for(url))
    monitor = ServerConnections(url, backend, console)
    try:
        limit = monitor.max_connections()
        # Round after round over every cell: a drift of the machine's speed
        # spreads over all of them instead of favouring the first ones.
        runs = [(rep, p, c) for rep in range(args.repeat)
                for c in args.concurrency for p in args.pool_sizes]
        if not args.json:
            total = len(runs) * args.duration
            cells_n = len(args.concurrency) * len(args.pool_sizes)
            fleet = (f"{args.replicas} replica processes, each with its own pool and workers; "
                     if args.replicas > 1 else "")
            behind = f"behind {_pooler_text(pooler)}; " if pooler is not None else ""
            sys.stdout.write(wrap(
                f"poolguard bench: {where} ({server}); {behind}{fleet}{cells_n} pool size x "
                "concurrency "
                f"cells, {args.repeat} run(s) of {args.duration:g} s each (about "
                f"{_about(total)}); workload: {source}, {len(workload)} statements; guard "
                f"options: {' '.join(f'{k}={v}' for k, v in options.items())}"
            ) + "\n")
            sys.stdout.flush()
        # Progress on stderr, piped or not; one line per run stays.
        status = StatusLine(on=not args.quiet, last=perf_counter())
        results = []
        for i, (rep, pool_size, concurrency) in enumerate(runs, 1):
            label = f"[{i}/{len(runs)}] pool {pool_size}, {concurrency} workers"
            if args.repeat > 1:
                label += f", run {rep + 1}/{args.repeat}"

            def tick(elapsed: float, served: int, label: str = label) -> None:
                status.show(f"{label}: {min(elapsed, args.duration):.1f}/{args.duration:g} s, "
                            f"{served:,} served", perf_counter())

            result = run_one(
                url, pool_size=pool_size, concurrency=concurrency, duration=args.duration,
                workload=workload, options=options, monitor=monitor, seed=args.seed + rep,
                tick=tick, replicas=args.replicas, connect_args=connect_args,
            )
            results.append(result)
            failed = result.timeouts + result.rejections + result.errors
            status.say(f"{label}: {result.throughput:,.1f} req/s, p99 {ms_text(result.p99_ms)}"
                       f"{f', {failed} failed' if failed else ''}", perf_counter())
    finally:
        monitor.close()
    recommendation = recommend(results, replicas=args.replicas, server_limit=limit,
                               backend=backend, pooler=pooler)
    if not recommendation["valid"]:
        recommendation["reasoning"] = _invalid_reasoning(recommendation["invalid_because"],
                                                         pooler, url, connect_args)
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
        "connect_args": dict(connect_args),
        "pgbouncer": dataclasses.asdict(pooler) if pooler is not None else None,
        "workload": {"source": source,
                     "statements": [dataclasses.asdict(s) for s in workload]},
        "results": [dataclasses.asdict(c) for c in cells(results)],
        "runs": [dataclasses.asdict(r) for r in results],
        "recommendation": recommendation,
    }


def _pooler_text(pooler: PgBouncerInfo) -> str:
    if pooler.settings_known:
        return (f"{pooler.version} ({pooler.pool_mode} mode, {pooler.pool_size} server "
                f"connections, max_client_conn {pooler.max_client_conn})")
    return "a pooler or proxy whose settings could not be read"


def _invalid_reasoning(
    failed: list[str], pooler: PgBouncerInfo | None, url: sa.URL, connect_args: dict[str, Any]
) -> list[str]:
    """Why nothing is recommended, and what to change before running again."""
    lines = [
        "Requests failed, so these runs measured failures as much as pool sizes (a failed "
        "request frees its worker early, a timeout hides the wait it cut): no recommendation.",
        *failed,
    ]
    text = " ".join(failed)
    if ("prepared statement" in text or "InvalidSqlStatementName" in text
            or "DuplicatePreparedStatement" in text) or (
            pooler is not None and url.get_driver_name() == "psycopg"
            and "prepare_threshold" not in connect_args):
        lines.append("Behind a pooler in transaction mode, psycopg's prepared statements fail "
                     "on another server connection: add --connect-arg prepare_threshold=None.")
    if pooler is not None and ("timed out" in text or "PoolerSaturated" in text):
        lines.append("Behind PgBouncer, timeouts and PoolerSaturated errors mean its queue is "
                     "full: fewer workers or --replicas, or a larger pool_size in PgBouncer.")
    lines.append("Measure again with concurrencies and pool sizes that do not fail (or a "
                 "longer --option acquire_timeout) before sizing from them.")
    return lines


def _about(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def format_report(report: dict[str, Any]) -> str:
    """The table of cells, its legend and the recommendation, within :data:`WIDTH`."""
    rows = [format_row(Cell(**r)) for r in report["results"]]
    lines = ["", _HEAD, "-" * len(_HEAD), *rows, "", wrap(LEGEND), ""]
    rec = report["recommendation"]
    size = rec["recommended_pool_size"]
    if not rec.get("valid", True):
        lines.append("INVALID RUN: requests failed; no recommendation")
    else:
        lines.append(f"Recommendation: pool_size={size}" if size is not None
                     else "Recommendation: none (nothing was served)")
    lines += [wrap(line, "  - ", "    ") for line in rec["reasoning"]]
    lines += [wrap(w, "  WARNING: ", "    ") for w in rec["warnings"]]
    return "\n".join(lines) + "\n"


def _hot_path(args: argparse.Namespace) -> int:
    from . import _hotpath as hotpath

    url = None
    if args.url:
        url = args.url
        ping(url)
    if args.contention:
        return hotpath.contention_main(as_json=args.json, quick=args.quick, url=url)
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
        wrap(f"poolguard bench --hot-path: python {meta['python']}, sqlalchemy "
              f"{meta['sqlalchemy']}, {args.rounds} rounds x {args.iterations} cycles, one "
              f"process{', OpenTelemetry SDK' if args.otel else ''}") + "\n\n"
        f"{format_hot_path(results, otel=args.otel)}\n\n"
        + wrap("ratio = guarded / plain time per cycle (median of alternating rounds; 1.00: "
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

