"""A fleet behind PgBouncer: a storm of slow queries under one tag, and the other traffic.

The set-up of issue 14: a real PgBouncer (started here, transaction mode,
``default_pool_size=10``, ``query_wait_timeout=5``) in front of the local
PostgreSQL, and 6 replica processes, each with its own engine and a pool of
10 (60 client connections for 10 server connections). Every replica drives,
open loop, its share of 120 API requests a second (a 1 ms query, evenly
spaced over the fleet); after a pre-storm phase, 18 callers (3 per replica)
run ``pg_sleep(8)`` under the tag ``report`` in a closed loop for 15 s (a
caller whose report fails tries again 0.2 s later).

The same fleet runs once per configuration, one after the other, against the
same PgBouncer and database:

* ``plain``: plain SQLAlchemy (QueuePool, its 30 s ``pool_timeout``);
* ``at2+breaker`` / ``at2``: ``acquire_timeout=2`` with and without
  ``breaker=True`` (the issue's first two rows);
* ``readme+st2``: the README's starting point plus ``statement_timeout=2``;
* ``recommended``: exactly ``poolguard.recommended.options()`` plus two
  facts of the fleet, not of a culprit: ``replicas=6`` and
  ``pooler="transaction"``; the configuration the done-when is about. The
  fleet's server connections (10, PgBouncer's ``default_pool_size``) are read
  by each guard from PgBouncer's admin console, once, with the engine's
  credentials: this PgBouncer has the service's user in ``stats_users`` (the
  read-only console), its admin (``admin_users``) another user, as a
  deployment would;
* ``rec+servers``: the same with ``server_connections=10`` stated (what a
  deployment whose PgBouncer does not let the service's user read its
  console states; nothing is read);
* ``rec+report=1``: for comparison only, the same plus ``tag_limits={"report": 1}``
  on each replica: the culprit named in advance, what isolating it within the
  fleet's share of server connections would give.

On the guarded sides every API request runs under
``poolguard.request(timeout=1.0, tag="api")`` and every report under
``poolguard.request(tag="report", timeout=30.0)``: a report endpoint behind
a typical 30 s gateway timeout. Plain SQLAlchemy has no deadlines. Every
engine sets ``prepare_threshold=None`` (psycopg's prepared statements do not
survive transaction pooling).

For the API requests scheduled in each phase it reports the offered and
served rates, the served share, p50/p99 latency (from the scheduled time, so
a request queued anywhere counts its wait), and failures by kind; for the
reports, how many ran and failed; PgBouncer's own queue (``SHOW POOLS``: most
clients waiting, longest wait) and the guard's acquire wait (its local
gate). The verdict is the done-when's: during the storm, API served >= 90%
of offered and p99 < 3x the pre-storm p99, for ``recommended``.

Run: ``python benchmarks/fleet.py [--quick] [--json] [--only NAME,...]``
(``--url``: the PostgreSQL behind PgBouncer, default
``POOLGUARD_TEST_POSTGRESQL_URL`` or ``postgresql+psycopg://postgres@127.0.0.1:5432/test``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import json
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import poolguard
from poolguard import recommended
from poolguard.cli._bouncer import AdminConsole

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _pgbouncer import PgBouncer  # the test bed's PgBouncer

REPLICAS = 6
POOL_SIZE = 10
API_RATE = 120.0
API_SQL = "SELECT pg_sleep(0.001)"
STORM_CALLERS = 18
REPORT_SECONDS = 8
API_DEADLINE = 1.0
REPORT_DEADLINE = 30.0
#: Seconds a new connection (to PgBouncer) may take: a stalled PgBouncer kept connects
#: (under ``request(timeout=1)``) waiting for minutes without it.
CONNECT_TIMEOUT = 5
PGBOUNCER = {
    "pool_mode": "transaction",
    "default_pool_size": 10,
    "query_wait_timeout": 5,
    "max_client_conn": 200,
}


@dataclasses.dataclass(frozen=True)
class Plan:
    warm: float
    pre: float
    storm: float

    @property
    def storm_at(self) -> float:
        return self.warm + self.pre

    @property
    def end(self) -> float:
        return self.warm + self.pre + self.storm


FULL = Plan(warm=2.0, pre=10.0, storm=15.0)
QUICK = Plan(warm=1.0, pre=4.0, storm=6.0)


def configurations() -> dict[str, dict[str, Any] | None]:
    """Name -> guard options (None: plain SQLAlchemy), in the order they run."""
    # Facts of the fleet, not culprits: how many replicas, and that a pooler
    # pools by transaction (each replica opens its pool before it is wrapped,
    # so the guard gets no new connection to find the pooler on).
    rec = {**recommended.options(), "replicas": REPLICAS, "pooler": "transaction"}
    return {
        "plain": None,
        "at2+breaker": {"acquire_timeout": 2.0, "breaker": True},
        "at2": {"acquire_timeout": 2.0},
        "readme+st2": {**recommended.options(), "statement_timeout": 2.0},
        "recommended": rec,
        # The server connections stated rather than read.
        "rec+servers": {**rec, "server_connections": PGBOUNCER["default_pool_size"]},
        # Not a configuration to ship: the culprit named in advance, one report
        # per replica (6 of PgBouncer's 10 server connections fleet-wide).
        # What the recommended setting would give if it isolated the culprit
        # within the fleet's share of server connections by itself.
        "rec+report=1": {**rec, "tag_limits": {"report": 1}},
    }


# -- one replica (a process) ------------------------------------------------------------


def _outcome(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc).lower()
    if "query_wait_timeout" in text and "PoolerSaturated" not in name:
        name += "(query_wait_timeout)"
    return name


def _call(engine: sa.Engine, guarded: bool, sql: str, tag: str, deadline: float) -> str:
    try:
        if guarded:
            with poolguard.request(tag=tag, timeout=deadline), engine.begin() as conn:
                conn.exec_driver_sql(sql).fetchall()
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql(sql).fetchall()
    except Exception as exc:  # noqa: BLE001 - counted by kind
        return _outcome(exc)
    return "ok"


def _open_pool(engine: sa.Engine) -> None:
    """Open the pool's connections (and PgBouncer's server connections) first."""
    conns = [engine.connect() for _ in range(POOL_SIZE)]
    for conn in conns:
        conn.exec_driver_sql("SELECT 1").fetchall()
        conn.rollback()
    for conn in conns:
        conn.close()


def _prepare(engine: sa.Engine, options: dict[str, Any] | None, index: int) -> bool:
    """Open the pool, wrap the engine if guarded; whether it is."""
    _open_pool(engine)
    if options is None:
        return False
    poolguard.wrap(engine, name=f"fleet-{index}", **options)
    return True


def _meet(start: Any) -> float:
    """Wait for every replica, then for the start the parent set (time.time())."""
    ready, go, start_wall = start
    ready.wait(120)
    go.wait(120)
    return float(start_wall.value)


def replica(
    index: int,
    url: str,
    options: dict[str, Any] | None,
    plan: Plan,
    start: Any,
    results: Any,
) -> None:
    """One replica: its engine, its share of the API traffic and of the storm."""
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: where a replica waits
    engine = sa.create_engine(
        url,
        pool_size=POOL_SIZE,
        max_overflow=0,
        connect_args={
            "prepare_threshold": None,
            "connect_timeout": CONNECT_TIMEOUT,
            "application_name": f"fleet-{index}",
        },
    )
    guarded = _prepare(engine, options, index)
    start_wall = _meet(start)
    samples: list[tuple[str, float, float, str]] = []  # kind, at (s from t0), latency, outcome
    lock = threading.Lock()
    # Local clock of the shared start (perf_counter is per process).
    t0 = time.perf_counter() + (start_wall - time.time())
    interval = REPLICAS / API_RATE
    offset = index * interval / REPLICAS

    def api(at: float) -> None:
        outcome = _call(engine, guarded, API_SQL, "api", API_DEADLINE)
        latency = time.perf_counter() - (t0 + at)
        with lock:
            samples.append(("api", at, latency, outcome))

    def storm_caller() -> None:
        sql = f"SELECT pg_sleep({REPORT_SECONDS})"
        while True:
            began = time.perf_counter()
            if began >= t0 + plan.end:
                return
            outcome = _call(engine, guarded, sql, "report", REPORT_DEADLINE)
            with lock:
                samples.append(("report", began - t0, time.perf_counter() - began, outcome))
            if outcome != "ok":
                time.sleep(0.2)

    callers = [
        threading.Thread(target=storm_caller, daemon=True) for _ in range(STORM_CALLERS // REPLICAS)
    ]
    started: list[threading.Thread] = []
    with ThreadPoolExecutor(max_workers=300) as pool:
        k = 0
        while True:
            at = offset + k * interval
            if at >= plan.end:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if callers and at >= plan.storm_at:
                for caller in callers:
                    caller.start()
                started, callers = callers, []
            pool.submit(api, at)
            k += 1
        for caller in started:
            caller.join()
    stats = poolguard.get_guard(engine).stats() if guarded else None
    engine.dispose()
    results.put(
        {
            "index": index,
            "samples": samples,
            "gate_wait_p99_ms": stats.wait_time.p99 * 1000 if stats else None,
            "gate_wait_max_ms": stats.wait_time_max * 1000 if stats else None,
            "pooler_saturations": stats.pooler_saturations if stats else None,
        }
    )


# -- the fleet, per configuration ---------------------------------------------------------


def _pools(console: AdminConsole, database: str) -> dict[str, int]:
    try:
        rows = console.rows("SHOW POOLS")
    except Exception:  # noqa: BLE001 - a sample lost under load
        return {}
    for row in rows:
        if row["database"] == database:
            return {
                "cl_waiting": int(row["cl_waiting"]),
                "sv_active": int(row["sv_active"]),
                "cl_active": int(row["cl_active"]),
                "maxwait_ms": int(row["maxwait"]) * 1000 + int(row["maxwait_us"]) // 1000,
            }
    return {"cl_waiting": 0, "sv_active": 0, "cl_active": 0, "maxwait_ms": 0}


def _settle(bouncer: AdminConsole, direct: sa.Engine, database: str) -> None:
    """Wait until nothing of the last configuration runs in PgBouncer or PostgreSQL."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pools = _pools(bouncer, database)
        with direct.connect() as conn:
            sleeping = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE 'SELECT pg_sleep(%%'"
            ).scalar_one()
        if pools and not (pools["cl_waiting"] or pools["sv_active"] or sleeping):
            return
        time.sleep(0.5)


def run_fleet(
    bouncer: AdminConsole, url: str, database: str, options: dict[str, Any] | None, plan: Plan
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    # The replicas import and open their pools, meet, then start together.
    start = (ctx.Barrier(REPLICAS + 1), ctx.Event(), ctx.Value("d", 0.0))
    processes = [
        ctx.Process(target=replica, args=(i, url, options, plan, start, results), daemon=True)
        for i in range(REPLICAS)
    ]
    for p in processes:
        p.start()
    start[0].wait(120)
    start_wall = start[2].value = time.time() + 0.5
    start[1].set()
    timeline: list[tuple[float, dict[str, int]]] = []
    got: list[dict[str, Any]] = []
    give_up = start_wall + plan.end + 60
    while len(got) < REPLICAS and time.time() < give_up:
        timeline.append((time.time() - start_wall, _pools(bouncer, database)))
        with contextlib.suppress(queue.Empty):
            got.append(results.get(timeout=0.25))
    for p in processes:
        p.join(10)
        if p.is_alive():
            p.kill()
    if len(got) < REPLICAS:
        raise RuntimeError(f"only {len(got)} of {REPLICAS} replicas reported")
    return _summarise(got, timeline, plan)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _phase(samples: list[tuple[str, float, float, str]], lo: float, hi: float) -> dict[str, Any]:
    api = [s for s in samples if s[0] == "api" and lo <= s[1] < hi]
    ok = [s[2] * 1000 for s in api if s[3] == "ok"]
    failed: dict[str, int] = {}
    for s in api:
        if s[3] != "ok":
            failed[s[3]] = failed.get(s[3], 0) + 1
    span = hi - lo
    return {
        "offered_per_s": round(len(api) / span, 1),
        "served_per_s": round(len(ok) / span, 1),
        "served_share": round(len(ok) / len(api), 3) if api else None,
        "p50_ms": round(_pct(ok, 50) or 0, 1) if ok else None,
        "p99_ms": round(_pct(ok, 99) or 0, 1) if ok else None,
        "failed": failed,
    }


def _summarise(
    got: list[dict[str, Any]], timeline: list[tuple[float, dict[str, int]]], plan: Plan
) -> dict[str, Any]:
    samples = [tuple(s) for r in got for s in r["samples"]]
    pre = _phase(samples, plan.warm, plan.storm_at)  # type: ignore[arg-type]
    storm = _phase(samples, plan.storm_at, plan.end)  # type: ignore[arg-type]
    reports = [s for s in samples if s[0] == "report"]
    report_failed: dict[str, int] = {}
    for s in reports:
        if s[3] != "ok":
            report_failed[str(s[3])] = report_failed.get(str(s[3]), 0) + 1

    def bouncer(lo: float, hi: float) -> dict[str, int]:
        rows = [p for t, p in timeline if lo <= t < hi] or [{}]
        return {
            "most_waiting": max(p.get("cl_waiting", 0) for p in rows),
            "longest_wait_ms": max(p.get("maxwait_ms", 0) for p in rows),
            "most_server_active": max(p.get("sv_active", 0) for p in rows),
        }

    waits = [r["gate_wait_p99_ms"] for r in got if r["gate_wait_p99_ms"] is not None]
    ratio = (
        storm["p99_ms"] / pre["p99_ms"] if storm["p99_ms"] is not None and pre["p99_ms"] else None
    )
    return {
        "pre": pre,
        "storm": storm,
        "storm_p99_over_pre": round(ratio, 2) if ratio is not None else None,
        "reports": {"ran": sum(1 for s in reports if s[3] == "ok"), "failed": report_failed},
        "pgbouncer": {
            "pre": bouncer(plan.warm, plan.storm_at),
            "storm": bouncer(plan.storm_at, plan.end),
        },
        "gate_wait_p99_ms": round(max(waits), 1) if waits else None,
        "pooler_saturations": sum(r["pooler_saturations"] or 0 for r in got),
    }


def meets_goal(result: dict[str, Any]) -> bool:
    storm, ratio = result["storm"], result["storm_p99_over_pre"]
    return (
        storm["served_share"] is not None
        and storm["served_share"] >= 0.9
        and ratio is not None
        and ratio < 3.0
    )


# -- output ---------------------------------------------------------------------------------


def format_table(runs: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'configuration':<13} {'pre/s':>6} {'p99':>7} {'storm/s':>7} {'share':>6} "
        f"{'p99':>8} {'x pre':>6} {'bnc wait':>8} {'gate p99':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, r in runs.items():
        pre, storm = r["pre"], r["storm"]

        def ms(v: float | None) -> str:
            return "-" if v is None else (f"{v / 1000:.1f}s" if v >= 1000 else f"{v:.1f}")

        share = f"{storm['served_share']:.0%}" if storm["served_share"] is not None else "-"
        ratio = f"{r['storm_p99_over_pre']:.1f}" if r["storm_p99_over_pre"] else "-"
        gate = ms(r["gate_wait_p99_ms"])
        lines.append(
            f"{name:<13} {pre['served_per_s']:>6.1f} {ms(pre['p99_ms']):>7} "
            f"{storm['served_per_s']:>7.1f} {share:>6} {ms(storm['p99_ms']):>8} {ratio:>6} "
            f"{ms(r['pgbouncer']['storm']['longest_wait_ms']):>8} {gate:>8}"
        )
    lines.append("")
    lines.append(
        "API served/s (of ~120 offered) and p99 in ms, pre-storm and during the storm; "
        "x pre = storm p99 / pre p99; bnc wait = longest wait in PgBouncer's queue "
        "during the storm (SHOW POOLS maxwait); gate p99 = the guard's acquire wait p99 "
        "(worst replica, whole run)."
    )
    for name, r in runs.items():
        fails = ", ".join(f"{k} {v}" for k, v in sorted(r["storm"]["failed"].items())) or "none"
        rfail = ", ".join(f"{k} {v}" for k, v in sorted(r["reports"]["failed"].items())) or "none"
        lines.append(
            f"{name}: storm API failures: {fails}; reports ran {r['reports']['ran']}, "
            f"failed: {rfail}; PgBouncer most clients waiting "
            f"{r['pgbouncer']['storm']['most_waiting']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "POOLGUARD_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--quick", action="store_true", help="shorter phases (a smoke run)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", help="comma-separated configurations to run")
    args = parser.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)
    plan = QUICK if args.quick else FULL
    configs = configurations()
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    upstream = sa.make_url(args.url)
    database = upstream.database or "test"
    direct = sa.create_engine(upstream, poolclass=sa.NullPool)
    runs: dict[str, dict[str, Any]] = {}
    with PgBouncer(
        upstream_host=upstream.host or "127.0.0.1",
        upstream_port=upstream.port or 5432,
        user=upstream.username or "postgres",
        # The set-up step the recommended row needs: the service's user may
        # read PgBouncer's console (SHOW ...), not administer it.
        admin_user="pgbouncer_admin",
        stats_users=upstream.username or "postgres",
        **PGBOUNCER,
    ) as bouncer:
        url = bouncer.url(database)
        console = AdminConsole(sa.make_url(bouncer.url("pgbouncer")))
        for name, options in configs.items():
            _settle(console, direct, database)
            print(f"running {name} ...", file=sys.stderr, flush=True)
            runs[name] = run_fleet(console, url, database, options, plan)
        console.close()
    direct.dispose()
    verdict = meets_goal(runs["recommended"]) if "recommended" in runs else None
    report = {
        "plan": dataclasses.asdict(plan),
        "replicas": REPLICAS,
        "pool_size": POOL_SIZE,
        "api_rate": API_RATE,
        "pgbouncer": PGBOUNCER,
        "options": dict(configs),
        "results": runs,
        "meets_goal": verdict,
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(
        f"{REPLICAS} replicas x pool {POOL_SIZE} behind PgBouncer "
        f"(default_pool_size {PGBOUNCER['default_pool_size']}, query_wait_timeout "
        f"{PGBOUNCER['query_wait_timeout']} s); {API_RATE:g} API req/s open loop; storm: "
        f"{STORM_CALLERS} x pg_sleep({REPORT_SECONDS}) for {plan.storm:g} s "
        f"(pre-storm {plan.pre:g} s)\n"
    )
    print(format_table(runs))
    if verdict is not None:
        r = runs["recommended"]
        print(
            f"\nDone-when (recommended): API served {r['storm']['served_share']:.0%} of offered "
            f"(goal >= 90%), p99 {r['storm_p99_over_pre']}x pre-storm (goal < 3x): "
            f"{'MET' if verdict else 'NOT MET'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
