"""poolguard's log events as ``poolguard demo`` sees them: captured, then told in one line.

:class:`EventCapture` is a handler on the ``poolguard`` logger that keeps the
structured fields of each event (:class:`Event`); :func:`describe_event` puts
one on a line, the fields that matter for it first; :func:`event_key` says
which events are "the same" for showing only the first of each.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from time import perf_counter
from typing import Any

__all__ = ["Event", "EventCapture", "describe_event", "event_key", "short"]

#: At most this many events are kept (counted all the same).
MAX_EVENTS = 5000


@dataclasses.dataclass(frozen=True)
class Event:
    """One event poolguard logged, with the time it was logged."""

    at: float  # perf_counter()
    level: str
    name: str
    fields: dict[str, Any]


class EventCapture(logging.Handler):
    """A handler on the ``poolguard`` logger that keeps its structured events."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[Event] = []
        self.counts: Counter[str] = Counter()
        self._lock_events = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "poolguard", None)
        if not isinstance(fields, dict):
            return
        name = str(fields.get("event", record.getMessage().split(" ", 1)[0]))
        rest = {k: v for k, v in fields.items() if k != "event"}
        with self._lock_events:
            self.counts[name] += 1
            if len(self.events) < MAX_EVENTS:
                self.events.append(Event(perf_counter(), record.levelname, name, rest))

    def snapshot(self) -> list[Event]:
        with self._lock_events:
            return list(self.events)

    def __enter__(self) -> EventCapture:
        logger = logging.getLogger("poolguard")
        self._saved = (logger.level, logger.propagate)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the demo prints them itself
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("poolguard")
        logger.removeHandler(self)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]


def short(text: object, width: int = 70) -> str:
    """``text`` cut to ``width`` characters, ``...`` marking the cut."""
    value = str(text)
    return value if len(value) <= width else value[: width - 3] + "..."


def describe_event(event: Event) -> str:
    """One line for an event, the fields that matter for it first."""
    f = event.fields
    name = event.name
    if name in ("connection.held_too_long", "query.slow"):
        took = f.get("held_ms") if name == "connection.held_too_long" else f.get("duration_ms")
        return (f"{name}: {short(f.get('statement'))!r} at {f.get('site')} "
                f"(tag {f.get('tag')}, {took} ms)")
    if name == "pool.exhausted":
        return (f"{name} ({f.get('reason')}): {f.get('in_use')}/{f.get('capacity')} in use, "
                f"{f.get('waiting')} waiting; held by {short(f.get('summary'), 90)}")
    if name == "query.error":
        return (f"{name}: {f.get('error_type')} after {f.get('duration_ms')} ms in "
                f"{short(f.get('statement'), 50)!r} at {f.get('site')}")
    text = " ".join(f"{k}={v}" for k, v in f.items() if k != "pool" and v is not None)
    return f"{name}: {short(text, 110)}"


def event_key(event: Event) -> tuple[str, ...]:
    """Events with one key are told once: one per statement shape and error type;
    every breaker and alert transition."""
    f = event.fields
    if event.name.startswith(("breaker.", "alert.")):
        return (event.name, str(event.at))  # every transition
    return (event.name, str(f.get("fingerprint")), str(f.get("error_type")))


