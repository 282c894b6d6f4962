"""Breakers behind PgBouncer: saturation is neither a failure nor a slow call (issue 14).

Behind a transaction pooler, a request that waits in the pooler's queue for a
server connection is slow, or is cut by its deadline there, because others
hold the server connections: that is saturation, not the database failing
and not the request's tag being slow. And one slow query class cut by its
statement timeout while the database answers everyone else is that class's
trouble (its tag's breaker), not the database's (the guard-wide breaker). A
real outage (connections failing) still opens the guard-wide breaker.

Real PgBouncer (``tests/_pgbouncer.py``) holding its one server connection
with a plain client, real PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import poolguard
from _support import wait_until
from test_pooler import _bouncer, _hold

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _pgbouncer import PgBouncer

pytestmark = [pytest.mark.postgresql, pytest.mark.usefixtures("structlog_unconfigured")]

#: Breakers that open on the first failure, or on the first slow call (>= 1 s).
TOUCHY = {
    "breaker": True,
    "breaker_per_tag": True,
    "breaker_minimum_calls": 1,
    "breaker_failure_rate": 0.01,
    "breaker_slow_call_rate": 0.01,
    "breaker_slow_call_duration": 1.0,
}


@pytest.fixture
def bouncer(postgresql_url: str) -> Iterator[tuple[PgBouncer, str]]:
    """A PgBouncer of its own with ONE server connection (transaction mode)."""
    running, database = _bouncer(postgresql_url, default_pool_size=1, query_wait_timeout=8)
    with running:
        yield running, database


def _engine(url: str, pool_size: int = 1, **options: Any) -> sa.Engine:
    return poolguard.wrap(
        sa.create_engine(url, pool_size=pool_size, max_overflow=0,
                         connect_args={"prepare_threshold": None}),
        connect_retries=0,
        **options,
    )


def _states(guard: poolguard.Guard) -> dict[str, str]:
    states = {tag: b.state for tag, b in guard.tag_breakers.items()}
    assert guard.breaker is not None
    states["*"] = guard.breaker.state
    return states


def _in_queue(bouncer: PgBouncer) -> bool:
    return any(row["cl_waiting"] for row in bouncer.admin("SHOW POOLS"))


@pytest.mark.timing
def test_a_wait_in_pgbouncers_queue_is_not_the_tags_slow_call(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # Before: the 1.5 s the SET LOCAL waited for PgBouncer's one server
    # connection counted as the statement's time: a slow call, and the api
    # tag's breaker opened although SELECT 1 took a millisecond.
    running, database = bouncer
    engine = _engine(running.url(database), pooler="transaction", **TOUCHY)
    guard = poolguard.get_guard(engine)
    try:
        with poolguard.request(tag="api", timeout=10.0), engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        holder = _hold(running, database, 1.5)
        started = time.monotonic()
        with poolguard.request(tag="api", timeout=10.0), engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 2").scalar_one() == 2
        holder.join(10)
        assert time.monotonic() - started >= 1.2  # it did wait in the queue
        assert _states(guard) == {"api": "closed", "*": "closed"}
    finally:
        engine.dispose()


@pytest.mark.timing
def test_a_deadline_cut_in_pgbouncers_queue_opens_no_breaker(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # Before: the deadline's watchdog cut the socket while the SET LOCAL
    # waited in PgBouncer's queue; the breakers saw a disconnect (a database
    # failure) and both opened. The database never saw the request.
    running, database = bouncer
    engine = _engine(running.url(database), pooler="transaction", **TOUCHY)
    guard = poolguard.get_guard(engine)
    try:
        with poolguard.request(tag="api", timeout=10.0), engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        holder = _hold(running, database, 3)
        with pytest.raises(poolguard.DeadlineExceeded), poolguard.request(
            tag="api", timeout=0.5
        ), engine.connect() as conn:
            conn.exec_driver_sql("SELECT 2")
        holder.join(10)
        assert _states(guard) == {"api": "closed", "*": "closed"}
        with poolguard.request(tag="api", timeout=10.0), engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 3").scalar_one() == 3
    finally:
        engine.dispose()


def _timeout_while(engine: sa.Engine, others: bool) -> None:
    """A report cut by its 0.3 s statement timeout; ``others``: while api
    statements succeed on another connection all along."""
    stop = threading.Event()
    answered: list[int] = []

    def api() -> None:
        while not stop.is_set():
            with poolguard.request(tag="api"), engine.connect() as conn:
                answered.append(conn.exec_driver_sql("SELECT 1").scalar_one())
            time.sleep(0.02)

    thread = threading.Thread(target=api, daemon=True)
    if others:
        with poolguard.request(tag="api"), engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")  # the breaker's first outcome: a success
        thread.start()
        wait_until(lambda: answered, "an api statement answered")
    try:
        with pytest.raises(poolguard.StatementTimeout), poolguard.request(
            tag="report", statement_timeout=0.3
        ), engine.connect() as conn:
            conn.exec_driver_sql("SELECT pg_sleep(3)")
    finally:
        stop.set()
        if others:
            thread.join(10)
    if others:
        assert len(answered) >= 3  # the database answered during the report


@pytest.mark.timing
def test_one_slow_class_cut_by_its_timeout_opens_its_tags_breaker_only(
    postgresql_url: str,
) -> None:
    # Before: QueryCanceled counted as a database failure for the guard-wide
    # breaker too; every request was refused with CircuitOpen while the
    # database answered the api all along.
    engine = _engine(postgresql_url, pool_size=2, **TOUCHY)
    guard = poolguard.get_guard(engine)
    try:
        _timeout_while(engine, others=True)
        states = _states(guard)
        assert states["report"] == "open"
        assert states["*"] == "closed"
        assert states["api"] == "closed"
    finally:
        engine.dispose()


@pytest.mark.timing
def test_a_timeout_while_the_database_answers_nobody_still_opens_the_breaker(
    postgresql_url: str,
) -> None:
    # The other side: nothing succeeded while it ran (a database that hangs
    # looks like this), so it is the database's failure as before.
    engine = _engine(postgresql_url, pool_size=2, **TOUCHY)
    guard = poolguard.get_guard(engine)
    try:
        _timeout_while(engine, others=False)
        assert _states(guard)["*"] == "open"
    finally:
        engine.dispose()


def test_connect_failures_still_open_the_breaker_behind_a_pooler(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # A real outage: the pooler refuses connections (its database is gone).
    running, _ = bouncer
    url = running.url("no_such_database_here")
    engine = _engine(url, pooler="transaction", **TOUCHY)
    guard = poolguard.get_guard(engine)
    try:
        with pytest.raises(sa.exc.OperationalError):
            with poolguard.request(tag="api"), engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        assert _states(guard)["*"] == "open"
    finally:
        engine.dispose()
