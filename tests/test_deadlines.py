"""Deadlines and statement limits on every exit path, on real servers.

Regression tests for defects of the statement-timeout and deadline code:

* a watchdog armed for a statement whose ``SET LOCAL`` failed stayed armed
  and later cut another request's query on the same pooled connection;
* ``SET LOCAL`` does nothing under AUTOCOMMIT;
* COMMIT and the rollbacks (explicit, and the pool's reset on return) were
  not bounded by the request's deadline;
* asyncpg ignored the deadline against a server that does not answer;
* ``pool_pre_ping`` was outside the acquire timeout and the wait statistics;
* connect retries without a deadline took ~3x ``connect_timeout``;
* huge limits broke every PostgreSQL statement, and killed the watchdog thread;
* ``statement_timeout=0`` meant three different things on three backends;
* the ``SET LOCAL`` round trip was outside the statement's timing.

Servers that stop answering are simulated with the tests' TCP proxy
(``tests/_proxy.py``); times are asserted against the deadline plus a
loose slack.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url

import poolguard
from _proxy import Proxy, bounded
from _support import EngineFactory, through_proxy
from poolguard._timeouts import KILL_GRACE, Watchdog, watchdog
from poolguard.breaker import CLOSED, OPEN

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

#: Scheduling and the driver noticing a cut socket, on a loaded machine.
SLACK = 1.5
THIRTY_DAYS = 30 * 24 * 3600.0
#: PostgreSQL's largest statement_timeout (INT_MAX milliseconds).
PG_MAX_MS = 2**31 - 1

pytestmark = pytest.mark.usefixtures("structlog_unconfigured")


def _no_leaks(engine: Engine) -> None:
    assert poolguard.get_guard(engine).stats().permits == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.fixture
def make_engine(make_engine: EngineFactory) -> EngineFactory:
    """``make_engine(url, pool=..., **wrap_options)``: 1 connection, no overflow,
    no connect retries unless asked for."""
    return make_engine.using(pool={"pool_size": 1, "max_overflow": 0}, connect_retries=0)


@pytest.fixture
def proxied(
    proxy: Proxy, postgresql_url: str, make_engine: EngineFactory
) -> Iterator[EngineFactory]:
    """``proxied(pool=..., **wrap_options)``: a guarded engine through the proxy."""
    yield through_proxy(make_engine, postgresql_url, proxy, pool_size=1)
    proxy.set_mode("pass")
    make_engine.dispose_all()  # through the proxy while it still runs


def _live_entries() -> int:
    """Watchdog entries still armed (scheduled and not cancelled)."""
    with watchdog._cond:
        return sum(1 for entry in watchdog._heap if entry[2] is not None)


# -- 1. a failed SET LOCAL must not leave its watchdog armed ------------------------------


@pytest.mark.postgresql
@pytest.mark.timing
def test_failed_set_local_leaves_no_watchdog_to_cut_the_next_request(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(postgresql_url)
    guard = poolguard.get_guard(engine)
    before = _live_entries()
    with poolguard.request(timeout=0.5), engine.connect() as conn:
        with pytest.raises(sa.exc.DataError):
            conn.exec_driver_sql("SELECT 1/0")  # the transaction is now aborted
        # The SET LOCAL in front of the next statement fails (25P02).
        with pytest.raises(sa.exc.InternalError) as info:
            conn.exec_driver_sql("SELECT 1")
        assert getattr(info.value.orig, "sqlstate", None) == "25P02"
        conn.rollback()
    assert _live_entries() == before  # nothing left armed
    # Another request, no deadline, the same pooled connection: a statement
    # running past the first request's deadline (+ grace) is not cut.
    with engine.connect() as conn:
        started = time.monotonic()
        assert conn.exec_driver_sql("SELECT pg_sleep(1.2), 7").one()[1] == 7
        assert time.monotonic() - started >= 1.2
    assert guard.stats().connections_invalidated == 0
    assert guard.stats().connections_opened == 1
    _no_leaks(engine)


@pytest.mark.postgresql
def test_a_stray_cut_of_a_finished_checkout_does_nothing(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    # Defence in depth: even if an entry outlived its statement, the cut
    # checks that the checkout it was armed for is still the one out.
    engine = make_engine(postgresql_url)
    guard = poolguard.get_guard(engine)
    timer = guard._queries
    assert timer is not None
    with engine.connect() as conn:
        fairy = conn.connection
        record = fairy._connection_record
        stale = guard.gate.out[record]
    with engine.connect() as conn:
        assert conn.connection._connection_record is record  # the same pooled connection
        timer._cut(conn.connection.dbapi_connection, None, record, stale)
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
        current = guard.gate.out[record]
        timer._cut(conn.connection.dbapi_connection, None, record, current)
        with pytest.raises(sa.exc.OperationalError):
            conn.exec_driver_sql("SELECT 1")
    _no_leaks(engine)


# -- 2. AUTOCOMMIT ------------------------------------------------------------------------


def _show(conn: sa.Connection) -> str:
    return str(conn.exec_driver_sql("SHOW statement_timeout").scalar_one())


@pytest.mark.postgresql
@pytest.mark.timing
def test_statement_timeout_is_enforced_under_engine_autocommit(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(
        postgresql_url, pool={"isolation_level": "AUTOCOMMIT"}, statement_timeout=0.5,
    )
    with engine.connect() as conn:
        started = time.monotonic()
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.exec_driver_sql("SELECT pg_sleep(1.5)")
        assert info.value.limit == pytest.approx(0.5)
        assert time.monotonic() - started < 1.4
        # The statement's results are intact (the reset used its own cursor).
        rows = conn.exec_driver_sql("SELECT generate_series(1, 3)").scalars().all()
        assert rows == [1, 2, 3]
    # The session setting was reset after each statement: a connection used
    # without a limit has none.
    with poolguard.request(statement_timeout=0), engine.connect() as conn:
        assert _show(conn) == "0"
        conn.exec_driver_sql("SELECT pg_sleep(0.6)")
    assert poolguard.get_guard(engine).stats().connections_invalidated == 0
    _no_leaks(engine)


@pytest.mark.postgresql
def test_statement_timeout_is_enforced_under_per_connection_autocommit(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(postgresql_url, statement_timeout=0.5)
    with engine.connect() as plain:
        conn = plain.execution_options(isolation_level="AUTOCOMMIT")
        with pytest.raises(poolguard.StatementTimeout):
            conn.exec_driver_sql("SELECT pg_sleep(1.5)")
        # Autocommit: nothing to roll back; the connection serves at once.
        assert conn.exec_driver_sql("SELECT 5").scalar_one() == 5
    with engine.connect() as conn:  # back to transactions: SET LOCAL again
        with pytest.raises(poolguard.StatementTimeout):
            conn.exec_driver_sql("SELECT pg_sleep(1.5)")
        conn.rollback()
    # Nothing stayed on the session.
    with poolguard.request(statement_timeout=0), engine.connect() as conn:
        assert _show(conn) == "0"
    assert poolguard.get_guard(engine).stats().connections_opened == 1
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_statement_timeout_is_enforced_under_asyncpg_autocommit(asyncpg_url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def scenario() -> None:
        engine = poolguard.wrap(
            create_async_engine(asyncpg_url, pool_size=1, max_overflow=0,
                                isolation_level="AUTOCOMMIT"),
            statement_timeout=0.5, connect_retries=0,
        )
        try:
            async with engine.connect() as conn:
                started = time.monotonic()
                with pytest.raises(poolguard.StatementTimeout):
                    await conn.exec_driver_sql("SELECT pg_sleep(1.5)")
                assert time.monotonic() - started < 1.4
                rows = (await conn.exec_driver_sql("SELECT generate_series(1, 3)")).all()
                assert [row[0] for row in rows] == [1, 2, 3]
            async with poolguard.request(statement_timeout=0), engine.connect() as conn:
                shown = (await conn.exec_driver_sql("SHOW statement_timeout")).scalar_one()
                assert shown == "0"
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


# -- 3. COMMIT and ROLLBACK under the deadline -------------------------------------------


@pytest.mark.postgresql
@pytest.mark.timing
def test_commit_against_a_silent_server_ends_at_the_deadline(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied()
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    with bounded(proxy), poolguard.request(timeout=1.0), engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
        proxy.set_mode("blackhole")
        started = time.monotonic()
        with pytest.raises(poolguard.DeadlineExceeded) as info:
            conn.commit()
        elapsed = time.monotonic() - started
    assert elapsed < 1.0 + KILL_GRACE + SLACK
    assert isinstance(info.value, sa.exc.TimeoutError)
    assert "COMMIT" in str(info.value)
    assert guard.stats().connections_invalidated == 1
    proxy.set_mode("pass")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 2").scalar_one() == 2
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_rollback_on_close_against_a_silent_server_ends_at_the_deadline(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied()
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    with bounded(proxy), poolguard.request(timeout=1.0):
        conn = engine.connect()
        conn.exec_driver_sql("SELECT 1")
        proxy.set_mode("blackhole")
        started = time.monotonic()
        # The ROLLBACK's error surfaces from close(), as it does in plain
        # SQLAlchemy (there, only after the operating system gives up).
        with pytest.raises(poolguard.DeadlineExceeded) as info:
            conn.close()
        elapsed = time.monotonic() - started
    assert "ROLLBACK" in str(info.value)
    # SQLAlchemy 2.1 closes it; 2.0 leaves it invalidated. Either way the
    # pooled connection is discarded and the permit is back (below).
    assert conn.closed or conn.invalidated
    assert elapsed < 1.0 + KILL_GRACE + SLACK
    assert guard.stats().connections_invalidated == 1
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_pool_reset_on_return_against_a_silent_server_ends_at_the_deadline(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    # A raw DBAPI connection: only the pool's reset (a rollback) runs on close.
    # The bound is installed on the engine by its first statement under a
    # deadline or a limit (raw DBAPI statements bypass poolguard).
    engine = proxied()
    guard = poolguard.get_guard(engine)
    with poolguard.request(timeout=5), engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    with bounded(proxy), poolguard.request(timeout=1.0):
        raw = engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute("SELECT 1")  # psycopg opened a transaction
        cursor.close()
        proxy.set_mode("blackhole")
        started = time.monotonic()
        raw.close()
        elapsed = time.monotonic() - started
    assert elapsed < 1.0 + KILL_GRACE + SLACK
    assert guard.stats().connections_invalidated == 1
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_commit_past_the_deadline_is_still_sent(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    # Finishing a transaction is never refused: past the deadline it still
    # gets the floor and the grace on a server that answers.
    engine = make_engine(postgresql_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TEMP TABLE IF NOT EXISTS t_commit (x int)")
    # 2 s: the statements before the commit fit in it on a loaded machine.
    with poolguard.request(timeout=2.0), engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS poolguard_t_commit (x int)")
        conn.exec_driver_sql("INSERT INTO poolguard_t_commit VALUES (1)")
        time.sleep(2.1)
        conn.commit()
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql(
                "SELECT count(*) FROM poolguard_t_commit").scalar_one() == 1
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE poolguard_t_commit")
    _no_leaks(engine)


# -- 4. asyncpg -------------------------------------------------------------------------


@pytest.mark.postgresql
@pytest.mark.timing
def test_asyncpg_deadline_holds_against_a_silent_server(
    asyncpg_url: str, proxy: Proxy,
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    url = make_url(asyncpg_url).set(host=proxy.host, port=proxy.port)

    async def scenario() -> float:
        engine = poolguard.wrap(
            create_async_engine(url, pool_size=1, max_overflow=0,
                                connect_args={"ssl": False}),
            connect_retries=0,
        )
        guard = poolguard.get_guard(engine)
        try:
            async with engine.connect() as conn:
                assert (await conn.exec_driver_sql("SELECT 1")).scalar_one() == 1
            proxy.set_mode("blackhole")
            started = time.monotonic()
            async with poolguard.request(timeout=1.0):
                with pytest.raises(poolguard.DeadlineExceeded):
                    async with engine.connect() as conn:
                        await conn.exec_driver_sql("SELECT 1")
            elapsed = time.monotonic() - started
            assert guard.stats().connections_invalidated == 1
            proxy.set_mode("pass")
            async with engine.connect() as conn:
                assert (await conn.exec_driver_sql("SELECT 2")).scalar_one() == 2
            assert guard.stats().permits == 0
            return elapsed
        finally:
            proxy.set_mode("pass")
            await engine.dispose()

    with bounded(proxy, 8.0):
        elapsed = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert elapsed < 1.0 + KILL_GRACE + SLACK


# -- 5. pool_pre_ping inside the acquire timeout and the wait ----------------------------


@pytest.mark.postgresql
@pytest.mark.timing
def test_pre_ping_against_a_silent_server_ends_at_the_acquire_timeout(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied(pool={"pool_pre_ping": True}, acquire_timeout=1.0)
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    proxy.set_mode("blackhole")
    started = time.monotonic()
    with bounded(proxy, 8.0), pytest.raises(poolguard.PoolTimeout) as info:
        engine.connect()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0 + SLACK
    assert isinstance(info.value, sa.exc.TimeoutError)
    assert "pre-ping" in str(info.value)
    assert guard.stats().connections_invalidated == 1
    proxy.set_mode("pass")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_pre_ping_time_is_counted_in_the_checkouts_wait(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied(pool={"pool_pre_ping": True})
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    before = guard.stats()
    proxy.set_mode("delay", delay=0.3)  # the ping's round trip takes >= 0.3 s
    with engine.connect() as conn:
        (holder,) = guard.holders()
        proxy.set_mode("pass")
        assert holder.wait >= 0.3
    after = guard.stats()
    # The checkout's wait (histogram of every checkout): one more, >= 0.3 s.
    # (wait_time_total/_max stay the gate's own: the wait for a permit.)
    assert after.wait_time.max >= 0.3
    assert after.wait_time.sum - before.wait_time.sum >= 0.3
    assert after.wait_time.count == before.wait_time.count + 1
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_pre_ping_gets_what_is_left_after_the_wait_for_a_permit(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied(pool={"pool_pre_ping": True}, acquire_timeout=1.5)
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    holder = engine.connect()
    release = threading.Timer(0.8, holder.close)  # a permit after ~0.8 s
    release.start()
    proxy.set_mode("blackhole")
    started = time.monotonic()
    try:
        with bounded(proxy, 8.0), pytest.raises(poolguard.PoolTimeout):
            engine.connect()
    finally:
        release.join()
    elapsed = time.monotonic() - started
    # 0.8 s waiting at the gate + the ping: 1.5 s in all, not 0.8 + 1.5.
    assert elapsed < 1.5 + SLACK / 2
    proxy.set_mode("pass")
    assert guard.stats().permits == 0


# -- 6. connect retries within the acquire timeout ----------------------------------------


@pytest.mark.postgresql
@pytest.mark.timing
def test_connect_retries_without_deadline_stay_within_the_acquire_timeout(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    import psycopg

    engine = proxied(connect_retries=2, acquire_timeout=3.0)
    dials: list[float] = []

    @event.listens_for(engine, "do_connect")
    def _dial(*args: Any) -> None:
        dials.append(time.monotonic())

    proxy.set_mode("blackhole")
    started = time.monotonic()
    with bounded(proxy, 12.0), pytest.raises(sa.exc.OperationalError) as info:
        engine.connect()
    elapsed = time.monotonic() - started
    assert isinstance(info.value.orig, psycopg.errors.ConnectionTimeout)
    # One dial takes connect_timeout (2 s); a second would end past 3 s.
    assert len(dials) == 1
    assert elapsed < 3.0 + SLACK
    proxy.set_mode("pass")
    _no_leaks(engine)


# -- 7. huge limits -----------------------------------------------------------------------


@pytest.mark.postgresql
def test_pg_huge_deadline_and_statement_timeout_are_clamped(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(postgresql_url, statement_timeout=THIRTY_DAYS)
    with engine.connect() as conn:
        assert _show(conn) == f"{PG_MAX_MS}ms"
    with poolguard.request(timeout=THIRTY_DAYS), engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    with poolguard.request(timeout=1e10, statement_timeout=1e10), engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 2").scalar_one() == 2
        conn.commit()
    _no_leaks(engine)


@pytest.mark.mariadb
def test_mariadb_huge_statement_timeout_is_accepted(
    mariadb_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(mariadb_url, statement_timeout=1e10)
    with poolguard.request(timeout=1e10), engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    _no_leaks(engine)


@pytest.mark.timing
def test_watchdog_thread_survives_far_off_times_and_failing_callbacks() -> None:
    dog = Watchdog()
    dog.schedule(perf_counter() + 1e10, lambda: None)  # far beyond a lock's max wait

    def fail() -> None:
        raise RuntimeError("boom")

    dog.schedule(perf_counter(), fail)
    ran = threading.Event()
    dog.schedule(perf_counter() + 0.05, ran.set)
    assert ran.wait(5.0)
    assert dog._thread is not None
    assert dog._thread.is_alive()
    assert dog.errors == 1


@pytest.mark.timing
def test_sqlite_deadline_still_enforced_after_a_huge_one(
    sqlite_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(sqlite_url, pool={"pool_size": 1})
    with poolguard.request(timeout=1e10), engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    forever = ("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) "
               "SELECT count(*) FROM r")
    started = time.monotonic()
    with poolguard.request(timeout=0.3), engine.connect() as conn:
        # If the watchdog is dead, end the statement anyway (and fail below).
        backstop = threading.Timer(5.0, conn.connection.dbapi_connection.interrupt)
        backstop.start()
        try:
            with pytest.raises(sa.exc.OperationalError):
                conn.exec_driver_sql(forever)
        finally:
            backstop.cancel()
    assert time.monotonic() - started < 0.3 + SLACK
    _no_leaks(engine)


# -- 8. statement_timeout=0 means no limit everywhere -------------------------------------


@pytest.mark.postgresql
def test_pg_statement_timeout_zero_is_no_limit(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(postgresql_url, statement_timeout=0)
    with engine.connect() as conn:
        assert _show(conn) == "0"
        conn.exec_driver_sql("SELECT pg_sleep(0.2)")
    # Per call, 0 lifts the guard's limit.
    limited = make_engine(postgresql_url, statement_timeout=0.1)
    with poolguard.request(statement_timeout=0), limited.connect() as conn:
        assert _show(conn) == "0"
        conn.exec_driver_sql("SELECT pg_sleep(0.3)")
    _no_leaks(engine)
    _no_leaks(limited)


@pytest.mark.mariadb
def test_mariadb_sub_millisecond_limit_is_one_millisecond(
    mariadb_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(mariadb_url, statement_timeout=0.0004)
    with engine.connect() as conn, pytest.raises(poolguard.StatementTimeout):
        conn.exec_driver_sql("SELECT SLEEP(1)")
    zero = make_engine(mariadb_url, statement_timeout=0)
    with zero.connect() as conn:
        assert conn.exec_driver_sql("SELECT SLEEP(0.2)").scalar_one() == 0
    _no_leaks(engine)
    _no_leaks(zero)


def test_sqlite_statement_timeout_zero_is_no_limit(
    sqlite_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(sqlite_url, statement_timeout=0)
    counted = ("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r "
               "WHERE i < 300000) SELECT count(*) FROM r")
    with engine.connect() as conn:
        assert conn.exec_driver_sql(counted).scalar_one() == 300000
    _no_leaks(engine)


# -- 9. the SET LOCAL is part of the statement --------------------------------------------


@pytest.mark.postgresql
@pytest.mark.timing
def test_set_local_round_trip_shows_the_statement_running(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied(statement_timeout=5.0)
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    proxy.set_mode("delay", delay=0.4)  # every round trip, the SET LOCAL's too
    seen: list[Any] = []
    with bounded(proxy), engine.connect() as conn:
        worker = threading.Thread(target=lambda: conn.exec_driver_sql("SELECT 42"))
        worker.start()
        time.sleep(0.2)  # inside the SET LOCAL's round trip
        seen = guard.holders()
        worker.join()
        proxy.set_mode("pass")
    (holder,) = seen
    assert holder.running
    assert holder.statement is not None
    assert "SELECT" in holder.statement
    _no_leaks(engine)


@pytest.mark.timing
def test_aiosqlite_runaway_statement_is_interrupted(aiosqlite_url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    forever = ("WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) "
               "SELECT count(*) FROM r")

    async def scenario() -> None:
        engine = poolguard.wrap(create_async_engine(aiosqlite_url),
                                statement_timeout=0.3, connect_retries=0)
        try:
            async with engine.connect() as conn:
                raw = await conn.get_raw_connection()
                sqlite_conn = raw.dbapi_connection._connection._conn  # type: ignore[union-attr]
                # If nothing interrupts it, end it anyway (and fail below).
                backstop = threading.Timer(5.0, sqlite_conn.interrupt)
                backstop.start()
                started = time.monotonic()
                try:
                    with pytest.raises(poolguard.StatementTimeout):
                        await conn.exec_driver_sql(forever)
                finally:
                    backstop.cancel()
                assert time.monotonic() - started < 0.3 + SLACK
                assert (await conn.exec_driver_sql("SELECT 1")).scalar_one() == 1
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_watchdog_works_in_a_child_forked_while_a_callback_runs() -> None:
    # A child forked while the shared watchdog runs a callback (holding its
    # locks) gets a fresh watchdog, not a lock held forever.
    inside, release = threading.Event(), threading.Event()

    def slow() -> None:
        inside.set()
        release.wait(5.0)

    watchdog.schedule(perf_counter(), slow)
    assert inside.wait(5.0)
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if the watchdog works
        code = 1
        try:
            ran = threading.Event()
            entry = watchdog.schedule(perf_counter() + 0.01, ran.set)
            if ran.wait(3.0):
                watchdog.cancel(entry)  # would block on a lock held by the parent
                code = 0
        finally:
            os._exit(code)
    release.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


#: A tag breaker that opens after 4 calls, half of them failed or slow.
TAG_BREAKER: dict[str, Any] = {
    "breaker_per_tag": True,
    "breaker_window": "count",
    "breaker_window_size": 4,
    "breaker_minimum_calls": 4,
    "breaker_slow_call_duration": 1.0,
    "breaker_slow_call_rate": 0.5,
    "breaker_wait_in_open": 30.0,
}


@pytest.mark.postgresql
@pytest.mark.timing
def test_a_deadline_spent_waiting_for_the_pool_is_no_slow_call_of_the_tag(
    postgresql_url: str, make_engine: EngineFactory, events: list[dict[str, Any]],
) -> None:
    # Regression (the postmortem's uniform control): API calls waited ~0.85 s
    # of their 1 s deadline for a pool the logins held, then their 0.16 s
    # statement was cut by the deadline; counted as the api tag's failures,
    # they opened its breaker and api was shed outright (circuit_open). A
    # statement cut sooner than its checkout waited is no outcome of its tag;
    # one that spent the deadline running still is.
    engine = make_engine(postgresql_url, 1, max_overflow=0, **TAG_BREAKER)
    guard = poolguard.get_guard(engine)
    calls = TAG_BREAKER["breaker_minimum_calls"]
    for _ in range(calls):
        release = threading.Event()
        held = threading.Event()

        def hold_the_pool(held: threading.Event, release: threading.Event) -> None:
            with engine.connect():
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold_the_pool, args=(held, release))
        holder.start()
        assert held.wait(30)
        timer = threading.Timer(0.8, release.set)  # the api call waits 0.8 s of its 1.2 s
        timer.start()
        with pytest.raises(poolguard.StatementTimeout):
            with poolguard.request(timeout=1.2, tag="api"), engine.connect() as conn:
                conn.exec_driver_sql("SELECT pg_sleep(2)")  # cut after at most 0.4 s
        holder.join(30)
        timer.join(30)
    assert guard.tag_breakers.get("api") is None or guard.tag_breakers["api"].state == CLOSED
    assert {"event": "breaker.open", "tag": "api"} not in [
        {"event": e["event"], "tag": e.get("tag")} for e in events
    ]
    for _ in range(calls):  # no wait: the deadline went on the statement itself
        with pytest.raises(poolguard.StatementTimeout):
            with poolguard.request(timeout=0.2, tag="report"), engine.connect() as conn:
                conn.exec_driver_sql("SELECT pg_sleep(0.5)")
    assert guard.tag_breakers["report"].state == OPEN
