"""Behind PgBouncer, saturation is not failure (issue 14, item 2).

PgBouncer's queue timing out (``query_wait_timeout``) or filling up
(``max_client_conn``) becomes :class:`poolguard.PoolerSaturated`, which the
breaker does not count; the pooler's own failures ("database removed") still
count. Pure tests build the drivers' errors as PgBouncer 1.18 makes them;
the others run against a real PgBouncer (``tests/_pgbouncer.py``).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from sqlalchemy.ext.asyncio import create_async_engine

import poolguard
from _pgbouncer import PgBouncer, find_binary
from poolguard._pooler import POOLER_FAILURE, SATURATION, pooler_kind
from poolguard.breaker import default_classifier
from poolguard.testing import capture_events

# -- recognition, on the errors as the drivers raise them -----------------------

_WAIT = "query_wait_timeout"
_FULL = "no more connections allowed (max_client_conn)"


def _asyncpg_adapted(error: Exception) -> Exception:
    """``error`` as SQLAlchemy's asyncpg adapter raises it (its own class, the
    asyncpg error as the cause), wrapped as SQLAlchemy wraps it."""
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi

    adapted: Any = AsyncAdapt_asyncpg_dbapi.Error(f"{type(error)}: {error}")
    adapted.sqlstate = getattr(error, "sqlstate", None)
    adapted.__cause__ = error
    return sa_exc.DBAPIError(None, None, adapted)


SATURATIONS = {
    "psycopg mid-session": psycopg.errors.ProtocolViolation(_WAIT),
    "psycopg at connect": psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 6432 failed: '
        "FATAL:  query_wait_timeout"),
    "psycopg max_client_conn": psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 6432 failed: '
        f"FATAL:  {_FULL}"),
    "psycopg wrapped": sa_exc.OperationalError(
        "select 1", None, psycopg.errors.ProtocolViolation(_WAIT)),
    "asyncpg closed": asyncpg.exceptions.ConnectionDoesNotExistError(
        f"connection was closed in the middle of operation: {_WAIT}"),
    "asyncpg protocol": asyncpg.exceptions.ProtocolViolationError(_WAIT),
    "asyncpg max_client_conn": asyncpg.exceptions.ProtocolViolationError(_FULL),
    "asyncpg adapted": _asyncpg_adapted(asyncpg.exceptions.ConnectionDoesNotExistError(
        f"connection was closed in the middle of operation: {_WAIT}")),
}

FAILURES = {
    "database removed": psycopg.errors.ProtocolViolation("database removed"),
    "database removed, wrapped": sa_exc.OperationalError(
        None, None, psycopg.errors.ProtocolViolation("database removed")),
    "server_login_retry": psycopg.OperationalError(
        "connection failed: ... FATAL:  server login has been failing, try again later "
        "(server_login_retry)"),
    "cannot connect": asyncpg.exceptions.ProtocolViolationError(
        "pgbouncer cannot connect to server"),
}

NEITHER = {
    "a refused connection": psycopg.OperationalError(
        'connection failed: connection to server at "127.0.0.1", port 1 failed: '
        "Connection refused"),
    "a user error quoting the marker": psycopg.errors.RaiseException(_WAIT),
    "asyncpg, a user error quoting it": asyncpg.exceptions.RaiseError(_FULL),
    "a statement timeout": psycopg.errors.QueryCanceled(
        "canceling statement due to statement timeout"),
}


@pytest.mark.parametrize("error", SATURATIONS.values(), ids=SATURATIONS.keys())
def test_pgbouncer_saturation_is_recognised_and_is_no_breaker_failure(error: Exception) -> None:
    assert pooler_kind(error) == SATURATION
    assert default_classifier(error) is False


@pytest.mark.parametrize("error", FAILURES.values(), ids=FAILURES.keys())
def test_pgbouncer_failures_are_recognised_and_count_as_failures(error: Exception) -> None:
    assert pooler_kind(error) == POOLER_FAILURE
    assert default_classifier(error) is True


@pytest.mark.parametrize("error", NEITHER.values(), ids=NEITHER.keys())
def test_other_errors_are_not_the_poolers(error: Exception) -> None:
    assert pooler_kind(error) is None


def _saturated() -> poolguard.PoolerSaturated:
    return poolguard.PoolerSaturated(
        "pool 'p': PgBouncer at h:6432: ...", pool_name="p", pooler="h:6432",
        error=_WAIT, timeout=1.2, in_use=1, capacity=5, waiting=0, retry_after=1.2,
        orig=psycopg.errors.ProtocolViolation(_WAIT), statement="select ?",
    )


def test_pooler_saturated_keeps_both_kinds_of_handlers_working() -> None:
    error = _saturated()
    assert isinstance(error, poolguard.PoolTimeout)
    assert isinstance(error, sa_exc.TimeoutError)
    assert isinstance(error, sa_exc.OperationalError)  # what plain SQLAlchemy raised
    assert isinstance(error.orig, psycopg.errors.ProtocolViolation)
    assert default_classifier(error) is False
    assert str(error) == "pool 'p': PgBouncer at h:6432: ..."


def test_pooler_saturated_pickles_with_its_fields() -> None:
    error = _saturated()
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is poolguard.PoolerSaturated
    assert (copy.pooler, copy.error, copy.timeout, copy.retry_after, copy.pool_name) == (
        "h:6432", _WAIT, 1.2, 1.2, "p")
    assert str(copy) == str(error)


# -- against a real PgBouncer -------------------------------------------------------

def _bouncer(postgresql_url: str, **settings: Any) -> tuple[PgBouncer, str]:
    if find_binary() is None:
        pytest.skip("pgbouncer not installed")
    url = sa.engine.make_url(postgresql_url)
    bouncer = PgBouncer(upstream_host=url.host or "127.0.0.1", upstream_port=url.port or 5432,
                        **settings)
    return bouncer, url.database or "test"


def _hold(bouncer: PgBouncer, database: str, seconds: float) -> threading.Thread:
    """Hold PgBouncer's one server connection for ``seconds`` (a plain client)."""
    started = threading.Event()

    def run() -> None:
        with psycopg.connect(f"host=127.0.0.1 port={bouncer.port} user={bouncer.user} "
                             f"dbname={database}", prepare_threshold=None) as conn:
            with conn.transaction():
                conn.execute("select 1")
                started.set()
                conn.execute("select pg_sleep(%s)", (seconds,))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    return thread


@pytest.mark.postgresql
@pytest.mark.timing
def test_psycopg_query_wait_timeout_is_pooler_saturated(postgresql_url: str) -> None:
    bouncer, database = _bouncer(postgresql_url, default_pool_size=1, query_wait_timeout=1)
    classified: list[type[BaseException]] = []

    def classifier(error: BaseException) -> bool:
        classified.append(type(error))
        return default_classifier(error)

    with bouncer:
        engine = poolguard.wrap(
            sa.create_engine(bouncer.url(database), pool_size=2,
                             connect_args={"prepare_threshold": None}),
            breaker=True, breaker_classifier=classifier,
        )
        try:
            with engine.connect() as conn:  # a pooled connection, before the queue fills
                conn.execute(sa.text("select 1"))
            holder = _hold(bouncer, database, 3)
            with capture_events(logging.WARNING) as events, pytest.raises(
                poolguard.PoolerSaturated
            ) as caught, engine.connect() as conn:
                conn.execute(sa.text("select 2"))
            holder.join()
            error = caught.value
            assert isinstance(error, poolguard.PoolTimeout)
            assert isinstance(error, sa_exc.OperationalError)
            assert isinstance(error.orig, psycopg.errors.ProtocolViolation)
            assert error.connection_invalidated  # PgBouncer closed that client
            assert f"PgBouncer at 127.0.0.1:{bouncer.port}" in str(error)
            assert "query_wait_timeout" in str(error)
            assert "did not count this as a database failure" in str(error)
            assert error.retry_after >= 0.9  # at least the wait in PgBouncer's queue
            guard = poolguard.get_guard(engine)
            assert guard.stats().pooler_saturations == 1
            assert classified == [poolguard.PoolerSaturated]  # what the caller sees
            saturated = [e for e in events if e["event"] == "pooler.saturated"]
            assert len(saturated) == 1
            assert saturated[0]["pooler"] == f"127.0.0.1:{bouncer.port}"
            assert saturated[0]["error"] == "query_wait_timeout"
            with engine.connect() as conn:  # the broken connection was discarded
                assert conn.execute(sa.text("select 3")).scalar_one() == 3
        finally:
            engine.dispose()


@pytest.mark.postgresql
@pytest.mark.timing
def test_asyncpg_query_wait_timeout_is_pooler_saturated(asyncpg_url: str) -> None:
    bouncer, database = _bouncer(asyncpg_url, default_pool_size=1, query_wait_timeout=1)

    async def run() -> None:
        engine = poolguard.wrap(create_async_engine(bouncer.url(database, "asyncpg"),
                                                    pool_size=2))
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("select 1"))
            holder = await asyncio.to_thread(_hold, bouncer, database, 3)
            with pytest.raises(poolguard.PoolerSaturated) as caught:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("select 2"))
            await asyncio.to_thread(holder.join)
            error = caught.value
            assert isinstance(error, poolguard.PoolTimeout)
            assert isinstance(error, sa_exc.OperationalError)
            assert error.connection_invalidated
            assert "query_wait_timeout" in str(error)
            assert poolguard.get_guard(engine).stats().pooler_saturations == 1
            async with engine.connect() as conn:
                assert (await conn.execute(sa.text("select 3"))).scalar_one() == 3
        finally:
            await engine.dispose()

    with bouncer:
        asyncio.run(run())


def _error_of(engine: sa.Engine, statement: str) -> BaseException | None:
    """What running ``statement`` raised (None: nothing)."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(statement))
    except Exception as error:
        return error
    return None


@pytest.mark.postgresql
@pytest.mark.timing
def test_breaker_stays_closed_on_saturation_and_opens_on_a_pooler_failure(
    postgresql_url: str,
) -> None:
    bouncer, database = _bouncer(postgresql_url, default_pool_size=1, query_wait_timeout=1)
    with bouncer:
        engine = poolguard.wrap(
            sa.create_engine(bouncer.url(database), pool_size=2,
                             connect_args={"prepare_threshold": None}),
            breaker=True, breaker_minimum_calls=2, breaker_window_size=2,
            breaker_failure_rate=1.0, breaker_wait_in_open=30,
        )
        guard = poolguard.get_guard(engine)
        try:
            with engine.connect() as conn:  # a pooled connection, before the queue fills
                conn.execute(sa.text("select 1"))
            holder = _hold(bouncer, database, 6)
            raised = [_error_of(engine, "select 1") for _ in range(3)]
            holder.join()
            assert guard.breaker is not None
            assert guard.breaker.transitions["open"] == 0  # 3 saturations: no failure
            assert guard.breaker.state == "closed"
            assert [type(error) for error in raised] == [poolguard.PoolerSaturated] * 3
            assert guard.stats().pooler_saturations == 3
            # A real failure of the pooler: the database's connections dropped.
            errors: list[BaseException] = []

            def sleep() -> None:
                try:
                    with engine.connect() as conn:
                        conn.execute(sa.text("select pg_sleep(5)"))
                except Exception as error:
                    errors.append(error)

            for attempt in range(2):
                thread = threading.Thread(target=sleep)
                thread.start()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and not any(
                    row["state"] == "active" and row["database"] == database
                    for row in bouncer.admin("SHOW SERVERS")
                ):
                    time.sleep(0.05)
                bouncer.admin(f"KILL {database}")
                thread.join(10)
                bouncer.admin(f"RESUME {database}")
                assert len(errors) == attempt + 1
                assert "database removed" in str(errors[-1])
                assert not isinstance(errors[-1], poolguard.PoolerSaturated)
            assert guard.breaker.state == "open"
        finally:
            engine.dispose()


@pytest.mark.postgresql
@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_max_client_conn_at_connect_is_pooler_saturated(postgresql_url: str, driver: str) -> None:
    bouncer, database = _bouncer(postgresql_url, max_client_conn=1)
    with bouncer, psycopg.connect(f"host=127.0.0.1 port={bouncer.port} user={bouncer.user} "
                                  f"dbname={database}"):  # the one client allowed

        if driver == "psycopg":
            engine = poolguard.wrap(sa.create_engine(bouncer.url(database)), breaker=True,
                                    breaker_minimum_calls=1)
            try:
                with pytest.raises(poolguard.PoolerSaturated) as caught:
                    engine.connect()
            finally:
                engine.dispose()
            guard = poolguard.get_guard(engine)
        else:
            async def run() -> tuple[BaseException, poolguard.Guard]:
                engine = poolguard.wrap(create_async_engine(bouncer.url(database, "asyncpg")),
                                        breaker=True, breaker_minimum_calls=1)
                try:
                    with pytest.raises(poolguard.PoolerSaturated) as caught:
                        await engine.connect()
                    return caught.value, poolguard.get_guard(engine)
                finally:
                    await engine.dispose()

            error, guard = asyncio.run(run())
            caught = None
        error = caught.value if caught is not None else error
        assert isinstance(error, poolguard.PoolTimeout)
        assert isinstance(error, sa_exc.OperationalError)
        assert "max_client_conn" in str(error)
        assert guard.stats().pooler_saturations == 1
        assert guard.breaker is not None
        assert guard.breaker.state == "closed"


def test_saturations_are_counted_logged_once_a_second_and_fed_to_the_adaptive_limit() -> None:
    from poolguard._config import Config
    from poolguard._gate import Gate
    from poolguard._log import EventLog
    from poolguard._parts import GuardParts
    from poolguard._policies import Gradient2
    from poolguard._pooler import PoolerErrors
    from poolguard._recorder import Recorder

    gate = Gate(5)
    gate.configure_policy(adaptive=Gradient2(5))
    assert gate.admission is not None
    adaptive = gate.admission.adaptive
    assert adaptive is not None
    for _ in range(50):
        gate.sample_hold(0.002)  # the usual hold time
    before = adaptive.limit
    recorder = Recorder()
    parts = GuardParts(
        log=EventLog("p"), config=Config, gate=lambda: gate, db_system=lambda: "postgresql",
        acquire_timeout=lambda: 2.0, reject=lambda reason, priority: None,
    )
    errors = PoolerErrors(
        parts, recorder,
        url=lambda: sa.engine.make_url("postgresql+psycopg://u@bouncer:6432/db"),
        retry_after=lambda: 0.1,
    )
    with capture_events(logging.WARNING) as events:
        first = errors.saturated(psycopg.OperationalError(f"... FATAL:  {_FULL}"), 1.5,
                                 sample=True)
        others = [errors.saturated(psycopg.errors.ProtocolViolation(_WAIT), 1.0)
                  for _ in range(3)]
        failure = errors.saturated(psycopg.errors.ProtocolViolation("database removed"), 1.0)
    assert failure is None  # the pooler's failure is no saturation
    assert isinstance(first, poolguard.PoolerSaturated)
    assert all(isinstance(e, poolguard.PoolerSaturated) for e in others)
    assert str(first).startswith("pool 'p': PgBouncer at bouncer:6432: refused the connection")
    assert "max_client_conn" in str(first)
    assert first.retry_after == 1.5  # at least the wait, over the pool's 0.1 s estimate
    assert recorder.pooler_saturations == 4
    assert [e["event"] for e in events] == ["pooler.saturated"]  # one a second at most
    assert events[0]["pooler"] == "bouncer:6432"
    assert adaptive.limit < before  # only the connect's (sample=True) wait was fed
