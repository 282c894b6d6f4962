"""The guarded QueuePool's queue of idle records (GatedQueue) keeps SQLAlchemy's
queue's promises without its lock: order, Full, waits that are woken."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.util import queue as sqla_queue

import poolguard
from poolguard._compat import GatedQueue
from poolguard._pool import GuardedQueuePool

if TYPE_CHECKING:
    from pathlib import Path

BOUND = 10.0  # seconds: a test that would hang fails after this instead


def test_wrap_gives_the_pool_a_gated_queue_keeping_its_idle_connections(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'q.db'}", pool_size=3, max_overflow=0)
    conns = [engine.connect() for _ in range(2)]
    for conn in conns:
        conn.close()
    pool = engine.pool
    assert isinstance(pool, sa.pool.QueuePool)
    assert pool.checkedin() == 2
    poolguard.wrap(engine)
    assert type(pool._pool) is GatedQueue  # type: ignore[attr-defined]
    assert pool.checkedin() == 2  # the same records, still idle
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        assert pool.checkedout() == 1
    poolguard.unwrap(engine)
    with engine.connect() as conn:  # a plain pool again, on the same queue
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    assert pool.checkedout() == 0
    engine.dispose()


def test_a_guarded_pool_built_as_poolclass_and_its_recreation_have_one(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'q.db'}", poolclass=GuardedQueuePool)
    assert type(engine.pool._pool) is GatedQueue  # type: ignore[attr-defined]
    engine.dispose()
    assert type(engine.pool._pool) is GatedQueue  # type: ignore[attr-defined]
    engine.dispose()


@pytest.mark.parametrize("lifo", [False, True], ids=["fifo", "lifo"])
def test_order_and_full_as_sqlalchemys_queue(lifo: bool) -> None:
    for queue in (sqla_queue.Queue[int](2, use_lifo=lifo), GatedQueue(2, use_lifo=lifo)):
        queue.put(1, False)
        queue.put(2, False)
        with pytest.raises(sqla_queue.Full):  # QueuePool closes an overflow record on this
            queue.put(3, False)
        assert [queue.get(False), queue.get(False)] == ([2, 1] if lifo else [1, 2])
        with pytest.raises(sqla_queue.Empty):
            queue.get(False)


def test_a_get_that_waits_is_woken_by_a_put() -> None:
    queue = GatedQueue(2)
    got: list[int] = []
    # A long timeout: a lost wake-up would leave the thread waiting past BOUND.
    thread = threading.Thread(target=lambda: got.append(queue.get(True, 60.0)), daemon=True)
    thread.start()
    stop = threading.Event()
    while queue._sleepers == 0 and not stop.wait(0.001):
        pass
    queue.put(7, False)
    thread.join(BOUND)
    assert not thread.is_alive(), "the waiting get was not woken by the put"
    assert got == [7]
    assert queue._sleepers == 0


def test_many_gets_and_puts_lose_no_record() -> None:
    queue = GatedQueue(4)
    for record in range(4):
        queue.put(record, False)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(2000):
                record = queue.get(True, 60.0)
                queue.put(record, False)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BOUND * 6)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sorted(queue.queue) == [0, 1, 2, 3]
