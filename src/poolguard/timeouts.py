"""Statement timeouts the database enforces, and request deadlines.

A statement gets a time limit from, in order: the request's own
``statement_timeout``, the tag's (``tag_statement_timeouts``), the guard's
``statement_timeout``; and never more than what is left of the request's
deadline (but at least ``deadline_floor``). A request already past its
deadline fails with :class:`poolguard.DeadlineExceeded` before it touches
the database again.

How each database enforces it:

- PostgreSQL: ``SET LOCAL statement_timeout`` before the statement (one
  extra round trip, only for limited statements; it ends with the
  transaction). The server cancels the statement; the connection stays
  usable once the transaction is rolled back.
- MariaDB: the statement is sent as ``SET STATEMENT max_statement_time=N FOR
  ...`` (no extra round trip). MySQL: ``SET SESSION max_execution_time``
  before SELECTs.
- SQLite: a watchdog calls ``interrupt()`` on the connection.

A server that accepts the statement and never answers is not bound by any
of these; for that, a request with a deadline also arms a client-side
watchdog: shortly after the deadline it shuts the connection's socket down,
the driver fails, and SQLAlchemy invalidates the connection.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Watchdog", "kill_socket", "limited_statement", "watchdog"]

#: Extra time after a deadline before the client-side watchdog cuts the socket:
#: the database's own timeout should fire first and leave the connection usable.
KILL_GRACE = 0.25


class Watchdog:
    """One daemon thread that runs callbacks at given ``perf_counter`` times."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def schedule(self, when: float, fn: Callable[[], None]) -> list[Any]:
        """Run ``fn`` at ``when``; returns a handle for :meth:`cancel`."""
        entry: list[Any] = [when, next(self._seq), fn]
        with self._cond:
            if self._thread is None or self._pid != os.getpid():  # started, and not forked
                self._thread = threading.Thread(
                    target=self._run, name="poolguard-watchdog", daemon=True
                )
                self._pid = os.getpid()
                self._thread.start()
            heapq.heappush(self._heap, entry)
            self._cond.notify()
        return entry

    def cancel(self, entry: list[Any]) -> None:
        """Don't run it (if it has not run yet)."""
        entry[2] = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, fn = self._heap[0]
                delay = when - time.perf_counter()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
            if fn is not None:
                with contextlib.suppress(Exception):  # a callback must not kill the thread
                    fn()


watchdog = Watchdog()


def kill_socket(dbapi_connection: Any) -> bool:
    """Shut down the socket under a DBAPI connection, from any thread.

    A driver blocked reading it gets an error at once. Works for drivers
    that expose the socket (psycopg's ``fileno()``, PyMySQL's ``_sock``).
    """
    fd = None
    with contextlib.suppress(Exception):
        fd = dbapi_connection.fileno()
    if fd is None:
        sock = getattr(dbapi_connection, "_sock", None)
        with contextlib.suppress(Exception):
            fd = sock.fileno() if sock is not None else None
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


def limited_statement(system: str, statement: str, limit: float, cursor: Any) -> str:
    """Apply ``limit`` (seconds) for ``system``; returns the statement to send."""
    ms = max(1, int(limit * 1000))
    if system == "postgresql":
        cursor.execute(f"SET LOCAL statement_timeout = {ms}")
        return statement
    if system == "mariadb":
        return f"SET STATEMENT max_statement_time={limit:.3f} FOR {statement}"
    if system == "mysql" and statement.lstrip()[:6].upper() == "SELECT":
        cursor.execute(f"SET SESSION max_execution_time = {ms}")
    return statement


def is_timeout_error(system: str, error: BaseException) -> bool:
    """Whether ``error`` (a DBAPI error) is the database cancelling a statement on time."""
    if system == "postgresql":
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        return code == "57014" or type(error).__name__ in {"QueryCanceled", "QueryCanceledError"}
    if system in ("mariadb", "mysql"):
        args: tuple[Any, ...] = tuple(getattr(error, "args", ()))
        return bool(args) and args[0] in (1969, 3024)
    if system == "sqlite":
        return "interrupted" in str(error)
    return False
