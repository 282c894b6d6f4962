"""The :class:`Guard`: one per guarded engine, shared by the pools it recreates.

It owns the gate, the recorder (stats storage), the event log and the
diagnostics, and it is where the hot path hands off anything that is not
cheap: the slow path of a checkout, a slow statement, the once-a-second scan
for leaks and alerts.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy.pool import Pool, QueuePool

from ._attach import ConnectionEvents, time_creator, untime_creator
from ._breakers import Breakers
from ._checkout import SlowCheckout
from ._compat import (
    capacity,
    checked_out_records,
    is_asyncio,
    pool_dialect,
    pool_gauges,
)
from ._diagnostics import Diagnostics
from ._gate import Gate
from ._hold import SITE, TASK, Hold, new_hold
from ._hooks import CheckoutHooks
from ._log import EventLog
from ._policies import BACKGROUND, CRITICAL, NORMAL, Codel, Gradient2, reserve_size, tag_cap
from ._recorder import Recorder
from ._retries import RetryBudget
from ._sites import current_site
from ._stats import PoolStats, QueryStats

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine

    from ._alerts import AlertEvent
    from ._config import Config
    from ._holders import Holder, HolderGroup
    from ._queries import QueryTimer
    from .breaker import CircuitBreaker, TagBreaker

__all__ = ["Guard"]

_SCAN_INTERVAL = 1.0


class Guard:
    """Gate, options, stats and diagnostics of one guarded engine.

    Get it with :func:`poolguard.get_guard`; :func:`poolguard.wrap` makes it.
    """

    def __init__(self, config: Config, *, default_name: str) -> None:
        self._default_name = default_name
        self.config = config
        self.name = config.name or default_name
        self.gate = Gate(None)
        self.recorder = Recorder()
        #: What the guarded pool reads of this guard on each checkout and checkin.
        self.hooks = CheckoutHooks(self.recorder)
        self.log = EventLog(self.name)
        self.log.refresh()
        self._pool: Pool | None = None
        self._engine: Engine | None = None
        self._queries: QueryTimer | None = None
        #: Connections opened, closed and invalidated (the pool's events).
        self.connections = ConnectionEvents()
        self._lock = threading.Lock()
        #: Checkouts refused before waiting, by (reason, priority).
        self.rejections: dict[tuple[str, str], int] = {}
        #: Leak warnings, alerts and the holders report.
        self.diagnostics = Diagnostics(
            self.log, gate=lambda: self.gate, config=lambda: self.config,
            db_system=lambda: self.db_system,
        )
        # Bound once: the pool calls it directly.
        self.after_checkin = self.diagnostics.returned_after_warning
        #: The circuit breakers, guard-wide and per tag.
        self.breakers = Breakers(
            self.log, changed=self._breaker_changed, tripped=lambda: self.hooks.tripped,
            in_use=lambda: self.gate.in_use, reject=self._reject,
            acquire_timeout=self.acquire_timeout, dialect=self._driver_dialect,
            db_system=lambda: self.db_system,
        )
        #: The slow path of a checkout (wait, shed, time out).
        self.checkout = SlowCheckout(
            self.log, self.recorder, self.breakers, gate=lambda: self.gate,
            acquire_timeout=self.acquire_timeout, maybe_scan=self.maybe_scan,
            note_wait=self._note_wait, reject=self._reject,
            exhausted=self.diagnostics.exhausted,
        )
        self.acquire_slow = self.checkout.acquire
        # Bound once: the pool and the statement timer call these directly.
        self.breaker_admit = self.breakers.admit
        self.breaker_record = self.breakers.record
        #: Some breaker records outcomes (guard-wide or per tag): one check per statement.
        self.breakers_on = False
        # Held while a pool is attached: a recreate() (engine.dispose()) or a
        # checkout racing wrap() waits for the whole gate, never half of it.
        self._attach_lock = threading.RLock()
        self.retry_budget: RetryBudget | None = None
        self._interval_wait_max = 0.0
        self._scan_lock = threading.Lock()
        self._next_scan = 0.0
        self._async = False
        self.exporter: Any = None
        self._exporter_settings: tuple[Any, ...] = ()
        self._setup()

    # -- set-up ---------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Apply new options; the gate, its permits and the counters stay."""
        self.config = config
        self.name = config.name or self._default_name
        self.log.pool_name = self.name
        self.log.refresh()
        self._setup()

    def _setup(self) -> None:
        cfg = self.config
        #: Read per statement; a copy of the option, so one attribute hop.
        self.slow_query_threshold = cfg.slow_query_threshold
        #: Some statement time limit is configured guard-wide or per tag.
        # statement_timeout=0 means no limit.
        self.limits_on = bool(cfg.statement_timeout) or bool(cfg.tag_statement_timeouts)
        self.diagnostics.configure(cfg)
        self._apply_policies()
        if self.retry_budget is not None:
            self.retry_budget.ratio = cfg.retry_budget
        self.breakers.configure(cfg)
        self.breakers_on = self.breakers.on
        self._update_slow_at()

    def _refresh_tripped(self) -> None:
        # Checkouts consult breaker_admit while any breaker is not closed.
        self.hooks.tripped = self.breakers.not_closed()

    def _breaker_changed(self) -> None:
        self._refresh_tripped()
        self._update_slow_at()

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The circuit breaker (``breaker=True``), else None."""
        return self.breakers.breaker

    @property
    def tag_breakers(self) -> dict[str, TagBreaker]:
        """The breakers of request tags (``breaker_per_tag=True``), by tag."""
        return self.breakers.tag_breakers

    def _driver_dialect(self) -> Any:
        engine = self._engine
        return engine.dialect if engine is not None else pool_dialect(self._pool)

    def _note_wait(self, waited: float) -> None:
        self._interval_wait_max = max(self._interval_wait_max, waited)

    def retry_after(self) -> float:
        """Seconds after which a shed request has a fair chance (0.1 s to 30 s)."""
        return self.checkout.retry_after()

    def _reject(self, reason: str, priority: str) -> None:
        key = (reason, priority)
        with self._lock:
            self.rejections[key] = self.rejections.get(key, 0) + 1

    def _apply_policies(self) -> None:
        cfg = self.config
        gate = self.gate
        capacity = gate.capacity
        if not cfg.policies_on or capacity is None:
            gate.configure_policy()
            return
        gate.configure_policy(
            reserved=reserve_size(cfg.reserved_critical, capacity),
            max_waiting={
                CRITICAL: cfg.max_waiting_critical,
                NORMAL: cfg.max_waiting_normal,
                BACKGROUND: cfg.max_waiting_background,
            },
            codel=Codel(cfg.codel_target, cfg.codel_interval) if cfg.codel else None,
            tag_caps={
                tag: tag_cap(limit, capacity) for tag, limit in (cfg.tag_limits or {}).items()
            },
            adaptive=Gradient2(capacity) if cfg.adaptive_limit else None,
        )

    def _update_slow_at(self) -> None:
        # tripped: a half-open probe's checkout records its outcome there.
        extras = self.config.capture_call_sites or self._async or self.hooks.tripped
        self.hooks.slow_at = float("-inf") if extras else self._next_scan

    @property
    def db_system(self) -> str:
        """``db.system.name`` of the engine's database (``postgresql``, ``mariadb``, ...)."""
        engine = self._engine
        if engine is None:
            return "other_sql"
        dialect = engine.dialect
        if dialect.name == "mysql" and getattr(dialect, "is_mariadb", False):
            return "mariadb"
        return {"postgresql": "postgresql", "mysql": "mysql", "sqlite": "sqlite",
                "mssql": "microsoft.sql_server", "oracle": "oracle.db"}.get(dialect.name,
                                                                            dialect.name)

    @property
    def pool(self) -> Pool:
        """The pool currently guarded (a new one after ``engine.dispose()``)."""
        if self._pool is None:
            raise RuntimeError(f"guard {self.name!r} is not attached to a pool")
        return self._pool

    def _attach(self, pool: Pool) -> None:
        """Guard ``pool``: the first pool, or one recreated by ``dispose()``.

        Everything is built before the pool sees its gate: a ``dispose()``
        (which recreates the pool and attaches it here) or a checkout racing
        this waits on the attach lock and finds the finished gate.
        """
        with self._attach_lock:
            first = self._pool is None
            # Known first, so that a recreate() meanwhile attaches its copy
            # here (and waits for this attach) instead of leaving it unguarded.
            pool._poolguard = self  # type: ignore[attr-defined]
            pool._poolguard_hooks = self.hooks  # type: ignore[attr-defined]
            adopted: dict[object, Hold] = {}
            if first:
                # Connections already checked out (wrap() of a busy engine)
                # hold capacity without a permit: adopt them, so that their
                # return gives the permit back like any other.
                records = checked_out_records(pool)
                use = self.recorder.use
                gate = Gate(capacity(pool), adopted=len(records), checkins=lambda: use.count)
                now = perf_counter()
                for record in records:
                    adopted[record] = gate.out[record] = new_hold(now, 0.0, 0, None)
                self.gate = gate
                self.retry_budget = RetryBudget(self.config.retry_budget, lambda: gate.acquired)
                self._apply_policies()
                self.connections.listen(pool)
            else:
                self.connections.relisten(pool)
            self._pool = pool
            self._async = is_asyncio(pool)
            time_creator(
                pool, self.recorder, self.log, retries=lambda: self.config.connect_retries,
                budget=lambda: self.retry_budget, acquire_timeout=self.acquire_timeout,
            )
            self._update_slow_at()
            # An adopted connection returned before the gate is published goes
            # back without its permit: give it back here, once. Swept before
            # publishing (nobody else touches these holds yet) and after (for
            # one returned in between).
            self._release_returned(adopted)
            # Published last: a checkout or checkin sees the whole gate or none.
            pool._poolguard_gate = self.gate  # type: ignore[attr-defined]
            self._release_returned(adopted)

    def _release_returned(self, adopted: dict[object, Hold]) -> None:
        out = self.gate.out
        for record, hold in list(adopted.items()):
            if getattr(record, "fairy_ref", None) is None and out.get(record) is hold:
                del adopted[record]
                if out.pop(record, None) is hold:
                    self.gate.release()

    def _wait_attached(self) -> None:
        """Return once no attach is under way (the gate is whole)."""
        with self._attach_lock:
            pass

    def _attach_engine(self, engine: Engine) -> None:
        """Time the engine's statements (once per engine); metrics as configured."""
        if self._engine is not engine:
            from ._queries import QueryTimer

            if self._queries is not None:
                self._queries.remove()
            self._engine = engine
            self._queries = QueryTimer(self, engine)
        self._setup_exporter()

    def _setup_exporter(self) -> None:
        # A second wrap() may change metrics, metrics_legacy_names or
        # meter_provider: start over with the new ones.
        cfg = self.config
        wanted = (cfg.metrics, cfg.metrics_legacy_names, cfg.meter_provider)
        if self.exporter is not None and self._exporter_settings != wanted:
            self.exporter.close()
            self.exporter = None
        if cfg.metrics and self.exporter is None:
            from ._otel import Exporter

            self.exporter = Exporter(self)
        self._exporter_settings = wanted

    def _detach(self) -> None:
        """Stop guarding: listeners off, waiters let through to the pool."""
        pool = self._pool
        if pool is not None:
            self.connections.unlisten(pool)
            untime_creator(pool)
        self.connections.clear()
        if self._queries is not None:
            self._queries.remove()
            self._queries = None
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None
        self._engine = None
        self.gate.close()
        self._pool = None

    def on_alert(self, callback: Callable[[AlertEvent], None]) -> Callable[[AlertEvent], None]:
        """Call ``callback(AlertEvent)`` when an alert fires or clears (usable as a decorator).

        Callbacks run on the thread that noticed the change, once per change;
        an exception in one is logged and does not affect the others.
        """
        self.diagnostics.alert_callbacks.append(callback)
        return callback

    # -- the slow path of a checkout -----------------------------------------

    def acquire_timeout(self) -> float | None:
        """The guard-wide acquire timeout in seconds (the pool's own if unset);
        ``None``: wait as long as it takes (SQLAlchemy's ``pool_timeout=None``)."""
        timeout = self.config.acquire_timeout
        if timeout is not None:
            return timeout
        pool = self._pool
        if isinstance(pool, QueuePool):
            return pool.timeout()
        return 30.0

    # -- per checkout and checkin, off the fast path -------------------------

    def after_checkout(self, hold: Hold, now: float) -> None:
        """Extras of a checkout: asyncio task, call site, the periodic scan."""
        if self._async:
            import asyncio

            try:
                hold[TASK] = asyncio.current_task()
            except RuntimeError:
                hold[TASK] = None
        if self.config.capture_call_sites:
            hold[SITE] = current_site(3)
        if self.hooks.tripped:  # a half-open probe got a working connection
            self.breakers.probe_succeeded()
        self.maybe_scan(now)

    # -- the once-a-second scan ----------------------------------------------

    def maybe_scan(self, now: float) -> None:
        """Run :meth:`scan` if a second has passed since the last one."""
        if now >= self._next_scan and self._scan_lock.acquire(blocking=False):
            try:
                if now >= self._next_scan:
                    self._next_scan = now + _SCAN_INTERVAL
                    self._update_slow_at()
                    self.scan(now)
            finally:
                self._scan_lock.release()

    def scan(self, now: float | None = None) -> None:
        """Check for connections held too long and evaluate the alerts."""
        now = perf_counter() if now is None else now
        self.diagnostics.scan_leaks(now)
        self.log.refresh()
        exporter = self.exporter
        if exporter is not None:
            exporter.poll()  # an SDK installed since wrap(): keep samples from now on
        wait_max, self._interval_wait_max = self._interval_wait_max, 0.0
        self.diagnostics.check_alerts(now, wait_max)

    # -- diagnostics ----------------------------------------------------------

    def holders(self) -> list[Holder]:
        """Every connection checked out now: age, statement, tag, site."""
        return self.diagnostics.holders()

    def holders_report(self, *, fresh: bool = False) -> list[HolderGroup]:
        """Holders grouped by statement and site, biggest group first.

        Reused for up to a second unless ``fresh``: a storm of timeouts
        builds it once.
        """
        return self.diagnostics.holders_report(fresh=fresh)

    @property
    def leak_warnings(self) -> int:
        """``connection.held_too_long`` warnings logged so far."""
        return self.diagnostics.leak_warnings

    @property
    def exhaustion_events(self) -> int:
        """``pool.exhausted`` events logged so far."""
        return self.diagnostics.exhaustion_events

    # -- statements ------------------------------------------------------------

    def top_queries(self, n: int = 10, *, by: str = "total_time") -> list[QueryStats]:
        """The ``n`` statement shapes with the most ``by`` (a :class:`QueryStats` field)."""
        names = [f.name for f in dataclasses.fields(QueryStats)]
        if by not in names:  # checked whatever the data: a typo fails on an idle guard too
            expected = ", ".join(names)
            raise ValueError(f"top_queries by={by!r} is invalid: expected one of {expected}")
        rows = [QueryStats.of(stat) for stat in list(self.recorder.queries.values())]
        rows.sort(key=lambda r: getattr(r, by), reverse=True)
        return rows[:n]

    def log_top_queries(self, n: int = 10, *, by: str = "total_time") -> list[QueryStats]:
        """Log ``queries.top`` with :meth:`top_queries` and return them."""
        top = self.top_queries(n, by=by)
        self.log.emit(
            logging.INFO,
            "queries.top",
            by=by,
            queries=[dataclasses.asdict(q) for q in top],
        )
        return top

    # -- reading --------------------------------------------------------------

    def stats(self) -> PoolStats:
        """An immutable snapshot of the pool's gauges and the guard's counters."""
        pool = self._pool
        gate = self.gate
        pool_size, max_overflow, idle, in_use = pool_gauges(pool, gate.in_use)
        permits = gate.in_use
        acquisitions = gate.acquired
        with gate._lock:
            waiting = gate.waiting
            waits = gate.waits
        recorder = self.recorder
        # Every wait, granted or not, plus the checkouts that never waited as
        # 0 s: returned ones and those out now, less those that waited (the
        # exporter counts alike). wait_time_total and wait_time_max are read
        # from it, so they are the histogram's sum and max by construction.
        wait_time = recorder.wait_snapshot(
            max(0, recorder.use.count + len(gate.out) - recorder.wait.count)
        )
        opened, closed, invalidated = self.connections.counts()
        return PoolStats(
            name=self.name,
            pool_class=type(pool).__name__ if pool is not None else "",
            pool_size=pool_size,
            max_overflow=max_overflow,
            capacity=gate.capacity,
            in_use=in_use,
            idle=idle,
            waiting=waiting,
            permits=permits,
            acquisitions=acquisitions,
            waits=waits,
            wait_time_total=wait_time.sum,
            wait_time_max=wait_time.max,
            # PoolTimeouts raised: the gate's own count also has queue_delay
            # sheds, which are rejections.
            timeouts=recorder.timeouts,
            connections_opened=opened,
            connections_closed=closed,
            connections_invalidated=invalidated,
            leak_warnings=self.diagnostics.leak_warnings,
            use_time=self.recorder.use.snapshot(),
            wait_time=wait_time,
            create_time=self.recorder.create.snapshot(),
        )

    def __repr__(self) -> str:
        gate = self.gate
        return f"<Guard {self.name!r} permits={gate.in_use}/{gate.capacity} waiting={gate.waiting}>"

