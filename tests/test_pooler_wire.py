"""Behind PgBouncer: what the request waits for is timed and bounded (issue 14, items 3 and 5).

Through transaction pooling, the first round trip of a transaction is where a
client waits in PgBouncer's queue for a server connection: the guard's own
``SET LOCAL`` (a statement timeout or a deadline), the pre-ping, or the
statement. These tests hold PgBouncer's one server connection with a plain
client (``pg_sleep``) so that the guarded engine queues there, and check that
the statement's limit, the request's deadline and the acquire timeout bound
that wait, that the holders report says what the connection is doing, and
what the guard finds out and warns about at its first connection.
Real PgBouncer (``tests/_pgbouncer.py``), real PostgreSQL; MariaDB through the
tests' TCP proxy for the wire timing that applies there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

import poolguard
from _proxy import Proxy, bounded
from _support import wait_until
from poolguard._pooler import Pooler, detect_pooler
from poolguard._timeouts import KILL_GRACE, unenforced_reason
from poolguard.testing import capture_events
from test_pooler import _bouncer, _hold

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _pgbouncer import PgBouncer

#: Scheduling and a driver noticing a cut socket, on a loaded machine.
SLACK = 1.5
#: PgBouncer's own queue timeout in these tests: every bound below is well under it.
QUERY_WAIT = 8

pytestmark = [pytest.mark.postgresql, pytest.mark.usefixtures("structlog_unconfigured")]


@pytest.fixture
def bouncer(postgresql_url: str) -> Iterator[tuple[PgBouncer, str]]:
    """A PgBouncer of its own with ONE server connection (transaction mode)."""
    running, database = _bouncer(postgresql_url, default_pool_size=1, query_wait_timeout=QUERY_WAIT)
    with running:
        yield running, database


def _engine(
    bouncer: PgBouncer, database: str, create: dict[str, Any] | None = None, **options: Any
) -> sa.Engine:
    return poolguard.wrap(
        sa.create_engine(
            bouncer.url(database),
            pool_size=1,
            max_overflow=0,
            **{"connect_args": {"prepare_threshold": None}, **(create or {})},
        ),
        connect_retries=0,
        **options,
    )


def _async_engine(
    bouncer: PgBouncer, database: str, create: dict[str, Any] | None = None, **options: Any
) -> Any:
    connect_args = {"statement_cache_size": 0, "prepared_statement_cache_size": 0}
    return poolguard.wrap(
        create_async_engine(
            bouncer.url(database, "asyncpg"),
            pool_size=1,
            max_overflow=0,
            **{"connect_args": connect_args, **(create or {})},
        ),
        connect_retries=0,
        **options,
    )


def _in_queue(bouncer: PgBouncer) -> bool:
    """Some client waits in PgBouncer's queue for a server connection."""
    return any(row["cl_waiting"] for row in bouncer.admin("SHOW POOLS"))


# -- 3. the statement's limit bounds the wait in PgBouncer's queue ------------------------


@pytest.mark.timing
def test_psycopg_statement_timeout_bounds_the_wait_in_pgbouncers_queue(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # Before: the SET LOCAL waited in the queue until query_wait_timeout (5.1 s
    # with a 2 s limit), failed as a plain OperationalError, and the holder
    # looked like a leak. Now: the limit bounds it, the error is saturation.
    running, database = bouncer
    engine = _engine(
        running, database, statement_timeout=1.0, breaker=True, breaker_minimum_calls=1
    )
    guard = poolguard.get_guard(engine)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            conn.commit()
        assert guard.pooler.behind is not None
        holder = _hold(running, database, 4)
        seen: list[Any] = []

        def look() -> None:
            wait_until(lambda: _in_queue(running), "a client in PgBouncer's queue", timeout=5)
            seen.append(guard.holders())
            seen.append(guard.diagnostics.holders_report(fresh=True))

        looker = threading.Thread(target=look)
        looker.start()
        started = time.monotonic()
        with pytest.raises(poolguard.PoolerSaturated) as caught, engine.connect() as conn:
            conn.exec_driver_sql("SELECT 2")
        elapsed = time.monotonic() - started
        looker.join(10)
        holder.join(10)
        assert elapsed < 1.0 + KILL_GRACE + SLACK < QUERY_WAIT
        error = caught.value
        assert isinstance(error, poolguard.PoolTimeout)
        assert isinstance(error, sa.exc.OperationalError)
        assert "within the statement's time limit (1.000s)" in str(error)
        assert error.connection_invalidated
        assert guard.stats().pooler_saturations == 1
        assert guard.breaker is not None
        assert guard.breaker.state == "closed"
        # While it waited, the holder said what it was doing.
        (holders, groups) = seen
        (one,) = holders
        assert one.running
        assert one.statement == "SELECT ?"
        assert one.on_wire is not None
        assert "likely waiting for a server connection" in one.on_wire
        assert groups[0].on_wire == 1
        from poolguard._holders import describe_groups

        assert "1 on the wire: SET LOCAL" in describe_groups(groups)
        # The SET LOCAL's time is the statement's (a failed statement, timed).
        (top,) = [q for q in guard.top_queries(10) if q.statement == "SELECT ?" and q.errors]
        assert top.max_time >= 1.0
        with engine.connect() as conn:  # the cut connection was replaced
            assert conn.exec_driver_sql("SELECT 3").scalar_one() == 3
            assert guard.holders()[0].on_wire is None
    finally:
        engine.dispose()


@pytest.mark.timing
def test_asyncpg_statement_timeout_bounds_the_wait_in_pgbouncers_queue(
    bouncer: tuple[PgBouncer, str],
) -> None:
    running, database = bouncer

    async def scenario() -> float:
        engine = _async_engine(running, database, statement_timeout=1.0)
        guard = poolguard.get_guard(engine)
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                await conn.commit()
            holder = await asyncio.to_thread(_hold, running, database, 4)
            started = time.monotonic()
            with pytest.raises(poolguard.PoolerSaturated):
                async with engine.connect() as conn:
                    await conn.exec_driver_sql("SELECT 2")
            elapsed = time.monotonic() - started
            await asyncio.to_thread(holder.join, 10)
            assert guard.stats().pooler_saturations == 1
            async with engine.connect() as conn:
                assert (await conn.exec_driver_sql("SELECT 3")).scalar_one() == 3
            return elapsed
        finally:
            await engine.dispose()

    elapsed = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert elapsed < 1.0 + KILL_GRACE + SLACK < QUERY_WAIT


@pytest.mark.timing
def test_the_wait_in_the_queue_is_taken_off_the_statements_limit(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # 2 s limit; ~1.2 s in PgBouncer's queue; then a 1.5 s statement. Before,
    # the server gave it the whole 2 s (3.2 s in all); now what is left.
    running, database = bouncer
    engine = _engine(running, database, statement_timeout=2.0)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            conn.commit()
        holder = _hold(running, database, 1.2)
        started = time.monotonic()
        with pytest.raises(poolguard.StatementTimeout), engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_sleep(1.5)")
        elapsed = time.monotonic() - started
        holder.join(10)
        assert elapsed < 2.0 + SLACK
    finally:
        engine.dispose()


@pytest.mark.timing
def test_a_statement_runs_from_when_the_pooler_gave_it_a_server_connection(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # ~1.2 s in PgBouncer's queue (shown on the wire), then a 1 s statement:
    # once it runs, the holder's running time leaves out the queue (culprit
    # isolation reads it: a fast statement that waited is not a slow one).
    running, database = bouncer
    engine = _engine(running, database, statement_timeout=5.0)
    guard = poolguard.get_guard(engine)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            conn.commit()
        holder = _hold(running, database, 1.2)
        seen: list[Any] = []

        def look() -> None:
            wait_until(lambda: _in_queue(running), "a client in PgBouncer's queue", timeout=5)
            wait_until(
                lambda: any(h.running and h.on_wire is None for h in guard.holders()),
                "the statement running on a server connection",
                timeout=10,
            )
            seen.extend(guard.holders())

        looker = threading.Thread(target=look)
        looker.start()
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_sleep(1.0)")
        looker.join(10)
        holder.join(10)
        (one,) = seen
        assert one.statement == "SELECT pg_sleep(?)"
        assert one.age >= 1.0
        assert one.running_for + 0.6 < one.age
    finally:
        engine.dispose()


# -- done when: deadlines hold through PgBouncer ---------------------------------------


@pytest.mark.timing
@pytest.mark.parametrize("limit", [None, 5.0], ids=["deadline", "deadline+statement_timeout"])
def test_psycopg_deadline_holds_through_pgbouncer(
    bouncer: tuple[PgBouncer, str],
    limit: float | None,
) -> None:
    running, database = bouncer
    engine = _engine(running, database, statement_timeout=limit)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            conn.commit()
        holder = _hold(running, database, 4)
        started = time.monotonic()
        with poolguard.request(timeout=1.0), pytest.raises(poolguard.DeadlineExceeded):
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 2")
        elapsed = time.monotonic() - started
        holder.join(10)
        assert elapsed < 1.0 + KILL_GRACE + SLACK < QUERY_WAIT
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 3").scalar_one() == 3
        assert poolguard.get_guard(engine).stats().permits == 0
    finally:
        engine.dispose()


@pytest.mark.timing
@pytest.mark.parametrize("limit", [None, 5.0], ids=["deadline", "deadline+statement_timeout"])
def test_asyncpg_deadline_holds_through_pgbouncer(
    bouncer: tuple[PgBouncer, str],
    limit: float | None,
) -> None:
    # Issue 14: request(timeout=1.0) did not bound the wait (5.17 s).
    running, database = bouncer

    async def scenario() -> float:
        engine = _async_engine(running, database, statement_timeout=limit)
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
                await conn.commit()
            holder = await asyncio.to_thread(_hold, running, database, 4)
            started = time.monotonic()
            async with poolguard.request(timeout=1.0):
                with pytest.raises(poolguard.DeadlineExceeded):
                    async with engine.connect() as conn:
                        await conn.exec_driver_sql("SELECT 2")
            elapsed = time.monotonic() - started
            await asyncio.to_thread(holder.join, 10)
            async with engine.connect() as conn:
                assert (await conn.exec_driver_sql("SELECT 3")).scalar_one() == 3
            assert poolguard.get_guard(engine).stats().permits == 0
            return elapsed
        finally:
            await engine.dispose()

    elapsed = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert elapsed < 1.0 + KILL_GRACE + SLACK < QUERY_WAIT


# -- the pre-ping waits in the queue too ---------------------------------------------------


@pytest.mark.timing
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_pre_ping_queued_in_pgbouncer_ends_at_the_acquire_timeout_and_counts_as_a_wait(
    bouncer: tuple[PgBouncer, str],
    driver: str,
) -> None:
    # Issue 14: a checkout took 6.5 s with acquire_timeout=2, and wait_time 0.
    running, database = bouncer
    create = {"pool_pre_ping": True}

    seen: list[Any] = []

    def look(guard: poolguard.Guard) -> threading.Thread:
        def run() -> None:
            wait_until(lambda: _in_queue(running), "a client in PgBouncer's queue", timeout=5)
            seen.extend(guard.diagnostics.holders_report(fresh=True))

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def check(guard: poolguard.Guard, error: BaseException, elapsed: float) -> None:
        # While it waited, the holders report showed the checkout in its pre-ping.
        (group,) = seen
        assert group.count == group.on_wire == 1
        assert group.on_wire_what == (
            "pre-ping (behind a connection pooler: likely waiting for a server connection)"
        )
        assert elapsed < 1.0 + SLACK < QUERY_WAIT
        assert isinstance(error, poolguard.PoolTimeout)
        assert "pre-ping (behind a connection pooler: likely waiting for a server" in str(error)
        stats = guard.stats()
        assert stats.timeouts == 1  # the checkout's wait, counted as timed out
        assert stats.wait_time_max >= 1.0
        assert stats.permits == 0

    if driver == "psycopg":
        engine = _engine(running, database, create, acquire_timeout=1.0)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            holder = _hold(running, database, 4)
            looker = look(poolguard.get_guard(engine))
            started = time.monotonic()
            with pytest.raises(poolguard.PoolTimeout) as caught:
                engine.connect()
            looker.join(10)
            check(poolguard.get_guard(engine), caught.value, time.monotonic() - started)
            holder.join(10)
        finally:
            engine.dispose()
        return

    async def scenario() -> None:
        engine = _async_engine(running, database, create, acquire_timeout=1.0)
        try:
            async with engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
            holder = await asyncio.to_thread(_hold, running, database, 4)
            looker = look(poolguard.get_guard(engine))
            started = time.monotonic()
            with pytest.raises(poolguard.PoolTimeout) as caught:
                await engine.connect()
            await asyncio.to_thread(looker.join, 10)
            check(poolguard.get_guard(engine), caught.value, time.monotonic() - started)
            await asyncio.to_thread(holder.join, 10)
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


# -- no session-level SET through a transaction pooler -------------------------------------


class _Recording(psycopg.Cursor[Any]):
    """A psycopg cursor that records what it sends."""

    sent: ClassVar[list[str]] = []

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        _Recording.sent.append(str(query))
        return super().execute(query, *args, **kwargs)


def test_autocommit_behind_a_pooler_limits_in_a_transaction_never_with_a_session_set(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # Before: under autocommit the limit was a session-level SET (and a reset
    # after): through transaction pooling each lands on whichever server
    # connection is free, and the setting stays there for other clients.
    running, database = bouncer
    engine = _engine(running, database, {"isolation_level": "AUTOCOMMIT"}, statement_timeout=0.5)

    @sa.event.listens_for(engine, "connect")
    def _record(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.cursor_factory = _Recording

    _Recording.sent = []
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 7").scalar_one() == 7
            with pytest.raises(poolguard.StatementTimeout):
                conn.exec_driver_sql("SELECT pg_sleep(2)")
            # The failed statement's transaction was ended: the next one runs.
            rows = conn.exec_driver_sql("SELECT generate_series(1, 3)").scalars().all()
            assert rows == [1, 2, 3]
        sets = [s for s in _Recording.sent if s.upper().startswith("SET ")]
        assert sets
        assert all(s.upper().startswith("SET LOCAL ") for s in sets), sets
        assert _Recording.sent.count("BEGIN") == _Recording.sent.count("COMMIT") == 3
        # Nothing stayed on the server connection for the next client.
        with psycopg.connect(
            f"host=127.0.0.1 port={running.port} user={running.user} dbname={database}",
            autocommit=True,
        ) as plain:
            row = plain.execute("SHOW statement_timeout").fetchone()
            assert row is not None
            assert row[0] == "0"
    finally:
        engine.dispose()


# -- 5. finding the pooler, and the warnings ------------------------------------------------


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_pgbouncer_is_detected_on_the_first_connection(
    bouncer: tuple[PgBouncer, str],
    postgresql_url: str,
    driver: str,
) -> None:
    running, database = bouncer

    def first_connection(engine: Any) -> poolguard.Guard:
        guard = poolguard.get_guard(engine)
        assert not guard.pooler.checked  # wrap() itself does no I/O
        return guard

    with capture_events(logging.INFO) as events:
        if driver == "psycopg":
            engine = _engine(running, database)
            guard = first_connection(engine)
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
            finally:
                engine.dispose()
            direct = poolguard.wrap(sa.create_engine(postgresql_url))
            try:
                with direct.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
                assert poolguard.get_guard(direct).pooler.behind is None
            finally:
                direct.dispose()
        else:

            async def scenario() -> poolguard.Guard:
                engine = _async_engine(running, database)
                guard = first_connection(engine)
                try:
                    async with engine.connect() as conn:
                        await conn.exec_driver_sql("SELECT 1")
                finally:
                    await engine.dispose()
                return guard

            guard = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert guard.pooler.behind == Pooler("unknown", "backend pid")
    detected = [e for e in events if e["event"] == "pooler.detected"]
    assert len(detected) == 1
    assert detected[0]["pooler"] == f"127.0.0.1:{running.port}"
    assert detected[0]["mode"] == "unknown"
    assert not [e for e in events if e["event"] == "pooler.prepared_statements"]


def test_pgbouncer_is_detected_on_a_pool_opened_before_wrap(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # A service that warms its pool and wraps it afterwards opens no new
    # connection for the guard to look at: the first checkout is looked at.
    running, database = bouncer
    engine = sa.create_engine(running.url(database), pool_size=2, max_overflow=0,
                              connect_args={"prepare_threshold": None})
    with capture_events(logging.INFO) as events:
        try:
            conns = [engine.connect() for _ in range(2)]
            for conn in conns:
                conn.exec_driver_sql("SELECT 1")
                conn.close()
            poolguard.wrap(engine, connect_retries=0)
            guard = poolguard.get_guard(engine)
            assert guard.pooler.unlooked  # nothing looked at yet: wrap() itself does no I/O
            assert guard.pooler.behind is None
            opened = guard.connections.counts()[0]
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
            assert guard.pooler.behind == Pooler("unknown", "backend pid")
            assert not guard.pooler.unlooked
            assert guard.connections.counts()[0] == opened  # no new connection was needed
            with engine.connect() as conn:  # looked at once
                conn.exec_driver_sql("SELECT 1")
        finally:
            engine.dispose()
    assert len([e for e in events if e["event"] == "pooler.detected"]) == 1


def test_the_pooler_option_says_it_without_a_probe(bouncer: tuple[PgBouncer, str]) -> None:
    running, database = bouncer
    for option, expected in [
        ("none", None),
        ("transaction", Pooler("transaction", "pooler option")),
    ]:
        engine = _engine(running, database, pooler=option)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            assert poolguard.get_guard(engine).pooler.behind == expected
        finally:
            engine.dispose()
    # A reconfigure applies at once.
    engine = _engine(running, database)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        guard = poolguard.get_guard(engine)
        assert guard.pooler.behind == Pooler("unknown", "backend pid")
        poolguard.wrap(engine, pooler="none")
        assert guard.pooler.behind is None
        poolguard.wrap(engine, pooler="session")
        assert guard.pooler.behind == Pooler("session", "pooler option")
    finally:
        engine.dispose()
    with pytest.raises(ValueError, match="pooler") as info:
        poolguard.Config(pooler="pgbouncer")
    assert "'auto', 'transaction', 'session' or 'none'" in str(info.value)


def test_detection_probe_through_a_plain_connection(postgresql_url: str) -> None:
    url = make_url(postgresql_url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database
    ) as conn:
        assert detect_pooler(conn) is None
        assert detect_pooler(conn, "session") == Pooler("session", "pooler option")
        assert detect_pooler(conn, admin_mode="statement") == Pooler("transaction", "admin console")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def _server_pid(bouncer: PgBouncer, database: str) -> psycopg.Connection[Any]:
    """A plain client in a transaction through PgBouncer: it holds the server
    connection the last transaction used (PgBouncer hands out the most recent)."""
    conn = psycopg.connect(
        f"host=127.0.0.1 port={bouncer.port} user={bouncer.user} dbname={database}",
        prepare_threshold=None,
    )
    conn.execute("SELECT 1")  # BEGIN: a server connection, held until rollback
    return conn


def _prepared_twice(run: Any, bouncer: PgBouncer, database: str) -> BaseException | None:
    """A statement prepared in one transaction, run again in the next on
    another server connection (the first one held by another client)."""
    run(6)  # psycopg prepares a statement on its 6th run
    other = _server_pid(bouncer, database)
    try:
        run(1)
    except Exception as error:
        return error
    finally:
        other.close()
    return None


@pytest.mark.parametrize("fixed", [False, True], ids=["default", "fixed"])
def test_psycopg_prepared_statements_warning_and_its_fix(
    postgresql_url: str,
    fixed: bool,
) -> None:
    running, database = _bouncer(postgresql_url, default_pool_size=2)
    connect_args = {"prepare_threshold": None} if fixed else {}
    with running, capture_events(logging.WARNING) as events:
        engine = poolguard.wrap(
            sa.create_engine(running.url(database), pool_size=1, connect_args=connect_args)
        )
        try:

            def run(times: int) -> None:
                with engine.connect() as conn:
                    for _ in range(times):
                        conn.execute(sa.text("SELECT 1 + :x"), {"x": 1})
                    conn.commit()

            error = _prepared_twice(run, running, database)
        finally:
            engine.dispose()
    warned = [e for e in events if e["event"] == "pooler.prepared_statements"]
    if fixed:
        assert error is None  # the fix works through PgBouncer
        assert not warned
        return
    assert error is not None
    assert "prepared statement" in str(error)
    (warning,) = warned
    assert warning["driver"] == "psycopg"
    assert warning["fix"] == 'connect_args={"prepare_threshold": None}'


@pytest.mark.parametrize("fixed", [False, True], ids=["default", "fixed"])
def test_asyncpg_prepared_statements_warning_and_its_fix(
    postgresql_url: str,
    fixed: bool,
) -> None:
    running, database = _bouncer(postgresql_url, default_pool_size=2)
    connect_args = {"statement_cache_size": 0, "prepared_statement_cache_size": 0} if fixed else {}

    async def scenario() -> BaseException | None:
        engine = poolguard.wrap(
            create_async_engine(
                running.url(database, "asyncpg"), pool_size=1, connect_args=connect_args
            )
        )

        async def work(times: int) -> None:
            async with engine.connect() as conn:
                for _ in range(times):
                    await conn.execute(sa.text("SELECT 1 + :x"), {"x": 1})
                await conn.commit()

        try:
            await work(6)
            other = _server_pid(running, database)  # a quick blocking call: fine here
            try:
                await work(1)
            except Exception as error:
                return error
            finally:
                other.close()
            return None
        finally:
            await engine.dispose()

    with running, capture_events(logging.WARNING) as events:
        error = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    warned = [e for e in events if e["event"] == "pooler.prepared_statements"]
    if fixed:
        assert error is None
        assert not warned
        return
    assert error is not None
    assert "prepared statement" in str(error)
    (warning,) = warned
    assert warning["driver"] == "asyncpg"
    assert warning["fix"] == (
        'connect_args={"statement_cache_size": 0, "prepared_statement_cache_size": 0}'
    )


def test_unenforceable_statement_timeouts_are_named() -> None:
    assert unenforced_reason("postgresql") is None
    assert unenforced_reason("mariadb") is None
    assert unenforced_reason("sqlite") is None
    assert "SELECT" in (unenforced_reason("mysql") or "")
    assert "microsoft.sql_server" in (unenforced_reason("microsoft.sql_server") or "")


# -- PyMySQL: the wire timing that applies (no pooler) ---------------------------------------


@pytest.fixture
def mariadb_proxy(mariadb_url: str) -> Iterator[tuple[Proxy, str]]:
    url = make_url(mariadb_url)
    with Proxy(url.host or "127.0.0.1", url.port or 3306) as running:
        yield running, url.set(host=running.host, port=running.port).render_as_string(False)


def _mariadb_engine(url: str, **options: Any) -> sa.Engine:
    return poolguard.wrap(
        sa.create_engine(
            url,
            pool_size=1,
            max_overflow=0,
            pool_pre_ping=True,
            connect_args={"connect_timeout": 2},
        ),
        connect_retries=0,
        **options,
    )


@pytest.mark.mariadb
@pytest.mark.timing
def test_pymysql_pre_ping_against_a_silent_server_ends_at_the_acquire_timeout(
    mariadb_proxy: tuple[Proxy, str],
) -> None:
    proxy, url = mariadb_proxy
    engine = _mariadb_engine(url, acquire_timeout=1.0)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        proxy.set_mode("blackhole")
        started = time.monotonic()
        with bounded(proxy, 8.0), pytest.raises(poolguard.PoolTimeout) as info:
            engine.connect()
        assert time.monotonic() - started < 1.0 + SLACK
        assert "pre-ping" in str(info.value)
        assert "pooler" not in str(info.value)  # none was detected: none is named
        proxy.set_mode("pass")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 2").scalar_one() == 2
        assert poolguard.get_guard(engine).stats().permits == 0
    finally:
        proxy.set_mode("pass")
        engine.dispose()


@pytest.mark.mariadb
@pytest.mark.timing
@pytest.mark.parametrize("limit", [None, 5.0], ids=["deadline", "deadline+statement_timeout"])
def test_pymysql_deadline_against_a_silent_server(
    mariadb_proxy: tuple[Proxy, str],
    limit: float | None,
) -> None:
    proxy, url = mariadb_proxy
    engine = _mariadb_engine(url, statement_timeout=limit)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        started = time.monotonic()
        with bounded(proxy, 8.0), poolguard.request(timeout=1.0), engine.connect() as conn:
            proxy.set_mode("blackhole")
            with pytest.raises(poolguard.DeadlineExceeded):
                conn.exec_driver_sql("SELECT 2")
        assert time.monotonic() - started < 1.0 + KILL_GRACE + SLACK
        proxy.set_mode("pass")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 3").scalar_one() == 3
    finally:
        proxy.set_mode("pass")
        engine.dispose()


@pytest.mark.timing
@pytest.mark.parametrize("isolation", ["READ COMMITTED", "AUTOCOMMIT"])
def test_asyncpg_statement_timeout_through_pgbouncer_is_enforced(
    bouncer: tuple[PgBouncer, str],
    isolation: str,
) -> None:
    # The SET LOCAL reaches the server inside the statement's transaction
    # (under autocommit: one of its own), so the server cancels the statement.
    running, database = bouncer

    async def scenario() -> None:
        engine = _async_engine(
            running, database, {"isolation_level": isolation}, statement_timeout=0.5
        )
        try:
            async with engine.connect() as conn:
                started = time.monotonic()
                with pytest.raises(poolguard.StatementTimeout):
                    await conn.exec_driver_sql("SELECT pg_sleep(3)")
                assert time.monotonic() - started < 0.5 + SLACK
                await conn.rollback()
                assert (await conn.exec_driver_sql("SELECT 4")).scalar_one() == 4
            async with poolguard.request(statement_timeout=0), engine.connect() as conn:
                shown = (await conn.exec_driver_sql("SHOW statement_timeout")).scalar_one()
                assert shown == "0"  # nothing stayed on the server connection
            assert poolguard.get_guard(engine).stats().connections_invalidated == 0
        finally:
            await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
