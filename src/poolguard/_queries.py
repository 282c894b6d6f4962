"""Per-statement timing: the dialect's execute calls, timed.

poolguard wraps ``do_execute``, ``do_executemany`` and
``do_execute_no_params`` on the engine's dialect object (instance attributes,
so only this engine is affected and unwrap() restores them). Every statement
SQLAlchemy sends goes through one of them, and the time measured is the
driver's execute call: what the database took, plus the network.

Not engine events: a listener on an Engine makes SQLAlchemy build a joined
event dispatcher for every Connection, which costs more per checkout than
the whole guard.

Per statement: a clock read on each side, a cached fingerprint lookup and a
few additions. A log event is built only for a slow statement, or when
``query_log_sample_rate`` is set (it is 0 by default), DEBUG is on for
poolguard and the sample says so. Parameter values never go into
an event unless ``log_parameters`` is set, and errors are reported by type,
never by message (database messages quote values).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import threading
import time
from bisect import bisect_left
from contextvars import ContextVar
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import event

from ._compat import connection_record
from ._context import _current
from ._fingerprint import fingerprint
from ._histogram import BOUNDS
from ._hold import REQUEST, RUNNING_SINCE, STATEMENT, TOP_STAT, TOP_TIME, WAIT, WIRE
from ._pooler import BEHIND
from ._recorder import TIMED_OUT
from ._sites import current_site
from ._timeouts import (
    KILL_GRACE,
    PG_RESET,
    interrupter,
    is_timeout_error,
    kill_socket,
    limit_ms,
    limited_statement,
    no_transaction_block,
    watchdog,
)
from .errors import DeadlineExceeded, PoolTimeout, StatementTimeout

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine, ExceptionContext
    from sqlalchemy.engine.interfaces import DBAPICursor

    from ._config import Config
    from ._context import RequestContext
    from ._culprit import Culprits
    from ._fingerprint import Fingerprint
    from ._gate import Gate
    from ._hold import Hold
    from ._log import EventLog
    from ._pooler import PoolerErrors
    from ._recorder import QueryTotals, Recorder

__all__ = ["QueryTimer", "count_ping"]

_STATEMENTS_MAX = 4096
#: Keys in an ExecutionContext's __dict__: the time limit applied, and "the
#: watchdog cut the connection at the deadline".
LIMIT = "_poolguard_limit"
CUT = "_poolguard_cut"
#: Set on a driver error that is a pooler's saturation: its PoolerSaturated.
POOLER = "_poolguard_pooler"
#: Set on a driver error of a round trip cut by the request's deadline while
#: it waited in a pooler's queue for a server connection.
ON_WIRE = "_poolguard_on_wire"

#: Dialect methods that run statements, and where their context argument is.
_METHODS = {"do_execute": 1, "do_executemany": 1, "do_execute_no_params": 0}
#: In place of the parameters of a do_execute_no_params call.
_NO_PARAMS: Any = object()
#: Dialect methods that end a transaction, bounded by a request's deadline.
_ENDS = {"do_commit": "COMMIT", "do_rollback": "ROLLBACK"}
#: The holders report's words for the guard's SET LOCAL in flight behind a pooler.
WIRE_SET = f"SET LOCAL statement_timeout ({BEHIND})"
PING_BEHIND = f"pre-ping ({BEHIND})"
#: Behind a pooler, a SET LOCAL that took longer than this (seconds) waited
#: in its queue: the limit is set again with what is left of it.
RESET_AFTER = 0.01

#: Seconds the current checkout waited at the gate, for its pre-ping's share
#: of the acquire timeout (set by Guard.acquire_slow only with pre-ping on).
_gate_wait: ContextVar[float] = ContextVar("poolguard_gate_wait", default=0.0)
#: (DBAPI connection, seconds) of the last pre-ping in this context.
_pinged: ContextVar[tuple[Any, float] | None] = ContextVar("poolguard_pinged", default=None)


class StatementGuard(Protocol):
    """What the statement timer needs of its guard (:class:`poolguard.Guard` is one)."""

    name: str
    config: Config
    gate: Gate
    recorder: Recorder
    log: EventLog
    pooler: PoolerErrors
    limits_on: bool
    breakers_on: bool
    slow_query_threshold: float | None
    culprits: Culprits

    @property
    def db_system(self) -> str: ...

    def acquire_timeout(self) -> float | None: ...

    def note_wait(self, waited: float) -> None: ...

    def breaker_record(
        self, error: BaseException | None, duration: float,
        request: RequestContext | None = None,
    ) -> None: ...


def query_fields(
    config: Config, fp: Fingerprint, duration: float, rows: int, hold: Hold | None,
    parameters: Any,
) -> dict[str, Any]:
    """The fields of a query event (never parameter values unless opted in)."""
    request = hold[REQUEST] if hold is not None else _current.get()
    fields: dict[str, Any] = {
        "fingerprint": fp.id,
        "statement": fp.text,
        "summary": fp.summary,
        "duration_ms": round(duration * 1000, 3),
        "rows": rows if rows >= 0 else None,
        "wait_ms": round(hold[WAIT] * 1000, 3) if hold is not None else None,
        "tag": request.tag if request is not None else None,
    }
    if config.log_parameters:
        fields["parameters"] = repr(parameters)[:1000]
    return fields


def _dbapi_connection(cursor: Any) -> Any:
    """The DBAPI connection of a cursor (SQLAlchemy's asyncio adapters included)."""
    connection = getattr(cursor, "connection", None)
    if connection is None:
        connection = getattr(cursor, "_adapt_connection", None)
    return connection


def _statement_limit(request: RequestContext | None, config: Config) -> float | None:
    """The statement's own limit: the call's, else the tag's, else the guard's.

    0 means no limit (what PostgreSQL and MariaDB mean by 0), and wins over
    a limit further down the list.
    """
    seconds = None
    if request is not None:
        seconds = request.statement_timeout
        if seconds is None and request.tag is not None and config.tag_statement_timeouts:
            seconds = config.tag_statement_timeouts.get(request.tag)
    if seconds is None:
        seconds = config.statement_timeout
    return seconds or None


def count_ping(guard: StatementGuard, conn: Any, wait: float) -> float:
    """A checkout with ``pool_pre_ping`` succeeded: its wait includes the ping.

    Called by the guarded pool's ``connect()`` (only with pre-ping on);
    records the checkout's wait once, and returns it.
    """
    pinged = _pinged.get()
    if pinged is not None:
        _pinged.set(None)
        if pinged[0] is conn.dbapi_connection:  # not a fresh connection's stale entry
            wait += pinged[1]
    if _gate_wait.get():
        _gate_wait.set(0.0)
    guard.recorder.add_wait(wait)
    guard.note_wait(wait)
    return wait


class QueryTimer:
    """Times the statements of one dialect for one guard; :meth:`remove` undoes it."""

    def __init__(self, guard: StatementGuard, engine: Engine) -> None:
        dialect = engine.dialect
        self.guard = guard
        self.dialect = dialect
        # Statement string -> its stats row. SQLAlchemy passes the same string
        # object for every run of a compiled statement, so this is one lookup
        # of a string whose hash is cached.
        self._stats: dict[str, QueryTotals] = {}
        attrs = dialect.__dict__
        for name, context_at in _METHODS.items():
            if name in attrs:  # another wrapper (or a test double) is there: leave it
                continue
            setattr(dialect, name, self._wrap(getattr(dialect, name), context_at))
        if "do_ping" not in attrs:
            setattr(dialect, "do_ping", self._wrap_ping(dialect.do_ping))  # noqa: B010
        self.engine = engine
        self._converting = False
        self._explained: set[str] = set()
        self._convert_lock = threading.Lock()

    def _listen_errors(self) -> None:
        # The handle_error listener alone: the first time an error needs it.
        with self._convert_lock:
            if not event.contains(self.engine, "handle_error", self._convert_error):
                event.listen(self.engine, "handle_error", self._convert_error)

    def _convert_errors(self) -> None:
        # Registered the first time a limit or deadline applies: a dialect
        # event costs a little on every statement, and the COMMIT/ROLLBACK
        # wrappers a little on every checkin, so engines that never use
        # limits never pay for them.
        self._listen_errors()
        with self._convert_lock:
            if not self._converting:
                dialect = self.dialect
                attrs = dialect.__dict__
                for name, what in _ENDS.items():
                    if name not in attrs:
                        setattr(dialect, name, self._wrap_end(getattr(dialect, name), what))
                self._converting = True

    def remove(self) -> None:
        """Restore the dialect's own methods."""
        if event.contains(self.engine, "handle_error", self._convert_error):
            event.remove(self.engine, "handle_error", self._convert_error)
        attrs = self.dialect.__dict__
        for name in (*_METHODS, *_ENDS, "do_ping"):
            fn = attrs.get(name)
            if fn is not None and getattr(fn, "_poolguard_timer", None) is self:
                del attrs[name]

    def _stat(self, statement: str) -> QueryTotals:
        stats = self._stats
        if len(stats) >= _STATEMENTS_MAX:
            stats.clear()  # statements with inlined literals: start over, stay bounded
        guard = self.guard
        stat = stats[statement] = guard.recorder.query(
            fingerprint(statement, guard.db_system), guard.config.top_queries
        )
        return stat

    def _wrap(  # noqa: PLR0915 - the per-statement path is inlined on purpose
        self, inner: Callable[..., Any], context_at: int
    ) -> Callable[..., Any]:
        # context_at: where the ExecutionContext sits in the arguments after
        # (cursor, statement); parameters, if any, come first.
        guard = self.guard
        out = guard.gate.out
        recorder = guard.recorder
        stats = self._stats
        new_stat, failed, log = self._stat, self._failed, self._log

        limit, finish, limit_failed = self._limit, self._finish, self._limit_failed
        culprits = guard.culprits

        # Fixed arity, not *args: no argument tuple built and unpacked per
        # statement. do_execute_no_params (no parameters) comes through a
        # thin wrapper below.
        def timed(  # noqa: PLR0912, PLR0915
            cursor: DBAPICursor, statement: str, parameters: Any, context: Any = None
        ) -> Any:
            try:
                dbapi_connection = context.root_connection._dbapi_connection  # sqla-private
                hold = out.get(dbapi_connection._connection_record)  # sqla-private
            except AttributeError:  # no context, or not pooled
                hold = None  # the context still goes to the dialect as it came
            send, armed = statement, None
            if culprits.shapes is not None:  # some shape is isolated: is it this one?
                culprits.check_statement((stats.get(statement) or new_stat(statement)).fp.id,
                                         hold[REQUEST] if hold is not None else _current.get())
            start = begun = perf_counter()
            if hold is not None:
                # Set before the time limit is applied: the SET LOCAL is a
                # round trip of this statement (behind PgBouncer, the queue
                # wait happens there), and the holder shows it running.
                hold[STATEMENT] = statement
                hold[RUNNING_SINCE] = start
                request = hold[REQUEST]
                if guard.limits_on or (request is not None and (
                    request.deadline is not None or request.statement_timeout is not None
                )):
                    # A time limit or a deadline applies: the slower path.
                    try:
                        send, armed = limit(cursor, statement, hold, context)
                    except BaseException as exc:
                        limit_failed(statement, start, hold, exc)
                        raise
                    # Behind a pooler, from when it had a server connection:
                    # the wait in the pooler's queue is not the statement's
                    # slowness (the breakers' slow calls).
                    begun = hold[RUNNING_SINCE]
            try:
                result = (inner(cursor, send, parameters, context) if parameters is not _NO_PARAMS
                          else inner(cursor, send, context))
            except BaseException as exc:
                failed(statement, perf_counter() - start, hold, exc)
                raise
            finally:
                if armed:
                    finish(cursor, armed)
            duration = perf_counter() - start
            # All of what follows runs per statement: kept inline, no calls
            # (the histogram add as at checkin in _pool.py).
            stat = stats.get(statement) or new_stat(statement)
            hist = stat.hist
            hist.counts[bisect_left(BOUNDS, duration)] += 1
            hist.sum += duration
            if duration > hist.max:
                hist.max = duration
            rows = cursor.rowcount
            if rows > 0:
                stat.rows += rows
            ops = recorder.export_ops
            if ops is not None:
                ops.append((duration, stat.fp, None))
            if hold is not None:
                hold[RUNNING_SINCE] = 0.0
                if duration > hold[TOP_TIME]:
                    hold[TOP_TIME] = duration
                    hold[TOP_STAT] = stat
            if guard.breakers_on:
                guard.breaker_record(
                    None, start + duration - begun,
                    hold[REQUEST] if hold is not None else _current.get(),
                )
            slow = guard.slow_query_threshold
            if (slow is not None and duration >= slow) or (
                guard.log.debug and guard.config.query_log_sample_rate
            ):
                log(cursor, statement, None if parameters is _NO_PARAMS else parameters,
                    duration, rows, stat, hold)
            return result

        if context_at == 0:
            def timed_no_params(cursor: DBAPICursor, statement: str, context: Any = None) -> Any:
                return timed(cursor, statement, _NO_PARAMS, context)

            timed_no_params._poolguard_timer = self  # type: ignore[attr-defined]
            return timed_no_params
        timed._poolguard_timer = self  # type: ignore[attr-defined]
        return timed

    def _wrap_ping(self, inner: Callable[[Any], bool]) -> Callable[[Any], bool]:
        # pool_pre_ping pings inside the checkout, outside any statement. The
        # ping is part of the checkout: bounded by what is left of the acquire
        # timeout (and of the request's deadline) with the client-side
        # watchdog, or a server that accepts and never answers would hold the
        # caller forever; and its time is counted in the checkout's wait.
        guard = self.guard

        def ping(dbapi_connection: Any) -> bool:
            start = perf_counter()
            waited = _gate_wait.get()
            if waited:
                _gate_wait.set(0.0)
            acquire = guard.acquire_timeout()
            budget = math.inf if acquire is None else acquire - waited
            by_deadline = False
            request = _current.get()
            if request is not None and request.deadline is not None:
                left = request.deadline - time.monotonic()
                if left <= budget:
                    budget, by_deadline = left, True
            budget = max(budget, 0.0)
            cut: list[bool] = []

            def cut_it() -> None:
                cut.append(True)
                kill_socket(dbapi_connection)

            # The grace lets the deadline's error win the race with a ping
            # that is about to answer, as for statements.
            entry = watchdog.schedule(start + budget + (KILL_GRACE if by_deadline else 0.0),
                                      cut_it)
            pinging = guard.gate.pinging  # the holders report shows it meanwhile
            pinging[dbapi_connection] = (start, PING_BEHIND if guard.pooler.behind else "pre-ping")
            try:
                return inner(dbapi_connection)
            except Exception:
                if cut:  # the pool discards the connection: the checkout fails
                    # The wait and the ping both were the checkout's wait.
                    spent = waited + perf_counter() - start
                    guard.recorder.add_wait(spent, TIMED_OUT)
                    guard.note_wait(spent)
                    hint = f" ({BEHIND})" if guard.pooler.behind is not None else ""
                    if by_deadline:
                        raise DeadlineExceeded(
                            f"pool {guard.name!r}: the database did not answer the pre-ping "
                            f"by the request's deadline{hint}; the connection was cut and is "
                            "discarded"
                        ) from None
                    raise self._ping_timeout(waited, budget, hint) from None
                raise
            finally:
                watchdog.cancel(entry)
                pinging.pop(dbapi_connection, None)
                _pinged.set((dbapi_connection, perf_counter() - start))

        ping._poolguard_timer = self  # type: ignore[attr-defined]
        return ping

    def _ping_timeout(self, waited: float, budget: float, hint: str) -> PoolTimeout:
        guard = self.guard
        gate = guard.gate
        timeout = waited + budget
        return PoolTimeout(
            f"pool {guard.name!r}: no connection within {timeout:.3f}s: the database did not "
            f"answer the pre-ping{hint} (after {waited:.3f}s waiting for a connection); the "
            "connection was cut and is discarded",
            pool_name=guard.name, timeout=timeout, in_use=gate.in_use,
            capacity=gate.capacity, waiting=gate.waiting,
        )

    def _wrap_end(self, inner: Callable[[Any], None], what: str) -> Callable[[Any], None]:
        # COMMIT and ROLLBACK (including the pool's rollback when a connection
        # is returned) are round trips too: a request's deadline bounds them
        # with the client-side watchdog. Installed the first time a deadline
        # or a limit applies, so engines that never use one pay nothing.
        guard = self.guard
        out = guard.gate.out

        def end(dbapi_connection: Any) -> None:
            record = connection_record(dbapi_connection)
            hold = out.get(record) if record is not None else None
            request = hold[REQUEST] if hold is not None else _current.get()
            if request is None or request.deadline is None:
                inner(dbapi_connection)
                return
            # Never refuse to finish a transaction: past the deadline it still
            # gets the floor (and the grace) before the connection is cut.
            left = max(request.deadline - time.monotonic(), guard.config.deadline_floor)
            cut: list[bool] = []

            def cut_it() -> None:
                if hold is not None and out.get(record) is not hold:
                    return  # that checkout is over: not ours to cut any more
                cut.append(True)
                kill_socket(dbapi_connection)

            entry = watchdog.schedule(perf_counter() + left + KILL_GRACE, cut_it)
            try:
                inner(dbapi_connection)
            except Exception as error:
                if cut:
                    # handle_error turns it into DeadlineExceeded (Connection
                    # path); the pool's reset logs it and discards the connection.
                    with contextlib.suppress(Exception):
                        setattr(error, CUT, what)
                raise
            finally:
                watchdog.cancel(entry)

        end._poolguard_timer = self  # type: ignore[attr-defined]
        return end

    def _limit(
        self, cursor: DBAPICursor, statement: str, hold: Hold, context: Any
    ) -> tuple[str, list[Any]]:
        """Apply the statement's time limit and the request's deadline.

        Returns the statement to send (MariaDB carries the limit in it) and
        what :meth:`_finish` undoes once it returns: watchdog entries armed
        for it, and a session setting to reset. Raises DeadlineExceeded when
        the deadline has already passed.
        """
        guard = self.guard
        if not self._converting:
            self._convert_errors()
        request = hold[REQUEST]
        config = guard.config
        seconds = _statement_limit(request, config)
        deadline = request.deadline if request is not None else None
        armed: list[Any] = []
        dbapi_connection = _dbapi_connection(cursor)
        by_deadline = False
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(
                    f"pool {guard.name!r}: the request's deadline passed "
                    f"{-left:.3f}s ago; not sending the statement"
                )
            left = max(left, config.deadline_floor)
            by_deadline = seconds is None or left <= seconds
            seconds = left if by_deadline else seconds
            if dbapi_connection is not None:
                connection = context.root_connection._dbapi_connection  # sqla-private
                record = connection._connection_record  # sqla-private
                armed.append(watchdog.schedule(
                    perf_counter() + left + KILL_GRACE,
                    functools.partial(self._cut, dbapi_connection, context, record, hold),
                ))
        if seconds is None:
            return statement, armed
        if context is not None:
            context.__dict__[LIMIT] = seconds
        db_system = guard.db_system
        try:
            interrupt = interrupter(dbapi_connection) if db_system == "sqlite" else None
            if interrupt is not None:
                # In whole milliseconds, at least one, as on the servers.
                armed.append(watchdog.schedule(perf_counter() + limit_ms(seconds) / 1000,
                                               interrupt))
            # Under autocommit there is no transaction for SET LOCAL to end
            # with (PostgreSQL ignores it, with a warning): set it for the
            # session and reset it after the statement.
            autocommit = db_system == "postgresql" and bool(
                getattr(dbapi_connection, "autocommit", False)
            )
            if db_system == "postgresql" and guard.pooler.behind is not None:
                if autocommit and no_transaction_block(statement):
                    # VACUUM and the like refuse a transaction block, and a
                    # session SET would stay on the pooler's server
                    # connection: no server-side limit (a deadline's
                    # watchdog still applies).
                    return statement, armed
                self._set_through_pooler(cursor, statement, seconds, hold, armed,
                                         autocommit=autocommit, by_deadline=by_deadline)
                return statement, armed
            send = limited_statement(db_system, statement, seconds, cursor, autocommit=autocommit)
            if autocommit:
                armed.append(PG_RESET)
        except BaseException:
            # Every exit path disarms: a watchdog left behind would cut the
            # connection under whoever uses it next.
            self._finish(cursor, armed)
            raise
        return send, armed

    def _limit_failed(
        self, statement: str, start: float, hold: Hold, exc: BaseException
    ) -> None:
        # The SET LOCAL is the statement's round trip: its failure (a
        # pooler's saturation too) is the statement's. A deadline that passed
        # before anything was sent is not.
        hold[RUNNING_SINCE] = 0.0
        if not isinstance(exc, DeadlineExceeded):
            self._failed(statement, perf_counter() - start, hold, exc)

    def _set_through_pooler(
        self, cursor: DBAPICursor, statement: str, seconds: float, hold: Hold,
        armed: list[Any], *, autocommit: bool, by_deadline: bool,
    ) -> None:
        """``SET LOCAL statement_timeout`` behind a connection pooler.

        Through transaction pooling the first round trip of a transaction
        (this SET LOCAL, or the BEGIN before it) is where the client waits
        in the pooler's queue for a server connection, which no server-side
        limit sees. So: the holders report says so while it is in flight; it
        is bounded by the limit itself (the client-side watchdog cuts it,
        and the statement fails with :class:`poolguard.PoolerSaturated`; a
        deadline's own watchdog covers a limit set by the deadline); and a
        wait longer than :data:`RESET_AFTER` is taken off the limit, set
        again. A session-level SET would reach whichever server connection
        the pooler picks and stay there for other clients: under autocommit
        the statement gets a transaction of its own (BEGIN ... COMMIT; a
        COMMIT of a failed one rolls it back).
        """
        guard = self.guard
        dbapi_connection = _dbapi_connection(cursor)
        start = perf_counter()
        cut: list[bool] = []

        def cut_it() -> None:
            cut.append(True)
            kill_socket(dbapi_connection)

        entry = None if by_deadline else watchdog.schedule(start + seconds + KILL_GRACE, cut_it)
        hold[WIRE] = WIRE_SET
        try:
            if autocommit:
                cursor.execute("BEGIN")
                armed.append("COMMIT")
            cursor.execute(f"SET LOCAL statement_timeout = {limit_ms(seconds)}")
            waited = perf_counter() - start
            if waited > RESET_AFTER:
                rest = limit_ms(max(seconds - waited, 0.0))
                cursor.execute(f"SET LOCAL statement_timeout = {rest}")
            # It has a server connection now: from here the statement runs
            # (the wait in the pooler's queue was shown on the wire, and is
            # not the statement's running time: culprit isolation reads it).
            hold[RUNNING_SINCE] = perf_counter()
        except Exception as error:
            request = hold[REQUEST]
            if not cut and request is not None and request.deadline is not None and (
                    time.monotonic() >= request.deadline):
                # The deadline's watchdog cut it in the pooler's queue: no
                # outcome of the database's, nor of the statement's.
                with contextlib.suppress(Exception):
                    setattr(error, ON_WIRE, True)
            if cut:
                saturated = guard.pooler.queue_timeout(
                    error, perf_counter() - start, seconds,
                    fingerprint(statement, guard.db_system).text)
                with contextlib.suppress(Exception):
                    setattr(error, POOLER, saturated)
            raise
        finally:
            if entry is not None:
                watchdog.cancel(entry)
            hold[WIRE] = None

    @staticmethod
    def _finish(cursor: DBAPICursor, armed: list[Any]) -> None:
        """After a limited statement: reset session settings, then disarm."""
        try:
            for item in armed:
                if isinstance(item, str):
                    # On a cursor of its own (the statement's results stay
                    # readable), still under the watchdog: a server that
                    # stops answering here is cut like the statement would
                    # have been. A failed reset means a broken connection,
                    # which its next use (or the pool's reset) finds out.
                    with contextlib.suppress(Exception):
                        reset = _dbapi_connection(cursor).cursor()
                        try:
                            reset.execute(item)
                        finally:
                            reset.close()
        finally:
            for item in armed:
                if not isinstance(item, str):
                    watchdog.cancel(item)

    def _cut(self, dbapi_connection: Any, context: Any, record: Any, hold: Hold) -> None:
        # Runs on the watchdog thread: the server did not answer by the
        # deadline. Cancelling the entry is what stops a late cut; checking
        # that the checkout is still the one it was armed for (defence in
        # depth) keeps a stray entry from cutting another request's query.
        if self.guard.gate.out.get(record) is not hold:
            return
        if context is not None:
            context.__dict__[CUT] = True
        kill_socket(dbapi_connection)

    def _convert_error(self, ctx: ExceptionContext) -> BaseException | None:
        """handle_error: a statement that hit its limit or the deadline, or
        a pooler's saturation."""
        saturated = getattr(ctx.original_exception, POOLER, None)
        if saturated is not None:
            saturated.connection_invalidated = ctx.is_disconnect
            return saturated  # type: ignore[no-any-return]
        cut_in = getattr(ctx.original_exception, CUT, None)
        if cut_in is not None:  # a COMMIT or ROLLBACK cut at the deadline
            ctx.is_disconnect = True
            return DeadlineExceeded(
                f"pool {self.guard.name!r}: the database did not answer the {cut_in} by the "
                "request's deadline; the connection was cut and is discarded"
            )
        context = ctx.execution_context
        if context is None:
            return None
        marks = context.__dict__
        if marks.get(CUT):
            return DeadlineExceeded(
                f"pool {self.guard.name!r}: the database did not answer by the request's "
                "deadline; the connection was cut and is discarded"
            )
        limit = marks.get(LIMIT)
        if limit is not None and is_timeout_error(self.guard.db_system, ctx.original_exception):
            fp = fingerprint(ctx.statement, self.guard.db_system) if ctx.statement else None
            return StatementTimeout(fp.text if fp else None, ctx.original_exception, limit)
        return None

    def _log(
        self,
        cursor: DBAPICursor,
        statement: str,
        parameters: Any,
        duration: float,
        rows: int,
        stat: QueryTotals,
        hold: Hold | None,
    ) -> None:
        guard = self.guard
        config = guard.config
        slow = config.slow_query_threshold
        if slow is not None and duration >= slow:
            self._on_slow_query(stat.fp, duration, rows, hold, statement, parameters, cursor)
            return
        rate = config.query_log_sample_rate
        if rate >= 1.0 or (rate > 0.0 and random.random() < rate):
            guard.log.emit(
                logging.DEBUG,
                "query",
                **query_fields(config, stat.fp, duration, rows, hold, parameters),
            )

    def _on_slow_query(
        self,
        fp: Fingerprint,
        duration: float,
        rows: int,
        hold: Hold | None,
        statement: str,
        parameters: Any,
        cursor: Any,
    ) -> None:
        """Log ``query.slow`` with where it came from; EXPLAIN it once if asked."""
        guard = self.guard
        config = guard.config
        fields = query_fields(config, fp, duration, rows, hold, parameters)
        fields["threshold_ms"] = round((config.slow_query_threshold or 0) * 1000, 3)
        fields["site"] = current_site(3)
        guard.log.emit(logging.WARNING, "query.slow", **fields)
        if config.explain_slow_queries and fp.id not in self._explained:
            self._explained.add(fp.id)
            from ._explain import explain

            explain(guard.log, guard.db_system, cursor, fp, statement, parameters)

    def _failed(
        self, statement: str, duration: float, hold: Hold | None, exc: BaseException
    ) -> None:
        guard = self.guard
        stat = self._stats.get(statement) or self._stat(statement)
        # A pooler's saturation, recognised here, on the error path only:
        # handle_error (registered now if need be: it runs after this) raises
        # it in place of the driver's error, and the breaker does not count it.
        saturated = getattr(exc, POOLER, None)  # the guard cut it in the pooler's queue
        if saturated is None and isinstance(exc, Exception):
            saturated = guard.pooler.saturated(exc, duration, stat.fp.text)
        if saturated is not None:
            with contextlib.suppress(Exception):
                setattr(exc, POOLER, saturated)
                self._listen_errors()
        stat.errors += 1
        stat.hist.add(duration)
        error_type = type(exc).__qualname__
        ops = guard.recorder.export_ops
        if ops is not None:
            ops.append((duration, stat.fp, error_type))
        if hold is not None:
            hold[RUNNING_SINCE] = 0.0
        if guard.breakers_on and not getattr(exc, ON_WIRE, False):
            # (Cut by the deadline in a pooler's queue: saturation, no outcome.)
            request = hold[REQUEST] if hold is not None else _current.get()
            # A classifier sees the error the caller will see: cut by the
            # request's deadline, a DeadlineExceeded (a timeout, whatever the
            # driver said of its cut socket).
            seen: BaseException = saturated or exc
            if saturated is None and request is not None and request.deadline is not None and (
                    time.monotonic() >= request.deadline):
                seen = DeadlineExceeded(
                    f"pool {guard.name!r}: the database did not answer by the request's deadline")
                if hold is not None and hold[WAIT] >= duration:
                    # Its deadline went mostly on waiting for a connection
                    # others held: the statement, cut sooner than it waited,
                    # was not shown slow. No outcome for its tag's breaker
                    # (as for an acquire timeout); the guard-wide one decides.
                    request = None
            guard.breaker_record(seen, duration, request)
        timed_out = is_timeout_error(guard.db_system, exc)
        slow = guard.slow_query_threshold
        if slow is not None and duration >= slow:
            # A slow statement that failed (often: cancelled at its time
            # limit) is still the slow statement on-call is looking for.
            fields = query_fields(guard.config, stat.fp, duration, -1, hold, None)
            guard.log.emit(
                logging.WARNING,
                "query.slow",
                **fields,
                error_type=error_type,
                timed_out=timed_out,
                threshold_ms=round(slow * 1000, 3),
                site=current_site(3),
            )
            return
        guard.log.emit(
            logging.INFO,
            "query.error",
            fingerprint=stat.fp.id,
            statement=stat.fp.text,
            error_type=error_type,
            timed_out=timed_out,
            duration_ms=round(duration * 1000, 3),
            site=current_site(3),
        )
