"""The postmortem, replayed on PostgreSQL: plain SQLAlchemy against a guarded pool.

A service with a 10-connection pool serves a steady mix of traffic:

* ``login``: fast ``critical`` requests (``SELECT 1``), tag ``login``;
* ``api``: ``normal`` requests running a 10 ms query, tag ``api``;
* ``batch``: ``background`` jobs running a 50 ms query, tag ``batch``.

After a quiet phase, a storm of an unoptimized report query (``pg_sleep``,
tag ``report``, priority ``normal``) arrives from a few dozen threads that
retry as soon as they can (after ``Retry-After`` when they are shed). The same
traffic runs twice in one process: against plain SQLAlchemy (a
``QueuePool`` with its defaults: waiters queue for up to 30 s), then against
the same pool behind ``poolguard.wrap(engine, **GUARDED_OPTIONS)``.

Per side and per phase (pre-storm, storm) it measures for each kind of work:
requests served, failed (timeouts, errors) and shed (by reason), p50/p99
latency of the served ones, throughput, logins served in each second of the
storm, and the most report queries that ran at once. A request counts in the
phase in which it started; both sides run the same schedule.

Run: ``python benchmarks/postmortem.py [--url URL] [--pre 8] [--storm 12] [--json]``
(default URL from ``POOLGUARD_TEST_POSTGRESQL_URL``, else
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). The test suite runs a
shorter version of the same scenario (``tests/test_postmortem_shedding.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import threading
from time import perf_counter
from typing import Any

import sqlalchemy as sa

import poolguard
from poolguard.policies import BACKGROUND, CRITICAL, NORMAL

__all__ = [
    "DEFAULT_URL",
    "GUARDED_OPTIONS",
    "KINDS",
    "POOL_SIZE",
    "PhaseStats",
    "Sample",
    "SideResult",
    "Traffic",
    "format_report",
    "run",
    "run_side",
]

DEFAULT_URL = (
    os.environ.get("POOLGUARD_TEST_POSTGRESQL_URL")
    or "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
POOL_SIZE = 10

#: The guard as the README recommends it for this service:
#: - ``reserved_critical=2``: 2 of the 10 connections only critical work (logins) may take;
#: - ``tag_limits={"report": 0.5}``: one query class never holds more than half of the pool,
#:   and its callers beyond that (running or queued) are shed at once (``tag_limit``);
#: - ``max_waiting_background=0``: background jobs never queue; they run when a connection
#:   is free and are shed otherwise (``queue_full``), to retry later;
#: - ``codel=True``: a standing queue (every wait over 5 ms for 100 ms) cuts non-critical
#:   waits to 10 ms (``queue_delay``) and serves the newest waiter first;
#: - ``acquire_timeout=1.0``: nothing waits 30 s to fail (the critical reserve and
#:   priority order keep logins' waits far below it).
GUARDED_OPTIONS: dict[str, Any] = {
    "reserved_critical": 2,
    "tag_limits": {"report": 0.5},
    "max_waiting_background": 0,
    "codel": True,
    "acquire_timeout": 1.0,
}

#: kind of work -> (priority, tag)
KINDS: dict[str, tuple[str, str]] = {
    "login": (CRITICAL, "login"),
    "api": (NORMAL, "api"),
    "batch": (BACKGROUND, "batch"),
    "report": (NORMAL, "report"),
}
PHASES = ("pre", "storm")
#: Longest pause after a shed or failed request (its Retry-After, capped).
MAX_BACKOFF = 1.0


@dataclasses.dataclass(frozen=True)
class Traffic:
    """The schedule and the mix (seconds; ``*_period`` is per thread)."""

    pre: float = 8.0
    storm: float = 12.0
    login_threads: int = 4
    login_period: float = 0.02
    api_threads: int = 3
    api_period: float = 0.04
    api_query: float = 0.01
    batch_threads: int = 2
    batch_period: float = 0.1
    batch_query: float = 0.05
    report_threads: int = 24
    report_query: float = 2.0
    #: Longest wait for the threads to finish after the storm (never reached
    #: unless something hangs; plain SQLAlchemy's waiters drain within seconds).
    drain_timeout: float = 90.0


@dataclasses.dataclass(frozen=True)
class Sample:
    """One request: when it started and ended (seconds from the run's start)."""

    kind: str
    start: float
    end: float
    #: ``ok``, ``timeout``, ``shed:<reason>`` or ``error:<type>``
    outcome: str

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class PhaseStats:
    """One kind of work in one phase."""

    priority: str
    requests: int
    served: int
    failed: int
    shed: int
    shed_reasons: dict[str, int]
    errors: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    per_second: float
    #: How long a shed request took to be turned away (p99), milliseconds.
    shed_p99_ms: float | None = None


@dataclasses.dataclass
class SideResult:
    """What one side (plain or guarded) did."""

    side: str
    traffic: Traffic
    phases: dict[str, dict[str, PhaseStats]]
    #: Logins served in each second of the storm (by completion time).
    storm_logins_per_second: list[int]
    #: Most report queries running at once, per phase.
    peak_reports: dict[str, int]
    #: After the run: permits and connections still out (must be 0).
    leftover: dict[str, Any]
    #: guard.rejections as "reason/priority" -> count (guarded side).
    rejections: dict[str, int]
    duration: float

    def stat(self, phase: str, kind: str) -> PhaseStats:
        return self.phases[phase][kind]


class _Active:
    """Report queries running now, and the most at once per phase."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = dict.fromkeys(PHASES, 0)
        self.storm_at = math.inf

    def enter(self) -> None:
        phase = "storm" if perf_counter() >= self.storm_at else "pre"
        with self.lock:
            self.now += 1
            if self.now > self.peak[phase]:
                self.peak[phase] = self.now

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _one(engine: sa.Engine, kind: str, stmt: sa.TextClause, active: _Active) -> tuple[str, float]:
    """Run one request; return its outcome and how long to back off after it."""
    priority, tag = KINDS[kind]
    try:
        with poolguard.request(priority=priority, tag=tag), engine.connect() as conn:
            if kind == "report":
                active.enter()
                try:
                    conn.execute(stmt)
                finally:
                    active.leave()
            else:
                conn.execute(stmt)
    except poolguard.LoadShed as shed:
        return f"shed:{shed.reason}", min(MAX_BACKOFF, shed.retry_after)
    except sa.exc.TimeoutError:  # QueuePool's own timeout, or poolguard.PoolTimeout
        return "timeout", 0.1
    except Exception as exc:  # noqa: BLE001 - counted and shown, never hidden
        return f"error:{type(exc).__name__}", 0.1
    return "ok", 0.0


def _statements(traffic: Traffic) -> dict[str, sa.TextClause]:
    return {
        "login": sa.text("SELECT 1"),
        "api": sa.text(f"SELECT pg_sleep({traffic.api_query:.3f})"),
        "batch": sa.text(f"SELECT pg_sleep({traffic.batch_query:.3f})"),
        "report": sa.text(f"SELECT pg_sleep({traffic.report_query:.3f})"),
    }


def _periods(traffic: Traffic) -> dict[str, tuple[int, float]]:
    return {
        "login": (traffic.login_threads, traffic.login_period),
        "api": (traffic.api_threads, traffic.api_period),
        "batch": (traffic.batch_threads, traffic.batch_period),
        "report": (traffic.report_threads, 0.0),  # retries as fast as it may
    }


def _summarize(
    samples: list[Sample], traffic: Traffic
) -> tuple[dict[str, dict[str, PhaseStats]], list[int]]:
    bounds = {"pre": (0.0, traffic.pre), "storm": (traffic.pre, traffic.pre + traffic.storm)}
    phases: dict[str, dict[str, PhaseStats]] = {}
    for phase, (lo, hi) in bounds.items():
        phases[phase] = {}
        for kind, (priority, _) in KINDS.items():
            mine = [s for s in samples if s.kind == kind and lo <= s.start < hi]
            served = [s.latency * 1000 for s in mine if s.outcome == "ok"]
            shed_ms = [s.latency * 1000 for s in mine if s.outcome.startswith("shed:")]
            shed: dict[str, int] = {}
            errors: dict[str, int] = {}
            for s in mine:
                if s.outcome.startswith("shed:"):
                    reason = s.outcome[5:]
                    shed[reason] = shed.get(reason, 0) + 1
                elif s.outcome != "ok":
                    errors[s.outcome] = errors.get(s.outcome, 0) + 1
            phases[phase][kind] = PhaseStats(
                priority=priority,
                requests=len(mine),
                served=len(served),
                failed=sum(errors.values()),
                shed=sum(shed.values()),
                shed_reasons=shed,
                errors=errors,
                p50_ms=_percentile(served, 50),
                p99_ms=_percentile(served, 99),
                max_ms=max(served) if served else None,
                per_second=len(served) / (hi - lo),
                shed_p99_ms=_percentile(shed_ms, 99),
            )
    per_second = [0] * max(1, int(traffic.storm))
    for s in samples:
        if s.kind == "login" and s.outcome == "ok":
            second = math.floor(s.end - traffic.pre)
            if 0 <= second < len(per_second):
                per_second[second] += 1
    return phases, per_second


def _warm_up(engine: sa.Engine) -> None:
    # The pool's connections are open before the clock starts (critical: the
    # guarded side keeps its reserve for it).
    with poolguard.request(priority=CRITICAL):
        conns = [engine.connect() for _ in range(POOL_SIZE)]
    for conn in conns:
        conn.execute(sa.text("SELECT 1"))
        conn.close()


def _leftover(engine: sa.Engine, guarded: bool) -> tuple[dict[str, Any], dict[str, int]]:
    leftover: dict[str, Any] = {"pool_checkedout": engine.pool.checkedout()}  # type: ignore[attr-defined]
    rejections: dict[str, int] = {}
    if guarded:
        guard = poolguard.get_guard(engine)
        gate = guard.gate
        leftover.update(permits=gate.in_use, waiting=gate.waiting, tag_in_use=dict(gate.tag_in_use))
        rejections = {f"{r}/{p}": n for (r, p), n in sorted(guard.rejections.items())}
    return leftover, rejections


def run_side(url: str, *, guarded: bool, traffic: Traffic) -> SideResult:
    """Run the whole schedule once against a fresh engine (plain or guarded)."""
    engine = sa.create_engine(url, pool_size=POOL_SIZE, max_overflow=0)
    if guarded:
        poolguard.wrap(engine, name="postmortem", **GUARDED_OPTIONS)
    statements = _statements(traffic)
    samples: list[Sample] = []
    samples_lock = threading.Lock()
    active = _Active()
    stop = threading.Event()
    try:
        _warm_up(engine)
        t0 = perf_counter()
        storm_at = active.storm_at = t0 + traffic.pre
        end_at = storm_at + traffic.storm

        def worker(kind: str, period: float, start_at: float) -> None:
            stmt = statements[kind]
            if stop.wait(max(0.0, start_at - perf_counter())):
                return
            next_at = perf_counter()
            while not stop.is_set():
                began = perf_counter()
                if began >= end_at:
                    return
                outcome, backoff = _one(engine, kind, stmt, active)
                ended = perf_counter()
                with samples_lock:
                    samples.append(Sample(kind, began - t0, ended - t0, outcome))
                # Paced: the next request on schedule (never a backlog burst),
                # or after the backoff a shed or failed request asked for.
                next_at = max(next_at + period, ended + backoff)
                if stop.wait(max(0.0, next_at - perf_counter())):
                    return

        threads = []
        for kind, (count, period) in _periods(traffic).items():
            start_at = storm_at if kind == "report" else t0
            for i in range(count):
                thread = threading.Thread(
                    target=worker, args=(kind, period, start_at),
                    name=f"postmortem-{kind}-{i}", daemon=True,
                )
                threads.append(thread)
                thread.start()
        # Workers stop issuing requests at end_at by themselves; in-flight ones finish.
        give_up = end_at + traffic.drain_timeout
        for thread in threads:
            thread.join(max(0.0, give_up - perf_counter()))
        stop.set()
        hung = [t.name for t in threads if t.is_alive()]
        if hung:
            raise RuntimeError(f"{len(hung)} threads still running after the drain: {hung[:5]}")
        duration = perf_counter() - t0
        leftover, rejections = _leftover(engine, guarded)
        phases, per_second = _summarize(samples, traffic)
        return SideResult(
            side="guarded" if guarded else "plain",
            traffic=traffic,
            phases=phases,
            storm_logins_per_second=per_second,
            peak_reports=dict(active.peak),
            leftover=leftover,
            rejections=rejections,
            duration=duration,
        )
    finally:
        stop.set()
        engine.dispose()


def run(url: str = DEFAULT_URL, traffic: Traffic | None = None) -> dict[str, SideResult]:
    """Both sides, one after the other, with the same traffic."""
    traffic = traffic or Traffic()
    return {
        "plain": run_side(url, guarded=False, traffic=traffic),
        "guarded": run_side(url, guarded=True, traffic=traffic),
    }


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(results: dict[str, SideResult]) -> str:
    """Both sides as aligned text tables, and the login summary."""
    lines: list[str] = []
    head = (
        f"{'side':<8} {'phase':<6} {'kind':<7} {'prio':<10} {'req':>6} {'served':>7} "
        f"{'/s':>7} {'failed':>7} {'shed':>6} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} "
        f"{'shed p99':>9}  reasons"
    )
    lines += [head, "-" * len(head)]
    for side, result in results.items():
        for phase in PHASES:
            for kind in KINDS:
                st = result.stat(phase, kind)
                reasons = ", ".join(f"{k}={v}" for k, v in {**st.shed_reasons,
                                                            **st.errors}.items())
                lines.append(
                    f"{side:<8} {phase:<6} {kind:<7} {st.priority:<10} {st.requests:>6} "
                    f"{st.served:>7} {st.per_second:>7.1f} {st.failed:>7} {st.shed:>6} "
                    f"{_ms(st.p50_ms):>9} {_ms(st.p99_ms):>9} {_ms(st.max_ms):>9} "
                    f"{_ms(st.shed_p99_ms, 3):>9}  {reasons}"
                )
    lines.append("")
    for side, result in results.items():
        pre, storm = result.stat("pre", "login"), result.stat("storm", "login")
        kept = storm.per_second / pre.per_second if pre.per_second else float("nan")
        p99 = (
            storm.p99_ms / pre.p99_ms
            if storm.p99_ms is not None and pre.p99_ms
            else float("nan")
        )
        lines.append(
            f"{side}: logins {pre.per_second:.1f}/s before, {storm.per_second:.1f}/s during "
            f"the storm ({kept:.0%} kept); login p99 {_ms(pre.p99_ms)} -> {_ms(storm.p99_ms)} ms "
            f"({p99:.1f}x); logins per storm second {result.storm_logins_per_second}; "
            f"most reports at once {result.peak_reports['storm']}; "
            f"left over {result.leftover}"
        )
        if result.rejections:
            lines.append(f"{side}: rejections {result.rejections}")
    return "\n".join(lines)


def _as_json(results: dict[str, SideResult]) -> str:
    return json.dumps(
        {
            "pool_size": POOL_SIZE,
            "guarded_options": GUARDED_OPTIONS,
            **{side: dataclasses.asdict(r) for side, r in results.items()},
        },
        indent=2,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--pre", type=float, default=Traffic.pre, help="seconds before the storm")
    parser.add_argument("--storm", type=float, default=Traffic.storm, help="seconds of storm")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    traffic = Traffic(pre=args.pre, storm=args.storm)
    results = run(args.url, traffic)
    print(_as_json(results) if args.json else format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
