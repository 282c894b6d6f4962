"""Helpers shared by the poolguard tests: engines, a fake clock, polling.

* :class:`EngineFactory`: the ``make_engine`` fixture (``tests/conftest.py``)
  makes guarded engines with it and disposes them when the test ends;
  ``make_engine.using(...)`` gives a factory with other defaults that disposes
  into the same list.
* :class:`FakeClock`: a clock that moves only when the test moves it.
* :func:`wait_until` / :func:`async_wait_until`: poll a condition, fail the
  test naming what did not happen. Their timeout only stops a broken test
  from hanging; no assertion is about elapsed time.

Events are captured with the public :func:`poolguard.testing.capture_events`
(the ``events`` and ``debug_events`` fixtures open one for the whole test);
:func:`named` picks some out.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import poolguard

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from sqlalchemy.engine import URL, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from _proxy import Proxy

__all__ = [
    "SAFETY_TIMEOUT",
    "AsyncEngineFactory",
    "EngineFactory",
    "FakeClock",
    "async_wait_until",
    "named",
    "through_proxy",
    "wait_until",
]

SAFETY_TIMEOUT = 30.0
"""Upper bound of a wait for another thread or process to get somewhere (seconds).

Generous because the suite runs on loaded two-core machines; a passing test
never waits this long.
"""

_POLL_INTERVAL = 0.005

#: ``create_engine`` arguments of a guarded engine unless a test says otherwise:
#: one connection, no overflow (so temporary tables stay visible to every checkout).
DEFAULT_POOL: Mapping[str, Any] = {"pool_size": 1, "max_overflow": 0}


class EngineFactory:
    """``make(url=None, pool_size=None, *, max_overflow=None, pool=None, **options)``.

    Creates ``sa.create_engine(url, **pool_args)`` (``url``: the factory's,
    ``sqlite://`` unless :meth:`using` set one) and returns it wrapped with
    ``poolguard.wrap(engine, **options)``. ``pool_args`` are the factory's
    (:data:`DEFAULT_POOL` unless :meth:`using` replaced them) updated with
    ``pool``, then ``pool_size`` / ``max_overflow`` when given. ``options`` go
    over the factory's default wrap options. Every engine is disposed by
    :meth:`dispose_all` (the fixture calls it at teardown).
    """

    def __init__(
        self,
        made: list[Engine] | None = None,
        pool: Mapping[str, Any] = DEFAULT_POOL,
        options: Mapping[str, Any] | None = None,
        url: str | URL = "sqlite://",
    ) -> None:
        self.made: list[Engine] = [] if made is None else made
        self.pool = dict(pool)
        self.options = dict(options or {})
        self.url = url

    def using(
        self,
        *,
        url: str | URL | None = None,
        pool: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> EngineFactory:
        """A factory with ``url`` and ``pool`` instead of this one's and ``options``
        over its wrap options, disposing into the same list."""
        return EngineFactory(
            self.made,
            self.pool if pool is None else pool,
            {**self.options, **options},
            self.url if url is None else url,
        )

    def __call__(
        self,
        url: str | URL | None = None,
        pool_size: int | None = None,
        *,
        max_overflow: int | None = None,
        pool: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Engine:
        return poolguard.wrap(
            self.plain(url, pool_size, max_overflow=max_overflow, pool=pool),
            **{**self.options, **options},
        )

    def plain(
        self,
        url: str | URL | None = None,
        pool_size: int | None = None,
        *,
        max_overflow: int | None = None,
        pool: Mapping[str, Any] | None = None,
        **create_args: Any,
    ) -> Engine:
        """An unguarded engine made as :meth:`__call__` makes one; ``create_args``
        go to ``create_engine``."""
        args = {**self.pool, **(pool or {}), **create_args}
        if pool_size is not None:
            args["pool_size"] = pool_size
        if max_overflow is not None:
            args["max_overflow"] = max_overflow
        engine = sa.create_engine(self.url if url is None else url, **args)
        self.made.append(engine)
        return engine

    def dispose_all(self) -> None:
        """Dispose every engine made, newest first."""
        while self.made:
            self.made.pop().dispose()


PROXY_CONNECT_TIMEOUT = 2
"""psycopg's ``connect_timeout`` through the fault proxy (libpq raises less to 2 s)."""


def through_proxy(
    make_engine: EngineFactory, postgresql_url: str, proxy: Proxy, *, pool_size: int
) -> EngineFactory:
    """``proxied(pool=..., **wrap_options)``: guarded engines to PostgreSQL through
    ``proxy`` (``pool_size`` connections, no overflow, no TLS, no connect retries)."""
    url = sa.make_url(postgresql_url).set(host=proxy.host, port=proxy.port)
    pool = {
        "pool_size": pool_size,
        "max_overflow": 0,
        "connect_args": {"connect_timeout": PROXY_CONNECT_TIMEOUT, "sslmode": "disable"},
    }
    return make_engine.using(url=url, pool=pool, connect_retries=0)


class AsyncEngineFactory:
    """``make(url, **create_args)``: an unguarded ``AsyncEngine`` (the test wraps it),
    disposed by :meth:`dispose_all`."""

    def __init__(self) -> None:
        self.made: list[AsyncEngine] = []

    def __call__(self, url: str, **create_args: Any) -> AsyncEngine:
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(url, **create_args)
        self.made.append(engine)
        return engine

    async def dispose_all(self) -> None:
        while self.made:
            await self.made.pop().dispose()


class FakeClock:
    """A monotonic clock that moves only when the test moves it.

    ``FakeClock(now)`` reads ``now``; ``FakeClock(base=time.perf_counter)``
    reads the real clock plus what the test advanced it by, for code that
    also measures real durations with it.
    """

    def __init__(self, now: float = 0.0, *, base: Callable[[], float] | None = None) -> None:
        self.now = now
        self._base = base

    def __call__(self) -> float:
        if self._base is None:
            return self.now
        return self._base() + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(
    predicate: Callable[[], object], what: str, timeout: float = SAFETY_TIMEOUT
) -> None:
    """Poll ``predicate`` until it is true; fail the test naming ``what`` after ``timeout``."""
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for {what} ({timeout:g}s)")
        time.sleep(_POLL_INTERVAL)


async def async_wait_until(
    predicate: Callable[[], object], what: str, timeout: float = SAFETY_TIMEOUT
) -> None:
    """:func:`wait_until` for a coroutine: polls between ``asyncio.sleep`` steps."""
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            pytest.fail(f"gave up waiting for {what} ({timeout:g}s)")
        await asyncio.sleep(_POLL_INTERVAL)


def named(events: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    """The captured events called one of ``names``, in order."""
    return [e for e in events if e["event"] in names]
