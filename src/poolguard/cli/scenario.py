"""The postmortem as a scenario: a small service whose pool one unoptimized query drains.

A service with a 10-connection pool serves a steady mix of traffic:

* ``login``: fast ``critical`` requests (``SELECT 1``), tag ``login``;
* ``api``: ``normal`` requests running a 10 ms statement, tag ``api``;
* ``batch``: ``background`` jobs running a 50 ms statement, tag ``batch``.

After a quiet phase (``pre``), a storm of an unoptimized query arrives
(``storm``): :func:`scan_auth_tokens` scans a token table row by row, slowly,
from a few dozen threads that retry as soon as they can (after
``Retry-After`` when they are shed). Then the fix is deployed: the scan stops,
and the service runs on (``after``, optional) while it recovers.

:func:`run_side` runs the whole schedule once against a fresh engine, plain
SQLAlchemy (a ``QueuePool`` with its defaults: waiters queue for up to 30 s)
or guarded by ``poolguard.wrap(engine, **options)``. Per phase it measures for
each kind of work and each priority: requests, served, failed (timeouts,
errors) and shed (by reason), p50/p99 latency of the served ones, throughput;
and the logins served in each second of the storm and the most scans that ran
at once. A request counts in the phase in which it started.

The statements run on SQLite (the command line registers a ``sleep()``
function), PostgreSQL and MariaDB/MySQL. ``poolguard demo`` runs both sides
at once and shows them side by side; ``benchmarks/postmortem.py`` runs them
one after the other on PostgreSQL.

The request functions below (:func:`sign_in`, :func:`list_orders`,
:func:`export_batch`, :func:`scan_auth_tokens`) play the application: they
check a connection out and run their statement, so poolguard's events name
them as call sites.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from time import perf_counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import poolguard
from poolguard import recommended
from poolguard.policies import BACKGROUND, CRITICAL, NORMAL

from ._db import create_engine, sleep_sql
from ._output import ms, percentile

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "GUARDED_OPTIONS",
    "KINDS",
    "PHASES",
    "POOL_SIZE",
    "PhaseStats",
    "Sample",
    "SideResult",
    "Traffic",
    "as_json",
    "format_report",
    "guarded_options",
    "named_in_advance",
    "run",
    "run_side",
    "next_start",
    "scan_auth_tokens",
    "start_offsets",
    "statements",
]

POOL_SIZE = 10



def named_in_advance(traffic: Traffic) -> dict[str, Any]:
    """Options that name the storm's query before it ever ran: a bulkhead on its tag.

    Only a guard told about the culprit beforehand could have it: one query
    class may hold at most half of the pool, and its callers beyond that
    (running or queued) are shed at once (``tag_limit``). It is kept apart
    from the recommended setting, which names no tag.
    """
    return {"tag_limits": {traffic.report_tag: 0.5}}


def guarded_options(traffic: Traffic | None = None) -> dict[str, Any]:
    """The guarded side's options: the recommended setting
    (:func:`poolguard.recommended.options`) and :func:`named_in_advance`."""
    return {**recommended.options(), **named_in_advance(traffic or Traffic())}


#: kind of work -> (priority, tag); the storm's tag is ``Traffic.report_tag``.
KINDS: dict[str, tuple[str, str]] = {
    "login": (CRITICAL, "login"),
    "api": (NORMAL, "api"),
    "batch": (BACKGROUND, "batch"),
    "report": (NORMAL, "report"),
}
PRIORITY_ORDER = (CRITICAL, NORMAL, BACKGROUND)
PHASES = ("pre", "storm", "after")
#: Longest pause after a shed or failed request (its Retry-After, capped).
MAX_BACKOFF = 1.0
#: Rows the unoptimized query scans; it sleeps ``report_query / SCAN_ROWS`` per row,
#: so a statement time limit cuts it at once on every backend (SQLite included).
SCAN_ROWS = 100


@dataclasses.dataclass(frozen=True)
class Traffic:
    """The schedule and the mix (seconds; ``*_period`` is per thread)."""

    pre: float = 8.0
    storm: float = 12.0
    #: After the fix: the scan stops, the rest of the traffic goes on (0: no such phase).
    after: float = 0.0
    login_threads: int = 4
    login_period: float = 0.02
    api_threads: int = 3
    api_period: float = 0.04
    api_query: float = 0.01
    batch_threads: int = 2
    batch_period: float = 0.1
    batch_query: float = 0.05
    report_threads: int = 24
    #: How long one run of the unoptimized query takes when nothing cuts it.
    report_query: float = 2.0
    #: The tag of the unoptimized query's requests.
    report_tag: str = "report"
    pool_size: int = POOL_SIZE
    #: Longest wait for the threads to finish after the schedule (never reached
    #: unless something hangs; plain SQLAlchemy's waiters drain within seconds).
    drain_timeout: float = 90.0

    def tag(self, kind: str) -> str:
        """The ``poolguard.request`` tag of ``kind``'s requests."""
        return self.report_tag if kind == "report" else KINDS[kind][1]

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Phase -> (start, end), seconds from the run's start."""
        storm_end = self.pre + self.storm
        bounds = {"pre": (0.0, self.pre), "storm": (self.pre, storm_end)}
        if self.after > 0:
            bounds["after"] = (storm_end, storm_end + self.after)
        return bounds

    @property
    def end(self) -> float:
        """When the last request may start, seconds from the run's start."""
        return self.pre + self.storm + self.after


#: The guarded side's options for the default :class:`Traffic` (see :func:`guarded_options`).
GUARDED_OPTIONS: dict[str, Any] = guarded_options()


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
    """One kind of work (or one priority) in one phase."""

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
    #: phase -> kind -> stats
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
    #: phase -> priority -> stats (the kinds of one priority together).
    priorities: dict[str, dict[str, PhaseStats]] = dataclasses.field(default_factory=dict)
    #: ``perf_counter()`` when the schedule started (to place log events in it).
    started_at: float = 0.0

    def stat(self, phase: str, kind: str) -> PhaseStats:
        return self.phases[phase][kind]


class _Active:
    """Report queries running now, and the most at once per phase."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = dict.fromkeys(PHASES, 0)
        self.storm_at = math.inf
        self.storm_end = math.inf

    def enter(self) -> None:
        now = perf_counter()
        phase = "pre" if now < self.storm_at else "storm" if now < self.storm_end else "after"
        with self.lock:
            self.now += 1
            if self.now > self.peak[phase]:
                self.peak[phase] = self.now

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


# -- the application: one function per kind of request -------------------------


def sign_in(engine: sa.Engine, stmt: sa.TextClause, active: _Active) -> None:
    """A login: one fast statement."""
    with engine.connect() as conn:
        conn.execute(stmt).all()


def list_orders(engine: sa.Engine, stmt: sa.TextClause, active: _Active) -> None:
    """An API call: one 10 ms statement."""
    with engine.connect() as conn:
        conn.execute(stmt).all()


def export_batch(engine: sa.Engine, stmt: sa.TextClause, active: _Active) -> None:
    """A background job: one 50 ms statement."""
    with engine.connect() as conn:
        conn.execute(stmt).all()


def scan_auth_tokens(engine: sa.Engine, stmt: sa.TextClause, active: _Active) -> None:
    """The unoptimized query: checks a token by scanning every row, slowly."""
    with engine.connect() as conn:
        active.enter()
        try:
            conn.execute(stmt).all()
        finally:
            active.leave()


HANDLERS: dict[str, Callable[[sa.Engine, sa.TextClause, _Active], None]] = {
    "login": sign_in,
    "api": list_orders,
    "batch": export_batch,
    "report": scan_auth_tokens,
}


def statements(dialect_name: str, traffic: Traffic) -> dict[str, sa.TextClause]:
    """The statement of each kind of request, for this backend."""
    per_row = traffic.report_query / SCAN_ROWS
    scan = (
        f"WITH RECURSIVE auth_tokens(id) AS (SELECT 1 UNION ALL SELECT id + 1 "  # noqa: S608 - numbers only
        f"FROM auth_tokens WHERE id < {SCAN_ROWS}) "
        f"SELECT count(*) FROM auth_tokens WHERE {sleep_sql(dialect_name, per_row)}"
    )
    return {
        "login": sa.text("SELECT 1"),
        "api": sa.text(f"SELECT {sleep_sql(dialect_name, traffic.api_query)}"),
        "batch": sa.text(f"SELECT {sleep_sql(dialect_name, traffic.batch_query)}"),
        "report": sa.text(scan),
    }


def _one(
    engine: sa.Engine, kind: str, stmt: sa.TextClause, active: _Active, traffic: Traffic
) -> tuple[str, float]:
    """Run one request; return its outcome and how long to back off after it."""
    priority = KINDS[kind][0]
    try:
        with poolguard.request(priority=priority, tag=traffic.tag(kind)):
            HANDLERS[kind](engine, stmt, active)
    except poolguard.Rejected as shed:  # LoadShed, CircuitOpen
        return f"shed:{shed.reason}", min(MAX_BACKOFF, shed.retry_after)
    except sa.exc.TimeoutError:  # QueuePool's own timeout, or poolguard.PoolTimeout
        return "timeout", 0.1
    except Exception as exc:  # noqa: BLE001 - counted and shown, never hidden
        return f"error:{type(exc).__name__}", 0.1
    return "ok", 0.0


def _periods(traffic: Traffic) -> dict[str, tuple[int, float]]:
    return {
        "login": (traffic.login_threads, traffic.login_period),
        "api": (traffic.api_threads, traffic.api_period),
        "batch": (traffic.batch_threads, traffic.batch_period),
        "report": (traffic.report_threads, 0.0),  # retries as fast as it may
    }


def start_offsets(traffic: Traffic) -> dict[str, list[float]]:
    """Kind -> when each of its threads sends its first request, seconds after its start.

    The threads of the steady traffic are spread over their period, each kind
    shifted by a different fraction of it: started together, they would send
    their requests in lockstep (the periods share a multiple every 0.2 s),
    a burst of every thread at once that a healthy service never sees, and
    the guarded side would shed background work that merely arrived in it.
    """
    periods = _periods(traffic)
    offsets = {kind: [0.0] * count for kind, (count, period) in periods.items() if not period}
    steady = [(kind, count, period) for kind, (count, period) in periods.items() if period]
    for n, (kind, count, period) in enumerate(steady):
        shift = n / len(steady)  # the kinds apart from each other within a slot
        offsets[kind] = [period * ((i + shift) / count) % period for i in range(count)]
    return offsets


def next_start(scheduled: float, period: float, now: float) -> float:
    """The next start on a thread's grid (``scheduled + k * period``) not before ``now``.

    A thread running late skips the slots it missed instead of catching up:
    after a stall (a loaded machine, a garbage collection) every thread would
    otherwise send at once, a burst of the client's making.
    """
    if period <= 0 or scheduled >= now:
        return max(scheduled, now)
    missed = math.ceil((now - scheduled) / period)
    return scheduled + missed * period


#: A thread woken later than this share of its period skips that request (see next_start).
LATE_SHARE = 0.5


def _stats(mine: list[Sample], priority: str, seconds: float) -> PhaseStats:
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
    return PhaseStats(
        priority=priority,
        requests=len(mine),
        served=len(served),
        failed=sum(errors.values()),
        shed=sum(shed.values()),
        shed_reasons=shed,
        errors=errors,
        p50_ms=percentile(served, 50),
        p99_ms=percentile(served, 99),
        max_ms=max(served) if served else None,
        per_second=len(served) / seconds if seconds > 0 else 0.0,
        shed_p99_ms=percentile(shed_ms, 99),
    )


def summarize(
    samples: list[Sample], traffic: Traffic
) -> tuple[dict[str, dict[str, PhaseStats]], dict[str, dict[str, PhaseStats]], list[int]]:
    """Per phase: stats by kind and by priority; logins served per storm second."""
    phases: dict[str, dict[str, PhaseStats]] = {}
    priorities: dict[str, dict[str, PhaseStats]] = {}
    for phase, (lo, hi) in traffic.bounds().items():
        inside = [s for s in samples if lo <= s.start < hi]
        phases[phase] = {
            kind: _stats([s for s in inside if s.kind == kind], priority, hi - lo)
            for kind, (priority, _) in KINDS.items()
        }
        priorities[phase] = {
            priority: _stats(
                [s for s in inside if KINDS[s.kind][0] == priority], priority, hi - lo
            )
            for priority in PRIORITY_ORDER
        }
    per_second = [0] * max(1, int(traffic.storm))
    for s in samples:
        if s.kind == "login" and s.outcome == "ok":
            second = math.floor(s.end - traffic.pre)
            if 0 <= second < len(per_second):
                per_second[second] += 1
    return phases, priorities, per_second


def _warm_up(engine: sa.Engine, pool_size: int) -> None:
    # The pool's connections are open before the clock starts (critical: the
    # guarded side keeps its reserve for it).
    with poolguard.request(priority=CRITICAL):
        conns = [engine.connect() for _ in range(pool_size)]
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


def run_side(  # noqa: PLR0915 - one schedule, kept in one place
    url: str,
    *,
    guarded: bool,
    traffic: Traffic,
    options: Mapping[str, Any] | None = None,
    name: str = "postmortem",
    start_at: float | None = None,
    observer: Callable[[Sample], None] | None = None,
) -> SideResult:
    """Run the whole schedule once against a fresh engine (plain or guarded).

    Args:
        options: ``poolguard.wrap`` options of the guarded side
            (default: :func:`guarded_options` of ``traffic``).
        name: the guarded pool's name.
        start_at: ``perf_counter()`` time at which the schedule starts (after
            the warm-up), so that two sides run in step; default: at once.
        observer: called with every request as it ends (live progress); it
            runs on the request's thread and must be quick.
    """
    engine = create_engine(
        url, poolclass=sa.QueuePool, pool_size=traffic.pool_size, max_overflow=0
    )
    if guarded:
        wrap_options = dict(guarded_options(traffic) if options is None else options)
        wrap_options.setdefault("name", name)
        poolguard.wrap(engine, **wrap_options)
    stmts = statements(engine.dialect.name, traffic)
    samples: list[Sample] = []
    samples_lock = threading.Lock()
    active = _Active()
    stop = threading.Event()
    try:
        _warm_up(engine, traffic.pool_size)
        if start_at is not None:
            stop.wait(max(0.0, start_at - perf_counter()))
        t0 = perf_counter()
        storm_at = active.storm_at = t0 + traffic.pre
        storm_end = active.storm_end = storm_at + traffic.storm
        end_at = t0 + traffic.end

        def worker(kind: str, period: float, start: float, stop_at: float) -> None:
            stmt = stmts[kind]
            next_at = start
            while not stop.wait(max(0.0, next_at - perf_counter())):
                began = perf_counter()
                if began >= stop_at:
                    return
                if period and began - next_at > LATE_SHARE * period:
                    # Woken late (a stall): keep to this thread's own slots.
                    next_at = next_start(next_at, period, began)
                    continue
                outcome, backoff = _one(engine, kind, stmt, active, traffic)
                ended = perf_counter()
                sample = Sample(kind, began - t0, ended - t0, outcome)
                with samples_lock:
                    samples.append(sample)
                if observer is not None:
                    observer(sample)
                # Paced: the next free slot of this thread (never a backlog
                # burst), or after the backoff a shed or failed request asked for.
                next_at = next_start(next_at + period, period, ended + backoff)

        threads = []
        offsets = start_offsets(traffic)
        for kind, (count, period) in _periods(traffic).items():
            # The storm starts with the storm phase and stops with the fix.
            start, stop_at = (storm_at, storm_end) if kind == "report" else (t0, end_at)
            for i in range(count):
                thread = threading.Thread(
                    target=worker, args=(kind, period, start + offsets[kind][i], stop_at),
                    name=f"postmortem-{kind}-{i}", daemon=True,
                )
                threads.append(thread)
                thread.start()
        # Workers stop issuing requests by themselves; in-flight ones finish.
        give_up = end_at + traffic.drain_timeout
        for thread in threads:
            thread.join(max(0.0, give_up - perf_counter()))
        stop.set()
        hung = [t.name for t in threads if t.is_alive()]
        if hung:
            raise RuntimeError(f"{len(hung)} threads still running after the drain: {hung[:5]}")
        duration = perf_counter() - t0
        leftover, rejections = _leftover(engine, guarded)
        phases, priorities, per_second = summarize(samples, traffic)
        return SideResult(
            side="guarded" if guarded else "plain",
            traffic=traffic,
            phases=phases,
            storm_logins_per_second=per_second,
            peak_reports=dict(active.peak),
            leftover=leftover,
            rejections=rejections,
            duration=duration,
            priorities=priorities,
            started_at=t0,
        )
    finally:
        stop.set()
        engine.dispose()


def run(
    url: str, traffic: Traffic | None = None, *, options: Mapping[str, Any] | None = None
) -> dict[str, SideResult]:
    """Both sides, one after the other, with the same traffic."""
    traffic = traffic or Traffic()
    return {
        "plain": run_side(url, guarded=False, traffic=traffic),
        "guarded": run_side(url, guarded=True, traffic=traffic, options=options),
    }


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
        for phase in result.phases:
            for kind in KINDS:
                st = result.stat(phase, kind)
                reasons = ", ".join(f"{k}={v}" for k, v in {**st.shed_reasons,
                                                            **st.errors}.items())
                lines.append(
                    f"{side:<8} {phase:<6} {kind:<7} {st.priority:<10} {st.requests:>6} "
                    f"{st.served:>7} {st.per_second:>7.1f} {st.failed:>7} {st.shed:>6} "
                    f"{ms(st.p50_ms):>9} {ms(st.p99_ms):>9} {ms(st.max_ms):>9} "
                    f"{ms(st.shed_p99_ms, 3):>9}  {reasons}"
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
            f"the storm ({kept:.0%} kept); login p99 {ms(pre.p99_ms)} -> {ms(storm.p99_ms)} ms "
            f"({p99:.1f}x); logins per storm second {result.storm_logins_per_second}; "
            f"most reports at once {result.peak_reports['storm']}; "
            f"left over {result.leftover}"
        )
        if result.rejections:
            lines.append(f"{side}: rejections {result.rejections}")
    return "\n".join(lines)


def as_json(results: dict[str, SideResult], options: Mapping[str, Any] | None = None) -> str:
    """Both sides as JSON (the options of the guarded side included)."""
    traffic = next(iter(results.values())).traffic if results else Traffic()
    return json.dumps(
        {
            "pool_size": traffic.pool_size,
            "guarded_options": dict(guarded_options(traffic) if options is None else options),
            **{side: dataclasses.asdict(r) for side, r in results.items()},
        },
        indent=2,
    )
