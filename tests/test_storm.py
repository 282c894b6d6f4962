"""Exact pool limits under a thread storm against real servers.

64 threads hammer a guarded ``QueuePool`` (``pool_size=5, max_overflow=3``). The
gate must let exactly ``5 + 3 = 8`` connections out at once (reached, never
exceeded), the server must never see more of the storm's sessions than that, every
iteration must succeed, and the counters must add up exactly when it is over.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool, QueuePool

import poolguard

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Engine

RUN_TIMEOUT_S = 120.0  # all threads must be done within this; generous, never asserted on
SAMPLE_INTERVAL_S = 0.02
MAX_SAMPLES = 5000


@dataclass
class _Storm:
    """What the storm's threads and its sampler saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    out: int = 0
    peak: int = 0
    done: int = 0
    errors: list[BaseException] = field(default_factory=list)
    server_counts: list[int] = field(default_factory=list)
    guard_in_use: list[int] = field(default_factory=list)
    pool_checkedout: list[int] = field(default_factory=list)
    sampler_errors: list[BaseException] = field(default_factory=list)


@pytest.fixture
def make_engine() -> Iterator[Callable[..., Engine]]:
    created: list[Engine] = []

    def make(url: str, **kwargs: Any) -> Engine:
        engine = sa.create_engine(url, **kwargs)
        created.append(engine)
        return engine

    yield make
    for engine in created:
        engine.dispose()


def _run_storm(
    engine: Engine,
    *,
    threads: int,
    iterations: int,
    statement: str,
    count_server_sessions: Callable[[], int],
) -> _Storm:
    """Run the storm and a sampler; return what they saw. Fails if a thread hangs."""
    storm = _Storm()
    guard = poolguard.get_guard(engine)
    start = threading.Barrier(threads + 1, timeout=RUN_TIMEOUT_S)
    finished = threading.Event()
    stmt = sa.text(statement)

    def worker() -> None:
        try:
            start.wait()
            for _ in range(iterations):
                conn = engine.connect()
                with storm.lock:
                    storm.out += 1
                    storm.peak = max(storm.peak, storm.out)
                try:
                    conn.execute(stmt).all()
                finally:
                    with storm.lock:
                        storm.out -= 1
                    conn.close()
                with storm.lock:
                    storm.done += 1
        except BaseException as exc:
            with storm.lock:
                storm.errors.append(exc)

    def sampler() -> None:
        try:
            start.wait()
            for _ in range(MAX_SAMPLES):
                storm.server_counts.append(count_server_sessions())
                storm.guard_in_use.append(guard.stats().permits)
                storm.pool_checkedout.append(engine.pool.checkedout())  # type: ignore[attr-defined]
                if finished.wait(SAMPLE_INTERVAL_S):
                    return
        except BaseException as exc:
            storm.sampler_errors.append(exc)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    watcher = threading.Thread(target=sampler, daemon=True)
    for thread in [*workers, watcher]:
        thread.start()
    try:
        for thread in workers:
            thread.join(RUN_TIMEOUT_S)
            assert not thread.is_alive(), f"a storm thread is still running: {guard!r}"
    finally:
        finished.set()
        watcher.join(RUN_TIMEOUT_S)
    assert not watcher.is_alive(), "the sampler is still running"
    return storm


def _check(engine: Engine, storm: _Storm, *, threads: int, iterations: int, capacity: int) -> None:
    assert storm.errors == []
    assert storm.sampler_errors == []
    assert storm.done == threads * iterations
    assert storm.peak == capacity  # reached, and never exceeded
    assert storm.server_counts, "the sampler took no sample"
    assert max(storm.server_counts) <= capacity, storm.server_counts
    assert max(storm.server_counts) > 0, "the sampler never saw the storm's sessions"
    assert max(storm.guard_in_use) <= capacity
    assert max(storm.pool_checkedout) <= capacity

    stats = poolguard.get_guard(engine).stats()
    assert stats.permits == 0, stats
    assert poolguard.get_guard(engine).gate.in_use == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert stats.waiting == 0, stats
    assert stats.acquisitions == threads * iterations, stats
    assert stats.timeouts == 0, stats
    assert stats.waits > 0, stats  # the storm did queue at the gate
    assert stats.capacity == capacity
    assert stats.connections_opened - stats.connections_closed <= capacity


@pytest.mark.postgresql
@pytest.mark.timing
def test_postgresql_storm_holds_exact_limit(
    postgresql_url: str, make_engine: Callable[..., Engine]
) -> None:
    threads, iterations, pool_size, max_overflow = 64, 15, 5, 3
    app = f"poolguard-storm-{uuid.uuid4().hex[:16]}"
    engine = poolguard.wrap(
        make_engine(
            postgresql_url,
            pool_size=pool_size,
            max_overflow=max_overflow,
            connect_args={"application_name": app},
        ),
        acquire_timeout=30,
    )
    assert isinstance(engine.pool, QueuePool)
    monitor = make_engine(postgresql_url, poolclass=NullPool)
    count = sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :app")

    with monitor.connect() as monitor_conn:

        def count_server_sessions() -> int:
            value: int = monitor_conn.execute(count, {"app": app}).scalar_one()
            monitor_conn.rollback()  # a fresh snapshot of pg_stat_activity next time
            return value

        storm = _run_storm(
            engine,
            threads=threads,
            iterations=iterations,
            statement="SELECT pg_sleep(0.005)",
            count_server_sessions=count_server_sessions,
        )
    _check(engine, storm, threads=threads, iterations=iterations, capacity=pool_size + max_overflow)


@pytest.mark.mariadb
@pytest.mark.timing
def test_mariadb_storm_holds_exact_limit(
    mariadb_url: str, make_engine: Callable[..., Engine]
) -> None:
    threads, iterations, pool_size, max_overflow = 32, 10, 3, 2
    engine = poolguard.wrap(
        make_engine(mariadb_url, pool_size=pool_size, max_overflow=max_overflow),
        acquire_timeout=30,
    )
    # PROCESSLIST cannot filter by application name: identify the storm's sessions
    # by the server thread ids of the connections this engine opened.
    thread_ids: set[int] = set()

    @sa.event.listens_for(engine, "connect")
    def remember(dbapi_conn: Any, record: Any) -> None:
        thread_ids.add(dbapi_conn.thread_id())

    monitor = make_engine(mariadb_url, poolclass=NullPool)
    with monitor.connect() as monitor_conn:

        def count_server_sessions() -> int:
            ids = list(thread_ids)  # a copy: threads add to the set meanwhile
            if not ids:
                return 0
            stmt = sa.text(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN :ids"
            ).bindparams(sa.bindparam("ids", expanding=True))
            value: int = monitor_conn.execute(stmt, {"ids": ids}).scalar_one()
            monitor_conn.rollback()
            return value

        storm = _run_storm(
            engine,
            threads=threads,
            iterations=iterations,
            statement="SELECT SLEEP(0.005)",
            count_server_sessions=count_server_sessions,
        )
    _check(engine, storm, threads=threads, iterations=iterations, capacity=pool_size + max_overflow)
