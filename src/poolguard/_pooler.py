"""PgBouncer's errors, recognised: saturation of its queue apart from failure.

Behind PgBouncer, a client that waits too long in PgBouncer's own queue
(``query_wait_timeout``) or finds it full (``max_client_conn``) gets an error
that looks like a broken database connection (SQLSTATE 08P01, or asyncpg's
"connection was closed in the middle of operation"). It means the pooler is
saturated, not that the database failed: it becomes
:class:`poolguard.PoolerSaturated`, which the breaker does not count, and the
guard's shedding hears of it instead. Recognition runs on the error path only.

Whether there is a pooler at all is decided once per guard, on the first
connection it opens (:func:`detect_pooler`): from the ``pooler`` option if
it says, else from the connection itself. PgBouncer (like other multiplexers)
hands each client a backend key of its own, so the process id the driver was
given at connect differs from the server's ``pg_backend_pid()``. That tells a
pooler is there, not its pool mode; a pool mode read from PgBouncer's admin
console can be passed in. Behind a pooler that may pool by transaction, the
guard warns about the driver's prepared statements (``pooler.prepared_statements``)
and its statement timer bounds the wait in the pooler's queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from ._compat import asyncpg_statement_caches
from ._timeouts import unenforced_reason
from .errors import PoolerSaturated

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._parts import GuardParts
    from ._recorder import Recorder

__all__ = [
    "POOLER_FAILURE",
    "SATURATION",
    "Pooler",
    "PoolerErrors",
    "detect_pooler",
    "pooler_kind",
    "prepared_statements_fix",
]

SATURATION = "saturation"
POOLER_FAILURE = "pooler_failure"

#: Message markers (lower case) -> (kind, what happened, what to do).
_MARKERS: tuple[tuple[str, str, str, str], ...] = (
    ("query_wait_timeout", SATURATION,
     "no server connection within its query_wait_timeout; its pool is saturated",
     "raise PgBouncer's default_pool_size (if the database has room) or lower the load"),
    ("no more connections allowed", SATURATION,
     "refused the connection: max_client_conn reached",
     "raise PgBouncer's max_client_conn or open fewer client connections"),
    ("server_login_retry", POOLER_FAILURE, "cannot log in to the database", ""),
    ("server login has been failing", POOLER_FAILURE, "cannot log in to the database", ""),
    ("pgbouncer cannot connect to server", POOLER_FAILURE, "cannot reach the database", ""),
    ("database removed", POOLER_FAILURE, "dropped the database's connections", ""),
    ("server shutting down", POOLER_FAILURE, "is shutting down", ""),
    ("pgbouncer is shutting down", POOLER_FAILURE, "is shutting down", ""),
)

#: Seconds between two ``pooler.saturated`` warnings of one guard.
LOG_EVERY = 1.0


def _driver_errors(error: BaseException) -> list[BaseException]:
    """``error``, the driver's error SQLAlchemy wrapped, and their causes."""
    found: list[BaseException] = []
    todo: list[BaseException | None] = [error]
    while todo and len(found) < 6:
        item = todo.pop()
        if item is None or any(item is seen for seen in found):
            continue
        found.append(item)
        todo += [item.__cause__, getattr(item, "orig", None)]
    return found


def _match(error: BaseException) -> tuple[str, str, str, str] | None:
    for item in _driver_errors(error):
        # A connection-class SQLSTATE (08...) or none (psycopg at connect):
        # an error of the request whose text quotes a marker is not one.
        state = getattr(item, "sqlstate", None) or getattr(item, "pgcode", None)
        if state is not None and not str(state).startswith("08"):
            continue
        text = str(item).lower()
        for marker in _MARKERS:
            if marker[0] in text:
                return marker
    return None


def pooler_kind(error: BaseException) -> str | None:
    """``"saturation"``, ``"pooler_failure"`` or None: what PgBouncer said with ``error``.

    ``error`` is the driver's error (psycopg, asyncpg, SQLAlchemy's asyncpg
    adapter) or SQLAlchemy's wrapper of it.
    """
    if isinstance(error, PoolerSaturated):
        return SATURATION
    match = _match(error)
    return match[1] if match is not None else None


#: What the holders report says of the guard's own round trip behind a pooler.
BEHIND = "behind a connection pooler: likely waiting for a server connection"


@dataclasses.dataclass(frozen=True, slots=True)
class Pooler:
    """A connection pooler in front of the database.

    Attributes:
        mode: ``"transaction"``, ``"session"`` or ``"unknown"`` (a pooler is
            there; its pool mode was not said).
        how: what told it (``"pooler option"``, ``"backend pid"``, ``"admin console"``).
    """

    mode: str
    how: str

    @property
    def may_pool_transactions(self) -> bool:
        """Server connections may change between transactions."""
        return self.mode != "session"


def _announced_pid(dbapi_connection: Any) -> int | None:
    """The backend process id the driver got at connect (BackendKeyData)."""
    info = getattr(dbapi_connection, "info", None)  # psycopg
    pid = getattr(info, "backend_pid", None)
    if pid is None:  # SQLAlchemy's asyncpg adapter
        inner = getattr(dbapi_connection, "_connection", None)
        get = getattr(inner, "get_server_pid", None)
        pid = get() if get is not None else None
    return pid if isinstance(pid, int) else None


def _server_pid(dbapi_connection: Any) -> int | None:
    """``pg_backend_pid()``, in a transaction of its own (ended here)."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT pg_backend_pid()")
        row = cursor.fetchone()
    finally:
        cursor.close()
        if not getattr(dbapi_connection, "autocommit", False):
            dbapi_connection.rollback()
    return row[0] if row else None


def detect_pooler(
    dbapi_connection: Any, option: str = "auto", admin_mode: str | None = None,
) -> Pooler | None:
    """The pooler between a PostgreSQL connection and its server, or None.

    ``option`` is the guard's ``pooler`` option (``"auto"``, ``"transaction"``,
    ``"session"``, ``"none"``); ``admin_mode`` a pool mode read from
    PgBouncer's admin console (``SHOW CONFIG``), if known. With neither, one
    round trip compares the process id the driver was announced at connect
    with the server's. Errors of that probe mean "don't know": None.
    """
    if option == "none":
        return None
    if option in ("transaction", "session"):
        return Pooler(option, "pooler option")
    if admin_mode in ("transaction", "session", "statement"):
        mode = "transaction" if admin_mode == "statement" else admin_mode
        return Pooler(mode, "admin console")
    announced = _announced_pid(dbapi_connection)
    if announced is None:
        return None
    server = None
    with contextlib.suppress(Exception):
        server = _server_pid(dbapi_connection)
    if server is None or server == announced:
        return None
    return Pooler(admin_mode or "unknown", "backend pid")


def prepared_statements_fix(dbapi_connection: Any) -> tuple[str, str] | None:
    """``(driver, the fix)`` when the driver keeps prepared statements, else None.

    Named prepared statements live in one server session: through transaction
    pooling, the next transaction may run on another one ("prepared statement
    ... does not exist").
    """
    if hasattr(dbapi_connection, "prepare_threshold"):  # psycopg 3
        if dbapi_connection.prepare_threshold is None:
            return None
        return "psycopg", 'connect_args={"prepare_threshold": None}'
    caches = asyncpg_statement_caches(dbapi_connection)
    if caches is not None:
        if not any(caches):
            return None
        return "asyncpg", ('connect_args={"statement_cache_size": 0, '
                           '"prepared_statement_cache_size": 0}')
    return None


class PoolerErrors:
    """One guard's handling of pooler errors: words, counts and logs them.

    Also finds out, on the guard's first connection, whether a pooler is
    there (:attr:`behind`), and warns about what does not work through it.
    """

    def __init__(
        self, parts: GuardParts, recorder: Recorder, *, url: Callable[[], Any],
        retry_after: Callable[[], float],
    ) -> None:
        self._log = parts.log
        self._gate = parts.gate
        self._recorder = recorder
        self._url = url  # the engine's URL (None: not attached)
        self._retry_after = retry_after
        self._lock = threading.Lock()
        self._logged_at = -LOG_EVERY
        self._unlogged = 0
        self._parts = parts
        self._detected: Pooler | None = None
        #: The pool mode PgBouncer's admin console showed (``pgbouncer_admin_url``).
        self._admin_mode: str | None = None
        #: Whether the first connection has been looked at.
        self.checked = False
        #: The pool had connections open when it was wrapped: the first
        #: connection checked out is looked at (:meth:`look_at`), since only
        #: new ones are (a pool opened before ``wrap()`` may open none).
        self.unlooked = False

    @property
    def behind(self) -> Pooler | None:
        """The pooler in front of the database: as the ``pooler`` option says
        (read now: a reconfigure applies at once), else as the guard's first
        connection told; None when there is none (or not known yet)."""
        option = self._parts.config().pooler
        if option == "auto":
            return self._detected
        return None if option == "none" else Pooler(option, "pooler option")

    def check_connection(self, dbapi_connection: Any, admin_mode: str | None = None) -> None:
        """Called with each new connection: the first one is looked at (once).

        Off the request path's hot part: a connect. A statement timeout the
        database cannot enforce logs ``statement_timeout.unenforced``. A PostgreSQL connection
        is checked for a pooler (:func:`detect_pooler`, one round trip when
        the ``pooler`` option is ``"auto"``); behind one that may pool by
        transaction, prepared statements of the driver log
        ``pooler.prepared_statements`` with the fix.
        """
        if self.checked:
            return
        with self._lock:
            if self.checked:
                return
            self.checked = True
            self.unlooked = False
        parts = self._parts
        config = parts.config()
        db_system = parts.db_system()
        unenforced = unenforced_reason(db_system)
        if unenforced is not None and (config.statement_timeout or config.tag_statement_timeouts):
            self._log.emit(logging.WARNING, "statement_timeout.unenforced",
                           db_system=db_system, message=unenforced)
        if db_system != "postgresql":
            return
        behind = self._detected = detect_pooler(
            dbapi_connection, config.pooler, admin_mode or self._admin_mode)
        if behind is None:
            return
        address = pooler_address(self._url())
        self._log.emit(logging.INFO, "pooler.detected", pooler=address, mode=behind.mode,
                       detected_by=behind.how)
        fix = prepared_statements_fix(dbapi_connection) if behind.may_pool_transactions else None
        if fix is not None:
            driver, todo = fix
            self._log.emit(
                logging.WARNING, "pooler.prepared_statements", pooler=address, driver=driver,
                mode=behind.mode, fix=todo,
                message=(f"{driver} keeps prepared statements in the server session; through "
                         "transaction pooling the next transaction may run on another server "
                         f"connection (\"prepared statement ... does not exist\"): pass {todo} "
                         "to create_engine (or, with PgBouncer >= 1.21, set its "
                         "max_prepared_statements), or pooler='session' if it pools by "
                         "session"),
            )

    def look_at(self, dbapi_connection: Any) -> None:
        """A connection that was open before ``wrap()``, just checked out by
        the caller's own thread: look at it as at a new one (once)."""
        self.unlooked = False
        self.check_connection(dbapi_connection)

    def admin_mode(self, mode: str | None) -> None:
        """PgBouncer's admin console showed its pool mode (off the request path).

        With the ``pooler`` option at ``"auto"``, it says how the pooler pools
        (the connection probe only tells one is there) and that one is there
        (a pool opened before it was wrapped gives the guard no connection
        to probe).
        """
        if mode not in ("transaction", "session", "statement") or mode == self._admin_mode:
            return
        self._admin_mode = mode
        detected = self._detected
        if self._parts.config().pooler != "auto" or (
                detected is not None and detected.how == "admin console"):
            return
        self._detected = Pooler("transaction" if mode == "statement" else mode, "admin console")
        self._log.emit(logging.INFO, "pooler.detected", pooler=pooler_address(self._url()),
                       mode=self._detected.mode, detected_by="admin console")

    def queue_timeout(
        self, error: BaseException, waited: float, limit: float, statement: str | None,
    ) -> PoolerSaturated:
        """The guard cut a round trip that waited ``limit`` seconds behind the
        pooler (``error``: what the cut made the driver raise)."""
        return self._saturated(
            error, waited, statement, marker="no server connection in time",
            what=f"no server connection within the statement's time limit ({limit:.3f}s)",
            todo="raise the pooler's pool size (if the database has room) or lower the load",
        )

    def saturated(
        self, error: BaseException, waited: float, statement: str | None = None,
        *, sample: bool = False,
    ) -> PoolerSaturated | None:
        """``error`` as :class:`PoolerSaturated` if it is the pooler's saturation, else None.

        Counts it, logs ``pooler.saturated`` at most once a second and, with
        ``sample`` (a failed connect: no checkin will report it), feeds the
        wait to the adaptive limit (when on) as the hold time it is.
        """
        match = _match(error)
        if match is None or match[1] != SATURATION:
            return None
        marker, _, what, todo = match
        return self._saturated(error, waited, statement, marker=marker, what=what, todo=todo,
                               sample=sample)

    def _saturated(
        self, error: BaseException, waited: float, statement: str | None, *, marker: str,
        what: str, todo: str, sample: bool = False,
    ) -> PoolerSaturated:
        gate = self._gate()
        address = pooler_address(self._url())
        # Its queue ahead took longer than this wait to drain: the pool's
        # own estimate, or at least that long (at most 30 s).
        retry_after = max(self._retry_after(), min(waited, 30.0))
        now = time.monotonic()
        with self._lock:
            self._recorder.pooler_saturations += 1
            self._unlogged += 1
            log_it = now - self._logged_at >= LOG_EVERY
            if log_it:
                self._logged_at = now
                count, self._unlogged = self._unlogged, 0
        if sample:
            # The pooler's queue is ours too: a wait that long is a hold that
            # long. (A statement's checkin reports its hold, wait included.)
            gate.sample_hold(waited)
        if log_it:
            self._log.emit(
                logging.WARNING, "pooler.saturated", pooler=address, error=marker,
                count=count, waited_ms=round(waited * 1000, 1), retry_after_s=round(retry_after, 2),
            )
        message = (
            f"pool {self._log.pool_name!r}: PgBouncer at {address}: {what} (clients waiting "
            f"there, {waited:.3f}s); {todo}; poolguard did not count this as a database "
            f"failure (retry after {retry_after:.1f}s)"
        )
        return PoolerSaturated(
            message, pool_name=self._log.pool_name, pooler=address, error=marker,
            timeout=waited, in_use=gate.in_use, capacity=gate.capacity, waiting=gate.waiting,
            retry_after=retry_after, orig=error, statement=statement,
        )


def pooler_address(url: Any) -> str:
    """``host:port`` of the pooler an engine's URL points at."""
    if url is None:
        return "?"
    return f"{url.host or 'localhost'}:{url.port or 5432}"
