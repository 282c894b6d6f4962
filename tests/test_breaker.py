"""The circuit breaker: the pure state machine, its classifier, and through an engine.

The state machine (:class:`poolguard.breaker.CircuitBreaker`) is driven with
explicit times: nothing here sleeps. A Hypothesis state machine checks it
against a reference model of the sliding window, that only legal transitions
happen, and that exactly ``half_open_calls`` probes pass in half-open.

Through an engine (SQLite, a ``creator`` that can be switched to fail, and a
clock the test moves forward): what callers see while it is open, that it
never dials then, its events, and that permits balance.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy.pool import NullPool, QueuePool

import poolguard
from _support import EngineFactory, FakeClock, named
from poolguard import _breakers as breakers_module
from poolguard import _checkout as checkout_module
from poolguard import _scan as scan_module
from poolguard.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    CircuitBreaker,
    default_classifier,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

#: poolguard's plain log messages go to the stdlib logger "poolguard", where caplog sees them.
pytestmark = pytest.mark.usefixtures("structlog_unconfigured")

LEGAL = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}


# -- the pure state machine, explicit times ---------------------------------------------


def _breaker(**settings_: Any) -> CircuitBreaker:
    return CircuitBreaker(BreakerConfig(**settings_))


def test_count_window_needs_minimum_calls_then_opens_at_the_failure_rate() -> None:
    b = _breaker(window="count", window_size=4, minimum_calls=4, failure_rate=0.5)
    for t in (1.0, 2.0, 3.0):
        assert b.record(True, 0.01, t) is None  # three failures, but fewer than 4 calls
    assert b.state == CLOSED
    assert b.record(False, 0.01, 4.0) == OPEN  # 3 of 4 failed
    assert b.state == OPEN
    assert b.opened_at == 4.0
    assert b.transitions == {OPEN: 1, HALF_OPEN: 0, CLOSED: 0}


def test_count_window_slides_over_the_last_calls() -> None:
    b = _breaker(window="count", window_size=4, minimum_calls=4, failure_rate=0.5)
    for t in range(4):
        assert b.record(False, 0.01, float(t)) is None
    assert b.record(True, 0.01, 4.0) is None  # S S S F: 25 %
    assert b.state == CLOSED
    assert b.record(True, 0.01, 5.0) == OPEN  # S S F F: the first successes slid out


def test_count_window_below_the_rate_stays_closed() -> None:
    b = _breaker(window="count", window_size=10, minimum_calls=5, failure_rate=0.5)
    for t in range(40):  # one failure in three, forever
        assert b.record(t % 3 == 0, 0.01, float(t)) is None
    assert b.state == CLOSED
    assert b.transitions == {OPEN: 0, HALF_OPEN: 0, CLOSED: 0}


def test_time_window_forgets_calls_older_than_its_seconds() -> None:
    b = _breaker(window="time", window_size=10, minimum_calls=3, failure_rate=0.5)
    assert b.record(True, 0.01, 0.0) is None
    assert b.record(True, 0.01, 1.0) is None
    # Twelve seconds later the two failures have left the window: one success
    # in it, fewer than the minimum, closed (had they stayed: 2/3 failed, open).
    assert b.record(False, 0.01, 12.0) is None
    assert b.state == CLOSED
    assert b.record(True, 0.01, 12.5) is None
    assert b.record(True, 0.01, 13.0) == OPEN  # 2 of 3 within the last 10 s


def test_time_window_counts_every_call_within_its_seconds() -> None:
    b = _breaker(window="time", window_size=10, minimum_calls=4, failure_rate=0.5)
    assert b.record(True, 0.01, 100.0) is None
    assert b.record(False, 0.01, 103.0) is None
    assert b.record(False, 0.01, 106.0) is None
    assert b.record(True, 0.01, 109.5) == OPEN  # all four within 10 s: 50 %


def test_slow_call_rate_opens_it_and_the_duration_threshold_is_inclusive() -> None:
    b = _breaker(
        window="count", window_size=4, minimum_calls=4, failure_rate=1.0,
        slow_call_rate=0.5, slow_call_duration=1.0,
    )
    assert b.record(False, 0.999, 1.0) is None  # just under: not slow
    assert b.record(False, 0.1, 2.0) is None
    assert b.record(False, 1.0, 3.0) is None  # exactly the duration: slow
    assert b.state == CLOSED
    assert b.record(False, 5.0, 4.0) == OPEN  # 2 of 4 slow, none failed


def test_open_refuses_until_wait_in_open_then_lets_exactly_the_probes_through() -> None:
    b = _breaker(window="count", window_size=2, minimum_calls=2, wait_in_open=5.0,
                 half_open_calls=3)
    b.record(True, 0.0, 10.0)
    assert b.record(True, 0.0, 10.0) == OPEN
    assert b.retry_after(10.0) == 5.0
    assert b.retry_after(13.0) == pytest.approx(2.0)
    assert b.allow(14.999) == (False, None)
    # A late outcome of a call let through before it opened changes nothing.
    assert b.record(False, 0.0, 14.0) is None
    assert b.state == OPEN
    assert b.allow(15.0) == (True, HALF_OPEN)
    assert b.retry_after(15.0) == 0.0
    assert b.allow(15.1) == (True, None)
    assert b.allow(15.2) == (True, None)
    for t in (15.3, 16.0, 100.0):  # three probes out: nobody else, however long
        assert b.allow(t) == (False, None)
    assert b.state == HALF_OPEN
    assert b.transitions == {OPEN: 1, HALF_OPEN: 1, CLOSED: 0}


def test_probes_that_succeed_close_it_with_a_fresh_window() -> None:
    b = _breaker(window="count", window_size=4, minimum_calls=4, failure_rate=0.5,
                 wait_in_open=1.0, half_open_calls=2)
    for t in range(4):
        b.record(True, 0.0, float(t))
    assert b.state == OPEN
    assert b.allow(4.0) == (True, HALF_OPEN)
    assert b.allow(4.0) == (True, None)
    assert b.record(False, 0.0, 4.1) is None  # one of two probes in: not evaluated yet
    assert b.state == HALF_OPEN
    assert b.record(False, 0.0, 4.2) == CLOSED
    # The window was cleared: three failures are below the minimum again.
    for t in (5.0, 6.0, 7.0):
        assert b.record(True, 0.0, t) is None
    assert b.state == CLOSED
    assert b.transitions == {OPEN: 1, HALF_OPEN: 1, CLOSED: 1}


def test_probes_that_fail_reopen_it_and_restart_the_wait() -> None:
    b = _breaker(window="count", window_size=2, minimum_calls=2, failure_rate=0.5,
                 wait_in_open=1.0, half_open_calls=2)
    b.record(True, 0.0, 0.0)
    b.record(True, 0.0, 0.0)
    assert b.allow(1.0) == (True, HALF_OPEN)
    assert b.allow(1.0) == (True, None)
    assert b.record(False, 0.0, 1.5) is None
    assert b.record(True, 0.0, 1.6) == OPEN  # 1 of 2 probes failed: 50 %
    assert b.opened_at == 1.6
    assert b.allow(2.5) == (False, None)  # the wait starts over from the reopening
    assert b.allow(2.6) == (True, HALF_OPEN)
    assert b.transitions == {OPEN: 2, HALF_OPEN: 2, CLOSED: 0}


def test_slow_probes_reopen_it() -> None:
    b = _breaker(window="count", window_size=1, minimum_calls=1, failure_rate=1.0,
                 slow_call_rate=1.0, slow_call_duration=0.5, wait_in_open=1.0,
                 half_open_calls=1)
    assert b.record(False, 0.6, 0.0) == OPEN
    assert b.allow(1.0) == (True, HALF_OPEN)
    assert b.record(False, 0.7, 1.5) == OPEN


# -- the default classifier on real exceptions ---------------------------------------------


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    yield engine
    engine.dispose()


def _raised(fn: Callable[[], object]) -> BaseException:
    try:
        fn()
    except BaseException as error:
        return error
    raise AssertionError("expected an exception")


def test_classifier_integrity_and_programming_errors_are_not_failures(
    sqlite_engine: Engine,
) -> None:
    def duplicate() -> None:
        with sqlite_engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")

    def bad_bindings() -> None:
        with sqlite_engine.connect() as conn:
            conn.exec_driver_sql("SELECT ?, ?", (1,))

    integrity = _raised(duplicate)
    programming = _raised(bad_bindings)
    assert isinstance(integrity, sa.exc.IntegrityError)
    assert isinstance(programming, sa.exc.ProgrammingError)
    assert not programming.connection_invalidated
    for error in (integrity, programming):
        assert default_classifier(error) is False
        assert isinstance(error, sa.exc.DBAPIError)
        assert default_classifier(error.orig) is False  # the raw driver error too


def test_classifier_connect_failures_are_failures(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    try:
        error = _raised(engine.connect)
    finally:
        engine.dispose()
    assert isinstance(error, sa.exc.OperationalError)
    assert default_classifier(error) is True
    assert isinstance(error.orig, sqlite3.OperationalError)
    assert default_classifier(error.orig) is True


def test_classifier_a_disconnect_is_a_failure_whatever_its_class(sqlite_engine: Engine) -> None:
    # pysqlite reports a closed connection as a ProgrammingError, which
    # SQLAlchemy recognises as a disconnect: the disconnect wins.
    with sqlite_engine.connect() as conn:
        conn.connection.dbapi_connection.close()  # type: ignore[union-attr]
        error = _raised(lambda: conn.exec_driver_sql("SELECT 1"))
    assert isinstance(error, sa.exc.ProgrammingError)
    assert error.connection_invalidated is True
    assert default_classifier(error) is True


def test_classifier_pool_timeout_and_statement_timeout_are_failures(sqlite_url: str) -> None:
    engine = poolguard.wrap(
        sa.create_engine(sqlite_url, poolclass=QueuePool, pool_size=1, max_overflow=0),
        acquire_timeout=0.01, statement_timeout=0.05,
    )
    try:
        with engine.connect() as conn:
            timeout = _raised(engine.connect)
            cancelled = _raised(lambda: conn.exec_driver_sql(
                "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) "
                "SELECT count(*) FROM r"
            ))
        assert isinstance(timeout, poolguard.PoolTimeout)
        assert isinstance(cancelled, poolguard.StatementTimeout)
        assert default_classifier(timeout) is True
        assert default_classifier(cancelled) is True
        assert poolguard.get_guard(engine).stats().permits == 0
    finally:
        engine.dispose()


@pytest.mark.postgresql
def test_classifier_on_postgresql_errors(postgresql_url: str) -> None:
    import psycopg

    engine = sa.create_engine(postgresql_url, pool_size=2, max_overflow=0)
    try:
        def run(sql: str) -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql(sql)

        programming = _raised(lambda: run("SELECT * FROM poolguard_no_such_table"))
        data = _raised(lambda: run("SELECT 1 / 0"))
        cancelled = _raised(
            lambda: run("SET statement_timeout = 20; SELECT pg_sleep(2)")
        )
        with engine.connect() as victim:
            pid = victim.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            with engine.connect() as admin:
                admin.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
            disconnect = _raised(lambda: victim.exec_driver_sql("SELECT 1"))
    finally:
        engine.dispose()
    assert isinstance(programming, sa.exc.ProgrammingError)
    assert isinstance(data, sa.exc.DataError)
    assert isinstance(cancelled, sa.exc.OperationalError)
    assert isinstance(cancelled.orig, psycopg.errors.QueryCanceled)
    assert isinstance(disconnect, sa.exc.OperationalError)
    assert disconnect.connection_invalidated is True
    assert default_classifier(programming) is False
    assert default_classifier(programming.orig) is False
    assert default_classifier(data) is False
    assert default_classifier(cancelled) is True
    assert default_classifier(cancelled.orig) is True  # the raw QueryCanceled
    assert default_classifier(disconnect) is True


# -- through an engine: SQLite, a creator that can fail, a clock moved by hand ----------------


class Dialer:
    """A ``creator`` that counts its calls and fails with ``error`` while set."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.dials = 0
        self.error: BaseException | None = None

    def __call__(self) -> sqlite3.Connection:
        self.dials += 1
        if self.error is not None:
            raise self.error
        return sqlite3.connect(self.path, check_same_thread=False)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The guard's ``perf_counter`` plus what the test advanced it by."""
    fake = FakeClock(base=time.perf_counter)
    for module in (checkout_module, scan_module, breakers_module):
        monkeypatch.setattr(module, "perf_counter", fake)
    return fake


@pytest.fixture
def dialer(tmp_path: Path) -> Dialer:
    path = str(tmp_path / "breaker.sqlite3")
    sqlite3.connect(path).close()
    return Dialer(path)


@pytest.fixture
def make_engine(make_engine: EngineFactory, dialer: Dialer) -> EngineFactory:
    """``make_engine(**wrap_options)``: SQLite through ``dialer``, a dial per checkout."""
    return make_engine.using(pool={"creator": dialer, "poolclass": NullPool}, connect_retries=0)


BREAKER = {
    "breaker": True,
    "breaker_window": "count",
    "breaker_window_size": 4,
    "breaker_minimum_calls": 4,
    "breaker_failure_rate": 0.5,
    "breaker_wait_in_open": 30.0,
    "breaker_half_open_calls": 2,
}


def _names(events: list[dict[str, Any]], prefix: str) -> list[str]:
    return [e["event"] for e in events if e["event"].startswith(prefix)]


def _select_one(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT 1").scalar_one())


def test_open_breaker_fails_fast_without_dialing_then_recovers(
    make_engine: EngineFactory, dialer: Dialer, clock: FakeClock,
    events: list[dict[str, Any]],
) -> None:
    engine = make_engine(**BREAKER)
    guard = poolguard.get_guard(engine)
    dialer.error = sqlite3.OperationalError("unable to open database file (injected)")
    for _ in range(4):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    assert guard.breaker is not None
    assert guard.breaker.state == OPEN
    dials = dialer.dials
    assert dials == 4

    for _ in range(20):
        with pytest.raises(poolguard.CircuitOpen) as info:
            engine.connect()
    error = info.value
    assert isinstance(error, poolguard.Rejected)
    assert isinstance(error, sa.exc.TimeoutError)
    assert error.reason == "circuit_open"
    assert 0 < error.retry_after <= 30.0
    assert dialer.dials == dials  # never dialed while open
    assert guard.rejections[("circuit_open", "normal")] == 20

    clock.advance(31.0)
    dialer.error = None
    assert _select_one(engine) == 1  # a probe: half-open, then closed by its successes
    assert guard.breaker.state == CLOSED
    assert _select_one(engine) == 1
    assert guard.breaker.transitions == {OPEN: 1, HALF_OPEN: 1, CLOSED: 1}
    assert _names(events, "breaker.") == ["breaker.open", "breaker.half_open", "breaker.closed"]
    (opened,) = named(events, "breaker.open")
    assert opened["level"] == "warning"
    stats = guard.stats()
    assert stats.permits == 0
    assert guard.hooks.tripped is False


def test_half_open_lets_exactly_the_probes_dial_and_failed_probes_reopen(
    make_engine: EngineFactory, dialer: Dialer, clock: FakeClock,
    events: list[dict[str, Any]],
) -> None:
    engine = make_engine(**BREAKER)
    guard = poolguard.get_guard(engine)
    dialer.error = sqlite3.OperationalError("unable to open database file (injected)")
    for _ in range(4):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    assert guard.breaker is not None
    assert guard.breaker.state == OPEN

    clock.advance(31.0)
    dials = dialer.dials
    for _ in range(2):  # the two probes dial, and fail
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    assert dialer.dials == dials + 2
    assert guard.breaker.state == OPEN  # reopened by its probes
    for _ in range(10):
        with pytest.raises(poolguard.CircuitOpen):
            engine.connect()
    assert dialer.dials == dials + 2
    assert guard.breaker.transitions == {OPEN: 2, HALF_OPEN: 1, CLOSED: 0}
    assert _names(events, "breaker.") == ["breaker.open", "breaker.half_open", "breaker.open"]
    assert guard.stats().permits == 0


def test_breaker_counts_failed_statements_and_ignores_request_errors(
    make_engine: EngineFactory, dialer: Dialer, clock: FakeClock,
) -> None:
    engine = make_engine(**BREAKER)
    guard = poolguard.get_guard(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    for _ in range(10):  # the database answered: integrity errors are not failures
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    assert guard.breaker is not None
    assert guard.breaker.state == CLOSED
    assert guard.stats().permits == 0


def test_custom_classifier_decides_what_is_a_failure(
    make_engine: EngineFactory, dialer: Dialer, clock: FakeClock,
) -> None:
    seen: list[BaseException] = []

    def never(error: BaseException) -> bool:
        seen.append(error)
        return False

    engine = make_engine(**BREAKER, breaker_classifier=never)
    guard = poolguard.get_guard(engine)
    dialer.error = sqlite3.OperationalError("unable to open database file (injected)")
    for _ in range(12):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    assert guard.breaker is not None
    assert guard.breaker.state == CLOSED
    assert len(seen) == 12
    # SQLAlchemy's exception, as the caller sees it: the driver's in .orig.
    assert all(isinstance(e, sa.exc.OperationalError) for e in seen)
    assert all(isinstance(e.orig, sqlite3.OperationalError) for e in seen)  # type: ignore[attr-defined]
    assert dialer.dials == 12

    # The other way round: programming errors from the creator are not
    # failures by default, but are for this classifier.
    dialer.error = sqlite3.ProgrammingError("injected")
    default = make_engine(**BREAKER)
    for _ in range(6):
        with pytest.raises(sa.exc.ProgrammingError):
            default.connect()
    default_guard = poolguard.get_guard(default)
    assert default_guard.breaker is not None
    assert default_guard.breaker.state == CLOSED

    strict = make_engine(
        **BREAKER,
        breaker_classifier=lambda e: isinstance(getattr(e, "orig", None), sqlite3.ProgrammingError),
    )
    for _ in range(4):
        with pytest.raises(sa.exc.ProgrammingError):
            strict.connect()
    with pytest.raises(poolguard.CircuitOpen):
        strict.connect()
    for engine_ in (engine, default, strict):
        assert poolguard.get_guard(engine_).stats().permits == 0


def test_a_probe_shed_at_the_gate_does_not_strand_the_breaker_half_open(
    dialer: Dialer, clock: FakeClock,
) -> None:
    # Half-open probes that are shed (the pool is full, nobody may wait) never
    # reach the database: their outcome never comes. They must give their
    # probe slot back, or the breaker stays half-open with no probe left,
    # refusing every checkout forever.
    engine = poolguard.wrap(
        sa.create_engine("sqlite://", creator=dialer, poolclass=QueuePool,
                         pool_size=1, max_overflow=0),
        breaker=True, breaker_window_size=2, breaker_minimum_calls=2,
        breaker_wait_in_open=1.0, breaker_half_open_calls=2,
        statement_timeout=0.05, max_waiting_normal=0, connect_retries=0,
    )
    guard = poolguard.get_guard(engine)
    try:
        held = engine.connect()
        for _ in range(2):  # two statement timeouts open the breaker
            with pytest.raises(poolguard.StatementTimeout):
                held.exec_driver_sql(
                    "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) "
                    "SELECT count(*) FROM r"
                )
            held.rollback()
        assert guard.breaker is not None
        assert guard.breaker.state == OPEN
        clock.advance(2.0)
        for _ in range(3):  # probes admitted, then shed: the only connection is held
            with pytest.raises(poolguard.LoadShed):
                engine.connect()
        held.close()
        clock.advance(3600.0)
        assert _select_one(engine) == 1  # a probe goes through and closes it
        assert guard.breaker.state == CLOSED
        assert guard.stats().permits == 0
    finally:
        engine.dispose()


def test_breaker_off_never_raises_circuit_open(
    make_engine: EngineFactory, dialer: Dialer,
) -> None:
    engine = make_engine()
    dialer.error = sqlite3.OperationalError("unable to open database file (injected)")
    for _ in range(30):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    guard = poolguard.get_guard(engine)
    assert guard.breaker is None
    assert dialer.dials == 30
    assert guard.stats().permits == 0


# -- Hypothesis: legal transitions and exactly the configured probes ------------------------


class BreakerMachine(RuleBasedStateMachine):
    """Drives allow/record/advance on one breaker against a reference model.

    Calls are modelled: ``allow`` that says yes starts a call, ``finish``
    records the outcome of one started call (possibly in a later state, as
    a slow call does), ``shed_probe`` gives back a half-open probe that was
    shed before it reached the database (``forfeit``, as the guard does).
    The reference recomputes the window from scratch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.epoch = 0  # half-open periods entered so far
        #: Calls let through and not finished: the half-open period they probe
        #: (its epoch), or 0 for a call let through while closed.
        self.calls: list[int] = []
        self.history: list[tuple[float, bool, bool]] = []  # since the last close
        self.probes_allowed = 0
        self.probe_outcomes: list[tuple[bool, bool]] = []
        self.seen = {OPEN: 0, HALF_OPEN: 0, CLOSED: 0}

    @initialize(
        window=st.sampled_from(["count", "time"]),
        window_size=st.integers(min_value=1, max_value=6),
        minimum_calls=st.integers(min_value=1, max_value=6),
        failure_rate=st.sampled_from([0.25, 0.5, 1.0]),
        slow_call_rate=st.sampled_from([0.5, 1.0]),
        slow_call_duration=st.sampled_from([0.5, 2.0]),
        wait_in_open=st.sampled_from([0.5, 1.0, 5.0]),
        half_open_calls=st.integers(min_value=1, max_value=4),
    )
    def setup(self, **settings_: Any) -> None:
        self.config = BreakerConfig(**settings_)
        self.breaker = CircuitBreaker(self.config)

    # -- the reference model of the closed state's window --

    def _should_open(self) -> bool:
        cfg = self.config
        if cfg.window == "count":
            window = self.history[-cfg.window_size:]
        else:
            horizon = self.now - cfg.window_size
            window = [h for h in self.history if float(int(h[0])) > horizon]
        calls = len(window)
        if calls < cfg.minimum_calls:
            return False
        failures = sum(1 for _, failed, _ in window if failed)
        slow = sum(1 for _, _, is_slow in window if is_slow)
        return failures / calls >= cfg.failure_rate or slow / calls >= cfg.slow_call_rate

    def _transition(self, before: str, entered: str | None) -> None:
        after = self.breaker.state
        if entered is None:
            assert after == before, (before, after)
        else:
            assert entered == after
            assert (before, after) in LEGAL, (before, after)
            self.seen[after] += 1
            if after == CLOSED:
                self.history.clear()

    # -- rules --

    @rule(seconds=st.floats(min_value=0.0, max_value=8.0, allow_nan=False))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def allow(self) -> None:
        b = self.breaker
        before = b.state
        allowed, entered = b.allow(self.now)
        if before == OPEN:
            due = self.now >= b.opened_at + self.config.wait_in_open
            assert (entered == HALF_OPEN) == due
            if entered == HALF_OPEN:
                self.probes_allowed = 0
                self.probe_outcomes = []
                self.epoch += 1
        self._transition(before, entered)
        if b.state == HALF_OPEN:
            # Exactly half_open_calls probes, then nobody until an evaluation.
            assert allowed == (self.probes_allowed < self.config.half_open_calls)
            self.probes_allowed += allowed
        elif b.state == OPEN:
            assert not allowed
        else:
            assert allowed
        if allowed:
            self.calls.append(self.epoch if b.state == HALF_OPEN else 0)

    @precondition(lambda self: bool(self.calls))
    @rule(failed=st.booleans(), duration=st.sampled_from([0.0, 0.4, 0.5, 1.0, 2.0, 3.0]),
          pick=st.integers(min_value=0, max_value=64))
    def finish(self, failed: bool, duration: float, pick: int = 0) -> None:
        b = self.breaker
        cfg = self.config
        self.calls.pop(pick % len(self.calls))
        before = b.state
        slow = duration >= cfg.slow_call_duration
        entered = b.record(failed, duration, self.now)
        self._transition(before, entered)
        if before == OPEN:
            assert entered is None  # a late outcome
        elif before == CLOSED:
            self.history.append((self.now, failed, slow))
            assert (entered == OPEN) == self._should_open()
        else:
            self.probe_outcomes.append((failed, slow))
            calls = len(self.probe_outcomes)
            if calls < cfg.half_open_calls:
                assert entered is None  # not evaluated before all probes are in
            else:
                bad = (sum(f for f, _ in self.probe_outcomes) / calls >= cfg.failure_rate
                       or sum(s for _, s in self.probe_outcomes) / calls >= cfg.slow_call_rate)
                assert entered == (OPEN if bad else CLOSED)

    @precondition(lambda self: bool(self.calls))
    @rule()
    def finish_fast_success(self) -> None:
        self.finish(False, 0.0)

    @precondition(lambda self: self.breaker.state == HALF_OPEN and self.epoch in self.calls)
    @rule()
    def shed_probe(self) -> None:
        # A probe of this half-open period shed before reaching the database
        # (the guard forfeits it): it gives its slot back, one more may probe.
        self.calls.remove(self.epoch)
        self.breaker.forfeit()
        self.probes_allowed -= 1
        assert self.breaker.state == HALF_OPEN

    # -- invariants --

    @invariant()
    def transitions_are_counted(self) -> None:
        if hasattr(self, "breaker"):
            assert self.breaker.transitions == self.seen

    @invariant()
    def retry_after_is_bounded(self) -> None:
        if hasattr(self, "breaker"):
            after = self.breaker.retry_after(self.now)
            assert 0.0 <= after <= self.config.wait_in_open + 1e-9  # float rounding
            if self.breaker.state != OPEN:
                assert after == 0.0


BreakerMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBreakerMachine = BreakerMachine.TestCase


# -- probes tied to their checkout; what the classifier sees ---------------------------------


@pytest.mark.postgresql
@pytest.mark.timing
async def test_a_probe_cancelled_at_the_gate_gives_its_slot_back(
    postgresql_url: str, clock: FakeClock,
) -> None:
    # The guard-wide breaker lets one probe through; that probe waits at the
    # gate (the only connection is held) and its task is cancelled. It never
    # reaches the database: unless it gives its slot back, the breaker stays
    # half-open with no probe left and refuses every checkout for good.
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = poolguard.wrap(
        create_async_engine(postgresql_url, pool_size=1, max_overflow=0),  # psycopg, async
        breaker=True, breaker_window_size=2, breaker_minimum_calls=2,
        breaker_wait_in_open=1.0, breaker_half_open_calls=1,
        statement_timeout=0.05, connect_retries=0, acquire_timeout=30.0,
    )
    guard = poolguard.get_guard(engine)
    try:
        held = await engine.connect()
        for _ in range(2):  # two statement timeouts open the breaker
            with pytest.raises(poolguard.StatementTimeout):
                await held.exec_driver_sql("SELECT pg_sleep(2)")
            await held.rollback()
        assert guard.breaker is not None
        assert guard.breaker.state == OPEN
        clock.advance(2.0)

        async def probe() -> None:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")

        task = asyncio.create_task(probe())
        for _ in range(2000):  # admitted as the one probe, then waits at the gate
            if guard.gate.waiting == 1:
                break
            await asyncio.sleep(0.005)
        assert guard.gate.waiting == 1
        assert guard.breaker.state == HALF_OPEN
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await held.close()

        async with engine.connect() as conn:  # a new probe, not CircuitOpen
            assert (await conn.exec_driver_sql("SELECT 1")).scalar_one() == 1
        assert guard.breaker.state == CLOSED
        assert guard.stats().permits == 0
    finally:
        await engine.dispose()


def test_a_probe_whose_checkout_fails_uncounted_or_times_out_leaves_no_slot_behind(
    dialer: Dialer, clock: FakeClock,
) -> None:
    # Every way a probe's checkout can end either records an outcome or
    # gives the slot back: here, failures the classifier does not count (an
    # outcome: the database answered) and an acquire timeout at the gate (a
    # failure: the breaker reopens, and later probes again).
    engine = poolguard.wrap(
        sa.create_engine("sqlite://", creator=dialer, poolclass=QueuePool,
                         pool_size=1, max_overflow=0),
        **{**BREAKER, "breaker_half_open_calls": 1, "breaker_wait_in_open": 1.0},
        acquire_timeout=0.05, connect_retries=0,
    )
    guard = poolguard.get_guard(engine)
    breaker = guard.breaker
    assert breaker is not None
    try:
        dialer.error = sqlite3.OperationalError("unable to open database file (injected)")
        for _ in range(4):
            with pytest.raises(sa.exc.OperationalError):
                engine.connect()
        assert breaker.state == OPEN
        clock.advance(2.0)
        dialer.error = sqlite3.ProgrammingError("injected: not a database failure")
        with pytest.raises(sa.exc.ProgrammingError):
            engine.connect()  # the probe: an outcome the classifier does not count
        assert breaker.state == CLOSED

        dialer.error = None
        held = engine.connect()  # holds the only connection: every other checkout times out
        for _ in range(4):
            with pytest.raises(poolguard.PoolTimeout):
                engine.connect()
        assert breaker.state == OPEN
        clock.advance(2.0)
        with pytest.raises(poolguard.PoolTimeout):
            engine.connect()  # the probe times out at the gate: a failure, reopened
        assert breaker.state == OPEN
        held.close()
        clock.advance(2.0)
        assert _select_one(engine) == 1  # probing again, and closed
        assert breaker.state == CLOSED
        assert guard.stats().permits == 0
    finally:
        engine.dispose()


def test_a_classifier_that_raises_never_replaces_the_database_error(
    make_engine: EngineFactory, dialer: Dialer, clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[BaseException] = []

    def broken(error: BaseException) -> bool:
        calls.append(error)
        raise RuntimeError("classifier bug")

    caplog.set_level(logging.INFO, logger="poolguard")
    engine = make_engine(**BREAKER, breaker_classifier=broken)
    guard = poolguard.get_guard(engine)
    dialer.error = sqlite3.OperationalError("unable to open database file (injected)")
    for _ in range(4):
        with pytest.raises(sa.exc.OperationalError) as info:
            engine.connect()
        assert isinstance(info.value.orig, sqlite3.OperationalError)
    assert len(calls) == 4
    logged = [r for r in caplog.records if "breaker_classifier" in r.getMessage()]
    assert len(logged) == 1  # once, not per failure
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
    assert "classifier bug" in str(logged[0].exc_info[1])
    # The default classifier decided instead: connect failures open it.
    assert guard.breaker is not None
    assert guard.breaker.state == OPEN
    assert guard.stats().permits == 0


def test_the_classifier_sees_sqlalchemy_errors_of_failed_statements(
    make_engine: EngineFactory, clock: FakeClock,
) -> None:
    seen: list[BaseException] = []

    def record(error: BaseException) -> bool:
        seen.append(error)
        return False

    engine = make_engine(**BREAKER, breaker_classifier=record)
    with pytest.raises(sa.exc.OperationalError), engine.connect() as conn:
        conn.exec_driver_sql("SELECT * FROM poolguard_no_such_table")
    (error,) = seen
    assert isinstance(error, sa.exc.OperationalError)
    assert isinstance(error.orig, sqlite3.OperationalError)
    assert "no such table" in str(error.orig)


@pytest.mark.postgresql
def test_the_classifier_sees_sqlalchemy_errors_on_postgresql(postgresql_url: str) -> None:
    import psycopg

    seen: list[BaseException] = []

    def record(error: BaseException) -> bool:
        seen.append(error)
        return default_classifier(error)

    engine = poolguard.wrap(
        sa.create_engine(postgresql_url, pool_size=1, max_overflow=0),
        breaker=True, breaker_classifier=record, statement_timeout=0.05,
    )
    try:
        with pytest.raises(sa.exc.DataError), engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1 / 0")
        with pytest.raises(poolguard.StatementTimeout), engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_sleep(2)")
    finally:
        engine.dispose()
    data, cancelled = seen
    assert isinstance(data, sa.exc.DataError)
    assert isinstance(data.orig, psycopg.errors.DivisionByZero)
    assert default_classifier(data) is False
    assert isinstance(cancelled, sa.exc.OperationalError)
    assert isinstance(cancelled.orig, psycopg.errors.QueryCanceled)
    assert default_classifier(cancelled) is True


@pytest.mark.postgresql
async def test_asyncpg_statement_timeouts_are_failures(asyncpg_url: str) -> None:
    # asyncpg's adapter raises a bare ``Error`` for a cancelled statement; as
    # SQLAlchemy's OperationalError the default classifier counts it.
    from sqlalchemy.ext.asyncio import create_async_engine

    seen: list[BaseException] = []

    def record(error: BaseException) -> bool:
        seen.append(error)
        return default_classifier(error)

    engine = poolguard.wrap(
        create_async_engine(asyncpg_url, pool_size=1, max_overflow=0),
        breaker=True, breaker_window_size=2, breaker_minimum_calls=2,
        breaker_classifier=record, statement_timeout=0.05, connect_retries=0,
    )
    guard = poolguard.get_guard(engine)
    try:
        async with engine.connect() as conn:
            for _ in range(2):
                with pytest.raises(poolguard.StatementTimeout):
                    await conn.exec_driver_sql("SELECT pg_sleep(2)")
                await conn.rollback()
    finally:
        await engine.dispose()
    assert [type(e) for e in seen] == [sa.exc.OperationalError] * 2
    assert guard.breaker is not None
    assert guard.breaker.state == OPEN


def test_reclaim_lets_lost_probes_through_again_only_after_their_time() -> None:
    b = _breaker(window_size=2, minimum_calls=2, wait_in_open=5.0, half_open_calls=2)
    b.record(True, 0.0, 0.0)
    assert b.record(True, 0.0, 1.0) == OPEN
    assert b.allow(6.0) == (True, HALF_OPEN)
    assert b.allow(7.0) == (True, None)
    assert b.record(False, 0.0, 7.5) is None  # one probe reported; the other is lost
    assert b.allow(8.0) == (False, None)
    assert b.reclaim(16.9, after=10.0) == 0  # 10 s after the last probe: not yet
    assert b.allow(16.9) == (False, None)
    assert b.reclaim(17.0, after=10.0) == 1  # only the missing one
    assert b.allow(17.0) == (True, None)
    assert b.allow(17.0) == (False, None)
    assert b.reclaim(18.0, after=10.0) == 0  # the clock restarted with that probe
    assert b.record(False, 0.0, 18.0) == CLOSED
    assert b.reclaim(99.0, after=10.0) == 0  # closed: nothing to reclaim


def test_a_probe_lost_on_an_unseen_path_is_reclaimed(
    make_engine: EngineFactory, dialer: Dialer, clock: FakeClock,
    events: list[dict[str, Any]],
) -> None:
    # Every known path ties the probe to its checkout; the guard still must
    # not trust that with its life: a probe slot taken and never settled
    # (here: taken by hand, its checkout never run) comes back after the
    # probe's acquire wait plus wait_in_open.
    engine = make_engine(**{**BREAKER, "breaker_half_open_calls": 1}, acquire_timeout=2.0)
    guard = poolguard.get_guard(engine)
    breaker = guard.breaker
    assert breaker is not None
    dialer.error = sqlite3.OperationalError("unable to open database file (injected)")
    for _ in range(4):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    dialer.error = None
    clock.advance(31.0)
    guard.breaker_admit(guard.pool)  # the one probe slot, lost
    assert breaker.state == HALF_OPEN
    with pytest.raises(poolguard.CircuitOpen):
        engine.connect()
    clock.advance(30.0 + 2.0 - 0.5)
    with pytest.raises(poolguard.CircuitOpen):
        engine.connect()
    clock.advance(1.0)
    assert _select_one(engine) == 1  # probing again, and closed
    assert breaker.state == CLOSED
    assert _names(events, "breaker.probes_reclaimed") == ["breaker.probes_reclaimed"]
    assert guard.stats().permits == 0


@pytest.mark.timing
def test_a_probe_interrupted_at_the_gate_gives_its_slot_back(
    dialer: Dialer, clock: FakeClock,
) -> None:
    # The synchronous twin of the cancelled probe: Ctrl-C (a real SIGINT, so
    # that it interrupts the blocked wait) while the one probe waits at the gate.
    import signal
    import threading

    main = threading.main_thread()
    assert threading.current_thread() is main
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    engine = poolguard.wrap(
        sa.create_engine("sqlite://", creator=dialer, poolclass=QueuePool,
                         pool_size=1, max_overflow=0),
        **{**BREAKER, "breaker_half_open_calls": 1, "breaker_wait_in_open": 1.0},
        acquire_timeout=0.01, connect_retries=0,
    )
    guard = poolguard.get_guard(engine)
    breaker = guard.breaker
    assert breaker is not None
    interrupter: threading.Thread | None = None
    try:
        held = engine.connect()
        for _ in range(4):  # acquire timeouts open it
            with pytest.raises(poolguard.PoolTimeout):
                engine.connect()
        assert breaker.state == OPEN
        poolguard.wrap(engine, **{**BREAKER, "breaker_half_open_calls": 1,
                                  "breaker_wait_in_open": 1.0},
                       acquire_timeout=30.0, connect_retries=0)  # same breaker, longer waits
        assert guard.breaker is breaker
        clock.advance(2.0)

        def interrupt_once_waiting() -> None:
            for _ in range(4000):
                if guard.gate.waiting == 1:
                    signal.pthread_kill(main.ident, signal.SIGINT)  # type: ignore[arg-type]
                    return
                time.sleep(0.005)

        interrupter = threading.Thread(target=interrupt_once_waiting, daemon=True)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            engine.connect()  # the one probe, interrupted while it waits
        interrupter.join(30.0)
        assert breaker.state == HALF_OPEN
        held.close()
        assert _select_one(engine) == 1  # a new probe, not CircuitOpen
        assert breaker.state == CLOSED
        assert guard.stats().permits == 0
    finally:
        if interrupter is not None:
            interrupter.join(30.0)
        engine.dispose()
