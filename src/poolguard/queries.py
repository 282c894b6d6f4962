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

import functools
import logging
import random
import threading
import time
from bisect import bisect_left
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from .context import _current
from .errors import DeadlineExceeded, StatementTimeout
from .fingerprint import fingerprint
from .histogram import BOUNDS
from .recorder import REQUEST, RUNNING_SINCE, STATEMENT, TOP_STAT, TOP_TIME
from .sites import current_site
from .timeouts import KILL_GRACE, is_timeout_error, kill_socket, limited_statement, watchdog

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine, ExceptionContext
    from sqlalchemy.engine.interfaces import DBAPICursor

    from .guard import Guard
    from .recorder import Hold, QueryStat

__all__ = ["QueryTimer"]

_STATEMENTS_MAX = 4096
#: Keys in an ExecutionContext's __dict__: the time limit applied, and "the
#: watchdog cut the connection at the deadline".
LIMIT = "_poolguard_limit"
CUT = "_poolguard_cut"

#: Dialect methods that run statements, and where their context argument is.
_METHODS = {"do_execute": 1, "do_executemany": 1, "do_execute_no_params": 0}


class QueryTimer:
    """Times the statements of one dialect for one guard; :meth:`remove` undoes it."""

    def __init__(self, guard: Guard, engine: Engine) -> None:
        dialect = engine.dialect
        self.guard = guard
        self.dialect = dialect
        # Statement string -> its stats row. SQLAlchemy passes the same string
        # object for every run of a compiled statement, so this is one lookup
        # of a string whose hash is cached.
        self._stats: dict[str, QueryStat] = {}
        attrs = dialect.__dict__
        for name, context_at in _METHODS.items():
            if name in attrs:  # another wrapper (or a test double) is there: leave it
                continue
            setattr(dialect, name, self._wrap(getattr(dialect, name), context_at))
        if "do_ping" not in attrs:
            setattr(dialect, "do_ping", self._wrap_ping(dialect.do_ping))  # noqa: B010
        self.engine = engine
        self._converting = False
        self._convert_lock = threading.Lock()

    def _convert_errors(self) -> None:
        # Registered the first time a limit or deadline applies: a dialect
        # event costs a little on every statement, so engines that never use
        # limits never pay it.
        with self._convert_lock:
            if not self._converting:
                event.listen(self.engine, "handle_error", self._convert_error)
                self._converting = True

    def remove(self) -> None:
        """Restore the dialect's own methods."""
        if event.contains(self.engine, "handle_error", self._convert_error):
            event.remove(self.engine, "handle_error", self._convert_error)
        attrs = self.dialect.__dict__
        for name in (*_METHODS, "do_ping"):
            fn = attrs.get(name)
            if fn is not None and getattr(fn, "_poolguard_timer", None) is self:
                del attrs[name]

    def _stat(self, statement: str) -> QueryStat:
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

        limit = self._limit

        def timed(cursor: DBAPICursor, statement: str, *args: Any) -> Any:  # noqa: PLR0912
            try:
                context = args[context_at]
                hold = out.get(context.root_connection._dbapi_connection._connection_record)
            except (IndexError, AttributeError):  # no context, or not pooled
                context = hold = None
            send, armed = statement, None
            if hold is not None:
                request = hold[REQUEST]
                if guard.limits_on or (request is not None and (
                    request.deadline is not None or request.statement_timeout is not None
                )):
                    # A time limit or a deadline applies: the slower path.
                    send, armed = limit(cursor, statement, hold, context)
            start = perf_counter()
            if hold is not None:
                hold[STATEMENT] = statement
                hold[RUNNING_SINCE] = start
            try:
                result = inner(cursor, send, *args)
            except BaseException as exc:
                failed(statement, perf_counter() - start, hold, exc)
                raise
            finally:
                if armed:
                    for entry in armed:
                        watchdog.cancel(entry)
            duration = perf_counter() - start
            # All of what follows runs per statement: kept inline, no calls.
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
                    None, duration, hold[REQUEST] if hold is not None else _current.get()
                )
            slow = guard.slow_query_threshold
            if (slow is not None and duration >= slow) or (
                guard.log.debug and guard.config.query_log_sample_rate
            ):
                log(cursor, statement, args, duration, rows, stat, hold)
            return result

        timed._poolguard_timer = self  # type: ignore[attr-defined]
        return timed

    def _wrap_ping(self, inner: Callable[[Any], bool]) -> Callable[[Any], bool]:
        # pool_pre_ping pings inside the checkout, outside any statement: a
        # request's deadline bounds it with the same client-side watchdog, or
        # a server that accepts and never answers would hold the caller forever.
        guard = self.guard

        def ping(dbapi_connection: Any) -> bool:
            request = _current.get()
            if request is None or request.deadline is None:
                return inner(dbapi_connection)
            left = request.deadline - time.monotonic()
            cut: list[bool] = []

            def cut_it() -> None:
                cut.append(True)
                kill_socket(dbapi_connection)

            entry = watchdog.schedule(perf_counter() + max(left, 0.0) + KILL_GRACE, cut_it)
            try:
                return inner(dbapi_connection)
            except Exception:
                if cut:  # the pool discards the connection: the checkout fails
                    raise DeadlineExceeded(
                        f"pool {guard.name!r}: the database did not answer the pre-ping by "
                        "the request's deadline; the connection was cut and is discarded"
                    ) from None
                raise
            finally:
                watchdog.cancel(entry)

        ping._poolguard_timer = self  # type: ignore[attr-defined]
        return ping

    def _limit(
        self, cursor: DBAPICursor, statement: str, hold: Hold, context: Any
    ) -> tuple[str, list[list[Any]]]:
        """Apply the statement's time limit and the request's deadline.

        Returns the statement to send (MariaDB carries the limit in it) and
        the watchdog entries armed for it (cancelled once it returns).
        Raises DeadlineExceeded when the deadline has already passed.
        """
        guard = self.guard
        if not self._converting:
            self._convert_errors()
        request = hold[REQUEST]
        config = guard.config
        seconds = None
        deadline = None
        if request is not None:
            seconds = request.statement_timeout
            if seconds is None and request.tag is not None and config.tag_statement_timeouts:
                seconds = config.tag_statement_timeouts.get(request.tag)
            deadline = request.deadline
        if seconds is None:
            seconds = config.statement_timeout
        armed: list[list[Any]] = []
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(
                    f"pool {guard.name!r}: the request's deadline passed "
                    f"{-left:.3f}s ago; not sending the statement"
                )
            left = max(left, config.deadline_floor)
            seconds = left if seconds is None else min(seconds, left)
            dbapi_connection = cursor.connection if hasattr(cursor, "connection") else None
            if dbapi_connection is not None:
                armed.append(watchdog.schedule(
                    perf_counter() + left + KILL_GRACE,
                    functools.partial(self._cut, dbapi_connection, context),
                ))
        if seconds is None:
            return statement, armed
        if context is not None:
            context.__dict__[LIMIT] = seconds
        system = guard.db_system
        if system == "sqlite" and hasattr(cursor, "connection"):
            armed.append(watchdog.schedule(perf_counter() + seconds, cursor.connection.interrupt))
        return limited_statement(system, statement, seconds, cursor), armed

    @staticmethod
    def _cut(dbapi_connection: Any, context: Any) -> None:
        # Runs on the watchdog thread: the server did not answer by the
        # deadline. Mark the context, so handle_error raises DeadlineExceeded.
        if context is not None:
            context.__dict__[CUT] = True
        kill_socket(dbapi_connection)

    def _convert_error(self, ctx: ExceptionContext) -> BaseException | None:
        """handle_error: a statement that hit its limit or the deadline."""
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
        args: tuple[Any, ...],
        duration: float,
        rows: int,
        stat: QueryStat,
        hold: Hold | None,
    ) -> None:
        guard = self.guard
        config = guard.config
        parameters = args[0] if len(args) > 1 else None
        slow = config.slow_query_threshold
        if slow is not None and duration >= slow:
            guard.on_slow_query(stat.fp, duration, rows, hold, statement, parameters, cursor)
            return
        rate = config.query_log_sample_rate
        if rate >= 1.0 or (rate > 0.0 and random.random() < rate):
            guard.log.emit(
                logging.DEBUG,
                "query",
                **guard.query_fields(stat.fp, duration, rows, hold, parameters),
            )

    def _failed(
        self, statement: str, duration: float, hold: Hold | None, exc: BaseException
    ) -> None:
        guard = self.guard
        stat = self._stats.get(statement) or self._stat(statement)
        stat.errors += 1
        stat.hist.add(duration)
        error_type = type(exc).__qualname__
        ops = guard.recorder.export_ops
        if ops is not None:
            ops.append((duration, stat.fp, error_type))
        if hold is not None:
            hold[RUNNING_SINCE] = 0.0
        if guard.breakers_on:
            request = hold[REQUEST] if hold is not None else _current.get()
            guard.breaker_record(exc, duration, request)
        timed_out = is_timeout_error(guard.db_system, exc)
        slow = guard.slow_query_threshold
        if slow is not None and duration >= slow:
            # A slow statement that failed (often: cancelled at its time
            # limit) is still the slow statement on-call is looking for.
            fields = guard.query_fields(stat.fp, duration, -1, hold, None)
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
