"""PgBouncer's errors, recognised: saturation of its queue apart from failure.

Behind PgBouncer, a client that waits too long in PgBouncer's own queue
(``query_wait_timeout``) or finds it full (``max_client_conn``) gets an error
that looks like a broken database connection (SQLSTATE 08P01, or asyncpg's
"connection was closed in the middle of operation"). It means the pooler is
saturated, not that the database failed: it becomes
:class:`poolguard.PoolerSaturated`, which the breaker does not count, and the
guard's shedding hears of it instead. Recognition runs on the error path only.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .errors import PoolerSaturated

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._parts import GuardParts
    from ._recorder import Recorder

__all__ = ["POOLER_FAILURE", "SATURATION", "PoolerErrors", "pooler_kind"]

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


class PoolerErrors:
    """One guard's handling of pooler errors: words, counts and logs them."""

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
