"""What the guard adds to a pool it attaches to: its gate, counters and creator timing.

:func:`adopting_gate` builds the gate of the first pool, adopting the
connections already checked out; :func:`release_returned` gives back the
permits of adopted ones returned meanwhile.
:class:`ConnectionEvents` counts connections opened, closed and invalidated
through SQLAlchemy's pool events; :func:`time_creator` wraps the function
every record calls to open its DBAPI connection, to time it
(``db.client.connection.create_time``) and retry it within the retry budget.
"""

from __future__ import annotations

import logging
import threading
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import event

from ._compat import capacity, checked_out_records, creator, set_creator
from ._gate import Gate
from ._hold import new_hold
from ._retries import connect_with_retries

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.pool import Pool
    from tenacity import RetryCallState

    from ._hold import Hold
    from ._log import EventLog
    from ._pooler import PoolerErrors
    from ._recorder import Recorder
    from ._retries import RetryBudget

__all__ = [
    "ConnectionEvents",
    "adopting_gate",
    "release_returned",
    "time_creator",
    "untime_creator",
]

_EVENTS = ("connect", "close", "close_detached", "invalidate")


class ConnectionEvents:
    """Counts the connections a guard's pools open, close and invalidate."""

    def __init__(self) -> None:
        # Reentrant: under asyncio a garbage collection terminates a dropped
        # connection at once, firing "close" on whichever thread collects,
        # possibly inside one of these updates (an increment is safe to nest).
        self._lock = threading.RLock()
        self.opened = 0
        self.closed = 0
        self.invalidated = 0
        self._listeners: list[tuple[str, Callable[..., None]]] = []

    def counts(self) -> tuple[int, int, int]:
        """``(opened, closed, invalidated)``, read together."""
        with self._lock:
            return self.opened, self.closed, self.invalidated

    def listen(self, pool: Pool) -> None:
        """Count ``pool``'s events (the first pool: recreated copies inherit them)."""

        def on_connect(dbapi_conn: Any, record: Any) -> None:
            with self._lock:
                self.opened += 1

        def on_close(dbapi_conn: Any, record: Any = None) -> None:
            with self._lock:
                self.closed += 1

        def on_invalidate(dbapi_conn: Any, record: Any, exc: Any) -> None:
            with self._lock:
                self.invalidated += 1

        handlers: dict[str, Callable[..., None]] = {
            "connect": on_connect,
            "close": on_close,
            "close_detached": on_close,
            "invalidate": on_invalidate,
        }
        for name in _EVENTS:
            # asyncio=False: these counters never await, so they need no
            # asyncio-aware run-once mutex on the event. Left to its default
            # (the pool's asyncio flag read now, at the first checkout of a pool
            # built with poolclass=Guarded...), it would give that mutex to a pool
            # whose own listeners were added while it was sync, and its first
            # connect outside a greenlet fails with MissingGreenlet. An async
            # pool's engine has set the flag already: it never goes back.
            event.listen(pool, name, handlers[name], asyncio=False)
            self._listeners.append((name, handlers[name]))

    def relisten(self, pool: Pool) -> None:
        """A copy made by a plain recreate() before the listeners were added
        (dispose() racing wrap()) lacks them: add the missing ones."""
        for name, fn in self._listeners:
            # (event.contains() does not see listeners copied by recreate())
            if fn not in list(getattr(pool.dispatch, name)):
                event.listen(pool, name, fn, asyncio=False)

    def unlisten(self, pool: Pool) -> None:
        """Take the counters off ``pool``."""
        for name, fn in self._listeners:
            if event.contains(pool, name, fn):
                event.remove(pool, name, fn)

    def clear(self) -> None:
        """Forget the listeners (after :meth:`unlisten`; the counts stay)."""
        self._listeners.clear()


def _give_up_at(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` past which no retry starts (None: no limit)."""
    return None if timeout is None else time.monotonic() + timeout


def time_creator(
    pool: Pool,
    recorder: Recorder,
    log: EventLog,
    *,
    retries: Callable[[], int],
    budget: Callable[[], RetryBudget | None],
    acquire_timeout: Callable[[], float | None],
    pooler: PoolerErrors | None = None,
) -> None:
    """Time ``pool``'s connection set-up, retried within the budget (once per pool).

    ``pooler``: turns a connect error that is a pooler's saturation into
    :class:`poolguard.PoolerSaturated`, and looks at the guard's first new
    connection for a pooler in front of the database.
    """
    inner = creator(pool)
    if getattr(inner, "_poolguard_timed", False):
        return

    def on_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        log.emit(
            logging.INFO,
            "connect.retry",
            attempt=state.attempt_number,
            error_type=type(error).__qualname__ if error is not None else None,
            sleep_ms=round((state.upcoming_sleep or 0.0) * 1000, 1),
        )

    def timed(record: Any) -> Any:
        start = perf_counter()
        try:
            attempts = retries()
            retry_budget = budget()
            if attempts and retry_budget is not None:
                # A checkout takes at most the acquire timeout, retries
                # included (the request's deadline, if sooner, also ends them).
                connection = connect_with_retries(
                    inner, record, retries=attempts, budget=retry_budget, on_retry=on_retry,
                    give_up_at=_give_up_at(acquire_timeout()),
                )
            else:
                connection = inner(record)
            if pooler is not None and not pooler.checked:
                pooler.check_connection(connection)
            return connection
        except Exception as error:
            saturated = (pooler.saturated(error, perf_counter() - start, None, sample=True)
                         if pooler is not None else None)
            if saturated is None:
                raise
            raise saturated from error
        finally:
            elapsed = perf_counter() - start
            recorder.create.add(elapsed)
            buf = recorder.export_create
            if buf is not None:
                buf.append(elapsed)

    if pooler is not None and not pooler.checked:
        try:
            opened = int(pool.checkedin()) + int(pool.checkedout())  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a pool class that does not count: look at new ones
            opened = 0
        pooler.unlooked = opened > 0

    timed._poolguard_timed = True  # type: ignore[attr-defined]
    timed._poolguard_inner = inner  # type: ignore[attr-defined]
    set_creator(pool, timed)


def untime_creator(pool: Pool) -> None:
    """Undo :func:`time_creator` on ``pool``."""
    inner = getattr(creator(pool), "_poolguard_inner", None)
    if inner is not None:
        set_creator(pool, inner)


def adopting_gate(pool: Pool, recorder: Recorder) -> tuple[Gate, dict[object, Hold]]:
    """The gate of ``pool`` and the holds it adopted.

    Connections already checked out (wrap() of a busy engine) hold capacity
    without a permit: adopted, their return gives the permit back like any
    other.
    """
    records = checked_out_records(pool)
    use = recorder.use
    gate = Gate(capacity(pool), adopted=len(records), checkins=lambda: use.count)
    now = perf_counter()
    adopted: dict[object, Hold] = {}
    for record in records:
        adopted[record] = gate.out[record] = new_hold(now, 0.0, 0, None)
    return gate, adopted


def release_returned(gate: Gate, adopted: dict[object, Hold]) -> None:
    """Give back, once, the permit of each adopted connection already returned.

    One returned before the gate is published went back without its permit.
    """
    out = gate.out
    for record, hold in list(adopted.items()):
        if getattr(record, "fairy_ref", None) is None and out.get(record) is hold:
            del adopted[record]
            if out.pop(record, None) is hold:
                gate.release()
