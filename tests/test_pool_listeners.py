"""The guard's pool listeners leave SQLAlchemy's run-once connect mutex as it was.

SQLAlchemy runs a pool's ``connect`` listeners under a mutex on the first
connection, an asyncio-aware one when any listener was added while the pool was
asyncio. A pool built with ``poolclass=Guarded...`` gets the guard's listeners
at its first checkout, so they must not decide that mutex by themselves.
"""

from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.util.concurrency import AsyncAdaptedLock

import poolguard
from poolguard import GuardedAsyncAdaptedQueuePool, GuardedQueuePool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.pool import Pool


@pytest.fixture(autouse=True)
def _no_poolguard_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pools built with poolclass=Guarded... configure from POOLGUARD_*.
    for name in list(os.environ):
        if name.startswith("POOLGUARD_") and not name.startswith("POOLGUARD_TEST_"):
            monkeypatch.delenv(name)


def _connect_mutex(pool: Pool) -> Any:
    return pool.dispatch.connect.for_modify(pool.dispatch)._exec_once_mutex


def test_sync_pool_flagged_asyncio_checks_out_outside_a_greenlet(sqlite_url: str) -> None:
    # SQLAlchemy's own pool tests build a sync QueuePool, set _is_asyncio on it
    # and check out from plain code (test_checkin_event_gc[...is_asyncio],
    # test_invalidate_close_interrupted); with the guard's listeners marking the
    # event asyncio, the first connect raised MissingGreenlet.
    path = make_url(sqlite_url).database
    assert path

    def creator() -> sqlite3.Connection:
        return sqlite3.connect(path, check_same_thread=False)

    pool = GuardedQueuePool(creator=creator, pool_size=1, max_overflow=0)
    pool._is_asyncio = True  # type: ignore[misc]  # what SQLAlchemy's fixture does
    try:
        conn = pool.connect()
        try:
            cursor = conn.cursor()
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
            guard = pool._poolguard
            assert guard is not None
            assert guard.stats().permits == 1
            assert guard.stats().connections_opened == 1  # the guard's listener ran
        finally:
            conn.close()
        assert guard.stats().permits == 0
        assert not isinstance(_connect_mutex(pool), AsyncAdaptedLock)
    finally:
        pool.dispose()


@pytest.fixture
async def make_async_engine() -> AsyncIterator[Callable[..., AsyncEngine]]:
    created: list[AsyncEngine] = []

    def make(url: str, **kwargs: Any) -> AsyncEngine:
        engine = create_async_engine(url, **kwargs)
        created.append(engine)
        return engine

    yield make
    for engine in created:
        await engine.dispose()


async def test_async_engine_keeps_its_asyncio_connect_mutex(
    async_db_url: str, make_async_engine: Callable[..., AsyncEngine]
) -> None:
    # The guard's listeners say asyncio=False; the engine's own connect listener
    # (dialect initialisation, which awaits) was added with asyncio=True at
    # create time, and that must still pick the asyncio-aware mutex: a
    # threading.Lock held across its await would block the event loop.
    engine = make_async_engine(
        async_db_url, poolclass=GuardedAsyncAdaptedQueuePool, pool_size=2, max_overflow=0
    )
    async with engine.connect() as conn:
        assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
        guard = poolguard.get_guard(engine)
        assert guard.stats().permits == 1
        assert guard.stats().connections_opened == 1
    assert isinstance(_connect_mutex(engine.sync_engine.pool), AsyncAdaptedLock)
    assert guard.stats().permits == 0
