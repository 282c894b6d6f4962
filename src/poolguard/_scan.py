"""The guard's once-a-second scan, and the per-checkout extras that ride on it.

The guarded pool calls :meth:`Scanner.after_checkout` only from the time in
``hooks.call_at`` on: the next scan, or always while some per-checkout extra
is on (call site, a half-open breaker's probe). An asyncio pool's checkout
records its task itself (``hooks.asyncio``, past ``hooks.slow_at``: the one
threshold a synchronous checkout compares with). The scan warns about leaks,
keeps the log and the exporter current, evaluates the alerts and logs the
``load.shed`` summary. Each scan also samples the holds for culprit
attribution (``_culprit.py``); under pressure the samples come faster than
the scans, between them.
"""

from __future__ import annotations

import threading
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._culprit import Culprits, ShedSummary
from ._hold import SITE
from ._sites import current_site

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._breakers import Breakers
    from ._diagnostics import Diagnostics
    from ._fleet import Fleet
    from ._hold import Hold
    from ._hooks import CheckoutHooks
    from ._parts import GuardParts

__all__ = ["Scanner"]

_SCAN_INTERVAL = 1.0


class Scanner:
    """Runs one guard's periodic scan and its checkouts' extras."""

    def __init__(
        self,
        hooks: CheckoutHooks,
        parts: GuardParts,
        diagnostics: Diagnostics,
        breakers: Breakers,
        *,
        is_async: Callable[[], bool],
        changed: Callable[[], None],
        exporter: Callable[[], Any],
        fleet: Fleet | None = None,
    ) -> None:
        self._fleet = fleet
        self._config = parts.config
        self._log = parts.log
        self._hooks = hooks
        self._diagnostics = diagnostics
        self._breakers = breakers
        #: Sheds counted for the ``load.shed`` summary.
        self.shed_summary = ShedSummary()
        #: Attribution and culprit isolation, sampled here.
        self.culprits = self._culprits = Culprits(
            parts,
            breakers,
            hooks.recorder,
            changed=changed,
            sheds=lambda: self.shed_summary.total + hooks.recorder.timeouts,
            maybe_scan=self.maybe_scan,
        )
        #: perf_counter() time of the next full scan (samples may come between).
        self.next_full = 0.0
        self._is_async = is_async
        self._exporter = exporter
        self._lock = threading.Lock()
        #: perf_counter() time of the next scan (``inf``: none, tests run it by hand).
        self.next_scan = 0.0
        #: The longest checkout wait since the last scan (the wait_time alert).
        self.wait_max = 0.0

    def note_wait(self, waited: float) -> None:
        """A checkout waited ``waited`` seconds."""
        self.wait_max = max(self.wait_max, waited)

    def update_slow_at(self) -> None:
        """Tell the pool from when on a checkout must call :meth:`after_checkout`."""
        hooks = self._hooks
        # tripped: a half-open probe's checkout records its outcome there.
        # An asyncio pool's checkout records its task itself (hooks.asyncio),
        # without a call: past slow_at, before call_at.
        is_async = hooks.asyncio = self._is_async()
        extras = self._config().capture_call_sites or hooks.tripped or self._unlooked()
        hooks.call_at = float("-inf") if extras else self.next_scan
        hooks.slow_at = float("-inf") if extras or is_async else self.next_scan

    def after_checkout(self, hold: Hold, now: float, conn: Any = None) -> None:
        """Extras of a checkout: call site, the periodic scan, a first look for a pooler."""
        if self._config().capture_call_sites:
            hold[SITE] = current_site(3)
        if self._hooks.tripped:  # a half-open probe got a working connection
            self._breakers.probe_succeeded()
        if conn is not None and self._unlooked():
            # A pool wrapped with its connections open: one round trip, once,
            # on the checkout's own thread (behind a pooler, waits must be
            # told from failures from the first request on).
            pooler = self._fleet.pooler() if self._fleet is not None else None
            if pooler is not None:
                pooler.look_at(conn.dbapi_connection)
            self.update_slow_at()
        self.maybe_scan(now)

    def _unlooked(self) -> bool:
        fleet = self._fleet
        pooler = fleet.pooler() if fleet is not None else None
        return pooler is not None and pooler.unlooked

    def maybe_scan(self, now: float) -> None:
        """Run :meth:`scan` if a second has passed since the last one."""
        if now >= self.next_scan and self._lock.acquire(blocking=False):
            try:
                if now >= self.next_scan:
                    full = now >= self.next_full
                    if full:
                        self.next_full = now + _SCAN_INTERVAL
                    self.next_scan = min(self.next_full, now + self._culprits.interval())
                    self.update_slow_at()
                    self._culprits.sample(now)
                    if self._fleet is not None:
                        self._fleet.sample(now)
                    if full:
                        self.scan(now)
            finally:
                self._lock.release()

    def scan(self, now: float | None = None) -> None:
        """Check for connections held too long and evaluate the alerts."""
        now = perf_counter() if now is None else now
        self._diagnostics.scan_leaks(now)
        self._log.refresh()
        exporter = self._exporter()
        if exporter is not None:
            exporter.poll()  # an SDK installed since wrap(): keep samples from now on
        wait_max, self.wait_max = self.wait_max, 0.0
        self._diagnostics.check_alerts(now, wait_max)
        self.shed_summary.emit(self._log, now)
