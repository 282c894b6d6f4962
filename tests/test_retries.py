"""Connection retries within a retry budget.

:class:`poolguard._retries.RetryBudget` on its own (a fake ``acquired()``
counter), then through engines whose ``creator`` fails: the dials are
counted, and must stay within the budget, stop at the request's deadline,
skip errors that are not transient, and never repeat a statement.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import poolguard
from _support import EngineFactory, named
from poolguard._retries import RetryBudget

if TYPE_CHECKING:
    from pathlib import Path




# -- the budget's arithmetic --------------------------------------------------------------


class Counter:
    """A fake ``acquired()``: permits granted so far."""

    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        return self.value


def test_budget_starts_with_the_burst_and_denies_past_it() -> None:
    acquired = Counter()
    budget = RetryBudget(0.1, acquired, burst=3.0)
    assert [budget.try_spend() for _ in range(5)] == [True, True, True, False, False]
    assert (budget.spent, budget.denied) == (3, 2)


def test_budget_deposits_ratio_per_checkout() -> None:
    acquired = Counter()
    budget = RetryBudget(0.1, acquired, burst=2.0)
    budget.try_spend()
    budget.try_spend()
    assert not budget.try_spend()
    acquired.value += 9  # 0.9 of a retry: not yet
    assert not budget.try_spend()
    acquired.value += 1  # 1.0
    assert budget.try_spend()
    assert not budget.try_spend()
    acquired.value += 25  # 2.5 deposited, capped at the burst of 2
    assert budget.try_spend()
    assert budget.try_spend()
    assert not budget.try_spend()
    assert (budget.spent, budget.denied) == (5, 4)


def test_budget_counts_each_checkout_once() -> None:
    acquired = Counter()
    budget = RetryBudget(0.5, acquired, burst=1.0)
    assert budget.try_spend()
    acquired.value = 2  # +1 token
    assert budget.try_spend()
    # No new checkouts: asking again deposits nothing.
    assert not budget.try_spend()
    assert not budget.try_spend()
    assert (budget.spent, budget.denied) == (2, 2)


def test_budget_ratio_zero_allows_only_the_burst() -> None:
    acquired = Counter()
    budget = RetryBudget(0.0, acquired, burst=1.0)
    assert budget.try_spend()
    acquired.value = 1000
    assert not budget.try_spend()


def test_budget_counts_from_where_acquired_was_at_creation() -> None:
    acquired = Counter()
    acquired.value = 500  # checkouts before the budget existed deposit nothing
    budget = RetryBudget(0.1, acquired, burst=1.0)
    assert budget.try_spend()
    assert not budget.try_spend()


def test_budget_is_thread_safe() -> None:
    acquired = Counter()
    budget = RetryBudget(0.0, acquired, burst=100.0)
    results: list[bool] = []
    lock = threading.Lock()

    def spend() -> None:
        for _ in range(50):
            ok = budget.try_spend()
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sum(results) == 100
    assert (budget.spent, budget.denied) == (100, 300)


# -- through an engine --------------------------------------------------------------------


class Dialer:
    """A ``creator`` that counts its calls (with their times) and fails while ``error`` is set."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.error: BaseException | None = None
        #: Errors raised by the next dials, one each, before ``error`` applies.
        self.script: list[BaseException] = []
        self.pause = 0.0
        self.times: list[float] = []
        self._lock = threading.Lock()

    @property
    def dials(self) -> int:
        return len(self.times)

    def __call__(self) -> sqlite3.Connection:
        with self._lock:
            self.times.append(time.monotonic())
        if self.pause:
            time.sleep(self.pause)
        if self.script:
            raise self.script.pop(0)
        if self.error is not None:
            raise self.error
        return sqlite3.connect(self.path, check_same_thread=False)


@pytest.fixture
def dialer(tmp_path: Path) -> Dialer:
    path = str(tmp_path / "retries.sqlite3")
    sqlite3.connect(path).close()
    return Dialer(path)


@pytest.fixture
def make_engine(make_engine: EngineFactory, dialer: Dialer) -> EngineFactory:
    """``make_engine(**wrap_options)``: SQLite through ``dialer``, a dial per checkout."""
    return make_engine.using(pool={"creator": dialer, "poolclass": NullPool})


def _retry_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return named(events, "connect.retry")


TRANSIENT = sqlite3.OperationalError("unable to open database file (injected)")
BURST = 10  # RetryBudget's default burst, as the guard builds it


def test_a_burst_of_failing_checkouts_stays_within_the_budget(
    make_engine: EngineFactory, dialer: Dialer, events: list[dict[str, Any]],
) -> None:
    engine = make_engine(connect_retries=3, retry_budget=0.1)
    guard = poolguard.get_guard(engine)
    budget = guard.retry_budget
    assert budget is not None
    dialer.error = TRANSIENT
    n = 60
    per_checkout: list[int] = []
    for _ in range(n):
        before = dialer.dials
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
        per_checkout.append(dialer.dials - before)

    assert dialer.dials <= n + BURST + 0.1 * n
    assert all(1 <= d <= 4 for d in per_checkout)  # one dial, at most three retries
    assert dialer.dials == n + budget.spent  # every retry spent from the budget
    assert budget.spent <= BURST + 0.1 * n
    assert len(_retry_events(events)) == budget.spent
    # Each checkout ended either on a denied retry or with its retries used up.
    exhausted = per_checkout.count(4)
    assert budget.denied == n - exhausted
    # The burst went first (three checkouts with every retry, then one more),
    # after that roughly one retry per ten checkouts.
    assert per_checkout[:3] == [4, 4, 4]
    assert max(per_checkout[10:]) <= 2
    assert guard.stats().permits == 0
    retries = _retry_events(events)
    assert {e["error_type"] for e in retries} == {"OperationalError"}
    assert [e["attempt"] for e in retries[:3]] == [1, 2, 3]
    assert all(e["sleep_ms"] > 0 for e in retries)


def test_concurrent_burst_stays_within_the_budget(
    make_engine: EngineFactory, dialer: Dialer,
) -> None:
    engine = make_engine(connect_retries=3, retry_budget=0.1)
    guard = poolguard.get_guard(engine)
    dialer.error = TRANSIENT
    threads_n, rounds = 16, 4
    errors: list[BaseException] = []
    lock = threading.Lock()

    def checkout() -> None:
        try:
            engine.connect().close()
        except sa.exc.OperationalError as error:
            with lock:
                errors.append(error)

    def work() -> None:
        for _ in range(rounds):
            checkout()

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    n = threads_n * rounds
    assert len(errors) == n
    assert dialer.dials <= n + BURST + 0.1 * n
    assert guard.retry_budget is not None
    assert dialer.dials == n + guard.retry_budget.spent
    assert guard.stats().permits == 0


def test_a_transient_failure_is_retried_and_the_checkout_succeeds(
    make_engine: EngineFactory, dialer: Dialer, events: list[dict[str, Any]],
) -> None:
    engine = make_engine(connect_retries=3, retry_budget=0.1)
    dialer.script = [TRANSIENT, TRANSIENT]
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    assert dialer.dials == 3
    assert len(_retry_events(events)) == 2
    guard = poolguard.get_guard(engine)
    assert guard.retry_budget is not None
    assert guard.retry_budget.spent == 2
    assert guard.stats().permits == 0


@pytest.mark.timing
def test_retries_stop_at_the_requests_deadline(
    make_engine: EngineFactory, dialer: Dialer, events: list[dict[str, Any]],
) -> None:
    # Plenty of retries and budget: only the deadline can stop them.
    engine = make_engine(connect_retries=50, retry_budget=1.0)
    guard = poolguard.get_guard(engine)
    budget = guard.retry_budget
    assert budget is not None
    dialer.error = TRANSIENT
    dialer.pause = 0.02
    for timeout in (0.3, 0.25, 0.4):
        before = dialer.dials
        spent = budget.spent
        logged = len(_retry_events(events))
        started = time.monotonic()
        with poolguard.request(timeout=timeout) as request, pytest.raises(
            sa.exc.OperationalError
        ):
            engine.connect()
        elapsed = time.monotonic() - started
        assert request.deadline is not None
        dials = dialer.times[before:]
        assert dials, "the first attempt is always made"
        assert all(t < request.deadline for t in dials)  # no dial starts after the deadline
        assert len(dials) < 51
        assert elapsed < timeout + 1.0  # ended near the deadline, not after 50 retries
        # The budget paid only for retries that happened.
        assert budget.spent - spent == len(dials) - 1
        assert len(_retry_events(events)) - logged == len(dials) - 1
    assert guard.stats().permits == 0


def test_a_checkout_past_the_deadline_does_not_dial(
    make_engine: EngineFactory, dialer: Dialer,
) -> None:
    engine = make_engine(connect_retries=3)
    with poolguard.request(timeout=0.01):
        time.sleep(0.03)
        with pytest.raises(poolguard.DeadlineExceeded):
            engine.connect()
    assert dialer.dials == 0
    assert poolguard.get_guard(engine).stats().permits == 0


def test_errors_that_are_not_transient_are_not_retried(
    make_engine: EngineFactory, dialer: Dialer, events: list[dict[str, Any]],
) -> None:
    engine = make_engine(connect_retries=3, retry_budget=0.1)
    guard = poolguard.get_guard(engine)
    for error in (sqlite3.ProgrammingError("injected"), sqlite3.IntegrityError("injected"),
                  ValueError("a bug in the creator")):
        dialer.error = error
        before = dialer.dials
        with pytest.raises((sa.exc.DBAPIError, ValueError)):
            engine.connect()
        assert dialer.dials == before + 1
    assert guard.retry_budget is not None
    assert (guard.retry_budget.spent, guard.retry_budget.denied) == (0, 0)
    assert _retry_events(events) == []
    assert guard.stats().permits == 0


def test_retries_off_dials_once(make_engine: EngineFactory, dialer: Dialer) -> None:
    engine = make_engine(connect_retries=0)
    dialer.error = TRANSIENT
    for _ in range(5):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    assert dialer.dials == 5


def test_a_failing_statement_is_executed_exactly_once(
    make_engine: EngineFactory, dialer: Dialer, events: list[dict[str, Any]],
) -> None:
    engine = make_engine(connect_retries=3, retry_budget=1.0)
    calls: list[int] = []

    def boom() -> int:
        calls.append(1)
        raise RuntimeError("the statement fails (injected)")

    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert isinstance(dbapi, sqlite3.Connection)
        dbapi.create_function("boom", 0, boom)
        # A transient-looking error (OperationalError) from a statement.
        with pytest.raises(sa.exc.OperationalError):
            conn.exec_driver_sql("SELECT boom()")
    assert calls == [1]
    assert dialer.dials == 1
    assert _retry_events(events) == []
    guard = poolguard.get_guard(engine)
    assert guard.retry_budget is not None
    assert guard.retry_budget.spent == 0
    assert guard.stats().permits == 0


@pytest.mark.postgresql
def test_a_statement_cut_by_a_disconnect_is_not_retried(postgresql_url: str) -> None:
    admin = sa.create_engine(postgresql_url, poolclass=NullPool)
    name = f"poolguard_retry_seq_{id(admin)}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SEQUENCE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE SEQUENCE {name}")
    engine = poolguard.wrap(
        sa.create_engine(postgresql_url, pool_size=2, max_overflow=0),
        connect_retries=3, retry_budget=1.0,
    )
    try:
        with engine.connect() as conn:
            # The statement advances the sequence (not transactional), then its
            # backend is terminated under it: a disconnect mid-statement.
            with pytest.raises(sa.exc.OperationalError) as info:
                conn.exec_driver_sql(
                    f"SELECT nextval('{name}'), pg_terminate_backend(pg_backend_pid())"
                )
            assert info.value.connection_invalidated
        with admin.connect() as conn:
            value = conn.exec_driver_sql(f"SELECT last_value FROM {name}").scalar_one()
        assert value == 1  # ran once: the statement was not sent again
        with engine.connect() as conn:  # and the pool recovers
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
        guard = poolguard.get_guard(engine)
        assert guard.retry_budget is not None
        assert guard.retry_budget.spent == 0
        assert guard.stats().permits == 0
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SEQUENCE IF EXISTS {name}")
        admin.dispose()
