"""The SQLAlchemy internals poolguard needs, reached here only, for 2.0 and 2.1.

Every private SQLAlchemy name poolguard reads or writes goes through a small
named function of this module (tests/test_architecture.py checks it); the
exceptions are the hot path's inlined reads, marked ``# sqla-private`` (a
call there would cost a frame per statement or checkout).
"""

from __future__ import annotations

import gc
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.pool import NullPool, Pool, QueuePool, SingletonThreadPool, StaticPool
from sqlalchemy.pool.base import _ConnectionFairy

# `await_only` exists under this name in 2.0 and 2.1 (2.1 adds `await_`): it
# suspends the greenlet SQLAlchemy runs pool code in and lets the event loop
# await the awaitable, which is how a sync pool method waits without blocking
# the loop.
from sqlalchemy.util import await_only as _await_only
from sqlalchemy.util import queue as sqla_queue

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

T = TypeVar("T")

__all__ = [
    "GatedQueue",
    "asyncpg_statement_caches",
    "await_only",
    "capacity",
    "checked_out_records",
    "connection_record",
    "creator",
    "db_system",
    "is_asyncio",
    "overflow_limit",
    "pool_dialect",
    "pool_gauges",
    "pool_timeout",
    "pre_ping",
    "set_creator",
    "singleton_connections",
    "use_gated_queue",
]


def await_only(awaitable: Awaitable[T]) -> T:
    """Await from inside SQLAlchemy's greenlet (see module docstring)."""
    return _await_only(awaitable)


def overflow_limit(pool: QueuePool) -> int:
    """The ``max_overflow`` a QueuePool was built with (negative: no limit)."""
    return pool._max_overflow


def is_asyncio(pool: Pool) -> bool:
    """Whether ``pool`` serves an asyncio engine (set by the engine, never unset)."""
    return bool(pool._is_asyncio)


def pre_ping(pool: Pool) -> bool:
    """Whether ``pool`` pings a connection before handing it out."""
    return bool(pool._pre_ping)


def pool_dialect(pool: Pool | None) -> Any:
    """The dialect a pool was given by its engine (None without one)."""
    return getattr(pool, "_dialect", None)


def singleton_connections(pool: Pool) -> Any:
    """The per-thread connections a SingletonThreadPool keeps."""
    return pool._all_conns  # type: ignore[attr-defined]


def creator(pool: Pool) -> Callable[[Any], Any]:
    """The function each record of ``pool`` calls to open its DBAPI connection."""
    return pool._invoke_creator


def set_creator(pool: Pool, fn: Callable[[Any], Any]) -> None:
    """Replace :func:`creator` (to time and retry connection set-up)."""
    pool._invoke_creator = fn  # type: ignore[assignment]


def plain_return(cls: type[Pool]) -> Callable[[Pool, Any], None]:
    """``cls``'s own checkin (``_do_return_conn``), for a guarded subclass to call."""
    return cls._do_return_conn


def plain_checkout(cls: type[Pool]) -> Callable[[Pool], Any]:
    """``cls``'s own checkout, for a guarded subclass to call.

    For a class that keeps :meth:`Pool.connect` (QueuePool and most others)
    this is what that method does, ``_ConnectionFairy._checkout(pool)``,
    called directly: one Python frame fewer per checkout.
    """
    if cls.connect is Pool.connect:
        return _ConnectionFairy._checkout
    return cls.connect


def keeps_return_conn(cls: type[Pool]) -> bool:
    """``cls`` returns records with :class:`Pool`'s own ``_return_conn`` (a
    plain call of ``_do_return_conn``), which a guarded subclass may replace."""
    return cls._return_conn is Pool._return_conn


def logging_name(pool: Pool) -> str | None:
    """The ``logging_name`` the pool was built with, if any."""
    return pool._orig_logging_name


def capacity(pool: Pool) -> int | None:
    """How many connections ``pool`` can hand out at once (``None``: no limit)."""
    if isinstance(pool, QueuePool):
        size = pool.size()
        overflow = pool._max_overflow
        if size == 0 or overflow < 0:
            return None
        return size + overflow
    return None


def checked_out_records(pool: Pool) -> list[object]:
    """The records of ``pool`` checked out now (one-off, at wrap).

    Found without a walk of the heap: SQLAlchemy registers every checked-out
    connection, 2.1 as a ``weakref.finalize`` of its ``_ConnectionFairy``
    (``_finalize_fairy(None, record, pool, ...)``), 2.0 in the module dict
    ``_strong_ref_connection_records``. One pass over that registry costs
    the connections checked out in the process, not the objects alive in it.
    """
    if not isinstance(pool, QueuePool) or pool.checkedout() <= 0:
        return []
    from sqlalchemy.pool import base
    from sqlalchemy.pool.base import _ConnectionRecord

    candidates: Iterable[object]
    strong = getattr(base, "_strong_ref_connection_records", None)
    registry = getattr(weakref.finalize, "_registry", None)
    if isinstance(strong, dict):  # SQLAlchemy 2.0
        candidates = list(strong.copy().values())
    elif isinstance(registry, dict):  # SQLAlchemy 2.1
        finalize_fairy = getattr(base, "_finalize_fairy", None)
        candidates = [
            info.args[1]
            for info in registry.copy().values()
            if info.func is finalize_fairy and len(info.args) > 2 and info.args[2] is pool
        ]
    else:  # neither: an unknown SQLAlchemy or Python; the slow way
        candidates = gc.get_objects()
    return [
        obj
        for obj in candidates
        if isinstance(obj, _ConnectionRecord)
        and obj._ConnectionRecord__pool is pool  # type: ignore[attr-defined]
        and obj.fairy_ref is not None
    ]


def connection_record(dbapi_connection: Any) -> Any:
    """The pool record a proxied DBAPI connection belongs to (None: not pooled)."""
    return getattr(dbapi_connection, "_connection_record", None)


def pool_gauges(pool: Pool | None, permits: int) -> tuple[int | None, int | None, int, int]:
    """``(pool_size, max_overflow, idle, in_use)`` as ``pool``'s class knows them.

    A QueuePool counts its own; the others are read from what they keep, with
    the gate's ``permits`` as the connections in use.
    """
    if isinstance(pool, QueuePool):
        return pool.size(), overflow_limit(pool), pool.checkedin(), pool.checkedout()
    in_use = permits
    if isinstance(pool, SingletonThreadPool):
        return pool.size, None, max(0, len(singleton_connections(pool)) - in_use), in_use
    if isinstance(pool, StaticPool):
        return 1, None, int("connection" in pool.__dict__ and in_use == 0), in_use
    if isinstance(pool, NullPool):
        return 0, None, 0, in_use
    return None, None, 0, in_use


def db_system(dialect: Any) -> str:
    """``db.system.name`` of a dialect's database (``postgresql``, ``mariadb``, ...)."""
    name: str = dialect.name
    if name == "mysql" and getattr(dialect, "is_mariadb", False):
        return "mariadb"
    return {"postgresql": "postgresql", "mysql": "mysql", "sqlite": "sqlite",
            "mssql": "microsoft.sql_server", "oracle": "oracle.db"}.get(name, name)


def pool_timeout(pool: Pool | None) -> float | None:
    """How long ``pool`` itself lets a checkout wait (30 s where it has no say)."""
    return pool.timeout() if isinstance(pool, QueuePool) else 30.0


def asyncpg_statement_caches(dbapi_connection: Any) -> tuple[bool, bool] | None:
    """SQLAlchemy's asyncpg adapter: ``(its prepared statement cache is on,
    asyncpg's statement cache is on)``; None for any other connection."""
    if not hasattr(dbapi_connection, "_prepared_statement_cache"):
        return None
    inner = getattr(dbapi_connection, "_connection", None)
    return (
        getattr(dbapi_connection, "_prepared_statement_cache", None) is not None,
        bool(getattr(inner, "_stmt_cache_enabled", False)),
    )
class GatedQueue(sqla_queue.Queue[Any]):
    """A QueuePool's queue of idle records, without its lock while nobody waits in it.

    SQLAlchemy's queue takes its lock and notifies its conditions on every
    get and put (a few Python frames each). Behind a gate it never has to
    wait: a checkout holds a permit, so an idle record or room to open one
    is there (the checkin gives the permit back only once its record is
    back). So a get pops a record in one C call, and a put appends it in
    one; the locked code runs only when the queue is empty (it may wait, as
    SQLAlchemy's does) or full (``Full``, as SQLAlchemy's).

    No lost wake-up, relying on the GIL ordering the operations of two
    threads (deque ``append``/``pop`` are single C calls): a get that must
    wait counts itself in ``_sleepers`` under the lock *before* it looks at
    the queue, and a put appends *before* it reads ``_sleepers``: either the
    put sees the sleeper (and notifies it under the lock) or the sleeper
    sees the record. A free-threaded build keeps the deque operations atomic
    but does not promise that order across two objects: there, a get that
    loses the race waits for the next put or its own timeout, then finds the
    record. Two puts racing past the size check may leave one record more
    than ``maxsize`` idle: the pool's overflow count still counts it, so the
    number of connections stays bounded.
    """

    _sleepers = 0

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        queue = self.queue
        try:
            item = queue.pop() if self.use_lifo else queue.popleft()
        except IndexError:
            return self._get_locked(block, timeout)
        if self.not_full._waiters:  # type: ignore[attr-defined]  # a blocking put (QueuePool makes none)
            with self.not_full:
                self.not_full.notify()
        return item

    def _get_locked(self, block: bool, timeout: float | None) -> Any:
        with self.mutex:
            self._sleepers += 1
            try:
                return super().get(block, timeout)
            finally:
                self._sleepers -= 1

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        queue = self.queue
        if 0 < self.maxsize <= len(queue):  # full: SQLAlchemy's answer (Full, or a wait)
            super().put(item, block, timeout)
            return
        queue.append(item)
        if self._sleepers or self.not_empty._waiters:  # type: ignore[attr-defined]
            with self.not_empty:
                self.not_empty.notify()


def use_gated_queue(pool: Pool) -> None:
    """Give a QueuePool with SQLAlchemy's own queue the :class:`GatedQueue`
    (in place: the idle records stay; a caller already waiting in the old
    code is still notified, by the condition's own waiter list)."""
    queue = getattr(pool, "_pool", None)
    if type(queue) is sqla_queue.Queue:
        queue.__class__ = GatedQueue
