"""The guard under ``AsyncEngine``/``AsyncSession``: permits balance, timeouts, and a
wait at the gate that never blocks the event loop (proved with a loop-lag probe)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.pool import AsyncAdaptedQueuePool

import poolguard
from _support import AsyncEngineFactory, async_wait_until
from poolguard import GuardedAsyncAdaptedQueuePool, GuardedPoolMixin, PoolTimeout

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

TASK_TIMEOUT_S = 20.0
PROBE_INTERVAL_S = 0.01
PROBE_MAX_TICKS = 5000  # bounds the probe loop (~50 s) if a test goes wrong


def _permits(engine: AsyncEngine) -> int:
    guard = poolguard.get_guard(engine)
    permits = guard.stats().permits
    assert guard.gate.in_use == permits
    return permits


def _assert_balanced(engine: AsyncEngine) -> None:
    guard = poolguard.get_guard(engine)
    stats = guard.stats()
    assert stats.permits == 0, stats
    assert guard.gate.in_use == 0, stats
    assert stats.waiting == 0, stats
    pool = engine.sync_engine.pool
    assert isinstance(pool, AsyncAdaptedQueuePool)
    assert pool.checkedout() == 0, stats


async def _select_one(conn: AsyncConnection) -> None:
    assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1


async def _probe(ticks: list[float], stop: asyncio.Event) -> None:
    """Record the loop's time every few milliseconds until told to stop."""
    for _ in range(PROBE_MAX_TICKS):
        if stop.is_set():
            return
        ticks.append(time.monotonic())
        await asyncio.sleep(PROBE_INTERVAL_S)


@pytest.fixture
def make_engine(make_async_engine: AsyncEngineFactory) -> AsyncEngineFactory:
    """``create_async_engine``, unguarded, disposed when the test ends."""
    return make_async_engine


@pytest.fixture
def one_conn_engine(async_db_url: str, make_engine: Callable[..., AsyncEngine]) -> AsyncEngine:
    """A guarded engine whose pool holds exactly one connection."""
    return poolguard.wrap(make_engine(async_db_url, pool_size=1, max_overflow=0))


async def test_wrap_async_engine_and_session(
    async_db_url: str, make_engine: Callable[..., AsyncEngine]
) -> None:
    plain = make_engine(async_db_url, pool_size=2, max_overflow=1)
    engine = poolguard.wrap(plain, acquire_timeout=5)
    assert engine is plain
    pool = engine.sync_engine.pool
    assert isinstance(pool, GuardedAsyncAdaptedQueuePool)
    assert isinstance(pool, AsyncAdaptedQueuePool)
    guard = poolguard.get_guard(engine)
    assert guard is poolguard.get_guard(engine.sync_engine)
    assert guard.stats().capacity == 3

    async with AsyncSession(engine) as session:
        assert (await session.execute(sa.text("SELECT 1"))).scalar_one() == 1
        assert _permits(engine) == 1
        await session.commit()
    _assert_balanced(engine)

    factory = async_sessionmaker(engine)
    async with factory() as session:
        await session.execute(sa.text("SELECT 1"))
        await session.rollback()
    _assert_balanced(engine)
    async with factory.begin() as session:
        await session.execute(sa.text("SELECT 1"))
        assert _permits(engine) == 1
    _assert_balanced(engine)

    conns = [await engine.connect() for _ in range(3)]
    for conn in conns:
        await _select_one(conn)
    assert _permits(engine) == 3
    for conn in conns:
        await conn.close()
    _assert_balanced(engine)

    async with engine.begin() as conn:
        await _select_one(conn)
    conn = await engine.connect()
    await _select_one(conn)
    await conn.invalidate()
    _assert_balanced(engine)
    await conn.close()
    _assert_balanced(engine)
    assert guard.stats().acquisitions == 2 + 1 + 3 + 2


@pytest.mark.timing
async def test_many_tasks_share_a_small_pool(
    async_db_url: str, make_engine: Callable[..., AsyncEngine]
) -> None:
    engine = poolguard.wrap(
        make_engine(async_db_url, pool_size=2, max_overflow=0), acquire_timeout=TASK_TIMEOUT_S
    )
    tasks, out, peak = 20, 0, 0

    async def work() -> None:
        nonlocal out, peak
        async with engine.connect() as conn:
            out += 1
            peak = max(peak, out)
            await _select_one(conn)
            await asyncio.sleep(0.002)
            out -= 1

    await asyncio.wait_for(asyncio.gather(*(work() for _ in range(tasks))), TASK_TIMEOUT_S)
    assert peak == 2
    stats = poolguard.get_guard(engine).stats()
    assert stats.acquisitions == tasks
    assert stats.waits > 0
    assert stats.timeouts == 0
    _assert_balanced(engine)


async def test_acquire_timeout_on_full_pool_in_request(one_conn_engine: AsyncEngine) -> None:
    engine = one_conn_engine
    guard = poolguard.get_guard(engine)
    holder = await engine.connect()
    await _select_one(holder)
    try:
        with poolguard.request(timeout=0.1), pytest.raises(PoolTimeout) as info:
            await engine.connect()
        assert isinstance(info.value, sa.exc.TimeoutError)
        assert info.value.timeout <= 0.1
        assert "1/1 in use" in str(info.value)

        @poolguard.request(timeout=0.05)
        async def decorated() -> None:
            async with engine.connect():
                pass

        with pytest.raises(PoolTimeout):
            await decorated()

        stats = guard.stats()
        assert stats.timeouts == 2
        assert stats.waiting == 0
        assert stats.permits == 1
    finally:
        await holder.close()
    _assert_balanced(engine)
    async with engine.connect() as conn:  # the timeouts left no permit behind
        await _select_one(conn)
    _assert_balanced(engine)


@pytest.mark.timing
async def test_wait_does_not_block_loop_and_succeeds_on_release(
    async_db_url: str, make_engine: Callable[..., AsyncEngine]
) -> None:
    engine = poolguard.wrap(
        make_engine(async_db_url, pool_size=1, max_overflow=0), acquire_timeout=TASK_TIMEOUT_S
    )
    guard = poolguard.get_guard(engine)
    holder = await engine.connect()
    await _select_one(holder)

    ticks: list[float] = []
    stop = asyncio.Event()
    span: list[float] = []

    async def waiter() -> int:
        span.append(time.monotonic())
        async with engine.connect() as conn:
            span.append(time.monotonic())
            value: int = (await conn.execute(sa.text("SELECT 1"))).scalar_one()
            return value

    probe = asyncio.create_task(_probe(ticks, stop))
    waiting = asyncio.create_task(waiter())
    try:
        await async_wait_until(lambda: guard.stats().waiting == 1, "the waiter to queue")
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await holder.close()
        assert await asyncio.wait_for(waiting, TASK_TIMEOUT_S) == 1
    finally:
        stop.set()
        await asyncio.wait_for(probe, TASK_TIMEOUT_S)
        waiting.cancel()
        await holder.close()

    start, end = span
    during = [t for t in ticks if start < t < end]
    assert during, f"no probe tick while the waiter waited ({len(ticks)} ticks in all)"
    stats = guard.stats()
    assert stats.waits == 1
    assert stats.timeouts == 0
    _assert_balanced(engine)


async def test_wait_does_not_block_loop_until_timeout(
    async_db_url: str, make_engine: Callable[..., AsyncEngine]
) -> None:
    engine = poolguard.wrap(
        make_engine(async_db_url, pool_size=1, max_overflow=0), acquire_timeout=0.5
    )
    guard = poolguard.get_guard(engine)
    holder = await engine.connect()  # never released while the waiter waits

    ticks: list[float] = []
    stop = asyncio.Event()
    span: list[float] = []

    async def waiter() -> None:
        span.append(time.monotonic())
        try:
            async with engine.connect():
                pass
        finally:
            span.append(time.monotonic())

    probe = asyncio.create_task(_probe(ticks, stop))
    try:
        with pytest.raises(PoolTimeout):
            await asyncio.wait_for(waiter(), TASK_TIMEOUT_S)
    finally:
        stop.set()
        await asyncio.wait_for(probe, TASK_TIMEOUT_S)
        await holder.close()

    start, end = span
    during = [t for t in ticks if start < t < end]
    assert during, f"no probe tick while the waiter waited ({len(ticks)} ticks in all)"
    stats = guard.stats()
    assert (stats.waits, stats.timeouts) == (1, 1)
    _assert_balanced(engine)


async def test_cancelled_waiter_leaves_nothing_behind(one_conn_engine: AsyncEngine) -> None:
    engine = poolguard.wrap(one_conn_engine, acquire_timeout=TASK_TIMEOUT_S)
    guard = poolguard.get_guard(engine)
    holder = await engine.connect()
    reached: list[bool] = []

    async def waiter() -> None:
        async with engine.connect():
            reached.append(True)

    task = asyncio.create_task(waiter())
    try:
        await async_wait_until(lambda: guard.stats().waiting == 1, "the waiter to queue")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TASK_TIMEOUT_S)
        assert reached == []
        stats = guard.stats()
        assert stats.waiting == 0
        assert stats.permits == 1  # the holder's, nothing more
    finally:
        task.cancel()
        await holder.close()
    _assert_balanced(engine)

    # Every permit is still there: the pool hands out its one connection at once.
    with poolguard.request(timeout=1.0):
        async with engine.connect() as conn:
            await _select_one(conn)
    _assert_balanced(engine)
    assert guard.stats().timeouts == 0


async def test_waiter_cancelled_right_after_its_grant(one_conn_engine: AsyncEngine) -> None:
    # The holder's release grants the permit to the waiter; the waiter is cancelled
    # before it can run. Either the cancel wins (the granted permit must be given
    # back) or the grant wins (the connection is closed by `async with`): both must
    # leave the gate balanced.
    engine = poolguard.wrap(one_conn_engine, acquire_timeout=TASK_TIMEOUT_S)
    guard = poolguard.get_guard(engine)
    holder = await engine.connect()

    async def waiter() -> None:
        async with engine.connect() as conn:
            await _select_one(conn)

    task = asyncio.create_task(waiter())
    try:
        await async_wait_until(lambda: guard.stats().waiting == 1, "the waiter to queue")
        # Wakes the waiter to take the free permit (without a policy, the
        # gate wakes the head waiter instead of handing the permit over).
        await holder.close()
        task.cancel()  # before the waiter ran again
        await asyncio.wait({task}, timeout=TASK_TIMEOUT_S)
        assert task.done()
        if not task.cancelled():
            assert task.exception() is None
    finally:
        task.cancel()
        await holder.close()
    _assert_balanced(engine)
    with poolguard.request(timeout=1.0):
        async with engine.connect() as conn:
            await _select_one(conn)
    _assert_balanced(engine)


async def test_dispose_keeps_the_guard(
    async_db_url: str, make_engine: Callable[..., AsyncEngine]
) -> None:
    engine = poolguard.wrap(make_engine(async_db_url, pool_size=2, max_overflow=0))
    guard = poolguard.get_guard(engine)
    old_pool = engine.sync_engine.pool
    out = await engine.connect()
    await _select_one(out)

    await engine.dispose()
    new_pool = engine.sync_engine.pool
    assert new_pool is not old_pool
    assert isinstance(new_pool, GuardedPoolMixin)
    assert poolguard.get_guard(engine) is guard
    assert guard.pool is new_pool
    assert _permits(engine) == 1

    await _select_one(out)
    await out.close()
    _assert_balanced(engine)
    async with AsyncSession(engine) as session:
        assert (await session.execute(sa.text("SELECT 1"))).scalar_one() == 1
        assert _permits(engine) == 1
    _assert_balanced(engine)
    assert guard.stats().acquisitions == 2


async def test_a_checkout_records_the_task_that_holds_it(
    make_async_engine: AsyncEngineFactory, aiosqlite_url: str
) -> None:
    from poolguard._hold import TASK

    engine = poolguard.wrap(make_async_engine(aiosqlite_url, pool_size=2, max_overflow=0))
    gate = poolguard.get_guard(engine).gate

    async def hold_one() -> tuple[object, object]:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
            (hold,) = gate.out.values()
            return hold[TASK], asyncio.current_task()

    recorded, task = await asyncio.create_task(hold_one())
    assert recorded is task
