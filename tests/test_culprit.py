"""Culprit isolation: the pure detector (explicit times), then real PostgreSQL.

The detector is fed :class:`Observation` samples and a ``pressed`` flag at
times the test chooses. The PostgreSQL tests drive a small pool with threads
running ``pg_sleep`` (the culprit) and fast statements (everyone else), and
check what is isolated, what is shed, and that it is lifted again.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import poolguard
from _support import wait_until
from poolguard import _culprit
from poolguard._culprit import (
    HOLD_FIRST,
    HOLD_MAX,
    PRESSED_INTERVAL,
    PRESSURE_FOR,
    RAMP,
    SHAPE,
    STEP,
    TAG,
    Detector,
    Observation,
    ShedSummary,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Engine

    from _support import EngineFactory

# -- the pure detector ------------------------------------------------------------------


def _bad(n: int, running: float = 2.0, tag: str | None = None) -> list[Observation]:
    return [Observation("bad", tag, running + 0.01, running) for _ in range(n)]


def _good(
    n: int, running: float = 0.003, tag: str | None = None, shape: str = "good"
) -> list[Observation]:
    return [Observation(shape, tag, running + 0.002, running) for _ in range(n)]


def _run(
    detector: Detector,
    start: float,
    seconds: float,
    make: Callable[[float], list[Observation]],
    *,
    pressed: bool = True,
) -> list[_culprit.Change]:
    """Sample every PRESSED_INTERVAL from ``start`` for ``seconds``; return the changes."""
    changes = []
    steps = round(seconds / PRESSED_INTERVAL)
    for i in range(steps + 1):
        now = start + i * PRESSED_INTERVAL
        changes += detector.sample(now, make(now), pressed)
    return changes


def test_a_slow_shape_holding_most_of_the_pool_is_isolated_once_the_pressure_stands() -> None:
    detector = Detector()
    # Calm: no pressure, the same holders: nothing, however long.
    assert _run(detector, 0.0, 5.0, lambda t: _bad(4) + _good(1), pressed=False) == []
    changes = _run(detector, 6.0, PRESSURE_FOR - PRESSED_INTERVAL, lambda t: _bad(4) + _good(1))
    assert changes == []  # pressure, not standing yet
    changes = _run(detector, 6.0 + PRESSURE_FOR, 0.0, lambda t: _bad(4) + _good(1))
    assert [(c.action, c.isolation.kind, c.isolation.key) for c in changes] == [
        ("isolated", SHAPE, "bad")
    ]
    iso = changes[0].isolation
    assert iso.share > 0.7
    assert changes[0].held == 4
    assert detector.isolations == {SHAPE: 1, TAG: 0}
    assert iso.phase == "isolated"
    assert not any(iso.admit() for _ in range(50))  # isolated: nothing goes through
    shares = {a.key: a for a in detector.attribution() if a.kind == SHAPE}
    assert shares["bad"].isolated == "isolated"
    assert shares["bad"].held == 4
    assert shares["bad"].share > shares["good"].share


def test_no_culprit_when_every_shape_is_slow_alike() -> None:
    detector = Detector()

    def uniformly_slow(t: float) -> list[Observation]:
        # The busiest shape holds most of the pool, but only because it is
        # most of the traffic: its statements run as long as the others'.
        return (
            _good(6, running=0.8, shape="login")
            + _good(2, running=0.7, shape="api")
            + _good(1, running=0.9, shape="search")
        )

    assert _run(detector, 0.0, 20.0, uniformly_slow) == []
    assert detector.isolated == {}
    assert detector.standing(20.0)


def test_no_culprit_without_pressure_below_the_share_or_with_one_connection() -> None:
    for make, pressed in [
        (lambda t: _bad(4) + _good(1), False),  # no pressure
        (lambda t: _bad(1) + _good(3, running=0.5), True),  # one connection, and no share
        (
            lambda t: _bad(2) + _good(4, running=0.05) + [Observation(None, None, 2.0, 0.0)] * 2,
            True,
        ),  # a third of the pool
    ]:
        detector = Detector()
        assert _run(detector, 0.0, 10.0, make, pressed=pressed) == []


def test_nothing_is_isolated_when_nobody_else_uses_the_pool() -> None:
    # The slow shape is the whole workload: isolating it would protect nobody.
    detector = Detector()
    assert _run(detector, 0.0, 10.0, lambda t: _bad(4)) == []


def test_fast_statements_are_never_a_culprit_however_unequal() -> None:
    # 40x slower than the rest, but 10 ms: below MIN_DURATION.
    detector = Detector()
    assert (
        _run(detector, 0.0, 10.0, lambda t: _bad(4, running=0.01) + _good(1, running=0.00025)) == []
    )


def test_a_tag_is_isolated_when_no_single_shape_explains_it() -> None:
    # "reports" checkouts hold their connections idle for seconds, each last
    # running a different (fast) statement: no shape is slow, the tag is.
    detector = Detector()

    def sample(t: float) -> list[Observation]:
        reports = [Observation(f"r{i}", "reports", 3.0, 0.0) for i in range(4)]
        return reports + _good(1, tag="login")

    changes = _run(detector, 0.0, 2.0, sample)
    assert [(c.isolation.kind, c.isolation.key) for c in changes] == [(TAG, "reports")]


def test_a_tag_idle_in_transaction_after_one_shape_is_isolated() -> None:
    # Each "checkout" request runs one fast statement, then holds its
    # connection for seconds (calls a payment API): the tag is the culprit.
    detector = Detector()

    def sample(t: float) -> list[Observation]:
        return [Observation("q", "checkout", 3.0, 0.0)] * 4 + _good(1, tag="api")

    changes = _run(detector, 0.0, 2.0, sample)
    assert [(c.isolation.kind, c.isolation.key) for c in changes] == [(TAG, "checkout")]


def test_a_tag_is_not_isolated_while_one_slow_shape_explains_it() -> None:
    # The login tag holds most of the pool because one of its shapes runs
    # slow; that shape is below culprit_share yet (the tag's other statements
    # add to the tag): the tag waits for the shape's turn, it is not isolated.
    detector = Detector(share=0.65)
    changes = _run(
        detector,
        0.0,
        3.0,
        lambda t: _bad(3, tag="login") + _good(1, tag="login", running=0.004) + _good(1, tag="api"),
    )
    assert changes == []


def test_a_shape_is_preferred_and_its_tag_is_then_not_isolated() -> None:
    # The critical login flow's own query went bad: isolate the shape, not
    # the login tag (its other statements keep being served).
    detector = Detector()
    changes = _run(
        detector,
        0.0,
        5.0,
        lambda t: _bad(4, tag="login") + _good(1, tag="login") + _good(1, tag="api"),
    )
    assert [(c.isolation.kind, c.isolation.key) for c in changes] == [(SHAPE, "bad")]


def test_a_shape_held_by_one_tag_is_isolated_in_that_tag_only() -> None:
    # "reports" runs the shape for seconds; "api" runs the same shape (other
    # parameters) in milliseconds: only the reports' executions are isolated.
    detector = Detector()

    def sample(t: float) -> list[Observation]:
        # The fast ones are seen running now and then, as a sample would.
        seen = round(t / PRESSED_INTERVAL) % 10 == 0
        return (
            _bad(4, tag="reports")
            + _good(1, tag="api")
            + [Observation("bad", "api", 0.004, 0.002)] * seen
        )

    changes = _run(detector, 0.0, 2.0, sample)
    assert detector.pairs[("bad", "api")].cs > 0
    (change,) = changes
    iso = change.isolation
    assert (iso.kind, iso.key, iso.scoped, iso.scope) == (SHAPE, "bad", True, "reports")
    assert iso.covers("bad", "reports")
    assert not iso.covers("bad", "api")
    assert not iso.covers("bad", None)


def test_a_shape_shared_by_a_slow_and_a_fast_tag_is_isolated_in_the_slow_tag_only() -> None:
    # The same statement text: slow in "report", fast in "api", and the API's
    # connections waiting in the pooler's queue (on the wire) make up more than
    # a tenth of the shape's holds. Only the reports' executions are isolated.
    detector = Detector()

    def sample(t: float) -> list[Observation]:
        seen = round(t / PRESSED_INTERVAL) % 2 == 0
        queued = [Observation("bad", "api", 1.5, 1.5, wire=True)] * 3
        return (
            _bad(3, tag="report")
            + queued
            + [Observation("bad", "api", 0.004, 0.002)] * seen
            + _good(1, tag="web")
        )

    changes = _run(detector, 0.0, 2.0, sample)
    (change,) = changes
    iso = change.isolation
    assert (iso.kind, iso.key, iso.scoped, iso.tags) == (SHAPE, "bad", True, {"report"})
    assert iso.covers("bad", "report")
    assert not iso.covers("bad", "api")
    assert not iso.covers("bad", None)
    assert ("bad", "api") not in detector.pairs or detector.pairs[("bad", "api")].run_n < 10


def test_a_shape_slow_in_two_tags_and_fast_in_a_third_spares_the_third() -> None:
    detector = Detector()

    def sample(t: float) -> list[Observation]:
        return (
            _bad(2, tag="report")
            + _bad(2, tag=None)
            + [Observation("bad", "api", 0.004, 0.002)] * 2
            + _good(1, tag="web")
        )

    (change,) = _run(detector, 0.0, 2.0, sample)
    iso = change.isolation
    assert (iso.key, iso.scoped, iso.tags) == ("bad", True, {"report", None})
    assert iso.covers("bad", "report")
    assert iso.covers("bad", None)
    assert not iso.covers("bad", "api")


def test_a_shape_held_across_tags_is_isolated_in_each_tag_it_runs_slow_in() -> None:
    detector = Detector()
    changes = _run(
        detector,
        0.0,
        2.0,
        lambda t: _bad(2, tag="reports") + _bad(2, tag="search") + _good(1, tag="api"),
    )
    (change,) = changes
    iso = change.isolation
    assert (iso.key, iso.tags) == ("bad", {"reports", "search"})
    assert iso.covers("bad", "search")
    assert not iso.covers("bad", "api")
    assert not iso.covers("bad", None)


def test_a_shape_slow_by_its_completed_statements_only_is_isolated_everywhere() -> None:
    # No sample sees it running slow (its holds are idle between statements),
    # the completed ones say it is slow: no tag to scope it to.
    detector = Detector()
    changes = []
    for i in range(11):
        now = i * PRESSED_INTERVAL
        obs = [Observation("bad", t, 1.0, 0.0) for t in ("reports", "search") for _ in range(2)]
        obs += _good(1, tag="api")
        done = {"bad": (4.0, 8.0), "good": (50.0, 0.1)}
        changes += detector.sample(now, obs, True, done)
    (change,) = changes
    iso = change.isolation
    assert (iso.key, iso.scoped, iso.tags) == ("bad", False, None)
    assert iso.covers("bad", "api")
    assert iso.covers("bad", None)


def _isolated_at(detector: Detector) -> float:
    changes = _run(detector, 0.0, 1.0, lambda t: _bad(4) + _good(1))
    assert changes
    return changes[0].isolation.since


def test_lifted_gradually_once_the_pressure_is_gone() -> None:
    detector = Detector()
    since = _isolated_at(detector)
    iso = detector.isolated[(SHAPE, "bad")]
    # Pressure gone (the culprit's connections drained), fast probes.
    start = since + PRESSED_INTERVAL
    events = []
    fractions = []
    t = start
    while t < since + HOLD_FIRST + STEP * (len(RAMP) + 3):
        events += detector.sample(t, _good(1), False)
        if (SHAPE, "bad") in detector.isolated:
            fractions.append(iso.step)
        t += PRESSED_INTERVAL
    assert [c.action for c in events] == ["released"]
    # Isolated for HOLD_FIRST, then one in 8, 4, 2, in that order.
    seen = [s for i, s in enumerate(fractions) if i == 0 or fractions[i - 1] != s]
    assert seen == [None, 0, 1, 2]
    assert (SHAPE, "bad") not in detector.isolated


def test_probing_lets_one_in_n_through() -> None:
    iso = _culprit.Isolation(SHAPE, "bad", share=0.8, slow=1.0, since=0.0, hold=HOLD_FIRST)
    iso.step = 0
    assert sum(iso.admit() for _ in range(80)) == 80 // RAMP[0]
    iso.step = len(RAMP) - 1
    assert sum(iso.admit() for _ in range(80)) == 80 // RAMP[-1]


def test_a_slow_probe_isolates_it_again_for_twice_as_long() -> None:
    detector = Detector()
    since = _isolated_at(detector)
    iso = detector.isolated[(SHAPE, "bad")]
    t = since + HOLD_FIRST + PRESSURE_FOR + 1.5
    assert detector.sample(t, _good(1), False) == []
    assert iso.phase == "probing"
    changes = detector.sample(t + PRESSED_INTERVAL, _bad(1, running=1.5) + _good(1), False)
    assert [c.action for c in changes] == ["isolated"]
    assert iso.phase == "isolated"
    assert iso.hold == 2 * HOLD_FIRST
    assert iso.isolations == 2
    assert detector.isolations[SHAPE] == 2


def test_an_isolation_is_lifted_after_hold_max_even_under_pressure() -> None:
    detector = Detector()
    since = _isolated_at(detector)
    iso = detector.isolated[(SHAPE, "bad")]
    # The pressure never ends (everyone else is slow too), the culprit is gone.
    probing_at = None
    t = since
    while t < since + HOLD_MAX + 1.0 and probing_at is None:
        t += PRESSED_INTERVAL
        detector.sample(t, _good(5, running=0.3), True)
        if iso.phase == "probing":
            probing_at = t
    assert probing_at is not None
    assert HOLD_MAX <= probing_at - since < HOLD_MAX + 2 * PRESSED_INTERVAL


def test_turning_it_off_releases_everything() -> None:
    detector = Detector()
    _isolated_at(detector)
    released = detector.reset()
    assert [(c.action, c.isolation.key) for c in released] == [("released", "bad")]
    assert detector.isolated == {}


def test_samples_come_fast_while_isolation_is_on_and_under_pressure() -> None:
    detector = Detector()
    assert detector.interval() == PRESSED_INTERVAL  # on: a drain must be seen early
    detector.enabled = False  # attribution only: calm samples unless pressed
    detector.sample(0.0, _good(1), False)
    assert detector.interval() == _culprit.CALM_INTERVAL
    detector.sample(1.0, _good(1), True)
    assert detector.interval() == PRESSED_INTERVAL
    detector.sample(1.0 + _culprit.PRESSURE_CLEAR + 0.1, _good(1), False)
    assert detector.interval() == _culprit.CALM_INTERVAL


# -- the early cap: a slow shape bounded before the pool runs dry ----------------------


def _capping(detector: Detector, start: float, seconds: float,
             make: Callable[[float], list[Observation]], *, pressed: bool = False,
             capacity: int = 10) -> list[_culprit.Change]:
    changes = []
    for i in range(round(seconds / PRESSED_INTERVAL) + 1):
        now = start + i * PRESSED_INTERVAL
        changes += detector.sample(now, make(now), pressed, capacity=capacity)
    return changes


def test_a_slow_shape_taking_half_the_pool_is_capped_before_any_pressure() -> None:
    detector = Detector()
    # Four of ten: below the share, nothing, however long.
    assert _capping(detector, 0.0, 3.0, lambda t: _bad(4) + _good(2)) == []
    (change,) = _capping(detector, 3.2, 0.0, lambda t: _bad(5) + _good(2))
    assert change.action == "isolated"
    iso = change.isolation
    assert (iso.kind, iso.key, iso.cap, iso.phase) == (SHAPE, "bad", 5, "capped")
    assert change.held == 5
    assert not detector.pressured()  # capped with no pressure seen at all
    assert iso.bar >= _culprit.MIN_DURATION


def test_the_cap_is_culprit_share_of_the_pool() -> None:
    detector = Detector(share=0.3)
    (change,) = _capping(detector, 0.0, 1.0, lambda t: _bad(3) + _good(2))
    assert change.isolation.cap == 3


def test_nothing_is_capped_when_every_shape_is_slow_alike_or_the_pool_is_tiny() -> None:
    alike = Detector()
    slow_too = lambda t: _bad(5) + _good(4, running=2.0, shape="other")  # noqa: E731
    assert _capping(alike, 0.0, 5.0, slow_too) == []
    fast = Detector()  # held by a shape whose statements are fast: no culprit
    assert _capping(fast, 0.0, 5.0, lambda t: _good(8) + _good(1, shape="x")) == []
    tiny = Detector()  # a pool of two: half of it is the whole of MIN_HELD
    assert _capping(tiny, 0.0, 5.0, lambda t: _bad(2) + _good(1), capacity=2) == []
    unbounded = Detector()
    changes = []
    for i in range(20):
        changes += unbounded.sample(i * PRESSED_INTERVAL, _bad(5) + _good(2), False)
    assert changes == []


def test_a_cap_is_lifted_once_none_of_its_statements_runs_slow() -> None:
    detector = Detector()
    (capped,) = _capping(detector, 0.0, 1.0, lambda t: _bad(5) + _good(2))
    since = capped.isolation.since
    # Still running slow past its hold time: kept.
    assert _capping(detector, since + 0.2, HOLD_FIRST + 1.0, lambda t: _bad(5) + _good(2)) == []
    # Its statements are gone: released at the next sample.
    (released,) = _capping(detector, since + HOLD_FIRST + 1.4, 0.0, lambda t: _good(2))
    assert released.action == "released"
    assert released.isolation is capped.isolation
    assert detector.isolated == {}


def test_a_capped_shape_is_isolated_when_the_pressure_stands_all_the_same() -> None:
    detector = Detector()
    (capped,) = _capping(detector, 0.0, 1.0, lambda t: _bad(5) + _good(2))
    assert capped.isolation.cap == 5
    changes = _capping(detector, 1.2, PRESSURE_FOR + PRESSED_INTERVAL,
                       lambda t: _bad(5) + _good(2), pressed=True)
    assert [(c.action, c.isolation.cap) for c in changes] == [("isolated", None)]
    iso = changes[0].isolation
    assert iso.phase == "isolated"
    assert iso.isolations == 2
    assert detector.isolated[(SHAPE, "bad")] is iso


def test_the_shed_summary_is_rate_limited_and_loses_no_count() -> None:
    summary = ShedSummary()
    for _ in range(3):
        summary.add("queue_delay", "normal")
    with poolguard.request(tag="reports", priority="background"):
        summary.add("culprit", "background")
    first = summary.take(100.0)
    assert first == {("queue_delay", "normal", None): 3, ("culprit", "background", "reports"): 1}
    summary.add("queue_full", "normal")
    assert summary.take(100.0 + _culprit.SHED_SUMMARY_EVERY / 2) is None  # too soon: kept
    summary.add("queue_full", "normal")
    assert summary.take(100.0 + _culprit.SHED_SUMMARY_EVERY) == {("queue_full", "normal", None): 2}
    assert summary.take(1000.0) is None  # nothing since
    assert summary.total == 5  # culprit isolation's own sheds are no sign of pressure


# -- real PostgreSQL ---------------------------------------------------------------------

SLEEP = sa.text("SELECT pg_sleep(:s)")
FAST = sa.text("SELECT 1")
POOL = 4


class Load:
    """Threads in a closed loop: ``run(fn)`` starts one; :meth:`stop` joins them all."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: dict[str, int] = {}
        self.ok = 0
        self.lock = threading.Lock()

    def run(
        self, fn: Callable[[], None], *, tag: str | None = None, priority: str = "normal"
    ) -> None:
        def loop() -> None:
            while not self.stopping.is_set():
                try:
                    with poolguard.request(tag=tag, priority=priority):
                        fn()
                except sa.exc.SQLAlchemyError as exc:  # noqa: PERF203 - one per call
                    name = getattr(exc, "reason", None) or type(exc).__name__
                    with self.lock:
                        self.errors[name] = self.errors.get(name, 0) + 1
                    time.sleep(0.02)
                else:
                    with self.lock:
                        self.ok += 1

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)
        assert not any(t.is_alive() for t in self.threads)


@pytest.fixture
def load() -> Iterator[Load]:
    running = Load()
    yield running
    running.stop()


def _engine(make_engine: EngineFactory, url: str, **options: Any) -> Engine:
    return make_engine(
        url, POOL, max_overflow=0, isolate_culprits=True, acquire_timeout=1.0, **options
    )


def _execute(engine: Engine, statement: sa.TextClause, **params: Any) -> Callable[[], None]:
    def run() -> None:
        with engine.connect() as conn:
            conn.execute(statement, params)
            conn.rollback()

    return run


def _isolated(engine: Engine) -> list[_culprit.Isolation]:
    return poolguard.get_guard(engine).culprits.isolated()


def _named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


@pytest.mark.timing
def test_pg_an_untagged_slow_shape_is_isolated_and_its_statements_shed(
    make_engine: EngineFactory,
    postgresql_url: str,
    load: Load,
    events: list[dict[str, Any]],
) -> None:
    engine = _engine(make_engine, postgresql_url, capture_call_sites=True)
    for _ in range(POOL):
        load.run(_execute(engine, SLEEP, s=1.5))
    for _ in range(2):
        load.run(_execute(engine, FAST))
    wait_until(lambda: _isolated(engine), "the slow shape isolated", timeout=10)
    (iso,) = _isolated(engine)
    assert iso.kind == SHAPE
    # The isolation is in place before its event is logged (outside the lock).
    wait_until(lambda: _named(events, "culprit.isolated"), "the event logged")
    (event,) = _named(events, "culprit.isolated")
    assert event["shape"] == iso.key
    assert "pg_sleep" in event["statement"]
    assert event["share"] >= 0.5
    assert event["size"] == POOL
    assert event["site"] is not None
    assert "test_culprit" in event["site"]
    # New executions fail at once, before they are sent, naming the shape.
    with engine.connect() as conn:
        start = time.perf_counter()
        with pytest.raises(poolguard.LoadShed) as shed:
            conn.execute(SLEEP, {"s": 1.5})
        assert time.perf_counter() - start < 1.0
        conn.rollback()
        assert conn.execute(FAST).scalar_one() == 1  # the connection is fine
    assert shed.value.reason == "culprit"
    assert iso.key in str(shed.value)
    assert "pg_sleep" in str(shed.value)
    assert "test_culprit" in str(shed.value)  # its call site
    # The fast traffic is served again.
    served = load.ok
    wait_until(lambda: load.ok > served + 20, "fast statements served")
    assert poolguard.get_guard(engine).rejections.get(("culprit", "normal"), 0) >= 1


@pytest.mark.timing
def test_pg_a_tag_holding_its_connections_is_shed_at_checkout(
    make_engine: EngineFactory,
    postgresql_url: str,
    load: Load,
    events: list[dict[str, Any]],
) -> None:
    engine = _engine(make_engine, postgresql_url)

    def idle_in_transaction() -> None:
        with engine.connect() as conn:
            conn.execute(FAST)
            time.sleep(1.5)  # holds the connection, runs nothing: no shape is slow

    for _ in range(POOL):
        load.run(idle_in_transaction, tag="reports")
    for _ in range(2):
        load.run(_execute(engine, FAST), tag="api")
    wait_until(lambda: _isolated(engine), "the tag isolated", timeout=10)
    (iso,) = _isolated(engine)
    assert (iso.kind, iso.key) == (TAG, "reports")
    # The isolation is in place before its event is logged (outside the lock).
    wait_until(lambda: _named(events, "culprit.isolated"), "the event logged")
    (event,) = _named(events, "culprit.isolated")
    assert event["tag"] == "reports"
    with poolguard.request(tag="reports"), pytest.raises(poolguard.LoadShed) as shed:
        engine.connect()
    assert shed.value.reason == "culprit"
    assert "'reports'" in str(shed.value)
    # Priority protects requests: a critical one of the same tag is served.
    with poolguard.request(tag="reports", priority="critical"), engine.connect() as conn:
        assert conn.execute(FAST).scalar_one() == 1


@pytest.mark.timing
def test_pg_a_critical_request_is_shed_for_the_culprit_shape_only(
    make_engine: EngineFactory,
    postgresql_url: str,
    load: Load,
) -> None:
    engine = _engine(make_engine, postgresql_url, reserved_critical=1)
    for _ in range(POOL):
        load.run(_execute(engine, SLEEP, s=1.5), tag="login", priority="critical")
    for _ in range(2):
        load.run(_execute(engine, FAST), tag="login", priority="critical")
    # Isolated, not only capped: a cap sheds the shape only while `cap` of its
    # statements run, and the load's sleeps all end (and start again) at once,
    # so a capped shape may let this request's statement through. An
    # isolation sheds every statement of the shape for its hold time (2 s).
    wait_until(lambda: any(i.cap is None for i in _isolated(engine)),
               "the slow shape isolated", timeout=10)
    assert [i.kind for i in _isolated(engine)] == [SHAPE]
    with poolguard.request(tag="login", priority="critical"), engine.connect() as conn:
        assert conn.execute(FAST).scalar_one() == 1
        with pytest.raises(poolguard.LoadShed) as shed:
            conn.execute(SLEEP, {"s": 1.5})
        assert conn.execute(sa.text("SELECT 2")).scalar_one() == 2
    assert shed.value.priority == "critical"
    assert shed.value.reason == "culprit"


@pytest.mark.timing
def test_pg_a_shape_slow_in_one_tag_and_fast_in_another_is_shed_in_the_slow_one_only(
    make_engine: EngineFactory,
    postgresql_url: str,
    load: Load,
) -> None:
    # The same statement text: seconds in "report", a millisecond in "api",
    # whose transactions then go on for a while (a good share of the
    # shape's connection-seconds, none of it running slow).
    engine = _engine(make_engine, postgresql_url)

    def api() -> None:
        with engine.connect() as conn:
            conn.execute(SLEEP, {"s": 0.001})
            time.sleep(1.0)
            conn.rollback()

    for _ in range(2):
        load.run(_execute(engine, SLEEP, s=1.5), tag="report")
    for _ in range(2):
        load.run(api, tag="api")
    load.run(_execute(engine, FAST), tag="web")
    wait_until(lambda: _isolated(engine), "the slow shape isolated", timeout=10)
    iso = _isolated(engine)[0]
    assert (iso.kind, iso.tags) == (SHAPE, {"report"})
    with poolguard.request(tag="api"), engine.connect() as conn:
        conn.execute(SLEEP, {"s": 0.001})
        conn.rollback()
    with poolguard.request(tag="report"), engine.connect() as conn:
        with pytest.raises(poolguard.LoadShed) as shed:
            conn.execute(SLEEP, {"s": 0.001})
        conn.rollback()
    assert "'report' only" in str(shed.value)


@pytest.mark.timing
def test_pg_lifted_gradually_after_the_storm(
    make_engine: EngineFactory,
    postgresql_url: str,
    load: Load,
    events: list[dict[str, Any]],
) -> None:
    engine = _engine(make_engine, postgresql_url)
    storm = threading.Event()
    storm.set()

    def culprit() -> None:
        # The same shape, slow during the storm, fast after it.
        with engine.connect() as conn:
            conn.execute(SLEEP, {"s": 1.5 if storm.is_set() else 0.0})

    for _ in range(POOL):
        load.run(culprit)
    for _ in range(2):
        load.run(_execute(engine, FAST))
    wait_until(lambda: _isolated(engine), "the slow shape isolated", timeout=10)
    storm.clear()
    shed_before = load.errors.get("culprit", 0)
    wait_until(
        lambda: _named(events, "culprit.released"),
        "the isolation lifted",
        timeout=HOLD_FIRST + STEP * len(RAMP) + 10,
    )
    assert _isolated(engine) == []
    (released,) = _named(events, "culprit.released")
    assert "pg_sleep" in released["statement"]
    # While it was lifted some of its executions went through, others were shed.
    assert load.errors.get("culprit", 0) > shed_before
    ok = load.ok
    wait_until(lambda: load.ok > ok + 20, "the shape served again")


@pytest.mark.timing
def test_pg_no_culprit_when_the_database_is_slow_for_everyone(
    make_engine: EngineFactory,
    postgresql_url: str,
    load: Load,
    events: list[dict[str, Any]],
) -> None:
    engine = _engine(make_engine, postgresql_url, codel=True, codel_target=0.05)
    shapes = [
        sa.text("SELECT pg_sleep(:s)"),
        sa.text("SELECT pg_sleep(:s), 1"),
        sa.text("SELECT pg_sleep(:s), 2"),
    ]
    for i in range(3 * POOL):
        load.run(_execute(engine, shapes[i % 3], s=0.3))
    time.sleep(5.0)
    guard = poolguard.get_guard(engine)
    assert guard.culprits.detector.standing(time.perf_counter())  # under pressure all along
    assert _isolated(engine) == []
    assert _named(events, "culprit.isolated") == []
    # CoDel (and the acquire timeout) do the shedding instead.
    assert load.errors.get("queue_delay", 0) + load.errors.get("PoolTimeout", 0) > 0
    assert "culprit" not in load.errors


def test_pg_load_shed_summary_is_logged_from_the_scan(
    make_engine: EngineFactory,
    postgresql_url: str,
    events: list[dict[str, Any]],
) -> None:
    engine = make_engine(postgresql_url, 1, max_overflow=0, max_waiting_normal=0)
    guard = poolguard.get_guard(engine)
    with engine.connect():
        for _ in range(3):
            with poolguard.request(tag="api"), pytest.raises(poolguard.LoadShed):
                engine.connect()
    guard.scan()
    (summary,) = _named(events, "load.shed")
    assert summary["shed"] == 3
    assert summary["by_reason"] == {"queue_full": 3}
    assert summary["by_tag"] == {"api": 3}
    guard.scan()
    assert len(_named(events, "load.shed")) == 1  # nothing new: no second event


@pytest.mark.timing
def test_pg_a_slow_shape_is_capped_at_half_the_pool_and_the_rest_keeps_flowing(
    make_engine: EngineFactory,
    postgresql_url: str,
    load: Load,
    events: list[dict[str, Any]],
) -> None:
    size = 8
    engine = make_engine(postgresql_url, size, max_overflow=0, isolate_culprits=True,
                         acquire_timeout=1.0)
    watcher = sa.create_engine(postgresql_url, poolclass=sa.pool.NullPool)

    def running_slow() -> int:
        with watcher.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                "AND query LIKE 'SELECT pg_sleep%' AND datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )).scalar_one())

    try:
        load.run(_execute(engine, FAST))
        # More callers of the slow shape than its cap, too few to fill the
        # pool: no pressure ever, what is seen is the cap alone.
        for _ in range(size // 2 + 2):
            load.run(_execute(engine, SLEEP, s=1.0))
            time.sleep(0.05)
        wait_until(lambda: _isolated(engine), "the slow shape capped", timeout=10)
        (iso,) = _isolated(engine)
        assert (iso.kind, iso.cap) == (SHAPE, size // 2)
        # The isolation is in place before its event is logged (outside the lock).
        wait_until(lambda: _named(events, "culprit.isolated"), "the event logged")
        (event,) = _named(events, "culprit.isolated")
        assert event["cap"] == size // 2
        assert "pg_sleep" in event["statement"]
        # Once the statements that ran before the cap are over (1 s each), the
        # database never runs more than the cap at once (one more: two callers
        # racing at cap - 1), while the fast traffic goes on.
        time.sleep(1.5)
        served = load.ok
        most = max(running_slow() for _ in range(30))
        assert most <= size // 2 + 1
        assert most >= 1  # the culprit still runs, within its cap
        wait_until(lambda: load.ok > served + 50, "fast statements served")
        assert load.errors.get("culprit", 0) > 0
        assert "PoolTimeout" not in load.errors
        assert _isolated(engine)[0].cap == size // 2  # never escalated: no pressure
    finally:
        load.stop()
        watcher.dispose()
    # Its callers gone, the cap is lifted (after its hold time).
    wait_until(lambda: not _isolated(engine) or _touch(engine), "the cap lifted", timeout=15)
    wait_until(lambda: _named(events, "culprit.released"), "the release logged")
    released = _named(events, "culprit.released")
    assert [e["cap"] for e in released] == [size // 2]


def _touch(engine: Engine) -> bool:
    """A checkout: the samples ride on checkouts; False to keep waiting."""
    with engine.connect() as conn:
        conn.execute(FAST)
    return False
