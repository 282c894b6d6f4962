"""Helpers for testing code that uses poolguard: capture its events as dicts.

:func:`capture_events` is poolguard's counterpart of ``structlog.testing.capture_logs``:
inside the ``with`` block every event a guard emits is appended to a list as a
dict, whatever logging set-up the application has (structlog, the stdlib, or
none), and nothing is printed.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ._log import EventLog

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["capture_events"]

_Capture = tuple[list[dict[str, Any]], int]


class _State:
    lock = threading.Lock()
    # The captures in progress as (list, lowest level); a tuple, replaced as a
    # whole under the lock, so an emitting thread reads a consistent snapshot
    # without taking the lock.
    active: tuple[_Capture, ...] = ()
    debug_wanted = False
    saved_emit: Any = None


def _captured_emit(self: EventLog, level: int, event: str, **fields: Any) -> None:
    # Stands in for EventLog.emit while a capture is open: the event goes to
    # the open captures only, never to the application's handlers.
    name = logging.getLevelName(level)
    entry = {
        "event": event,
        "level": name.lower() if isinstance(name, str) else str(level),
        "pool": self.pool_name,
        **fields,
    }
    for events, lowest in _State.active:
        if level >= lowest:
            events.append(dict(entry))


def _get_debug(self: EventLog) -> bool:
    return _State.debug_wanted or bool(self.__dict__.get("debug", False))


def _set_debug(self: EventLog, value: bool) -> None:
    self.__dict__["debug"] = value


# ``debug`` is a plain instance attribute that the per-statement path reads; a
# data descriptor on the class wins over it, so every existing guard emits its
# DEBUG events at once (not after its once-a-second refresh) while a capture
# asks for them, and the instances keep their own value for afterwards.
_debug_property = property(_get_debug, _set_debug)


def _install() -> None:
    _State.saved_emit = EventLog.__dict__["emit"]
    EventLog.emit = _captured_emit  # type: ignore[method-assign]
    EventLog.debug = _debug_property  # type: ignore[assignment]


def _uninstall() -> None:
    EventLog.emit = _State.saved_emit  # type: ignore[method-assign]
    delattr(EventLog, "debug")
    _State.saved_emit = None


@contextmanager
def capture_events(level: int = logging.DEBUG) -> Iterator[list[dict[str, Any]]]:
    """Capture poolguard's events at ``level`` and above as a list of dicts.

    Each event is ``{"event": name, "level": "warning", "pool": pool_name,
    **fields}``, in the order emitted. Inside the block, events go to the
    list and not to the application's structlog or stdlib logging (so they
    are captured whatever that set-up filters, and nothing is printed); on
    exit the previous behaviour is restored. With the default
    ``level=logging.DEBUG`` the guards emit their DEBUG events (for example
    ``query`` when ``query_log_sample_rate`` is set) as if DEBUG logging were
    on. Captures may nest and may be opened from several threads: each gets
    every event emitted while it is open, from any thread.

    Only events (``EventLog.emit``) are captured, not plain log messages.

    >>> import logging, sqlalchemy as sa, poolguard
    >>> from poolguard.testing import capture_events
    >>> engine = poolguard.wrap(sa.create_engine("sqlite://"), slow_query_threshold=0.0)
    >>> with capture_events(level=logging.WARNING) as events, engine.connect() as conn:
    ...     _ = conn.execute(sa.text("SELECT 1"))
    >>> [(e["event"], e["level"], e["statement"]) for e in events]
    [('query.slow', 'warning', 'SELECT ?')]
    >>> engine.dispose()
    """
    events: list[dict[str, Any]] = []
    entry: _Capture = (events, level)
    with _State.lock:
        if not _State.active:
            _install()
        _State.active = (*_State.active, entry)
        _State.debug_wanted = any(lowest <= logging.DEBUG for _, lowest in _State.active)
    try:
        yield events
    finally:
        with _State.lock:
            _State.active = tuple(a for a in _State.active if a is not entry)
            _State.debug_wanted = any(lowest <= logging.DEBUG for _, lowest in _State.active)
            if not _State.active:
                _uninstall()
