"""Guarded pool classes: SQLAlchemy's pools with the admission gate in front.

Every checkout path (Core, ORM, ``raw_connection()``, ``pool.connect()``)
goes through :meth:`Pool.connect`, and every record handed out comes back
through ``Pool._return_conn`` (close, invalidate, garbage collection) or,
detached, ``Pool._do_return_conn``. The mix-in takes a permit in the first,
registers the record in the gate's ``out`` map, and gives the permit back in
the others when it finds the record there (or at once, if the checkout
fails). A checkin takes the record out of ``out`` before the pool has it
back (the hand-over point: a checkout that gets it finds it not out) and
gives the permit back after (a checkout holding a permit finds a record).
Both replace the plain method that only calls the next one
(``Pool.connect`` calls ``_ConnectionFairy._checkout``, ``_return_conn``
calls ``_do_return_conn``), so a guarded cycle runs no more Python frames
than a plain one. It
keeps :meth:`recreate` carrying the guard, so that ``engine.dispose()``
keeps it. It adds no ``__init__``, so the guarded
classes take exactly the arguments of the classes they extend and work as
``create_engine(url, poolclass=...)``.
"""

from __future__ import annotations

import logging
import threading
import time
from asyncio import current_task
from asyncio.events import _get_running_loop
from bisect import bisect_left
from threading import get_ident
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy.pool import (
    AsyncAdaptedQueuePool,
    NullPool,
    Pool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)

from ._compat import GatedQueue, keeps_return_conn, logging_name, plain_checkout, plain_return
from ._context import _current
from ._histogram import BOUNDS
from ._hold import REQUEST, T0, TASK, TOP_STAT, WARNED, Hold
from ._policies import BACKGROUND
from ._queries import count_ping

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.pool.base import ConnectionPoolEntry, PoolProxiedConnection

    from ._gate import Gate
    from ._guard import Guard
    from ._hooks import CheckoutHooks

__all__ = [
    "GuardedAsyncAdaptedQueuePool",
    "GuardedNullPool",
    "GuardedPoolMixin",
    "GuardedQueuePool",
    "GuardedSingletonThreadPool",
    "GuardedStaticPool",
    "guarded_class",
]

_P = TypeVar("_P", bound="GuardedPoolMixin")
#: Serialises building a guard for a pool that has none (poolclass=Guarded...).
_DEFAULT_LOCK = threading.Lock()


class GuardedPoolMixin(Pool):
    """Puts a pool behind a :class:`poolguard.Guard`'s gate.

    Combine it before a :class:`sqlalchemy.pool.Pool` subclass; see
    :func:`guarded_class`.
    """

    _poolguard: Guard | None = None
    _poolguard_gate: Gate | None = None
    # Set with _poolguard, before the gate is published.
    _poolguard_hooks: CheckoutHooks
    _poolguard_plain: type[Pool] = Pool
    # The plain class's methods, bound once per class: calling them is
    # cheaper than building a super() object on every checkout.
    _poolguard_connect: Callable[[Pool], PoolProxiedConnection]
    _poolguard_return: Callable[[Pool, ConnectionPoolEntry], None]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        plain = cls._poolguard_plain
        cls._poolguard_connect = staticmethod(plain_checkout(plain))
        cls._poolguard_return = staticmethod(plain_return(plain))
        if not keeps_return_conn(plain):
            # A pool with its own _return_conn: keep it (it ends in
            # _do_return_conn, guarded below).
            cls._return_conn = plain._return_conn  # type: ignore[method-assign]  # sqla-private

    def connect(self) -> PoolProxiedConnection:  # noqa: PLR0912, PLR0915 - the hot path, inlined
        gate = self._poolguard_gate
        if gate is None:
            gate = self._poolguard_default().gate
        # Bound before any wait: unwrap() may restore the plain class meanwhile.
        connect = self._poolguard_connect
        request = _current.get()
        take = gate.take
        if request is not None:
            if request.deadline is not None:
                _check_deadline(request.deadline, gate)
            if request.priority == BACKGROUND:  # passes nobody waiting
                take = gate.take_last
        hooks = self._poolguard_hooks
        if hooks.tripped:  # circuit breaker open or probing: CircuitOpen, or a probe
            self._poolguard.breaker_admit(self)  # type: ignore[union-attr]
        # A signal's exception may land after any call: each step below is
        # covered by a handler that knows whether the permit is held, and
        # nothing between two of them checks for one (no calls, no loops).
        waiter = None
        try:
            take()  # a C call: an exception after it means it took a permit
        except IndexError:
            waiter = gate.new_waiter()
        except BaseException:
            gate.give(None)  # inline: the permit is back once this C call returns
            gate.returned()
            raise
        wait = 0.0
        if waiter is not None:
            # Outside the IndexError handler: a PoolTimeout must not carry it
            # as its context.
            try:
                wait = self._poolguard.acquire_slow(self, waiter)  # type: ignore[union-attr]
            except BaseException:
                # Granted, then interrupted on the way here? give_back() runs
                # to its end whatever interrupts it inside; one at its very
                # entry (no exception has been raised yet), once more.
                try:
                    gate.give_back(waiter)
                except BaseException:  # noqa: BLE001 - the first exception propagates
                    gate.give_back(waiter)
                raise
            if gate.closed:  # unwrapped while we waited: plain checkout
                return connect(self)
        hold = None
        try:
            conn = connect(self)
            # Registered only now: a record SQLAlchemy returns during a failed
            # checkout must not release a permit that is released below.
            record = conn._connection_record  # sqla-private
            out = gate.out
            if record in out:
                # The record is already out under a permit: a nested checkout
                # of the thread's connection (SingletonThreadPool), or
                # StaticPool handing its one record to a second caller. One
                # record, one permit.
                if waiter is None:
                    hold = out[record]  # first: the handler below gives nothing back
                    gate.give(None)  # inline: the permit is back once this C call returns
                    gate.returned()
                else:
                    # Idempotent: cut short, the handler below runs it again.
                    gate.give_back(waiter)
                return conn
            # the ping ran inside the checkout: part of its wait
            if self._pre_ping:  # sqla-private
                wait = count_ping(self._poolguard, conn, wait)  # type: ignore[arg-type]
            now = perf_counter()
            # _hold.new_hold(), spelled out: one list display, no call.
            hold = out[record] = [now, wait, get_ident(), request, None, 0.0, None, -1.0,
                                  None, None, False, None]
        except BaseException as error:
            if hold is None:  # the permit did not reach a record: this is its release
                if waiter is None:
                    gate.give(None)  # inline, as above
                    gate.returned()
                else:  # as after acquire_slow() above
                    try:
                        gate.give_back(waiter)
                    except BaseException:  # noqa: BLE001 - the first exception propagates
                        gate.give_back(waiter)
                guard = self._poolguard
                if guard is not None and guard.breakers_on:
                    guard.breaker_record(error, 0.0, request)
            raise
        if now >= hooks.slow_at:  # a scan is due, or per-checkout extras are on
            if hooks.asyncio:  # the task that holds it (inline: no call per checkout)
                loop = _get_running_loop()
                if loop is not None:
                    hold[TASK] = current_task(loop)
            if now >= hooks.call_at:  # a scan is due, or the guard's extras are on
                self._poolguard.after_checkout(hold, now, conn)  # type: ignore[union-attr]
        return conn

    def _return_conn(self, record: ConnectionPoolEntry) -> None:
        # Pool._return_conn only calls _do_return_conn: replaced by it, a
        # checkin costs no more Python frames than a plain one.
        gate = self._poolguard_gate
        if gate is None or record not in gate.out:
            self._poolguard_return(self, record)
            return
        out = gate.out
        # Out of ``out`` before the record is back in the pool (the hand-over
        # point): a checkout that pops it from the pool's queue must not find
        # it still out, as a nested checkout. An item read and a delete, then
        # the call in the try: no interrupt can land between them. Not
        # dict.pop(): a signal handler may run at the end of that C call,
        # with the record gone from ``out`` and its permit never given back.
        hold: Hold = out[record]
        del out[record]
        try:
            self._poolguard_return(self, record)
        finally:
            # The permit only once the record is back: a checkout holding a
            # permit finds an idle record, or room to open one. Gate.release(),
            # inlined: this runs on every checkin. The use-time histogram
            # below counts the release.
            gate.give(None)
            held = perf_counter() - hold[T0]
            if gate.policy_checkin:  # tag bulkheads, adaptive limit
                gate.on_checkin(hold[REQUEST], held)
            if gate.waiters and (gate.signalled is None or gate.admission is not None
                                 or gate.handing_off):
                gate.wake()  # not while a waiter is signalled (see Gate.signalled)
            recorder = self._poolguard_hooks.recorder
            buf = recorder.export_use
            # Histogram.add() without min, inlined (as per statement in
            # _queries.py): a call would cost more than these lines.
            use = recorder.use
            use.counts[bisect_left(BOUNDS, held)] += 1
            use.sum += held
            if held > use.max:
                use.max = held
            if buf is not None:
                buf.append(held)
            stat = hold[TOP_STAT]
            if stat is not None:  # connection-seconds of its main statement
                stat.held += held
            if hold[WARNED]:
                self._poolguard.after_checkin(hold, held)  # type: ignore[union-attr]

    # A detached connection's record comes back through _do_return_conn
    # directly; every other through _return_conn.
    _do_return_conn = _return_conn

    def recreate(self: _P) -> _P:
        pool = cast("_P", super().recreate())
        guard = self._poolguard
        if guard is not None:
            guard._attach(pool)
        return pool

    def _poolguard_default(self) -> Guard:
        # Built with poolclass=Guarded...: configure from the environment. Or
        # a checkout while wrap() attaches: wait for that guard instead.
        from ._config import Config
        from ._guard import Guard

        with _DEFAULT_LOCK:
            guard = self._poolguard
            if guard is None:
                # A bad POOLGUARD_* variable fails this one call, clearly; the
                # guard keeps the good ones, so later checkouts neither fail
                # nor parse the environment again.
                config, errors = Config._from_env()
                guard = Guard(config, default_name=logging_name(self) or "pool")
                guard._attach(self)
                if errors:
                    guard.log.emit(logging.ERROR, "config.invalid",
                                   errors=[str(error) for error in errors])
                    raise errors[0]
                return guard
        guard._wait_attached()
        return guard


def _check_deadline(deadline: float, gate: Gate) -> None:
    """A request already past its deadline gets no connection (not even a dial)."""
    late = time.monotonic() - deadline
    if late >= 0:
        from .errors import DeadlineExceeded

        raise DeadlineExceeded(
            f"the request's deadline passed {late:.3f}s ago; no connection taken "
            f"({gate.in_use}/{gate.capacity} in use)"
        )


class GuardedQueuePool(GuardedPoolMixin, QueuePool):
    """:class:`sqlalchemy.pool.QueuePool` behind a poolguard gate."""

    _poolguard_plain = QueuePool
    # Its idle records in a queue that takes no lock while nobody waits in it
    # (the gate does the waiting); wrap() gives one to a pool it swaps in.
    _queue_class = GatedQueue


class GuardedAsyncAdaptedQueuePool(GuardedPoolMixin, AsyncAdaptedQueuePool):
    """:class:`sqlalchemy.pool.AsyncAdaptedQueuePool` behind a poolguard gate."""

    _poolguard_plain = AsyncAdaptedQueuePool


class GuardedNullPool(GuardedPoolMixin, NullPool):
    """:class:`sqlalchemy.pool.NullPool` behind a poolguard gate."""

    _poolguard_plain = NullPool


class GuardedStaticPool(GuardedPoolMixin, StaticPool):
    """:class:`sqlalchemy.pool.StaticPool` behind a poolguard gate."""

    _poolguard_plain = StaticPool


class GuardedSingletonThreadPool(GuardedPoolMixin, SingletonThreadPool):
    """:class:`sqlalchemy.pool.SingletonThreadPool` behind a poolguard gate."""

    _poolguard_plain = SingletonThreadPool


_GUARDED: dict[type[Pool], type[GuardedPoolMixin]] = {
    cls._poolguard_plain: cls
    for cls in (
        GuardedQueuePool,
        GuardedAsyncAdaptedQueuePool,
        GuardedNullPool,
        GuardedStaticPool,
        GuardedSingletonThreadPool,
    )
}
_GUARDED_LOCK = threading.Lock()


def guarded_class(pool_class: type[Pool]) -> type[GuardedPoolMixin]:
    """Return the guarded subclass of ``pool_class`` (made once for custom pools)."""
    if issubclass(pool_class, GuardedPoolMixin):
        return pool_class
    with _GUARDED_LOCK:
        cls = _GUARDED.get(pool_class)
        if cls is None:
            attrs: dict[str, Any] = {
                "_poolguard_plain": pool_class,
                "__module__": __name__,
                "__doc__": f"{pool_class.__qualname__} behind a poolguard gate.",
            }
            cls = cast(
                "type[GuardedPoolMixin]",
                type(f"Guarded{pool_class.__name__}", (GuardedPoolMixin, pool_class), attrs),
            )
            _GUARDED[pool_class] = cls
        return cls
