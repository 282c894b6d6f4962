"""The :class:`Guard`: one per guarded engine, shared by the pools it recreates."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.pool import NullPool, Pool, QueuePool, SingletonThreadPool, StaticPool

from .context import _current
from .errors import PoolTimeout
from .gate import Gate
from .stats import PoolStats

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import Config
    from .pool import GuardedPoolMixin

__all__ = ["Guard"]

_EVENTS = ("connect", "close", "close_detached", "invalidate")


def _capacity(pool: Pool) -> int | None:
    """How many connections ``pool`` can hand out at once (``None``: no limit)."""
    if isinstance(pool, QueuePool):
        size = pool.size()
        overflow = pool._max_overflow
        if size == 0 or overflow < 0:
            return None
        return size + overflow
    return None


class Guard:
    """Gate, options and stats of one guarded engine.

    Get it with :func:`poolguard.get_guard`; :func:`poolguard.wrap` makes it.
    """

    def __init__(self, config: Config, *, default_name: str) -> None:
        self._default_name = default_name
        self.config = config
        self.name = config.name or default_name
        self.gate = Gate(None)
        self._pool: GuardedPoolMixin | None = None
        self._listeners: list[tuple[str, Callable[..., None]]] = []
        self._lock = threading.Lock()
        self._opened = 0
        self._closed = 0
        self._invalidated = 0

    # -- set-up ---------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Apply new options; the gate, its permits and the counters stay."""
        self.config = config
        self.name = config.name or self._default_name

    @property
    def pool(self) -> Pool:
        """The pool currently guarded (a new one after ``engine.dispose()``)."""
        if self._pool is None:
            raise RuntimeError(f"guard {self.name!r} is not attached to a pool")
        return self._pool

    def _attach(self, pool: GuardedPoolMixin) -> None:
        """Guard ``pool``: the first pool, or one recreated by ``dispose()``."""
        first = self._pool is None
        pool._poolguard = self
        self._pool = pool
        if first:
            # Connections already checked out (wrap() of a busy engine) hold
            # capacity without a ticket: count them as adopted permits.
            adopted = pool.checkedout() if isinstance(pool, QueuePool) else 0
            self.gate = Gate(_capacity(pool), adopted=max(0, adopted))
            self._listen(pool)
        pool._poolguard_gate = self.gate
        # A recreated pool copied the listeners with the rest of the dispatch.

    def _listen(self, pool: Pool) -> None:
        def on_connect(dbapi_conn: Any, record: Any) -> None:
            with self._lock:
                self._opened += 1

        def on_close(dbapi_conn: Any, record: Any = None) -> None:
            with self._lock:
                self._closed += 1

        def on_invalidate(dbapi_conn: Any, record: Any, exc: Any) -> None:
            with self._lock:
                self._invalidated += 1

        handlers: dict[str, Callable[..., None]] = {
            "connect": on_connect,
            "close": on_close,
            "close_detached": on_close,
            "invalidate": on_invalidate,
        }
        for name in _EVENTS:
            event.listen(pool, name, handlers[name])
            self._listeners.append((name, handlers[name]))

    def _detach(self) -> None:
        """Stop guarding: listeners off, waiters let through to the pool."""
        pool = self._pool
        if pool is not None:
            for name, fn in self._listeners:
                if event.contains(pool, name, fn):
                    event.remove(pool, name, fn)
        self._listeners.clear()
        self.gate.close()
        self._pool = None

    # -- the slow path of a checkout -----------------------------------------

    def acquire_timeout(self) -> float:
        """The guard-wide acquire timeout in seconds (the pool's own if unset)."""
        timeout = self.config.acquire_timeout
        if timeout is not None:
            return timeout
        pool = self._pool
        if isinstance(pool, QueuePool):
            return pool.timeout()
        return 30.0

    def acquire_slow(self, pool: Pool) -> None:
        """Wait for a permit, bounded by the acquire timeout and the request's deadline."""
        timeout = self.acquire_timeout()
        by_deadline = False
        request = _current.get()
        if request is not None and request.deadline is not None:
            left = request.deadline - time.monotonic()
            if left < timeout:
                timeout = max(0.0, left)
                by_deadline = True
        if not self.gate.acquire(timeout, asyncio_mode=bool(pool._is_asyncio)):
            raise self._timeout_error(timeout, by_deadline)

    def _timeout_error(self, timeout: float, by_deadline: bool) -> PoolTimeout:
        gate = self.gate
        in_use, capacity, waiting = gate.in_use, gate.capacity, gate.waiting
        limit = "the request's deadline" if by_deadline else "acquire_timeout"
        message = (
            f"pool {self.name!r}: no connection within {timeout:.3f}s (limited by {limit}); "
            f"{in_use}/{capacity if capacity is not None else 'unbounded'} in use, "
            f"{waiting} waiting"
        )
        return PoolTimeout(
            message,
            pool_name=self.name,
            timeout=timeout,
            in_use=in_use,
            capacity=capacity,
            waiting=waiting,
        )

    # -- reading --------------------------------------------------------------

    def stats(self) -> PoolStats:
        """An immutable snapshot of the pool's gauges and the guard's counters."""
        pool = self._pool
        gate = self.gate
        pool_size: int | None = None
        max_overflow: int | None = None
        idle = 0
        if isinstance(pool, QueuePool):
            pool_size = pool.size()
            max_overflow = pool._max_overflow
            idle = pool.checkedin()
            in_use = pool.checkedout()
        else:
            in_use = gate.in_use
            if isinstance(pool, SingletonThreadPool):
                pool_size = pool.size
                idle = max(0, len(pool._all_conns) - in_use)
            elif isinstance(pool, StaticPool):
                pool_size = 1
                idle = int("connection" in pool.__dict__ and in_use == 0)
            elif isinstance(pool, NullPool):
                pool_size = 0
        permits = gate.in_use
        acquisitions = gate.acquired
        with gate._lock:
            waiting = gate.waiting
            waits = gate.waits
            wait_total = gate.wait_total
            wait_max = gate.wait_max
            timeouts = gate.timeouts
        with self._lock:
            opened, closed, invalidated = self._opened, self._closed, self._invalidated
        return PoolStats(
            name=self.name,
            pool_class=type(pool).__name__ if pool is not None else "",
            pool_size=pool_size,
            max_overflow=max_overflow,
            capacity=gate.capacity,
            in_use=in_use,
            idle=idle,
            waiting=waiting,
            permits=permits,
            acquisitions=acquisitions,
            waits=waits,
            wait_time_total=wait_total,
            wait_time_max=wait_max,
            timeouts=timeouts,
            connections_opened=opened,
            connections_closed=closed,
            connections_invalidated=invalidated,
        )

    def __repr__(self) -> str:
        gate = self.gate
        return f"<Guard {self.name!r} permits={gate.in_use}/{gate.capacity} waiting={gate.waiting}>"
