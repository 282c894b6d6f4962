"""Where poolguard's events go: the host application's logging, never stdout.

If the application configured structlog, events go through its processors
and renderer (``structlog.get_logger("poolguard")``). Otherwise they go to the
stdlib logger ``poolguard`` as ``event key=value ...`` messages (a value with
a space or a non-printable character is written as its ``repr()``, so no value
can forge a field or a line) with the event dict attached as ``record.poolguard``; that logger has a
``NullHandler``, so an application that configured no logging at all sees
nothing (a library never prints uninvited).

Which of the two applies, and whether DEBUG is on (``EventLog.debug``), is
re-read at most once a second (the guard's scan calls :meth:`EventLog.refresh`),
not per event: the per-statement check is one attribute read.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import structlog

__all__ = ["EventLog", "STDLIB_LOGGER"]

STDLIB_LOGGER = logging.getLogger("poolguard")
STDLIB_LOGGER.addHandler(logging.NullHandler())

_REFRESH = 1.0


def _render(value: Any) -> str:
    # repr() escapes control characters (a newline or an ANSI escape in a
    # value would forge or hide a log line) and quotes spaces (which would
    # forge a key=value field).
    text = str(value)
    return text if text and text.isprintable() and " " not in text else repr(text)


class EventLog:
    """Emits structured events for one guard, with ``pool`` bound."""

    def __init__(self, pool_name: str) -> None:
        self.pool_name = pool_name
        self._checked_at = -_REFRESH
        self._structlog: Any = None
        self.debug = False

    def refresh(self, now: float | None = None) -> None:
        """Re-read the logging set-up (at most once a second when called per event)."""
        now = time.monotonic() if now is None else now
        self._checked_at = now
        if structlog.is_configured():
            logger = structlog.get_logger("poolguard").bind(pool=self.pool_name)
            self._structlog = logger
            check = getattr(logger, "is_enabled_for", None) or getattr(logger, "isEnabledFor", None)
            self.debug = bool(check(logging.DEBUG)) if check is not None else True
        else:
            self._structlog = None
            self.debug = STDLIB_LOGGER.isEnabledFor(logging.DEBUG)

    def emit(self, level: int, event: str, **fields: Any) -> None:
        """Emit ``event`` at ``level`` with ``fields`` (values must be safe to log)."""
        if time.monotonic() - self._checked_at >= _REFRESH:
            self.refresh()
        if self._structlog is not None:
            self._structlog.log(level, event, **fields)
            return
        if not STDLIB_LOGGER.isEnabledFor(level):
            return
        fields = {"pool": self.pool_name, **fields}
        text = " ".join(f"{k}={_render(v)}" for k, v in fields.items() if v is not None)
        extra = {"poolguard": {"event": event, **fields}}
        STDLIB_LOGGER.log(level, "%s %s", event, text, extra=extra)
