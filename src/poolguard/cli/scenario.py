"""The postmortem as a scenario: a small web service whose pool one query drains.

A service with a 10-connection pool and a fixed set of worker threads (a web
server's workers, 24 by default) behind a bounded accept queue serves traffic
that arrives at a fixed rate, whatever happens to it (an open loop):

* ``login``: ``critical`` requests, one fast statement, tag ``login``;
* ``api``: ``normal`` requests running a 10 ms statement, tag ``api``;
* ``batch``: ``background`` jobs running a 50 ms statement, tag ``batch``.

Every request has a deadline (1 s): one that found the accept queue full,
waited longer than its deadline for a worker, failed, was shed, or was
answered after its deadline counts as not served. So a pool that stops serving
shows up as requests lost, not as a load generator that politely stops asking.

After a quiet phase (``pre``) comes the storm (``storm``), in one of four
variants (:data:`VARIANTS`), none of which the guard is told about:

* ``tagged``: a normal-priority request with its own tag
  (:func:`scan_auth_tokens`, tag ``auth-token-scan``) turns into a
  multi-second query;
* ``untagged``: the same kind of query from code that opens no
  ``poolguard.request`` at all (:func:`refresh_sessions`, run by a job
  runner's own threads);
* ``critical``: the login flow's own query goes bad: a share of the logins run
  a slow statement (:func:`sign_in` with ``slow=True``) after their fast one;
  the protected traffic is then the API calls;
* ``uniform``: the control: the database gets slower for every statement
  alike; there is no culprit to find.

Then the storm stops (``after``, optional) while the service runs on.

:func:`run_side` runs the schedule once against a fresh engine: plain
SQLAlchemy (a ``QueuePool`` with its defaults) or the same engine behind
``poolguard.wrap(engine, **recommended.options())``: the recommended setting
(:mod:`poolguard.recommended`), as is, naming no tag. Every request of the web
workers runs under ``poolguard.request(timeout=deadline, priority=..., tag=...)``
on both sides (on the plain side nothing reads it). Per phase it measures for
each kind of work and each priority: requests offered, served, failed (by
cause) and shed (by reason), p50/p99 latency of the served ones (from arrival
to answer), goodput; the protected requests served in each second of the
storm, and the most culprit statements that ran at once. A request counts in
the phase in which it arrived.

The statements run on SQLite (the command line registers a ``sleep()``
function), PostgreSQL and MariaDB/MySQL. ``poolguard demo`` runs both sides
at once; ``benchmarks/postmortem.py`` runs every variant, one side after the
other, on PostgreSQL and judges each against issue 13's bar (:func:`assess`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
from time import perf_counter
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import poolguard
from poolguard import recommended
from poolguard._fingerprint import fingerprint
from poolguard._policies import BACKGROUND, CRITICAL, NORMAL
from poolguard.testing import capture_events

from ._db import create_engine, sleep_sql
from ._output import ms, percentile

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = [
    "KINDS",
    "PHASES",
    "POOL_SIZE",
    "VARIANTS",
    "PhaseStats",
    "Sample",
    "SideResult",
    "Traffic",
    "Variant",
    "arrivals",
    "as_json",
    "assess",
    "false_isolations",
    "format_report",
    "guarded_options",
    "isolations",
    "run",
    "run_side",
    "statements",
]

POOL_SIZE = 10
PHASES = ("pre", "storm", "after")
#: Kinds of work, in the order reports show them; ``culprit`` is the variant's bad query.
KINDS = ("login", "api", "batch", "culprit")
PRIORITY_ORDER = (CRITICAL, NORMAL, BACKGROUND)
#: Rows the slow query scans; it sleeps ``culprit_query / SCAN_ROWS`` per row, so a
#: statement time limit cuts it at once on every backend (SQLite included).
SCAN_ROWS = 100
#: The bar of issue 13 for the protected traffic during the storm.
GOODPUT_KEPT_MIN = 0.9
P99_RATIO_MAX = 3.0

#: Outcomes that are not a served request, besides ``shed:<reason>`` and ``error:<type>``.
QUEUE_FULL = "accept_queue_full"
NO_WORKER = "no_worker"
LATE = "late"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One storm: what goes bad and where it runs."""

    name: str
    title: str
    #: The kinds whose goodput is judged together (the protected traffic).
    protected: tuple[str, ...]
    #: priority and tag of the culprit's requests (None: no ``poolguard.request``).
    culprit_priority: str | None
    culprit_tag: str | None
    #: The application function that runs the culprit statement ("" for the control).
    culprit_site: str
    #: The name the culprit's statement scans (its shape), "" for the control.
    culprit_table: str

    @property
    def has_culprit(self) -> bool:
        return bool(self.culprit_table)

    @property
    def in_web_workers(self) -> bool:
        """Whether the culprit runs on the web workers (else on a job runner's threads)."""
        return self.culprit_tag is not None

    def kinds(self) -> dict[str, tuple[str | None, str | None]]:
        """Kind -> (priority, tag) of its requests."""
        return {
            "login": (CRITICAL, "login"),
            "api": (NORMAL, "api"),
            "batch": (BACKGROUND, "batch"),
            "culprit": (self.culprit_priority, self.culprit_tag),
        }


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "tagged",
            "a normal request with its own tag turns slow",
            ("login", "api"),
            NORMAL,
            "auth-token-scan",
            "scan_auth_tokens",
            "auth_tokens",
        ),
        Variant(
            "untagged",
            "code outside any poolguard.request turns slow",
            ("login", "api"),
            None,
            None,
            "refresh_sessions",
            "stale_sessions",
        ),
        Variant(
            "critical",
            "the critical login flow's own query turns slow",
            ("api",),
            CRITICAL,
            "login",
            "sign_in",
            "login_history",
        ),
        Variant(
            "uniform",
            "control: the database is slow for everyone",
            ("login", "api"),
            None,
            None,
            "",
            "",
        ),
    )
}


def guarded_options() -> dict[str, Any]:
    """The guarded side's options: exactly :func:`poolguard.recommended.options`."""
    return recommended.options()


@dataclasses.dataclass(frozen=True)
class Traffic:
    """The schedule, the service and the mix (seconds; rates per second)."""

    variant: str = "tagged"
    pre: float = 5.0
    storm: float = 10.0
    #: After the storm: the culprit stops, the rest goes on (0: no such phase).
    after: float = 0.0
    pool_size: int = POOL_SIZE
    #: The web server's worker threads and its accept queue.
    workers: int = 24
    accept_queue: int = 64
    #: Each request's deadline: its ``poolguard.request(timeout=...)``, and the
    #: longest it may take from arrival to answer to count as served.
    deadline: float = 1.0
    login_rate: float = 40.0
    api_rate: float = 20.0
    batch_rate: float = 4.0
    api_query: float = 0.01
    batch_query: float = 0.05
    #: Slow runs per second during the storm (for ``critical``: that many of the logins).
    culprit_rate: float = 8.0
    #: How long one slow run takes when nothing cuts it.
    culprit_query: float = 3.0
    #: ``untagged``: the job runner's threads that run the culprit.
    culprit_workers: int = 16
    #: Seconds at the start that count in no phase (see :meth:`bounds`).
    warmup: float = 1.0
    #: ``uniform``: what every statement takes more during the storm.
    uniform_extra: float = 0.15
    #: Longest wait for the threads after the schedule (never reached unless
    #: something hangs; plain SQLAlchemy's waiters drain within seconds).
    drain_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(
                f"variant={self.variant!r} is invalid: expected one of {', '.join(VARIANTS)}"
            )

    @property
    def kind(self) -> Variant:
        return VARIANTS[self.variant]

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Phase -> (start, end), seconds from the run's start.

        The requests of the first ``warmup`` seconds (at most half the quiet
        phase) count in no phase: threads and connections are still settling,
        and one slow first request would set the pre-storm p99 the storm's is
        compared with.
        """
        storm_end = self.pre + self.storm
        settled = min(self.warmup, self.pre / 2)
        bounds = {"pre": (settled, self.pre), "storm": (self.pre, storm_end)}
        if self.after > 0:
            bounds["after"] = (storm_end, storm_end + self.after)
        return bounds

    @property
    def end(self) -> float:
        """When the last request arrives, seconds from the run's start."""
        return self.pre + self.storm + self.after

    def in_storm(self, at: float) -> bool:
        return self.pre <= at < self.pre + self.storm


def arrivals(traffic: Traffic) -> list[tuple[float, str]]:
    """The open-loop schedule: (arrival, kind), sorted, seconds from the run's start.

    Each kind arrives evenly at its rate. The kinds are shifted apart by a
    fraction of the shortest period (no two requests at one instant when the
    rates divide the highest one: no burst of the client's making). The
    culprit arrives during the storm only; in the ``critical`` variant it is
    every n-th login of the storm (n = login_rate / culprit_rate), so the
    logins keep their rate.
    """
    variant = traffic.kind
    rates = [
        ("login", traffic.login_rate),
        ("api", traffic.api_rate),
        ("batch", traffic.batch_rate),
    ]
    if variant.has_culprit and variant.name != "critical":
        rates.append(("culprit", traffic.culprit_rate))
    rates = [(kind, rate) for kind, rate in rates if rate > 0]
    every = round(traffic.login_rate / traffic.culprit_rate) if traffic.culprit_rate > 0 else 0
    slot = 1.0 / max((rate for _, rate in rates), default=1.0)
    schedule: list[tuple[float, str]] = []
    for n, (kind, rate) in enumerate(rates):
        storm_only = kind == "culprit"
        start = traffic.pre if storm_only else 0.0
        stop = traffic.pre + traffic.storm if storm_only else traffic.end
        first = start + slot * n / len(rates)
        for i in range(math.ceil((stop - first) * rate)):
            at = first + i / rate
            slow_login = (
                kind == "login"
                and variant.name == "critical"
                and every > 0
                and traffic.in_storm(at)
                and i % every == 0
            )
            schedule.append((at, "culprit" if slow_login else kind))
    schedule.sort()
    return schedule


@dataclasses.dataclass(frozen=True)
class Sample:
    """One request: when it arrived and was answered (seconds from the run's start)."""

    kind: str
    start: float
    end: float
    #: ``ok``, ``late``, ``no_worker``, ``accept_queue_full``, ``timeout``,
    #: ``shed:<reason>`` or ``error:<type>``
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
    #: Protected requests served in each second of the storm (by answer time).
    storm_served_per_second: list[int]
    #: Most culprit statements running at once, per phase.
    peak_culprits: dict[str, int]
    #: After the run: permits and connections still out (must be 0).
    leftover: dict[str, Any]
    #: guard.rejections as "reason/priority" -> count (guarded side).
    rejections: dict[str, int]
    duration: float
    #: phase -> priority -> stats (the kinds of one priority together).
    priorities: dict[str, dict[str, PhaseStats]] = dataclasses.field(default_factory=dict)
    #: phase -> stats of the protected traffic (``Variant.protected``, together).
    protected: dict[str, PhaseStats] = dataclasses.field(default_factory=dict)
    #: ``perf_counter()`` when the schedule started (to place log events in it).
    started_at: float = 0.0
    #: The guard's ``culprit.isolated`` events during the run (filled by the caller
    #: that captured the events: :func:`run`, ``poolguard demo``).
    isolations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: The backend's dialect name (the culprit's shape depends on it).
    dialect: str = "postgresql"

    def stat(self, phase: str, kind: str) -> PhaseStats:
        return self.phases[phase][kind]


class _Active:
    """Culprit statements running now, and the most at once per phase."""

    def __init__(self, traffic: Traffic) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.peak = dict.fromkeys(PHASES, 0)
        self.t0 = math.inf
        self.traffic = traffic

    def enter(self) -> None:
        at = perf_counter() - self.t0
        t = self.traffic
        phase = "pre" if at < t.pre else "storm" if at < t.pre + t.storm else "after"
        with self.lock:
            self.now += 1
            self.peak[phase] = max(self.peak[phase], self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


# -- the application: one function per kind of request -------------------------


def sign_in(
    engine: sa.Engine, stmts: Mapping[str, sa.TextClause], active: _Active, *, slow: bool = False
) -> None:
    """A login: one fast statement; a slow one after it for the ``critical`` storm."""
    with engine.connect() as conn:
        conn.execute(stmts["login"]).all()
        if slow:
            active.enter()
            try:
                conn.execute(stmts["culprit"]).all()  # the login flow's slow query
            finally:
                active.leave()


def sign_in_slowly(engine: sa.Engine, stmts: Mapping[str, sa.TextClause], active: _Active) -> None:
    """The ``critical`` culprit: a login whose flow runs the slow query too."""
    sign_in(engine, stmts, active, slow=True)


def list_orders(engine: sa.Engine, stmts: Mapping[str, sa.TextClause], active: _Active) -> None:
    """An API call: one 10 ms statement."""
    with engine.connect() as conn:
        conn.execute(stmts["api"]).all()


def export_batch(engine: sa.Engine, stmts: Mapping[str, sa.TextClause], active: _Active) -> None:
    """A background job: one 50 ms statement."""
    with engine.connect() as conn:
        conn.execute(stmts["batch"]).all()


def scan_auth_tokens(
    engine: sa.Engine, stmts: Mapping[str, sa.TextClause], active: _Active
) -> None:
    """The ``tagged`` culprit: checks a token by scanning every row, slowly."""
    with engine.connect() as conn:
        active.enter()
        try:
            conn.execute(stmts["culprit"]).all()  # the unoptimized query
        finally:
            active.leave()


def refresh_sessions(
    engine: sa.Engine, stmts: Mapping[str, sa.TextClause], active: _Active
) -> None:
    """The ``untagged`` culprit: a job, outside any request, that scans every session."""
    conn = engine.connect()
    active.enter()
    try:
        conn.execute(stmts["culprit"]).all()  # the unoptimized job
    finally:
        active.leave()
        conn.close()


def _handler(variant: Variant, kind: str) -> Callable[..., None]:
    if kind == "culprit":
        return {
            "tagged": scan_auth_tokens,
            "untagged": refresh_sessions,
        }.get(variant.name, sign_in_slowly)
    return {"login": sign_in, "api": list_orders, "batch": export_batch}[kind]


def culprit_sql(dialect_name: str, traffic: Traffic) -> str:
    """The variant's slow statement: a scan of ``SCAN_ROWS`` rows, sleeping on each."""
    table = traffic.kind.culprit_table or "nothing"
    per_row = traffic.culprit_query / SCAN_ROWS
    return (
        f"WITH RECURSIVE {table}(id) AS (SELECT 1 UNION ALL SELECT id + 1 "  # noqa: S608 - constants only
        f"FROM {table} WHERE id < {SCAN_ROWS}) "
        f"SELECT count(*) FROM {table} WHERE {sleep_sql(dialect_name, per_row)}"
    )


def statements(dialect_name: str, traffic: Traffic, extra: float = 0.0) -> dict[str, sa.TextClause]:
    """The statement of each kind, for this backend; each takes ``extra`` more.

    Every statement sleeps (``sleep(0)`` for the login), so that the
    ``uniform`` storm slows them all without changing their shapes.
    """

    def sleep(seconds: float) -> str:
        return sleep_sql(dialect_name, seconds + extra)

    return {
        "login": sa.text(f"SELECT 1 AS signed_in WHERE {sleep(0.0)}"),
        "api": sa.text(f"SELECT 2 AS orders WHERE {sleep(traffic.api_query)}"),
        "batch": sa.text(f"SELECT 3 AS exported WHERE {sleep(traffic.batch_query)}"),
        "culprit": sa.text(culprit_sql(dialect_name, traffic)),
    }


def _one(
    engine: sa.Engine,
    kind: str,
    stmts: Mapping[str, sa.TextClause],
    active: _Active,
    traffic: Traffic,
) -> str:
    """Run one request of the web workers (or the job runner); return its outcome."""
    variant = traffic.kind
    priority, tag = variant.kinds()[kind]
    handler = _handler(variant, kind)
    try:
        if kind == "culprit" and not variant.in_web_workers:
            handler(engine, stmts, active)  # code that opens no poolguard.request
        else:
            with poolguard.request(timeout=traffic.deadline, priority=priority, tag=tag):
                handler(engine, stmts, active)
    except poolguard.Rejected as shed:  # LoadShed, CircuitOpen
        return f"shed:{shed.reason}"
    except sa.exc.TimeoutError:  # QueuePool's own timeout, or poolguard.PoolTimeout
        return "timeout"
    except Exception as exc:  # noqa: BLE001 - counted and shown, never hidden
        return f"error:{type(exc).__name__}"
    return "ok"


class _Server:
    """Worker threads behind a bounded accept queue, fed by a paced dispatcher."""

    def __init__(
        self,
        name: str,
        workers: int,
        accept_queue: int,
        serve: Callable[[float, str], None],
        record: Callable[[Sample], None],
        now: Callable[[], float],
    ) -> None:
        self.queue: queue.Queue[tuple[float, str] | None] = queue.Queue(accept_queue)
        self.serve = serve
        self.record = record
        self.now = now
        self.threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def offer(self, at: float, kind: str) -> None:
        """A request arrives: queued, or turned away at once when the queue is full."""
        try:
            self.queue.put_nowait((at, kind))
        except queue.Full:
            self.record(Sample(kind, at, self.now(), QUEUE_FULL))

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            self.serve(*item)


def _dispatch(
    schedule: Iterable[tuple[float, str]],
    servers: Mapping[str, _Server],
    t0: float,
    stop: threading.Event,
) -> None:
    """Offer each request at its arrival time, late or not (the open loop)."""
    for at, kind in schedule:
        delay = t0 + at - perf_counter()
        if delay > 0 and stop.wait(delay):
            return
        servers.get(kind, servers["web"]).offer(at, kind)


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
) -> tuple[
    dict[str, dict[str, PhaseStats]],
    dict[str, dict[str, PhaseStats]],
    dict[str, PhaseStats],
    list[int],
]:
    """Per phase: stats by kind, by priority and of the protected traffic;
    protected requests served in each second of the storm."""
    kinds = traffic.kind.kinds()

    def priority_of(kind: str) -> str:
        return kinds[kind][0] or NORMAL  # code outside a request runs as normal

    protected = traffic.kind.protected
    phases: dict[str, dict[str, PhaseStats]] = {}
    priorities: dict[str, dict[str, PhaseStats]] = {}
    guarded_kinds: dict[str, PhaseStats] = {}
    for phase, (lo, hi) in traffic.bounds().items():
        inside = [s for s in samples if lo <= s.start < hi]
        phases[phase] = {
            kind: _stats([s for s in inside if s.kind == kind], priority_of(kind), hi - lo)
            for kind in KINDS
        }
        priorities[phase] = {
            priority: _stats(
                [s for s in inside if priority_of(s.kind) == priority], priority, hi - lo
            )
            for priority in PRIORITY_ORDER
        }
        guarded_kinds[phase] = _stats(
            [s for s in inside if s.kind in protected], priority_of(protected[0]), hi - lo
        )
    per_second = [0] * max(1, int(traffic.storm))
    for s in samples:
        if s.kind in protected and s.outcome == "ok":
            second = math.floor(s.end - traffic.pre)
            if 0 <= second < len(per_second):
                per_second[second] += 1
    return phases, priorities, guarded_kinds, per_second


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
            (default: :func:`guarded_options`).
        name: the guarded pool's name.
        start_at: ``perf_counter()`` time at which the schedule starts (after
            the warm-up), so that two sides run in step; default: at once.
        observer: called with every request as it ends (live progress); it
            runs on the request's thread and must be quick.
    """
    engine = create_engine(url, poolclass=sa.QueuePool, pool_size=traffic.pool_size, max_overflow=0)
    if guarded:
        wrap_options = dict(guarded_options() if options is None else options)
        wrap_options.setdefault("name", name)
        poolguard.wrap(engine, **wrap_options)
    stmts = statements(engine.dialect.name, traffic)
    slow_stmts = statements(engine.dialect.name, traffic, traffic.uniform_extra)
    uniform = traffic.variant == "uniform"
    samples: list[Sample] = []
    samples_lock = threading.Lock()
    active = _Active(traffic)
    stop = threading.Event()
    servers: dict[str, _Server] = {}
    try:
        _warm_up(engine, traffic.pool_size)
        if start_at is not None:
            stop.wait(max(0.0, start_at - perf_counter()))
        t0 = active.t0 = perf_counter()

        def now() -> float:
            return perf_counter() - t0

        def record(sample: Sample) -> None:
            with samples_lock:
                samples.append(sample)
            if observer is not None:
                observer(sample)

        def serve(at: float, kind: str) -> None:
            began = now()
            if began - at > traffic.deadline:
                record(Sample(kind, at, began, NO_WORKER))  # no worker within the deadline
                return
            use = slow_stmts if uniform and traffic.in_storm(at) else stmts
            outcome = _one(engine, kind, use, active, traffic)
            ended = now()
            if outcome == "ok" and ended - at > traffic.deadline:
                outcome = LATE  # answered, but after the client gave up
            record(Sample(kind, at, ended, outcome))

        servers["web"] = _Server("web", traffic.workers, traffic.accept_queue, serve, record, now)
        if not traffic.kind.in_web_workers and traffic.kind.has_culprit:
            servers["culprit"] = _Server(
                "jobs", traffic.culprit_workers, traffic.accept_queue, serve, record, now
            )
        _dispatch(arrivals(traffic), servers, t0, stop)
        for server in servers.values():
            server.close()
        give_up = t0 + traffic.end + traffic.drain_timeout
        threads = [t for server in servers.values() for t in server.threads]
        for thread in threads:
            thread.join(max(0.0, give_up - perf_counter()))
        hung = [t.name for t in threads if t.is_alive()]
        if hung:
            raise RuntimeError(f"{len(hung)} threads still running after the drain: {hung[:5]}")
        duration = perf_counter() - t0
        leftover, rejections = _leftover(engine, guarded)
        phases, priorities, protected, per_second = summarize(samples, traffic)
        return SideResult(
            side="guarded" if guarded else "plain",
            traffic=traffic,
            phases=phases,
            storm_served_per_second=per_second,
            peak_culprits=dict(active.peak),
            leftover=leftover,
            rejections=rejections,
            duration=duration,
            priorities=priorities,
            protected=protected,
            started_at=t0,
            dialect=engine.dialect.name,
        )
    finally:
        stop.set()
        engine.dispose()


# -- judging a run --------------------------------------------------------------


def isolations(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``culprit.isolated`` events among ``events`` (dicts with an ``event`` key)."""
    return [dict(e) for e in events if e.get("event") == "culprit.isolated"]


def _names_the_culprit(event: Mapping[str, Any], traffic: Traffic, dialect_name: str) -> bool:
    variant = traffic.kind
    if not variant.has_culprit:
        return False
    shape = fingerprint(culprit_sql(dialect_name, traffic)).id
    texts = [v for v in event.values() if isinstance(v, str)]
    by_shape = any(shape in t or variant.culprit_table in t for t in texts)
    # A tag is the culprit only when the culprit has a tag of its own (not the
    # login tag its fast statement shares in the critical variant).
    by_tag = variant.name == "tagged" and event.get("tag") == variant.culprit_tag
    return by_shape or by_tag


def false_isolations(
    found: Iterable[Mapping[str, Any]], traffic: Traffic, dialect_name: str
) -> list[dict[str, Any]]:
    """The isolations that name something other than the variant's culprit
    (every isolation, in the control: there is no culprit to isolate)."""
    return [dict(e) for e in found if not _names_the_culprit(e, traffic, dialect_name)]


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def assess(result: SideResult) -> dict[str, Any]:
    """One side of one variant against issue 13's bar.

    The protected traffic must keep at least :data:`GOODPUT_KEPT_MIN` of its
    pre-storm goodput during the storm, with a p99 at most
    :data:`P99_RATIO_MAX` times its pre-storm p99, and nothing may be isolated
    but the culprit (nothing at all in the control).
    """
    traffic = result.traffic
    protected = "+".join(traffic.kind.protected)
    pre, storm = result.protected["pre"], result.protected["storm"]
    kept = _ratio(storm.per_second, pre.per_second)
    p99 = _ratio(storm.p99_ms, pre.p99_ms)
    sheds: dict[str, int] = {}
    failures: dict[str, int] = {}
    for kind_stats in result.phases["storm"].values():
        for reason, n in kind_stats.shed_reasons.items():
            sheds[reason] = sheds.get(reason, 0) + n
        for cause, n in kind_stats.errors.items():
            failures[cause] = failures.get(cause, 0) + n
    false = false_isolations(result.isolations, traffic, result.dialect)
    protects = (
        kept is not None and kept >= GOODPUT_KEPT_MIN and p99 is not None and (p99 <= P99_RATIO_MAX)
    )
    if traffic.kind.has_culprit:
        passed = protects and not false
        why = (
            f"{protected} kept {_pct(kept)} (bar >= {GOODPUT_KEPT_MIN:.0%}), "
            f"p99 {_x(p99)}x (bar <= {P99_RATIO_MAX:g}x), {len(false)} false isolations"
        )
    else:
        passed = not result.isolations
        why = f"{len(result.isolations)} isolations (must be 0; no culprit)"
    return {
        "variant": traffic.variant,
        "side": result.side,
        "protected": protected,
        "goodput_pre": round(pre.per_second, 2),
        "goodput_storm": round(storm.per_second, 2),
        "goodput_kept": None if kept is None else round(kept, 3),
        "p99_pre_ms": None if pre.p99_ms is None else round(pre.p99_ms, 2),
        "p99_storm_ms": None if storm.p99_ms is None else round(storm.p99_ms, 2),
        "p99_ratio": None if p99 is None else round(p99, 2),
        # Every kind's, the culprit's included; then the protected traffic's own.
        "storm_sheds": dict(sorted(sheds.items())),
        "protected_storm_shed": dict(sorted(storm.shed_reasons.items())),
        "protected_storm_failed": dict(sorted(storm.errors.items())),
        "storm_failures": dict(sorted(failures.items())),
        "isolations": len(result.isolations),
        "false_isolations": len(false),
        "pass": passed,
        "verdict": f"{'PASS' if passed else 'FAIL'}: {why}",
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# -- running every variant --------------------------------------------------------


def run(
    url: str, traffic: Traffic | None = None, *, options: Mapping[str, Any] | None = None
) -> dict[str, SideResult]:
    """Both sides of one variant, one after the other, with the same traffic.

    The guard's ``culprit.isolated`` events during the guarded side land in
    its :attr:`SideResult.isolations`.
    """
    traffic = traffic or Traffic()
    plain = run_side(url, guarded=False, traffic=traffic)
    with capture_events(level=logging.INFO) as events:
        guarded = run_side(url, guarded=True, traffic=traffic, options=options)
    guarded.isolations = isolations(events)
    return {"plain": plain, "guarded": guarded}


def format_report(results: dict[str, SideResult]) -> str:
    """Both sides of one variant as an aligned table, then the verdict lines."""
    lines: list[str] = []
    head = (
        f"{'side':<8} {'phase':<6} {'kind':<8} {'prio':<10} {'req':>6} {'served':>7} "
        f"{'/s':>7} {'failed':>7} {'shed':>6} {'p50 ms':>8} {'p99 ms':>8}  failed/shed"
    )
    lines += [head, "-" * len(head)]
    for side, result in results.items():
        for phase in result.phases:
            for kind in KINDS:
                st = result.stat(phase, kind)
                if not st.requests:
                    continue
                reasons = ", ".join(f"{k}={v}" for k, v in {**st.shed_reasons, **st.errors}.items())
                lines.append(
                    f"{side:<8} {phase:<6} {kind:<8} {st.priority:<10} {st.requests:>6} "
                    f"{st.served:>7} {st.per_second:>7.1f} {st.failed:>7} {st.shed:>6} "
                    f"{ms(st.p50_ms):>8} {ms(st.p99_ms):>8}  {reasons}"
                )
    lines.append("")
    for result in results.values():
        lines.append(verdict_line(assess(result)))
        lines.append(
            f"{'':<4}peak culprit statements at once {result.peak_culprits['storm']}; "
            f"left over {result.leftover}"
        )
    return "\n".join(lines)


def verdict_line(a: Mapping[str, Any]) -> str:
    """One line of :func:`assess`'s figures, ending with its verdict."""
    sheds = ", ".join(f"{k} {v}" for k, v in a["storm_sheds"].items()) or "none"
    lost = {**a["protected_storm_shed"], **a["protected_storm_failed"]}
    unserved = ", ".join(f"{k} {v}" for k, v in lost.items()) or "none"
    return (
        f"{a['variant']:<9} {a['side']:<8} {a['protected']:<9} "
        f"{a['goodput_pre']:>5.1f}/s -> {a['goodput_storm']:>5.1f}/s "
        f"({_pct(a['goodput_kept']):>4} kept), p99 {ms(a['p99_pre_ms'])} -> "
        f"{ms(a['p99_storm_ms'])} ms ({_x(a['p99_ratio'])}x); not served: {unserved}; "
        f"sheds (all kinds): {sheds}; isolations {a['isolations']} "
        f"(false {a['false_isolations']}): {'PASS' if a['pass'] else 'FAIL'}"
    )


def as_json(
    results: Mapping[str, Mapping[str, SideResult]], options: Mapping[str, Any] | None = None
) -> str:
    """Every variant's sides as JSON, with the verdicts and the guarded side's options."""
    return json.dumps(
        {
            "guarded_options": dict(guarded_options() if options is None else options),
            "variants": {
                variant: {
                    "traffic": dataclasses.asdict(next(iter(sides.values())).traffic),
                    "assessment": {side: assess(r) for side, r in sides.items()},
                    **{side: dataclasses.asdict(r) for side, r in sides.items()},
                }
                for variant, sides in results.items()
            },
        },
        indent=2,
        default=str,
    )
