"""Statement timeouts the database enforces, and request deadlines, on real servers.

* A statement past its limit is cancelled by the database itself (PostgreSQL
  ``statement_timeout``, MariaDB ``max_statement_time``, SQLite interrupt):
  ``poolguard.StatementTimeout``, still a ``sqlalchemy.exc.OperationalError``
  with the driver's error as ``.orig`` and no parameter values in it; the
  connection (and the pool) serve the next query.
* The limit comes from the call, else the tag, else the guard.
* ``poolguard.request(timeout=...)``: each statement gets what is left of the
  deadline (with a floor), and a statement or a checkout that would start
  after it raises ``poolguard.DeadlineExceeded`` without reaching the server
  (counted on the server: a sequence, or a SQLite function).

Every test checks that no permit and no connection is left out. Times are
asserted loosely: only that a cancelled statement ended well before the
3 s it asked for.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import NullPool

import poolguard
from _support import EngineFactory

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Engine

PARAM_VALUE = "hunter2-do-not-log"
SLEEP = 3.0
#: A statement that runs forever on SQLite.
FOREVER_SQLITE = (
    "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) SELECT count(*) FROM r"
)


@pytest.fixture
def make_engine(make_engine: EngineFactory) -> EngineFactory:
    """``make_engine(url, pool=..., **wrap_options)``: 2 connections, no overflow,
    no connect retries unless asked for."""
    return make_engine.using(pool={"pool_size": 2, "max_overflow": 0}, connect_retries=0)


def _no_leaks(engine: Engine) -> None:
    guard = poolguard.get_guard(engine)
    assert guard.stats().permits == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def _count_dials(engine: Engine) -> list[int]:
    dials: list[int] = []

    @event.listens_for(engine, "do_connect")
    def _dial(*args: Any) -> None:
        dials.append(1)

    return dials


def _assert_cancelled(error: poolguard.StatementTimeout, limit: float, orig: type) -> None:
    assert isinstance(error, sa.exc.OperationalError)
    assert isinstance(error, poolguard.PoolguardError)
    assert isinstance(error.orig, orig)
    assert error.limit == pytest.approx(limit)
    assert error.params is None
    assert PARAM_VALUE not in str(error)
    assert PARAM_VALUE not in repr(error)


# -- PostgreSQL ---------------------------------------------------------------------------


@pytest.fixture
def pg_sequence(postgresql_url: str) -> Iterator[tuple[str, Callable[[], int]]]:
    """A fresh sequence and a function reading its ``last_value`` from outside."""
    admin = sa.create_engine(postgresql_url, poolclass=NullPool)
    name = f"poolguard_t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SEQUENCE {name}")

    def last_value() -> int:
        with admin.connect() as conn:
            value, called = conn.exec_driver_sql(
                f"SELECT last_value, is_called FROM {name}"
            ).one()
        return int(value) if called else 0

    yield name, last_value
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP SEQUENCE IF EXISTS {name}")
    admin.dispose()


@pytest.mark.postgresql
@pytest.mark.timing
def test_pg_sleep_past_the_statement_timeout_is_cancelled_by_postgresql(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    import psycopg

    engine = make_engine(postgresql_url, statement_timeout=0.5)
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        started = time.monotonic()
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.execute(sa.text("SELECT pg_sleep(:s), :secret"),
                         {"s": SLEEP, "secret": PARAM_VALUE})
        elapsed = time.monotonic() - started
        _assert_cancelled(info.value, 0.5, psycopg.errors.QueryCanceled)
        assert elapsed < SLEEP
        assert not info.value.connection_invalidated
        # The same connection works once its transaction is rolled back.
        conn.rollback()
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    # And so does the pool: the same connection, not a new one.
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 2")).scalar_one() == 2
    stats = guard.stats()
    assert stats.connections_opened == 1
    assert stats.connections_invalidated == 0
    _no_leaks(engine)


@pytest.mark.postgresql
def test_pg_statement_timeout_inside_begin_block_rolls_back_and_pool_serves(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(postgresql_url, statement_timeout=0.3, pool={"pool_size": 1})
    for _ in range(2):
        with pytest.raises(poolguard.StatementTimeout), engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": SLEEP})
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    assert poolguard.get_guard(engine).stats().connections_opened == 1
    _no_leaks(engine)


def _show_timeout(conn: sa.Connection) -> str:
    return str(conn.execute(sa.text("SHOW statement_timeout")).scalar_one())


@pytest.mark.postgresql
def test_pg_limit_per_tag_and_per_call_override_the_guards(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(
        postgresql_url, statement_timeout=0.5, tag_statement_timeouts={"login": 0.3},
    )
    with engine.connect() as conn:
        assert _show_timeout(conn) == "500ms"  # the guard's
    with poolguard.request(tag="login"), engine.connect() as conn:
        assert _show_timeout(conn) == "300ms"  # the tag's
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": SLEEP})
        assert info.value.limit == pytest.approx(0.3)
    with poolguard.request(tag="login", statement_timeout=0.2), engine.connect() as conn:
        assert _show_timeout(conn) == "200ms"  # the call's wins over the tag's
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": SLEEP})
        assert info.value.limit == pytest.approx(0.2)
    # Per call, longer than the guard's: a statement the guard would cancel runs.
    with poolguard.request(statement_timeout=5.0), engine.connect() as conn:
        assert _show_timeout(conn) == "5s"
        conn.execute(sa.text("SELECT pg_sleep(0.7)"))
    # A nested scope keeps the outer one's limit.
    with poolguard.request(statement_timeout=0.25), poolguard.request(tag="other"):
        with engine.connect() as conn:
            assert _show_timeout(conn) == "250ms"
    # The limit is per transaction (SET LOCAL): nothing stays on the connection.
    with engine.connect() as conn:
        assert _show_timeout(conn) == "500ms"
    _no_leaks(engine)


@pytest.mark.postgresql
def test_pg_without_any_limit_nothing_is_set(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(postgresql_url)
    with engine.connect() as conn:
        assert _show_timeout(conn) == "0"
    with poolguard.request(tag="login"), engine.connect() as conn:
        assert _show_timeout(conn) == "0"
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_pg_deadline_limits_statements_and_refuses_late_ones(
    postgresql_url: str, make_engine: EngineFactory,
    pg_sequence: tuple[str, Callable[[], int]],
) -> None:
    name, last_value = pg_sequence
    engine = make_engine(postgresql_url, statement_timeout=10.0)
    dials = _count_dials(engine)
    # 2 s: the checkout and the first two statements fit in it on a loaded machine
    # (0.3 s did not always).
    with poolguard.request(timeout=2.0):
        with engine.connect() as conn:
            # The limit is what is left of the deadline, not the guard's 10 s.
            shown = _show_timeout(conn)
            assert shown.endswith("ms")
            assert 0 < int(shown[:-2]) <= 2000
            assert conn.execute(sa.text(f"SELECT nextval('{name}')")).scalar_one() == 1
            time.sleep(2.05)
            with pytest.raises(poolguard.DeadlineExceeded):
                conn.execute(sa.text(f"SELECT nextval('{name}')"))
            assert isinstance(poolguard.DeadlineExceeded("x"), sa.exc.TimeoutError)
        assert last_value() == 1  # the late statement never reached the server
        # A checkout past the deadline: refused, and nothing dialed.
        opened = len(dials)
        with pytest.raises(poolguard.DeadlineExceeded):
            engine.connect()
        assert len(dials) == opened
    assert last_value() == 1
    # The connection of the refused statement stays usable.
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT nextval('{name}')")).scalar_one() == 2
    assert poolguard.get_guard(engine).stats().connections_invalidated == 0
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_pg_deadline_floor_gives_a_late_statement_a_minimum(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    # Margins of a second each way: less than the floor is left, and the
    # deadline has not passed yet, however late the scheduler runs this thread.
    engine = make_engine(postgresql_url, deadline_floor=2.0)
    with poolguard.request(timeout=3.0), engine.connect() as conn:
        time.sleep(1.9)  # about 1 s left: the floor of 2 s applies
        assert _show_timeout(conn) == "2s"  # PostgreSQL shows 2000 ms so
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_pg_statement_running_into_the_deadline_is_cancelled_by_the_server(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    import psycopg

    engine = make_engine(postgresql_url)
    started = time.monotonic()
    with poolguard.request(timeout=0.5), engine.connect() as conn:
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": SLEEP})
        assert isinstance(info.value.orig, psycopg.errors.QueryCanceled)
        assert 0 < info.value.limit <= 0.5
    assert time.monotonic() - started < SLEEP
    # The server's timeout came first: the watchdog did not cut the connection.
    stats = poolguard.get_guard(engine).stats()
    assert stats.connections_invalidated == 0
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    _no_leaks(engine)


@pytest.mark.postgresql
@pytest.mark.timing
def test_pg_deadline_bounds_the_acquire_wait(
    postgresql_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(postgresql_url, pool={"pool_size": 1}, acquire_timeout=30.0)
    with engine.connect():
        started = time.monotonic()
        with poolguard.request(timeout=0.3), pytest.raises(poolguard.PoolTimeout) as info:
            engine.connect()
        assert time.monotonic() - started < 5.0  # the deadline, not the 30 s acquire timeout
        assert "deadline" in str(info.value)
    _no_leaks(engine)


# -- MariaDB ------------------------------------------------------------------------------


@pytest.mark.mariadb
@pytest.mark.timing
def test_mariadb_sleep_past_the_statement_timeout_is_cancelled(
    mariadb_url: str, make_engine: EngineFactory,
) -> None:
    import pymysql

    engine = make_engine(mariadb_url, statement_timeout=0.5)
    with engine.connect() as conn:
        started = time.monotonic()
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.execute(sa.text("SELECT SLEEP(:s), :secret"), {"s": SLEEP, "secret": PARAM_VALUE})
        assert time.monotonic() - started < SLEEP
        _assert_cancelled(info.value, 0.5, pymysql.err.OperationalError)
        assert info.value.orig.args[0] == 1969
        conn.rollback()
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 2")).scalar_one() == 2
    # Per call and per tag, on MariaDB too.
    with poolguard.request(statement_timeout=0.2), engine.connect() as conn:
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.execute(sa.text("SELECT SLEEP(:s)"), {"s": SLEEP})
        assert info.value.limit == pytest.approx(0.2)
    stats = poolguard.get_guard(engine).stats()
    assert stats.connections_opened == 1
    assert stats.connections_invalidated == 0
    _no_leaks(engine)


@pytest.mark.mariadb
@pytest.mark.timing
def test_mariadb_deadline_limits_and_refuses_late_statements(
    mariadb_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(mariadb_url)
    started = time.monotonic()
    with poolguard.request(timeout=0.5), engine.connect() as conn:
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.execute(sa.text("SELECT SLEEP(:s)"), {"s": SLEEP})
        assert 0 < info.value.limit <= 0.5
        time.sleep(0.1)
        conn.rollback()
        with pytest.raises(poolguard.DeadlineExceeded):
            conn.execute(sa.text("SELECT 1"))
    assert time.monotonic() - started < SLEEP
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    _no_leaks(engine)


# -- SQLite -------------------------------------------------------------------------------


@pytest.mark.timing
def test_sqlite_runaway_statement_is_interrupted(
    sqlite_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(sqlite_url, statement_timeout=0.5)
    with engine.connect() as conn:
        started = time.monotonic()
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.execute(sa.text(FOREVER_SQLITE + " WHERE :secret IS NOT NULL"),
                         {"secret": PARAM_VALUE})
        assert time.monotonic() - started < SLEEP
        _assert_cancelled(info.value, 0.5, sqlite3.OperationalError)
        conn.rollback()
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    with poolguard.request(statement_timeout=0.1), engine.connect() as conn:
        with pytest.raises(poolguard.StatementTimeout) as info:
            conn.exec_driver_sql(FOREVER_SQLITE)
        assert info.value.limit == pytest.approx(0.1)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 2")).scalar_one() == 2
    assert poolguard.get_guard(engine).stats().connections_invalidated == 0
    _no_leaks(engine)


def test_sqlite_deadline_refuses_late_statements_and_checkouts(
    sqlite_url: str, make_engine: EngineFactory,
) -> None:
    engine = make_engine(sqlite_url)
    dials = _count_dials(engine)
    calls: list[int] = []

    def counted() -> int:
        calls.append(1)
        return len(calls)

    with poolguard.request(timeout=0.3):
        with engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert isinstance(dbapi, sqlite3.Connection)
            dbapi.create_function("counted", 0, counted)
            assert conn.exec_driver_sql("SELECT counted()").scalar_one() == 1
            # A runaway statement is interrupted at the deadline.
            with pytest.raises(poolguard.StatementTimeout) as info:
                conn.exec_driver_sql(FOREVER_SQLITE)
            assert 0 < info.value.limit <= 0.3
            conn.rollback()
            with pytest.raises(poolguard.DeadlineExceeded):
                conn.exec_driver_sql("SELECT counted()")
        assert calls == [1]  # the late statement never ran
        opened = len(dials)
        with pytest.raises(poolguard.DeadlineExceeded):
            engine.connect()
        assert len(dials) == opened
    _no_leaks(engine)


# -- asyncpg ------------------------------------------------------------------------------


@pytest.mark.postgresql
@pytest.mark.timing
def test_asyncpg_statement_timeout_and_deadline(asyncpg_url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def scenario() -> None:
        engine = poolguard.wrap(
            create_async_engine(asyncpg_url, pool_size=1, max_overflow=0),
            statement_timeout=0.5, connect_retries=0,
        )
        try:
            started = time.monotonic()
            async with engine.connect() as conn:
                with pytest.raises(poolguard.StatementTimeout) as info:
                    await conn.execute(sa.text("SELECT pg_sleep(:s), :secret"),
                                       {"s": SLEEP, "secret": PARAM_VALUE})
                assert time.monotonic() - started < SLEEP
                assert isinstance(info.value, sa.exc.OperationalError)
                assert PARAM_VALUE not in str(info.value)
                await conn.rollback()
                assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
            async with poolguard.request(timeout=0.3):
                async with engine.connect() as conn:
                    shown = (await conn.execute(sa.text("SHOW statement_timeout"))).scalar_one()
                    assert 0 < int(str(shown).removesuffix("ms")) <= 300
                    await asyncio.sleep(0.35)
                    with pytest.raises(poolguard.DeadlineExceeded):
                        await conn.execute(sa.text("SELECT 1"))
                with pytest.raises(poolguard.DeadlineExceeded):
                    await engine.connect()
            guard = poolguard.get_guard(engine)
            assert guard.stats().permits == 0
            assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            assert guard.stats().connections_opened == 1
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
