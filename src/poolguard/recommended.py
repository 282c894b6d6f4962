"""The recommended setting: the ``poolguard.wrap`` options a web service starts from.

One definition, read by everything that shows or uses "the recommended
setting": the README (a test compares its code block with :func:`options`),
``poolguard demo``'s guarded side, the postmortem benchmark and the examples::

    from poolguard import recommended

    engine = poolguard.wrap(engine, **recommended.options())

It is for a service whose requests take milliseconds and whose critical work
(logins) must keep being served while something else drains the pool. It
names no tag: a bulkhead (``tag_limits``) for a query class known to be
dangerous is the service's own choice, added next to these options. A
request's deadline (``poolguard.request(timeout=...)``) bounds each of its
statements, with or without these options.
"""

from __future__ import annotations

from typing import Any

__all__ = ["options"]


def options() -> dict[str, Any]:
    """The recommended ``poolguard.wrap`` options, as a new dict (change it freely)."""
    return {
        # Nothing waits 30 s (QueuePool's default) to fail: a request of a web
        # service that waited a second for a connection has failed already.
        "acquire_timeout": 1.0,
        # A fifth of the pool kept for priority="critical" requests (what they
        # hold counts: no connection idles beside critical work holding its share).
        "reserved_critical": 0.2,
        # Background jobs never queue behind a full pool: shed, they retry later.
        "max_waiting_background": 0,
        # A standing queue sheds non-critical waits and serves the newest first.
        "codel": True,
        # Events name the function that checked each connection out (a short
        # stack walk per checkout): the question an exhausted pool raises.
        "capture_call_sites": True,
        # While the database itself fails, checkouts fail at once instead of
        # dialling it; one slow query class among others does not open it.
        "breaker": True,
        # Every request tag gets a breaker of its own that opens when half of
        # its recent statements took a second or more: that tag is shed, the
        # others are served.
        "breaker_per_tag": True,
        "breaker_slow_call_duration": 1.0,
        "breaker_slow_call_rate": 0.5,
        # A statement shape running far slower than the rest never holds more
        # than half the pool (capped before any pressure); under pressure, the
        # shape (or tag) holding most of the pool is shed before it is sent,
        # in every request, critical ones included; lifted gradually after.
        "isolate_culprits": True,
    }
