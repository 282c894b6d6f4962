"""What the guard tells about its holders: leak warnings, alerts, exhaustion reports.

Run by the guard's once-a-second scan and by a checkout that timed out; it
reads the gate's checked-out holds and writes events to the log. It knows the
guard only through the callables it is given (the gate is replaced when a
pool is attached).
"""

from __future__ import annotations

import logging
import threading
from time import perf_counter
from typing import TYPE_CHECKING

from ._alerts import Alert, AlertEvent
from ._hold import SITE, T0, WARNED
from ._holders import (
    Holder,
    HolderGroup,
    describe_groups,
    group_holders,
    holders,
    pinging_group,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import Config
    from ._hold import Hold
    from ._parts import GuardParts
    from ._pgbouncer import PgBouncerStats

__all__ = ["Diagnostics"]

_REPORT_TTL = 1.0
_EXHAUSTED_LOG_INTERVAL = 10.0
#: The holder's fields a connection.held_too_long event carries, in order.
_LEAK_FIELDS = (
    "tag",
    "fingerprint",
    "statement",
    "running",
    "idle_in_transaction",
    "site",
    "on_wire",
)


class Diagnostics:
    """Leak warnings, alerts and the holders report of one guard."""

    def __init__(
        self, parts: GuardParts,
        upstream: Callable[[], PgBouncerStats | None] = lambda: None,
    ) -> None:
        self._parts = parts
        #: PgBouncer's numbers (None: not read), told in exhaustion reports.
        self._upstream = upstream
        self._log = parts.log
        self._lock = threading.Lock()
        self.leak_warnings = 0
        self.exhaustion_events = 0
        self.alerts: list[Alert] = []
        self.alert_callbacks: list[Callable[[AlertEvent], None]] = []
        self._report: tuple[float, list[HolderGroup]] | None = None
        self._exhausted_logged_at = -_EXHAUSTED_LOG_INTERVAL

    def configure(self, cfg: Config) -> None:
        """The alerts ``cfg`` asks for (their state starts afresh)."""
        alerts = []
        if cfg.alert_utilization is not None:
            alerts.append(Alert("utilization", cfg.alert_utilization, cfg.alert_for))
        if cfg.alert_wait_time is not None:
            alerts.append(Alert("wait_time", cfg.alert_wait_time, cfg.alert_for))
        self.alerts = alerts

    def scan_leaks(self, now: float) -> None:
        """Warn once about each connection held past ``leak_threshold``."""
        threshold = self._parts.config().leak_threshold
        if threshold is not None:
            holds: list[Hold] = list(self._parts.gate().out.values())
            for hold in holds:
                if not hold[WARNED] and now - hold[T0] >= threshold:
                    self.warn_leak(hold, now)

    def returned_after_warning(self, hold: Hold, held: float) -> None:
        """A connection that was reported as held too long came back."""
        self._log.emit(
            logging.INFO,
            "connection.returned_after_warning",
            held_ms=round(held * 1000, 1),
            site=hold[SITE],
        )

    def warn_leak(self, hold: Hold, now: float) -> None:
        hold[WARNED] = True
        with self._lock:
            self.leak_warnings += 1
        (item,) = holders([hold], now, self._parts.db_system())
        self._log.emit(
            logging.WARNING,
            "connection.held_too_long",
            held_ms=round(item.age * 1000, 1),
            threshold_ms=round((self._parts.config().leak_threshold or 0) * 1000, 1),
            **{name: getattr(item, name) for name in _LEAK_FIELDS},
            site_kind="checkout" if hold[SITE] else "now",
        )

    def check_alerts(self, now: float, wait_max: float) -> None:
        """Evaluate the alerts at ``now`` (``wait_max``: the longest wait since the last)."""
        gate = self._parts.gate()
        capacity = gate.capacity
        for alert in self.alerts:
            if alert.name == "utilization":
                if not capacity:
                    continue
                value = gate.in_use / capacity
            else:
                value = wait_max
            changed = alert.update(value, now)
            if changed is None:
                continue
            ev = AlertEvent(
                pool=self._log.pool_name,
                name=alert.name,
                firing=changed,
                value=value,
                threshold=alert.threshold,
                since=now,
            )
            self._log.emit(
                logging.WARNING if changed else logging.INFO,
                f"alert.{alert.name}",
                state="firing" if changed else "cleared",
                value=round(value, 4),
                threshold=alert.threshold,
                in_use=gate.in_use,
                capacity=capacity,
                waiting=gate.waiting,
            )
            if changed and alert.name == "utilization":
                self.exhausted("utilization")
            for callback in list(self.alert_callbacks):
                try:
                    callback(ev)
                except Exception:  # noqa: PERF203 - one failing callback must not stop the rest
                    logging.getLogger("poolguard").exception("alert callback %r failed", callback)

    def holders(self) -> list[Holder]:
        """Every connection checked out now: age, statement, tag, site."""
        holds: list[Hold] = list(self._parts.gate().out.values())
        return holders(holds, perf_counter(), self._parts.db_system())

    def holders_report(self, *, fresh: bool = False) -> list[HolderGroup]:
        """Holders grouped by statement and site, biggest group first.

        Reused for up to a second unless ``fresh``: a storm of timeouts
        builds it once.
        """
        now = perf_counter()
        cached = self._report
        if not fresh and cached is not None and now - cached[0] < _REPORT_TTL:
            return cached[1]
        groups = group_holders(self.holders())
        # Checkouts still in their pre-ping hold a permit too (behind a
        # pooler, often waiting in its queue): one group of their own.
        pings = pinging_group(list(self._parts.gate().pinging.values()), now)
        if pings is not None:
            groups.append(pings)
            groups.sort(key=lambda g: (-g.count, -g.oldest))
        self._report = (now, groups)
        return groups

    def exhausted(self, reason: str) -> list[HolderGroup]:
        """The pool ran dry: build the holders report, and log ``pool.exhausted``
        (at most every 10 s; ``exhaustion_events`` counts the events logged)."""
        groups = self.holders_report()
        now = perf_counter()
        with self._lock:
            # Decided under the lock: two threads timing out together log one event.
            due = now - self._exhausted_logged_at >= _EXHAUSTED_LOG_INTERVAL
            if due:
                self._exhausted_logged_at = now
                self.exhaustion_events += 1
        if due:
            gate = self._parts.gate()
            summary = describe_groups(groups)
            bouncer = self._upstream()
            if bouncer is not None:  # whether the wait is PgBouncer's queue too
                summary = f"{summary}; {bouncer.describe()}"
            self._log.emit(
                logging.WARNING,
                "pool.exhausted",
                reason=reason,
                in_use=gate.in_use,
                capacity=gate.capacity,
                waiting=gate.waiting,
                top_holders=[
                    {
                        "count": g.count,
                        "fingerprint": g.fingerprint,
                        "statement": g.statement,
                        "site": g.site,
                        "oldest_s": round(g.oldest, 3),
                        "youngest_s": round(g.youngest, 3),
                        "running": g.running,
                        "idle_in_transaction": g.idle_in_transaction,
                        "tags": list(g.tags),
                        "on_wire": g.on_wire,
                        "on_wire_what": g.on_wire_what,
                    }
                    for g in groups[:5]
                ],
                summary=summary,
                pgbouncer=None if bouncer is None else bouncer.summary(),
            )
        return groups
