"""Statement timeouts the database enforces, and request deadlines.

A statement gets a time limit from, in order: the request's own
``statement_timeout``, the tag's (``tag_statement_timeouts``), the guard's
``statement_timeout``; and never more than what is left of the request's
deadline (but at least ``deadline_floor``). A request already past its
deadline fails with :class:`poolguard.DeadlineExceeded` before it touches
the database again.

A limit of ``0`` means no limit, on every backend (what PostgreSQL and
MariaDB mean by 0); a ``request(statement_timeout=0)`` lifts the tag's and
the guard's. Limits count in whole milliseconds, at least 1, and are
clamped to what the database accepts (PostgreSQL: ``INT_MAX`` ms, about
24.8 days; MariaDB: one year); a deadline further off than that is still
enforced by the client-side watchdog below.

How each database enforces it:

- PostgreSQL: ``SET LOCAL statement_timeout`` before the statement (one
  extra round trip, only for limited statements; it ends with the
  transaction). The server cancels the statement; the connection stays
  usable once the transaction is rolled back. Under autocommit (engine-wide
  or per connection) there is no transaction for ``SET LOCAL``: the limit is
  set for the session and reset (``SET statement_timeout TO DEFAULT``, on a
  cursor of its own) after the statement, two extra round trips. Behind a
  connection pooler (``_pooler``) never a session-level SET: the statement
  gets a transaction of its own, and the SET LOCAL is bounded by the limit
  (``QueryTimer._set_through_pooler``).
- MariaDB: the statement is sent as ``SET STATEMENT max_statement_time=N FOR
  ...`` (no extra round trip). MySQL: ``SET SESSION max_execution_time``
  before SELECTs.
- SQLite (and aiosqlite): a watchdog calls ``interrupt()`` on the connection.

A server that accepts the statement and never answers is not bound by any
of these; for that, a request with a deadline also arms a client-side
watchdog: shortly after the deadline it cuts the connection (shuts its
socket down; asyncpg: terminates it on its event loop), the driver fails,
and SQLAlchemy invalidates the connection. The same bound covers COMMIT
and ROLLBACK (the pool's reset on return included) once the engine has run
a statement under a deadline or a limit, and the pre-ping, which also gets
no more than what is left of the acquire timeout. A watchdog entry is
cancelled on every exit path, and checks before cutting that the checkout
it was armed for is still out.
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import itertools
import math
import os
import re
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "Watchdog",
    "kill_socket",
    "limit_ms",
    "limited_statement",
    "no_transaction_block",
    "unenforced_reason",
    "watchdog",
]

#: Extra time after a deadline before the client-side watchdog cuts the socket:
#: the database's own timeout should fire first and leave the connection usable.
KILL_GRACE = 0.25

#: Longest single wait of the watchdog thread (seconds).
_MAX_WAIT = min(3600.0, threading.TIMEOUT_MAX)

#: PostgreSQL's ``statement_timeout`` is an int of milliseconds.
PG_MAX_MS = 2**31 - 1
#: MariaDB caps ``max_statement_time`` (seconds) at one year.
MARIADB_MAX_S = 31536000
#: MySQL's ``max_execution_time`` is an unsigned 32-bit count of milliseconds.
MYSQL_MAX_MS = 2**32 - 1


class Watchdog:
    """One daemon thread that runs callbacks at given ``perf_counter`` times.

    Every engine shares it, so it must outlive anything a callback or a
    caller does: an exception in a callback is swallowed (the callback's
    job is best-effort), a wait longer than the platform allows is cut into
    pieces, and a thread that died anyway is started again by the next
    :meth:`schedule`.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        # Held while a callback runs, and by cancel(): once cancel() returns,
        # the callback has either finished or will never run. A statement
        # that finished is then never cut by its own late watchdog.
        self._firing = threading.Lock()
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0
        #: Callbacks that raised (they are otherwise ignored).
        self.errors = 0

    def schedule(self, when: float, fn: Callable[[], None]) -> list[Any]:
        """Run ``fn`` at ``when``; returns a handle for :meth:`cancel`."""
        entry: list[Any] = [when, next(self._seq), fn]
        with self._cond:
            thread = self._thread
            if thread is None or self._pid != os.getpid() or not thread.is_alive():
                # Not started, forked, or (it should not happen) dead.
                self._thread = threading.Thread(
                    target=self._run, name="poolguard-watchdog", daemon=True
                )
                self._pid = os.getpid()
                self._thread.start()
            heapq.heappush(self._heap, entry)
            self._cond.notify()
        return entry

    def cancel(self, entry: list[Any]) -> None:
        """Don't run it; if it is running, return once it has finished."""
        with self._firing:
            entry[2] = None

    def _run(self) -> None:
        while True:
            try:
                self._step()
            except BaseException:  # noqa: BLE001, PERF203 - the one thread every engine relies on
                self.errors += 1

    def _step(self) -> None:
        with self._cond:
            while not self._heap:
                self._cond.wait()
            entry = self._heap[0]
            delay = entry[0] - time.perf_counter()
            if delay > 0:
                # Far-off times (a 30-day deadline) exceed what a lock wait
                # accepts: wake up now and then and look again.
                self._cond.wait(min(delay, _MAX_WAIT))
                return
            heapq.heappop(self._heap)
        with self._firing:
            fn = entry[2]
            if fn is None:
                return
            entry[2] = None
            try:
                fn()
            except Exception:  # noqa: BLE001 - a callback must not kill the thread
                self.errors += 1


    def _after_fork(self) -> None:
        # In a forked child only the forking thread exists: a lock held by
        # the parent's watchdog thread would stay held, and the entries
        # belong to the parent's statements.
        self._cond = threading.Condition()
        self._firing = threading.Lock()
        self._heap = []
        self._thread = None


watchdog = Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=watchdog._after_fork)


def kill_socket(dbapi_connection: Any) -> bool:
    """Cut the connection under a DBAPI connection, from any thread.

    A driver blocked reading it gets an error at once. Works for drivers
    that expose the socket (psycopg's ``fileno()``, PyMySQL's ``_sock``),
    and for asyncpg, whose connection lives on its event loop: it is
    terminated there (``call_soon_threadsafe``), since asyncpg's objects
    are not safe to touch from this thread.
    """
    # A pool's proxy (fairy) or SQLAlchemy's asyncio adapter: look inside.
    raw = getattr(dbapi_connection, "dbapi_connection", None) or dbapi_connection
    fd = _fileno(raw)
    inner = getattr(raw, "_connection", None)  # SQLAlchemy's asyncio adapters
    if fd is None and inner is not None:
        fd = _fileno(inner)
        if fd is None:
            return _terminate_on_loop(inner)
    if fd is None or fd < 0:
        return False
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    finally:
        dup.close()
    return True


def _terminate_on_loop(connection: Any) -> bool:
    # asyncpg: terminate() aborts the transport; the awaiting driver call
    # fails with "connection was closed in the middle of operation".
    loop = getattr(connection, "_loop", None)
    terminate = getattr(connection, "terminate", None)
    if loop is None or terminate is None:
        return False
    try:
        loop.call_soon_threadsafe(terminate)
    except RuntimeError:  # the loop is closed: nothing left to cut
        return False
    return True


def _fileno(connection: Any) -> int | None:
    fd = None
    fileno = getattr(connection, "fileno", None)
    if fileno is not None:
        with contextlib.suppress(Exception):
            fd = fileno()
    if fd is None:
        sock = getattr(connection, "_sock", None)
        with contextlib.suppress(Exception):
            fd = sock.fileno() if sock is not None else None
    return fd if isinstance(fd, int) else None


def interrupter(dbapi_connection: Any) -> Callable[[], Any] | None:
    """SQLite: the connection's thread-safe ``interrupt()``, or ``None``.

    aiosqlite's own ``interrupt`` is a coroutine; the sqlite3 connection
    under it is interrupted directly (sqlite3 allows it from any thread).
    """
    fn = getattr(dbapi_connection, "interrupt", None)
    if fn is not None and not inspect.iscoroutinefunction(fn):
        return cast("Callable[[], Any]", fn)
    inner = getattr(dbapi_connection, "_connection", None)  # SQLAlchemy's adapter
    try:
        raw = getattr(inner, "_conn", None)  # aiosqlite's sqlite3 connection
    except Exception:  # noqa: BLE001 - aiosqlite raises when not connected
        return None
    fn = getattr(raw, "interrupt", None)
    return cast("Callable[[], Any] | None", fn)


def limit_ms(limit: float) -> int:
    """``limit`` seconds as whole milliseconds: at least 1 (every backend's
    smallest step), rounded up, never above what PostgreSQL accepts."""
    return min(PG_MAX_MS, max(1, math.ceil(round(limit * 1000, 6))))


#: Sent after a statement that was limited with a session-level setting
#: (autocommit: there is no transaction for ``SET LOCAL`` to end with).
PG_RESET = "SET statement_timeout TO DEFAULT"


def limited_statement(
    db_system: str, statement: str, limit: float, cursor: Any, *, autocommit: bool = False
) -> str:
    """Apply ``limit`` (seconds, > 0) for ``db_system``; returns the statement to send.

    Values are clamped to what each database accepts (PostgreSQL: 24.8
    days; MariaDB: one year). With ``autocommit`` (PostgreSQL), the limit is
    set for the session, and the caller must send :data:`PG_RESET` after
    the statement.
    """
    ms = limit_ms(limit)
    if db_system == "postgresql":
        scope = "" if autocommit else "LOCAL "
        cursor.execute(f"SET {scope}statement_timeout = {ms}")
        return statement
    if db_system == "mariadb":
        seconds = min(ms, MARIADB_MAX_S * 1000) / 1000
        return f"SET STATEMENT max_statement_time={seconds:.3f} FOR {statement}"
    if db_system == "mysql" and statement.lstrip()[:6].upper() == "SELECT":
        cursor.execute(f"SET SESSION max_execution_time = {min(ms, MYSQL_MAX_MS)}")
    return statement


def is_timeout_error(db_system: str, error: BaseException) -> bool:
    """Whether ``error`` (a DBAPI error) is the database cancelling a statement on time."""
    if db_system == "postgresql":
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        return code == "57014" or type(error).__name__ in {"QueryCanceled", "QueryCanceledError"}
    if db_system in ("mariadb", "mysql"):
        args: tuple[Any, ...] = tuple(getattr(error, "args", ()))
        return bool(args) and args[0] in (1969, 3024)
    if db_system == "sqlite":
        return "interrupted" in str(error)
    return False


def unenforced_reason(db_system: str) -> str | None:
    """Why ``statement_timeout`` is not enforced (fully) on ``db_system``, or None."""
    if db_system in ("postgresql", "mariadb", "sqlite"):
        return None
    if db_system == "mysql":
        return ("MySQL's max_execution_time limits SELECT statements only: other statements "
                "run without a limit (a request's deadline still cuts them)")
    return (f"poolguard cannot set a statement time limit on {db_system}: statements run "
            "without one (a request's deadline still cuts them, client-side)")


#: PostgreSQL statements that cannot run inside a transaction block.
_NO_TRANSACTION = re.compile(
    r"\s*(VACUUM|CREATE\s+DATABASE|DROP\s+DATABASE|CREATE\s+TABLESPACE|DROP\s+TABLESPACE"
    r"|ALTER\s+SYSTEM|CREATE\s+(UNIQUE\s+)?INDEX\s+CONCURRENTLY|DROP\s+INDEX\s+CONCURRENTLY"
    r"|REINDEX\b.*\bCONCURRENTLY)\b",
    re.IGNORECASE | re.DOTALL,
)


def no_transaction_block(statement: str) -> bool:
    """Whether PostgreSQL refuses to run ``statement`` inside a transaction block."""
    return _NO_TRANSACTION.match(statement) is not None
