"""The :class:`Guard`, the front of one guarded engine: its documented API and the wiring.

One per guarded engine, shared by the pools it recreates. Each job lives in
a module of its own, given narrow collaborators: ``_breakers`` (circuit
breakers), ``_checkout`` (the slow path of a checkout), ``_scan`` and
``_diagnostics`` (the periodic scan, leaks, alerts, exhaustion reports),
``_attach`` (what a pool gets: gate, counters, creator timing),
``_queries`` (statement timing and events), ``_otel`` (metrics),
``_fleet`` (fleet budgets, PgBouncer's own numbers).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import TYPE_CHECKING, Any

from ._admission import admission
from ._attach import (
    ConnectionEvents,
    adopting_gate,
    release_returned,
    time_creator,
    untime_creator,
)
from ._breakers import Breakers
from ._checkout import SlowCheckout
from ._compat import db_system, is_asyncio, pool_dialect, pool_timeout
from ._diagnostics import Diagnostics
from ._fleet import Fleet
from ._gate import Gate
from ._hooks import CheckoutHooks
from ._log import EventLog
from ._parts import GuardParts
from ._pooler import PoolerErrors
from ._recorder import Recorder
from ._retries import RetryBudget
from ._scan import Scanner
from ._stats import PoolStats, QueryStats, pool_stats, top_queries

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    from ._alerts import AlertEvent
    from ._config import Config
    from ._hold import Hold
    from ._holders import Holder, HolderGroup
    from ._queries import QueryTimer
    from .breaker import CircuitBreaker, TagBreaker

__all__ = ["Guard"]



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
        parts = GuardParts(
            self.log, config=lambda: self.config, gate=lambda: self.gate,
            db_system=lambda: self.db_system, acquire_timeout=self.acquire_timeout,
            reject=self._reject,
        )
        #: Fleet budgets, and PgBouncer's own numbers (pgbouncer_admin_url).
        self.fleet = Fleet(parts, guard=self)
        self.diagnostics = Diagnostics(parts, upstream=self.fleet.pgbouncer)
        # Bound once: the pool calls it directly.
        self.after_checkin = self.diagnostics.returned_after_warning
        #: The circuit breakers, guard-wide and per tag.
        self.breakers = Breakers(
            parts, changed=self._breaker_changed, tripped=lambda: self.hooks.tripped,
            dialect=self._driver_dialect,
        )
        #: The once-a-second scan, and the extras of a checkout that ride on it.
        self.scanner = Scanner(
            self.hooks, parts, self.diagnostics, self.breakers,
            is_async=lambda: self._async, changed=self._breaker_changed,
            exporter=lambda: self.exporter, fleet=self.fleet)
        #: Who holds the pool (``culprits.attribution()``), and culprit isolation.
        self.culprits = self.scanner.culprits
        self.after_checkout = self.scanner.after_checkout
        self._update_slow_at = self.scanner.update_slow_at
        self.maybe_scan = self.scanner.maybe_scan
        self.note_wait = self.scanner.note_wait
        #: The slow path of a checkout (wait, shed, time out).
        self.checkout = SlowCheckout(
            parts, self.recorder, self.breakers, maybe_scan=self.maybe_scan,
            note_wait=self.note_wait, exhausted=self.diagnostics.exhausted,
        )
        self.acquire_slow = self.checkout.acquire
        #: PgBouncer's saturation errors, worded and counted.
        self.pooler = PoolerErrors(parts, self.recorder,
                                   url=lambda: self._engine.url if self._engine else None,
                                   retry_after=self.retry_after)
        # Bound once: the pool and the statement timer call these directly.
        self.breaker_admit = self.culprits.admit  # an isolated tag's checkout, then breakers
        self.breaker_record = self.breakers.record
        #: Some breaker records outcomes (guard-wide or per tag): one check per statement.
        self.breakers_on = False
        # Held while a pool is attached: a recreate() (engine.dispose()) or a
        # checkout racing wrap() waits for the whole gate, never half of it.
        self._attach_lock = threading.RLock()
        self.retry_budget: RetryBudget | None = None
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
        self.culprits.configure(cfg)
        self.breakers.configure(cfg)
        self.breakers_on = self.breakers.on
        self._update_slow_at()

    def _breaker_changed(self) -> None:
        # Checkouts consult breaker_admit while a breaker is not closed or a tag is isolated.
        self.hooks.tripped = self.breakers.not_closed() or self.culprits.tags_on
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

    def retry_after(self) -> float:
        """Seconds after which a shed request has a fair chance (0.1 s to 30 s)."""
        return self.checkout.retry_after()

    def _reject(self, reason: str, priority: str) -> None:
        key = (reason, priority)
        self.scanner.shed_summary.add(reason, priority)
        with self._lock:
            self.rejections[key] = self.rejections.get(key, 0) + 1

    def _apply_policies(self) -> None:
        gate = self.gate
        gate.configure_policy(admission(self.config, gate.capacity))

    def scan(self, now: float | None = None) -> None:
        """Check for connections held too long and evaluate the alerts."""
        self.scanner.scan(now)

    @property
    def db_system(self) -> str:
        """``db.system.name`` of the engine's database (``postgresql``, ``mariadb``, ...)."""
        engine = self._engine
        return "other_sql" if engine is None else db_system(engine.dialect)

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
                gate, adopted = adopting_gate(pool, self.recorder)
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
                pooler=self.pooler,
            )
            self._update_slow_at()
            # An adopted connection returned before the gate is published goes
            # back without its permit: give it back here, once. Swept before
            # publishing (nobody else touches these holds yet) and after (for
            # one returned in between).
            release_returned(self.gate, adopted)
            # Published last: a checkout or checkin sees the whole gate or none.
            pool._poolguard_gate = self.gate  # type: ignore[attr-defined]
            release_returned(self.gate, adopted)

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
        self.fleet.configure(self.config)

    def _setup_exporter(self) -> None:
        from ._otel import refresh_exporter

        self.exporter, self._exporter_settings = refresh_exporter(
            self, self.exporter, self._exporter_settings)

    def _detach(self) -> None:
        """Stop guarding: listeners off, waiters let through to the pool."""
        pool = self._pool
        if pool is not None:
            self.connections.unlisten(pool)
            untime_creator(pool)
        self.connections.clear()
        self.fleet.stop()
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

    def acquire_timeout(self) -> float | None:
        """The guard-wide acquire timeout in seconds (the pool's own if unset);
        ``None``: wait as long as it takes (SQLAlchemy's ``pool_timeout=None``)."""
        timeout = self.config.acquire_timeout
        return timeout if timeout is not None else pool_timeout(self._pool)

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
        return top_queries(list(self.recorder.queries.values()), n, by)

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
        return pool_stats(
            self.name, self._pool, self.gate, self.recorder, self.connections.counts(),
            self.diagnostics.leak_warnings, self.fleet.pgbouncer(),
        )

    def __repr__(self) -> str:
        gate = self.gate
        return f"<Guard {self.name!r} permits={gate.in_use}/{gate.capacity} waiting={gate.waiting}>"

