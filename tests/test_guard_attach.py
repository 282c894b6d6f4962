"""wrap() of a busy engine: adopting checked-out connections, racing dispose().

Real databases (SQLite, PostgreSQL, MariaDB through ``db_url``). The races
are made deterministic by running the racing call at the exact point where
it hurt: inside the attach (a ``dispose()`` on another thread while
checked-out connections are being adopted; a connection returned meanwhile)
and before the pool's class is swapped (a ``dispose()`` on the same thread).
"""

from __future__ import annotations

import gc
import threading
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import poolguard
from poolguard import _attach as attach_module
from poolguard import _engine as engine_module

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine


def _record(conn: Connection) -> object:
    return conn.connection._connection_record  # type: ignore[attr-defined]


def _select_one(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT 1").scalar_one())


def _assert_capacity(engine: Engine, capacity: int) -> None:
    """Exactly ``capacity`` checkouts at once; the next one times out at the gate."""
    conns = [engine.connect() for _ in range(capacity)]
    try:
        with pytest.raises(poolguard.PoolTimeout):
            engine.connect()
    finally:
        for conn in conns:
            conn.close()


def test_wrap_adopts_checked_out_connections_without_a_heap_scan(
    db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = sa.create_engine(db_url, pool_size=2, max_overflow=1, pool_timeout=5)
    other = sa.create_engine(db_url, pool_size=1, max_overflow=0)
    try:
        first, second = engine.connect(), engine.connect()
        engine.connect().close()  # checked in again: not adopted
        elsewhere = other.connect()  # another pool's: not adopted
        with monkeypatch.context() as patch:

            def heap_scan(*args: Any) -> list[object]:
                raise AssertionError("wrap() walked the heap (gc.get_objects)")

            patch.setattr(gc, "get_objects", heap_scan)
            poolguard.wrap(engine, acquire_timeout=0.2)
        guard = poolguard.get_guard(engine)
        gate = guard.gate
        assert set(gate.out) == {_record(first), _record(second)}
        assert gate.in_use == 2
        assert guard.stats().acquisitions == 0  # adopted, not acquired

        first.invalidate()  # an adopted connection returned through invalidation
        first.close()
        assert gate.in_use == 1
        second.close()
        assert gate.in_use == 0
        assert gate.out == {}
        _assert_capacity(engine, 3)  # no permit lost, none given back twice
        assert guard.stats().permits == 0
        elsewhere.close()
    finally:
        engine.dispose()
        other.dispose()


def test_an_adopted_connection_returned_during_wrap_gives_its_permit_back_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = sa.create_engine(db_url, pool_size=2, max_overflow=0, pool_timeout=5)
    try:
        first, second = engine.connect(), engine.connect()
        real = attach_module.checked_out_records

        def returned_meanwhile(pool: Any) -> list[object]:
            records = real(pool)
            first.close()  # back before the gate is published: no permit given back yet
            return records

        monkeypatch.setattr(attach_module, "checked_out_records", returned_meanwhile)
        poolguard.wrap(engine, acquire_timeout=0.2)
        guard = poolguard.get_guard(engine)
        assert guard.gate.in_use == 1
        assert set(guard.gate.out) == {_record(second)}
        second.close()
        assert guard.gate.in_use == 0
        _assert_capacity(engine, 2)
        assert guard.stats().permits == 0
    finally:
        engine.dispose()


@pytest.mark.timing
def test_dispose_racing_the_adoption_in_wrap_leaves_no_half_built_gate(
    db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failover reset or a post-fork hook disposes the engine on another
    # thread while wrap() adopts the checked-out connections: the recreated
    # pool must get the finished gate, not the guard's placeholder.
    engine = sa.create_engine(db_url, pool_size=2, max_overflow=0, pool_timeout=1)
    disposers: list[threading.Thread] = []
    try:
        held = engine.connect()
        real = attach_module.checked_out_records

        def dispose_meanwhile(pool: Any) -> list[object]:
            records = real(pool)
            disposer = threading.Thread(target=engine.dispose)
            disposers.append(disposer)
            disposer.start()
            disposer.join(1.0)  # finished, or waiting for this attach to finish
            return records

        monkeypatch.setattr(attach_module, "checked_out_records", dispose_meanwhile)
        poolguard.wrap(engine, acquire_timeout=0.2)
        (disposer,) = disposers
        disposer.join(30.0)
        assert not disposer.is_alive()

        guard = poolguard.get_guard(engine)
        pool = engine.pool
        assert isinstance(pool, poolguard.GuardedPoolMixin)
        assert pool._poolguard is guard
        assert pool._poolguard_gate is guard.gate
        assert guard.pool is pool
        held.close()  # back to the disposed pool: its adopted permit comes back
        assert guard.gate.in_use == 0
        assert _select_one(engine) == 1  # a checkin that works
        _assert_capacity(engine, 2)  # PoolTimeout, not the pool's own QueuePool timeout
        assert guard.stats().permits == 0
    finally:
        for disposer in disposers:
            disposer.join(30.0)
        engine.dispose()


def test_dispose_before_the_class_swap_in_wrap_still_guards_the_new_pool(
    db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # dispose() between wrap() reading engine.pool and swapping its class
    # recreates a plain pool: wrap() must guard that one too.
    engine = sa.create_engine(db_url, pool_size=2, max_overflow=0, pool_timeout=1)
    try:
        held = engine.connect()
        real = engine_module.guarded_class
        disposed: list[bool] = []

        def dispose_first(pool_class: Any) -> Any:
            if not disposed:
                disposed.append(True)
                engine.dispose()
            return real(pool_class)

        monkeypatch.setattr(engine_module, "guarded_class", dispose_first)
        poolguard.wrap(engine, acquire_timeout=0.2)
        assert disposed == [True]
        guard = poolguard.get_guard(engine)
        pool = engine.pool
        assert isinstance(pool, poolguard.GuardedPoolMixin)
        assert pool._poolguard is guard
        assert pool._poolguard_gate is guard.gate
        opened = guard.stats().connections_opened
        assert _select_one(engine) == 1
        assert guard.stats().connections_opened == opened + 1  # its listeners too
        held.close()
        _assert_capacity(engine, 2)
        assert guard.stats().permits == 0
    finally:
        engine.dispose()


@pytest.mark.timing
def test_a_checkout_during_a_second_wrap_waits_for_the_new_gate(
    db_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # After unwrap(), wrap() again: a checkout while it attaches must not use
    # the closed gate of the first guard (its permit would count nowhere).
    engine = sa.create_engine(db_url, pool_size=2, max_overflow=0, pool_timeout=1)
    threads: list[threading.Thread] = []
    conns: list[Connection] = []
    try:
        poolguard.unwrap(poolguard.wrap(engine))
        real = attach_module.checked_out_records

        def checkout_meanwhile(pool: Any) -> list[object]:
            records = real(pool)
            thread = threading.Thread(target=lambda: conns.append(engine.connect()))
            threads.append(thread)
            thread.start()
            thread.join(1.0)  # checked out, or waiting for this attach to finish
            return records

        monkeypatch.setattr(attach_module, "checked_out_records", checkout_meanwhile)
        poolguard.wrap(engine, acquire_timeout=0.2)
        (thread,) = threads
        thread.join(30.0)
        assert not thread.is_alive()
        (conn,) = conns
        guard = poolguard.get_guard(engine)
        assert set(guard.gate.out) == {_record(conn)}
        assert guard.gate.in_use == 1
        conn.close()
        assert guard.gate.in_use == 0
        _assert_capacity(engine, 2)
        assert guard.stats().permits == 0
    finally:
        for thread in threads:
            thread.join(30.0)
        for conn in conns:
            conn.close()
        engine.dispose()
