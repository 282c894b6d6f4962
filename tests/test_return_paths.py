"""Every way a connection goes back to a guarded pool releases its permit exactly once.

Each test checks the permit count while a connection is out (so that a guard that
never counted would fail) and again after it came back: ``stats().permits``,
``gate.in_use`` and, for queue pools, the pool's own ``checkedout()`` must all be
back to zero. The engines run against real servers through the test bed fixtures.
"""

from __future__ import annotations

import gc
import threading
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool, SingletonThreadPool, StaticPool

import poolguard
from _support import EngineFactory, wait_until
from poolguard import GuardedPoolMixin, PoolTimeout

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Engine

POOL_SIZE = 2
MAX_OVERFLOW = 1
CAPACITY = POOL_SIZE + MAX_OVERFLOW
JOIN_TIMEOUT_S = 20.0


# --- helpers -------------------------------------------------------------------------


def _permits(engine: Engine) -> int:
    guard = poolguard.get_guard(engine)
    permits = guard.stats().permits
    assert guard.gate.in_use == permits
    return permits


def _assert_balanced(engine: Engine) -> None:
    """No permit held, nobody waiting, and the pool agrees that nothing is out."""
    guard = poolguard.get_guard(engine)
    stats = guard.stats()
    assert stats.permits == 0, stats
    assert guard.gate.in_use == 0, stats
    assert stats.waiting == 0, stats
    pool = engine.pool
    if isinstance(pool, QueuePool):
        assert pool.checkedout() == 0, stats
        assert stats.in_use == 0, stats


def _select_one(conn: sa.Connection) -> None:
    assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1


@pytest.fixture
def make_engine(make_engine: EngineFactory) -> Callable[..., Engine]:
    """``create_engine(url, **kwargs)``, unguarded (the test wraps it), disposed when the
    test ends."""
    return make_engine.using(pool={}).plain


@pytest.fixture
def engine(db_url: str, make_engine: Callable[..., Engine]) -> Engine:
    """A guarded QueuePool engine with a small pool, once per backend."""
    return poolguard.wrap(
        make_engine(db_url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW),
        acquire_timeout=10,
    )


def _backend(url: str) -> str:
    return make_url(url).get_backend_name()


# --- Core ----------------------------------------------------------------------------


def test_engine_is_guarded_with_pool_capacity(engine: Engine) -> None:
    guard = poolguard.get_guard(engine)
    assert isinstance(engine.pool, GuardedPoolMixin)
    assert isinstance(engine.pool, QueuePool)
    assert guard.stats().capacity == CAPACITY
    _assert_balanced(engine)


def test_connection_close(engine: Engine) -> None:
    conns = [engine.connect() for _ in range(CAPACITY)]
    for conn in conns:
        _select_one(conn)
    assert _permits(engine) == CAPACITY
    assert engine.pool.checkedout() == CAPACITY  # type: ignore[attr-defined]
    for released, conn in enumerate(conns, start=1):
        conn.close()
        assert _permits(engine) == CAPACITY - released
    _assert_balanced(engine)
    assert poolguard.get_guard(engine).stats().acquisitions == CAPACITY


def test_engine_begin_block_commit_and_rollback(engine: Engine) -> None:
    with engine.begin() as conn:
        _select_one(conn)
        assert _permits(engine) == 1
    _assert_balanced(engine)

    def fail_inside_begin() -> None:
        with engine.begin() as conn:
            _select_one(conn)
            assert _permits(engine) == 1
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_inside_begin()
    _assert_balanced(engine)


def _item_model(table_name: str) -> type[Any]:
    """A mapped class on a table private to the test (the servers are shared)."""

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = table_name
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        label: Mapped[str] = mapped_column(sa.String(50))

    return Item


@pytest.fixture
def item_model(engine: Engine) -> Iterator[type[Any]]:
    item = _item_model(f"poolguard_rp_{uuid.uuid4().hex[:12]}")
    item.metadata.create_all(engine)
    _assert_balanced(engine)
    yield item
    item.metadata.drop_all(engine)


def test_orm_session_commit_and_rollback(engine: Engine, item_model: type[Any]) -> None:
    with Session(engine) as session:
        session.add(item_model(id=1, label="kept"))
        session.flush()
        assert _permits(engine) == 1
        session.commit()
        assert _permits(engine) == 0
    _assert_balanced(engine)

    with Session(engine) as session:
        session.add(item_model(id=2, label="rolled back"))
        session.flush()
        assert _permits(engine) == 1
        session.rollback()
    _assert_balanced(engine)

    with Session(engine) as session:
        labels = session.scalars(sa.select(item_model.label).order_by(item_model.id)).all()
        assert labels == ["kept"]
    _assert_balanced(engine)


def test_sessionmaker_commit_and_rollback(engine: Engine, item_model: type[Any]) -> None:
    factory = sessionmaker(engine)
    with factory.begin() as session:
        session.add(item_model(id=1, label="kept"))
        session.flush()
        assert _permits(engine) == 1
    _assert_balanced(engine)

    def fail_inside_begin() -> None:
        with factory.begin() as session:
            session.add(item_model(id=2, label="rolled back"))
            session.flush()
            assert _permits(engine) == 1
            raise LookupError

    with pytest.raises(LookupError):
        fail_inside_begin()
    _assert_balanced(engine)

    with factory() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(item_model)) == 1
    _assert_balanced(engine)


def test_raw_connection_close(engine: Engine) -> None:
    raw = engine.raw_connection()
    cursor = raw.cursor()
    cursor.execute("SELECT 1")
    assert cursor.fetchone()[0] == 1
    cursor.close()
    assert _permits(engine) == 1
    raw.close()
    _assert_balanced(engine)


def test_pool_connect_close(engine: Engine) -> None:
    first = engine.pool.connect()
    second = engine.pool.connect()
    assert _permits(engine) == 2
    first.close()
    assert _permits(engine) == 1
    second.close()
    _assert_balanced(engine)


def test_invalidate_releases_at_once(engine: Engine) -> None:
    guard = poolguard.get_guard(engine)
    conn = engine.connect()
    _select_one(conn)
    conn.invalidate()
    # The invalidated connection went back to the pool: its permit is free even
    # though the Connection object is not closed yet.
    _assert_balanced(engine)
    conn.close()
    _assert_balanced(engine)

    fairy = engine.pool.connect()
    assert _permits(engine) == 1
    fairy.invalidate()
    _assert_balanced(engine)
    assert guard.stats().connections_invalidated == 2

    with engine.connect() as conn:  # the pool still serves
        _select_one(conn)
    _assert_balanced(engine)


def test_detach_releases_at_once(engine: Engine) -> None:
    guard = poolguard.get_guard(engine)
    conn = engine.connect()
    _select_one(conn)
    conn.detach()
    _assert_balanced(engine)
    _select_one(conn)  # the detached DBAPI connection still works, outside the pool
    closed_before = guard.stats().connections_closed
    conn.close()
    assert guard.stats().connections_closed == closed_before + 1
    _assert_balanced(engine)

    fairy = engine.pool.connect()
    fairy.detach()
    _assert_balanced(engine)
    fairy.close()
    _assert_balanced(engine)


def test_garbage_collected_pool_connection(engine: Engine) -> None:
    fairy: Any = engine.pool.connect()
    assert _permits(engine) == 1
    del fairy
    gc.collect()
    _assert_balanced(engine)

    conn: Any = engine.connect()
    _select_one(conn)
    assert _permits(engine) == 1
    del conn
    gc.collect()
    _assert_balanced(engine)

    with engine.connect() as conn:
        _select_one(conn)
    _assert_balanced(engine)


# --- failed checkouts ----------------------------------------------------------------


class _ConnectFailed(Exception):
    pass


def test_failed_checkout_propagates_and_holds_no_permit(
    db_url: str, make_engine: Callable[..., Engine]
) -> None:
    backend = _backend(db_url)
    if backend == "sqlite":
        import sqlite3

        failure = sqlite3.OperationalError("poolguard test: creator refuses to connect")

        def creator() -> Any:
            raise failure

        plain = make_engine(db_url, creator=creator, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
    else:
        missing = f"poolguard_missing_{uuid.uuid4().hex[:12]}"
        plain = make_engine(
            make_url(db_url).set(database=missing),
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
        )
    engine = poolguard.wrap(plain, acquire_timeout=0)

    # More failures than permits: a leaked permit would turn a later attempt into a
    # PoolTimeout (the acquire timeout is 0) instead of the connect error.
    for _ in range(CAPACITY + 2):
        with pytest.raises(sa.exc.OperationalError) as info:
            engine.connect()
        assert type(info.value) is sa.exc.OperationalError
        assert not isinstance(info.value, poolguard.PoolguardError)
        if backend == "sqlite":
            assert info.value.orig is failure
        else:
            assert missing in str(info.value.orig)
        _assert_balanced(engine)

        # The pool itself raises the driver's own error.
        with pytest.raises(engine.dialect.loaded_dbapi.OperationalError):
            engine.pool.connect()
        _assert_balanced(engine)
    assert poolguard.get_guard(engine).stats().timeouts == 0


def test_raising_checkout_listener_holds_no_permit(engine: Engine) -> None:
    guard = poolguard.get_guard(engine)

    def refuse(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        raise _ConnectFailed("checkout listener says no")

    event.listen(engine, "checkout", refuse)
    for _ in range(CAPACITY + 1):
        with pytest.raises(_ConnectFailed):
            engine.connect()
        _assert_balanced(engine)
    event.remove(engine, "checkout", refuse)
    assert guard.stats().timeouts == 0

    conns = [engine.connect() for _ in range(CAPACITY)]  # every permit still exists
    assert _permits(engine) == CAPACITY
    for conn in conns:
        conn.close()
    _assert_balanced(engine)


def test_disconnect_from_checkout_listener_reconnects(engine: Engine) -> None:
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:  # one idle connection to be found dead
        _select_one(conn)
    opened = guard.stats().connections_opened
    calls: list[int] = []

    def flaky(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.DisconnectionError("poolguard test: pretend it died")

    event.listen(engine, "checkout", flaky)
    try:
        with engine.connect() as conn:
            _select_one(conn)
            assert _permits(engine) == 1
    finally:
        event.remove(engine, "checkout", flaky)
    assert len(calls) == 2
    stats = guard.stats()
    assert stats.connections_opened == opened + 1
    assert stats.connections_invalidated >= 1
    _assert_balanced(engine)


def test_failed_checkout_on_busy_wrapped_engine_keeps_adopted_permit(
    sqlite_url: str, make_engine: Callable[..., Engine]
) -> None:
    # A connection checked out before wrap() holds an adopted permit. A record that
    # a failed checkout gives back is not that connection: it must not give the
    # adopted permit back (else the gate admits more than the pool can serve).
    engine = make_engine(sqlite_url, pool_size=POOL_SIZE, max_overflow=0)
    early = engine.connect()
    _select_one(early)
    with engine.connect() as conn:  # leaves one idle connection in the pool
        _select_one(conn)
    poolguard.wrap(engine, acquire_timeout=0)
    assert _permits(engine) == 1

    def refuse(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        raise _ConnectFailed("checkout listener says no")

    event.listen(engine, "checkout", refuse)
    with pytest.raises(_ConnectFailed):
        engine.connect()
    event.remove(engine, "checkout", refuse)
    assert _permits(engine) == 1  # the early connection is still out

    second = engine.connect()
    assert _permits(engine) == POOL_SIZE
    with pytest.raises(PoolTimeout):
        engine.connect()
    second.close()
    early.close()
    _assert_balanced(engine)


# --- dispose, pre-ping, recycle --------------------------------------------------------


def test_dispose_with_connection_out(engine: Engine) -> None:
    guard = poolguard.get_guard(engine)
    old_pool = engine.pool
    conn = engine.connect()
    _select_one(conn)
    engine.dispose()

    assert engine.pool is not old_pool
    assert isinstance(engine.pool, GuardedPoolMixin)
    assert poolguard.get_guard(engine) is guard
    assert guard.pool is engine.pool
    assert _permits(engine) == 1  # the connection of the old pool still holds its permit

    _select_one(conn)
    conn.close()
    _assert_balanced(engine)

    conns = [engine.connect() for _ in range(CAPACITY)]
    assert _permits(engine) == CAPACITY
    for c in conns:
        c.close()
    _assert_balanced(engine)
    assert guard.stats().acquisitions == 1 + CAPACITY


def test_pool_pre_ping(db_url: str, make_engine: Callable[..., Engine]) -> None:
    engine = poolguard.wrap(
        make_engine(db_url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_pre_ping=True)
    )
    for _ in range(3):  # later checkouts reuse the connection and ping it
        with engine.connect() as conn:
            _select_one(conn)
            assert _permits(engine) == 1
        _assert_balanced(engine)
    stats = poolguard.get_guard(engine).stats()
    assert stats.acquisitions == 3
    assert stats.connections_opened == 1


def test_pool_recycle(db_url: str, make_engine: Callable[..., Engine]) -> None:
    engine = poolguard.wrap(
        make_engine(db_url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_recycle=3600)
    )
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        _select_one(conn)
        # Age the connection past pool_recycle instead of sleeping for it.
        conn.connection._connection_record.starttime -= 7200  # type: ignore[union-attr]
    _assert_balanced(engine)
    with engine.connect() as conn:  # recycled: closed and replaced on checkout
        _select_one(conn)
        assert _permits(engine) == 1
    _assert_balanced(engine)
    stats = guard.stats()
    assert (stats.connections_opened, stats.connections_closed) == (2, 1)
    assert stats.acquisitions == 2


# --- server-side disconnects (PostgreSQL) ----------------------------------------------


@pytest.fixture
def pg_admin(postgresql_url: str, make_engine: Callable[..., Engine]) -> Engine:
    """A plain engine for terminating backends of the engine under test."""
    return make_engine(postgresql_url, poolclass=NullPool)


def _terminate(admin: Engine, pid: int) -> None:
    with admin.connect() as conn:
        # The timeout form waits until the backend is gone (PostgreSQL 14+).
        gone = conn.execute(
            sa.text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid}
        ).scalar_one()
    assert gone is True


def test_server_terminated_connection(
    postgresql_url: str, pg_admin: Engine, make_engine: Callable[..., Engine]
) -> None:
    engine = poolguard.wrap(
        make_engine(postgresql_url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
    )
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        _terminate(pg_admin, pid)
        with pytest.raises(sa.exc.DBAPIError) as info:
            conn.execute(sa.text("SELECT 1"))
        assert isinstance(info.value, sa.exc.OperationalError)
        assert info.value.connection_invalidated
        assert not isinstance(info.value, poolguard.PoolguardError)
        # The dead connection went back (invalidated) while the Connection is open.
        _assert_balanced(engine)
    _assert_balanced(engine)
    assert guard.stats().connections_invalidated >= 1

    with engine.connect() as conn:  # the pool serves the next checkout
        new_pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        assert new_pid != pid
        assert _permits(engine) == 1
    _assert_balanced(engine)


def test_pre_ping_replaces_server_terminated_connection(
    postgresql_url: str, pg_admin: Engine, make_engine: Callable[..., Engine]
) -> None:
    engine = poolguard.wrap(
        make_engine(postgresql_url, pool_size=POOL_SIZE, max_overflow=0, pool_pre_ping=True)
    )
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    _terminate(pg_admin, pid)
    with engine.connect() as conn:  # the ping finds it dead and reconnects
        assert conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one() != pid
        assert _permits(engine) == 1
    _assert_balanced(engine)
    stats = guard.stats()
    assert stats.connections_invalidated >= 1
    assert stats.connections_opened == 2
    assert stats.acquisitions == 2


# --- events and errors ------------------------------------------------------------------


def test_user_pool_events_still_fire(db_url: str) -> None:
    fired: dict[str, int] = {"connect": 0, "checkout": 0, "checkin": 0, "late_checkout": 0}

    def on(name: str) -> Callable[..., None]:
        def listener(*args: Any) -> None:
            fired[name] += 1

        return listener

    # An engine that is wrapped after its listeners were added.
    plain = sa.create_engine(db_url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
    try:
        for name in ("connect", "checkout", "checkin"):
            event.listen(plain, name, on(name))
        poolguard.wrap(plain)
        event.listen(plain, "checkout", on("late_checkout"))

        first = plain.connect()
        second = plain.connect()
        first.close()
        second.close()
        with plain.connect() as conn:
            _select_one(conn)
        assert fired == {"connect": 2, "checkout": 3, "checkin": 3, "late_checkout": 3}
        _assert_balanced(plain)

        plain.dispose()  # the recreated pool keeps the listeners and the guard
        with plain.connect() as conn:
            _select_one(conn)
        assert fired == {"connect": 3, "checkout": 4, "checkin": 4, "late_checkout": 4}
        _assert_balanced(plain)
        assert poolguard.get_guard(plain).stats().connections_opened == 3
    finally:
        plain.dispose()


def test_existing_timeout_handler_catches_pool_timeout(
    sqlite_url: str, make_engine: Callable[..., Engine]
) -> None:
    engine = poolguard.wrap(
        make_engine(sqlite_url, pool_size=1, max_overflow=0), name="orders", acquire_timeout=0.05
    )
    held = engine.connect()
    caught: sa.exc.TimeoutError | None = None
    try:
        engine.connect()
    except sa.exc.TimeoutError as exc:  # code written for plain SQLAlchemy
        caught = exc
    assert isinstance(caught, PoolTimeout)
    assert "orders" in str(caught)
    assert "1/1 in use" in str(caught)
    assert caught.capacity == 1
    held.close()
    _assert_balanced(engine)
    assert poolguard.get_guard(engine).stats().timeouts == 1


def test_request_timeout_raises_pool_timeout(
    sqlite_url: str, make_engine: Callable[..., Engine]
) -> None:
    engine = poolguard.wrap(make_engine(sqlite_url, pool_size=1, max_overflow=0))
    held = engine.connect()
    with poolguard.request(timeout=0.05), pytest.raises(PoolTimeout) as info:
        engine.connect()
    assert info.value.timeout <= 0.05
    assert "deadline" in str(info.value)
    held.close()
    _assert_balanced(engine)


# --- pool classes ----------------------------------------------------------------------


def test_null_pool(sqlite_url: str, make_engine: Callable[..., Engine]) -> None:
    engine = poolguard.wrap(make_engine(sqlite_url, poolclass=NullPool))
    assert isinstance(engine.pool, NullPool)
    assert isinstance(engine.pool, GuardedPoolMixin)
    guard = poolguard.get_guard(engine)
    first, second = engine.connect(), engine.connect()
    _select_one(first)
    _select_one(second)
    assert _permits(engine) == 2
    first.close()
    assert _permits(engine) == 1
    second.close()
    _assert_balanced(engine)
    stats = guard.stats()
    assert stats.capacity is None
    assert (stats.acquisitions, stats.connections_opened, stats.connections_closed) == (2, 2, 2)


def test_static_pool(make_engine: Callable[..., Engine]) -> None:
    engine = poolguard.wrap(make_engine("sqlite://", poolclass=StaticPool))
    assert isinstance(engine.pool, StaticPool)
    assert isinstance(engine.pool, GuardedPoolMixin)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        conn.execute(sa.text("INSERT INTO t VALUES (42)"))
        assert _permits(engine) == 1
    _assert_balanced(engine)
    with engine.connect() as conn:  # the one shared connection: same memory database
        assert conn.execute(sa.text("SELECT x FROM t")).scalar_one() == 42
        assert _permits(engine) == 1
    _assert_balanced(engine)
    raw = engine.raw_connection()
    assert _permits(engine) == 1
    raw.close()
    _assert_balanced(engine)
    assert poolguard.get_guard(engine).stats().connections_opened == 1


def test_singleton_thread_pool(make_engine: Callable[..., Engine]) -> None:
    engine = poolguard.wrap(make_engine("sqlite://", poolclass=SingletonThreadPool))
    assert isinstance(engine.pool, SingletonThreadPool)
    assert isinstance(engine.pool, GuardedPoolMixin)

    outer = engine.connect()
    inner = engine.connect()  # same thread: the same DBAPI connection, one permit
    _select_one(outer)
    _select_one(inner)
    assert _permits(engine) == 1

    other_thread_out = threading.Event()
    release_other = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with engine.connect() as conn:
                _select_one(conn)
                seen.append(_permits(engine))
                other_thread_out.set()
                release_other.wait(JOIN_TIMEOUT_S)
        except BaseException as exc:
            errors.append(exc)
            other_thread_out.set()

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    assert other_thread_out.wait(JOIN_TIMEOUT_S)
    release_other.set()
    thread.join(JOIN_TIMEOUT_S)
    assert not thread.is_alive()
    assert errors == []
    assert seen == [2]  # another thread: its own connection, its own permit
    assert _permits(engine) == 1

    inner.close()
    assert _permits(engine) == 1  # the outer checkout still holds the connection
    outer.close()
    _assert_balanced(engine)


def test_guarded_queue_pool_as_poolclass(
    sqlite_url: str, make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POOLGUARD_ACQUIRE_TIMEOUT", raising=False)
    monkeypatch.delenv("POOLGUARD_NAME", raising=False)
    engine = make_engine(
        sqlite_url,
        poolclass=poolguard.GuardedQueuePool,
        pool_size=2,
        max_overflow=0,
        pool_timeout=0.05,
    )
    guard = poolguard.get_guard(engine)
    assert guard.stats().capacity == 2
    assert poolguard.get_guard(engine) is guard
    first, second = engine.connect(), engine.connect()
    _select_one(first)
    assert _permits(engine) == 2
    # No acquire_timeout option: the pool's own pool_timeout bounds the wait.
    with pytest.raises(PoolTimeout):
        engine.connect()
    first.close()
    second.close()
    _assert_balanced(engine)
    assert guard.stats().acquisitions == 2


# --- wrap twice, unwrap -------------------------------------------------------------------


def test_wrap_twice_reconfigures_and_counts_once(engine: Engine) -> None:
    guard = poolguard.get_guard(engine)
    assert poolguard.wrap(engine, name="renamed", acquire_timeout=3) is engine
    assert poolguard.get_guard(engine) is guard
    assert guard.stats().name == "renamed"
    assert guard.acquire_timeout() == 3

    checkouts = 5
    for _ in range(checkouts):
        with engine.connect() as conn:
            _select_one(conn)
    poolguard.wrap(engine, name="renamed-again")
    both = [engine.connect(), engine.connect()]  # the second is a new connection
    for conn in both:
        conn.close()

    stats = guard.stats()
    assert stats.name == "renamed-again"
    assert stats.acquisitions == checkouts + 2
    assert stats.connections_opened == 2
    assert stats.capacity == CAPACITY
    _assert_balanced(engine)


def test_unwrap_restores_plain_class(engine: Engine) -> None:
    guard = poolguard.get_guard(engine)
    with engine.connect() as conn:
        _select_one(conn)
    out = engine.connect()  # checked out under the guard, returned after unwrap
    assert poolguard.unwrap(engine) is engine

    assert type(engine.pool) is QueuePool
    with pytest.raises(LookupError):
        poolguard.get_guard(engine)
    out.close()
    acquisitions = guard.stats().acquisitions
    for _ in range(CAPACITY):
        with engine.connect() as conn:
            _select_one(conn)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert guard.stats().acquisitions == acquisitions  # nothing counted any more

    poolguard.wrap(engine)  # and it can be guarded again
    new_guard = poolguard.get_guard(engine)
    assert new_guard is not guard
    with engine.connect() as conn:
        _select_one(conn)
        assert _permits(engine) == 1
    _assert_balanced(engine)


def test_unwrap_lets_a_waiting_thread_through(
    sqlite_url: str, make_engine: Callable[..., Engine]
) -> None:
    engine = poolguard.wrap(
        make_engine(sqlite_url, pool_size=1, max_overflow=0, pool_timeout=60),
        acquire_timeout=60,
    )
    guard = poolguard.get_guard(engine)
    held = engine.connect()
    results: list[object] = []

    def waiter() -> None:
        try:
            with engine.connect() as conn:
                results.append(conn.execute(sa.text("SELECT 1")).scalar_one())
        except BaseException as exc:
            results.append(exc)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    wait_until(lambda: guard.stats().waiting == 1, "the thread to wait at the gate")

    poolguard.unwrap(engine)
    assert guard.gate.waiting == 0  # let through to the pool's own queue
    # The held connection goes back through the plain pool, which gives no permit
    # back: only unwrap() can have let the waiter past the gate.
    held.close()
    thread.join(JOIN_TIMEOUT_S)
    assert not thread.is_alive(), "the waiter is still stuck at the gate after unwrap()"
    assert results == [1]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
