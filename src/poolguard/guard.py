"""The :class:`Guard`: one per guarded engine, shared by the pools it recreates.

It owns the gate, the recorder (stats storage), the event log and the
diagnostics, and it is where the hot path hands off anything that is not
cheap: the slow path of a checkout, a slow statement, the once-a-second scan
for leaks and alerts.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
import weakref
from contextvars import ContextVar
from time import perf_counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.pool import NullPool, Pool, QueuePool, SingletonThreadPool, StaticPool

from .alerts import Alert, AlertEvent
from .breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    CircuitBreaker,
    TagBreaker,
    default_classifier,
)
from .context import RequestContext, _current
from .errors import CircuitOpen, LoadShed, PoolTimeout
from .gate import Gate, Refused, _Waiter
from .holders import Holder, HolderGroup, describe_groups, group_holders, holders
from .log import EventLog
from .policies import BACKGROUND, CRITICAL, NORMAL, Codel, Gradient2, reserve_size, tag_cap
from .queries import _gate_wait
from .recorder import (
    REQUEST,
    SHED,
    SITE,
    T0,
    TASK,
    TIMED_OUT,
    WAIT,
    WARNED,
    Hold,
    Recorder,
    new_hold,
)
from .retries import RetryBudget, connect_with_retries
from .sites import current_site
from .stats import PoolStats, QueryStats
from .timeouts import is_timeout_error

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from sqlalchemy.engine import Engine
    from tenacity import RetryCallState

    from .config import Config
    from .fingerprint import Fingerprint
    from .pool import GuardedPoolMixin
    from .queries import QueryTimer

__all__ = ["Guard"]

_EVENTS = ("connect", "close", "close_detached", "invalidate")
_SCAN_INTERVAL = 1.0
#: A holders report is reused for this long: a storm of timeouts builds one.
_REPORT_TTL = 1.0
_EXHAUSTED_LOG_INTERVAL = 10.0
#: Tags with a breaker of their own (``breaker_per_tag``); later tags have none.
_MAX_TAG_BREAKERS = 100


def _capacity(pool: Pool) -> int | None:
    """How many connections ``pool`` can hand out at once (``None``: no limit)."""
    if isinstance(pool, QueuePool):
        size = pool.size()
        overflow = pool._max_overflow
        if size == 0 or overflow < 0:
            return None
        return size + overflow
    return None


def _checked_out_records(pool: Pool) -> list[object]:
    """The records of ``pool`` checked out now (one-off, at wrap).

    Found without a walk of the heap: SQLAlchemy registers every checked-out
    connection, 2.1 as a ``weakref.finalize`` of its ``_ConnectionFairy``
    (``_finalize_fairy(None, record, pool, ...)``), 2.0 in the module dict
    ``_strong_ref_connection_records``. One pass over that registry costs
    the connections checked out in the process, not the objects alive in it.
    """
    if not isinstance(pool, QueuePool) or pool.checkedout() <= 0:
        return []
    from sqlalchemy.pool import base
    from sqlalchemy.pool.base import _ConnectionRecord

    candidates: Iterable[object]
    strong = getattr(base, "_strong_ref_connection_records", None)
    registry = getattr(weakref.finalize, "_registry", None)
    if isinstance(strong, dict):  # SQLAlchemy 2.0
        candidates = list(strong.copy().values())
    elif isinstance(registry, dict):  # SQLAlchemy 2.1
        finalize_fairy = getattr(base, "_finalize_fairy", None)
        candidates = [
            info.args[1]
            for info in registry.copy().values()
            if info.func is finalize_fairy and len(info.args) > 2 and info.args[2] is pool
        ]
    else:  # neither: an unknown SQLAlchemy or Python; the slow way
        candidates = gc.get_objects()
    return [
        obj
        for obj in candidates
        if isinstance(obj, _ConnectionRecord)
        and obj._ConnectionRecord__pool is pool  # type: ignore[attr-defined]
        and obj.fairy_ref is not None
    ]


#: The half-open probe slots the checkout under way in this context (thread,
#: or asyncio task) took in :meth:`Guard.breaker_admit`: the guard, the
#: breaker and the half-open period of its slot, the tag's breaker and its
#: period. The checkout's outcome, or its forfeit, clears it: a probe that
#: never gets an outcome must not keep its slot (a breaker half-open for good).
_Probe = tuple["Guard", "CircuitBreaker | None", int, "TagBreaker | None", int]
_probe: ContextVar[_Probe | None] = ContextVar("poolguard_probe", default=None)


def _give_up_at(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` past which no retry starts (None: no limit)."""
    return None if timeout is None else time.monotonic() + timeout


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
        self.log = EventLog(self.name)
        self.log.refresh()
        self._pool: GuardedPoolMixin | None = None
        self._engine: Engine | None = None
        self._queries: QueryTimer | None = None
        self._listeners: list[tuple[str, Callable[..., None]]] = []
        self._lock = threading.Lock()
        self._opened = 0
        self._closed = 0
        self._invalidated = 0
        self.leak_warnings = 0
        self.exhaustion_events = 0
        #: Checkouts refused before waiting, by (reason, priority).
        self.rejections: dict[tuple[str, str], int] = {}
        #: The circuit breaker (``breaker=True``), else None.
        self.breaker: CircuitBreaker | None = None
        #: The breakers of request tags (``breaker_per_tag=True``), by tag.
        self.tag_breakers: dict[str, TagBreaker] = {}
        self._tag_settings: BreakerConfig | None = None
        #: Some breaker records outcomes (guard-wide or per tag): one check per statement.
        self.breakers_on = False
        self._breaker_lock = threading.Lock()
        self._classify: Callable[[BaseException], bool] = default_classifier
        self._classifier_failed = False
        # Held while a pool is attached: a recreate() (engine.dispose()) or a
        # checkout racing wrap() waits for the whole gate, never half of it.
        self._attach_lock = threading.RLock()
        self.retry_budget: RetryBudget | None = None
        self._explained: set[str] = set()
        self._alert_callbacks: list[Callable[[AlertEvent], None]] = []
        self._alerts: list[Alert] = []
        self._interval_wait_max = 0.0
        self._report: tuple[float, list[HolderGroup]] | None = None
        self._exhausted_logged_at = -_EXHAUSTED_LOG_INTERVAL
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
        alerts = []
        if cfg.alert_utilization is not None:
            alerts.append(Alert("utilization", cfg.alert_utilization, cfg.alert_for))
        if cfg.alert_wait_time is not None:
            alerts.append(Alert("wait_time", cfg.alert_wait_time, cfg.alert_for))
        self._alerts = alerts
        self._apply_policies()
        self._setup_breaker()
        self._update_slow_at()

    def _setup_breaker(self) -> None:
        cfg = self.config
        if self.retry_budget is not None:
            self.retry_budget.ratio = cfg.retry_budget
        classify = cfg.breaker_classifier or default_classifier
        if classify is not self._classify:
            self._classify = classify
            self._classifier_failed = False
        settings = BreakerConfig(
            window=cfg.breaker_window,
            window_size=cfg.breaker_window_size,
            minimum_calls=cfg.breaker_minimum_calls,
            failure_rate=cfg.breaker_failure_rate,
            slow_call_rate=cfg.breaker_slow_call_rate,
            slow_call_duration=cfg.breaker_slow_call_duration,
            wait_in_open=cfg.breaker_wait_in_open,
            half_open_calls=cfg.breaker_half_open_calls,
        )
        with self._breaker_lock:
            if not cfg.breaker:
                self.breaker = None
            elif self.breaker is None or self.breaker.config != settings:
                self.breaker = CircuitBreaker(settings)
            if not cfg.breaker_per_tag or settings != self._tag_settings:
                self.tag_breakers = {}
            self._tag_settings = settings if cfg.breaker_per_tag else None
        self.breakers_on = self.breaker is not None or self._tag_settings is not None
        self._refresh_tripped()

    def _refresh_tripped(self) -> None:
        # Checkouts consult breaker_admit while any breaker is not closed.
        breaker = self.breaker
        self.gate.tripped = (breaker is not None and breaker.state != CLOSED) or any(
            b.state != CLOSED for b in list(self.tag_breakers.values())
        )

    def _tag_breaker(self, request: RequestContext | None) -> TagBreaker | None:
        """The breaker of the request's tag, made on first use (under _breaker_lock)."""
        if request is None or request.tag is None or self._tag_settings is None:
            return None
        breakers = self.tag_breakers
        breaker = breakers.get(request.tag)
        if breaker is None and len(breakers) < _MAX_TAG_BREAKERS:
            breaker = breakers[request.tag] = TagBreaker(self._tag_settings)
        return breaker

    # -- the circuit breaker ----------------------------------------------------

    def breaker_admit(self, pool: Pool) -> None:
        """A checkout while a breaker is not closed: a probe, or CircuitOpen."""
        breaker = self.breaker
        request = _current.get()
        now = perf_counter()
        allowed, entered, tag_entered = True, None, None
        retry_after = 0.0
        probe: CircuitBreaker | None = None
        tag_probe: TagBreaker | None = None
        reclaimed = 0
        with self._breaker_lock:
            if breaker is not None:
                if breaker.state == HALF_OPEN:
                    # A probe has its acquire wait, then wait_in_open, to report.
                    # (Waits without limit are given the pool's default 30 s.)
                    acquire = self.acquire_timeout()
                    reclaimed = breaker.reclaim(
                        now, breaker.config.wait_in_open + (30.0 if acquire is None else acquire))
                allowed, entered = breaker.allow(now)
                retry_after = breaker.retry_after(now)
                if allowed and breaker.state == HALF_OPEN:
                    probe = breaker
            tag_breaker = self.tag_breakers.get(request.tag) if (
                allowed and request is not None and request.tag is not None) else None
            if tag_breaker is not None and tag_breaker.state != CLOSED:
                allowed, tag_entered = tag_breaker.allow(now)
                retry_after = tag_breaker.retry_after(now)
                if not allowed and probe is not None:
                    probe.forfeit()  # its probe slot is not used after all
                    probe = None
                if allowed and tag_breaker.state == HALF_OPEN:
                    tag_probe = tag_breaker
                breaker = tag_breaker
            # Tied to this checkout: its outcome or its forfeit frees the slots.
            _probe.set(
                (self, probe, probe.probe_round if probe is not None else 0,
                 tag_probe, tag_probe.probe_round if tag_probe is not None else 0)
                if probe is not None or tag_probe is not None else None
            )
        if reclaimed:
            self.log.emit(logging.WARNING, "breaker.probes_reclaimed", probes=reclaimed)
        if entered is not None:
            self._breaker_changed(entered)
        if tag_entered is not None:
            self._breaker_changed(tag_entered, request.tag if request is not None else None)
        if allowed or breaker is None:
            return
        priority = request.priority if request is not None else NORMAL
        key = ("circuit_open", priority)
        with self._lock:
            self.rejections[key] = self.rejections.get(key, 0) + 1
        retry_after = max(retry_after, 0.05)
        if breaker is self.breaker:
            message = (f"pool {self.name!r}: circuit breaker {breaker.state}, the database is "
                       f"failing; not dialing it (retry after {retry_after:.1f}s)")
        else:
            tag = request.tag if request is not None else None
            message = (f"pool {self.name!r}: circuit breaker of tag {tag!r} {breaker.state}, "
                       f"its statements are slow or failing; not dialing the database "
                       f"(retry after {retry_after:.1f}s)")
        raise CircuitOpen(
            message,
            reason="circuit_open",
            priority=priority,
            retry_after=retry_after,
            pool_name=self.name,
        )

    def breaker_record(
        self,
        error: BaseException | None,
        duration: float,
        request: RequestContext | None = None,
    ) -> None:
        """Record one call's outcome (``error`` None: success) with the breaker,
        and with the breaker of ``request``'s tag (``breaker_per_tag``).

        The classifier sees SQLAlchemy's exception (a driver error is wrapped
        as SQLAlchemy wraps it). A call cancelled or interrupted (an exception
        that is not an :class:`Exception`) is no outcome: a probe it was
        gives its slot back.
        """
        if error is not None and not isinstance(error, Exception):
            self._probe_forfeit()
            return
        if self.gate.tripped and _probe.get() is not None:
            _probe.set(None)  # this checkout's outcome, recorded now
        breaker = self.breaker
        failed = error is not None and self._is_failure(error)
        now = perf_counter()
        entered = tag_entered = None
        with self._breaker_lock:
            if breaker is not None:
                entered = breaker.record(failed, duration, now)
            tag_breaker = self._tag_breaker(request)
            if tag_breaker is not None:
                tag_entered = tag_breaker.record(failed, duration, now)
        if entered is not None:
            self._breaker_changed(entered)
        if tag_entered is not None and request is not None:
            self._breaker_changed(tag_entered, request.tag)

    def _probe_forfeit(self) -> None:
        """The checkout under way gets no outcome (shed, cancelled, interrupted):
        give back the probe slots it took, if any, of their half-open period."""
        probe = _probe.get()
        if probe is None:
            return
        _probe.set(None)
        guard, breaker, probe_round, tag_breaker, tag_round = probe
        if guard is not self:
            return
        with self._breaker_lock:
            if breaker is not None:
                breaker.forfeit(probe_round)
            if tag_breaker is not None:
                tag_breaker.forfeit(tag_round)

    def _breaker_forfeit(self, request: RequestContext | None = None) -> None:
        # The former name, kept for callers written against it.
        self._probe_forfeit()

    def _probe_succeeded(self) -> None:
        # The checkout of a half-open probe got a working connection. A
        # checkout that was no probe (it passed the gate before the breaker
        # opened) is no evidence of recovery and records nothing.
        probe = _probe.get()
        if probe is None:
            return
        _probe.set(None)
        guard, breaker, probe_round = probe[0], probe[1], probe[2]
        if guard is not self or breaker is None:
            return  # a tag's probe: its statements are its outcome
        entered = None
        with self._breaker_lock:
            if (breaker is self.breaker and breaker.state == HALF_OPEN
                    and breaker.probe_round == probe_round):
                entered = breaker.record(False, 0.0, perf_counter())
        if entered is not None:
            self._breaker_changed(entered)

    def _is_failure(self, error: BaseException) -> bool:
        """The classifier's verdict on ``error``; the default's if it raises."""
        error = self._sqlalchemy_error(error)
        classify = self._classify
        try:
            return bool(classify(error))
        except Exception:
            # Never in place of the database error the caller is about to see.
            if not self._classifier_failed:
                self._classifier_failed = True
                logging.getLogger("poolguard").exception(
                    "pool %r: breaker_classifier %r raised on %s; the default classifier "
                    "decides instead (logged once)",
                    self.name, classify, type(error).__qualname__,
                )
            return default_classifier(error)

    def _sqlalchemy_error(self, error: BaseException) -> BaseException:
        """``error`` as SQLAlchemy raises it: a driver error wrapped in its
        ``sqlalchemy.exc.DBAPIError`` subclass (the driver's in ``.orig``)."""
        import sqlalchemy.exc as sa_exc

        if isinstance(error, sa_exc.SQLAlchemyError) or not isinstance(error, Exception):
            return error
        engine = self._engine
        dialect: Any = engine.dialect if engine is not None else getattr(
            self._pool, "_dialect", None)
        base = getattr(getattr(dialect, "dbapi", None), "Error", None)
        if not isinstance(base, type) or not isinstance(error, base):
            return error  # not the driver's (an OSError, a poolguard error)
        try:
            # As SQLAlchemy decides it for a failed connect: the error alone.
            invalidated = bool(dialect.is_disconnect(error, None, None))
        except Exception:  # noqa: BLE001 - a dialect that needs a connection to tell
            invalidated = False
        if is_timeout_error(self.db_system, error):
            # A statement cancelled on time is an OperationalError whatever
            # class the driver gives it (asyncpg's adapter: a bare Error).
            return sa_exc.OperationalError(
                None, None, error, connection_invalidated=invalidated
            )
        return sa_exc.DBAPIError.instance(
            None, None, error, base, connection_invalidated=invalidated, dialect=dialect
        )

    def _breaker_changed(self, state: str, tag: str | None = None) -> None:
        self._refresh_tripped()
        self._update_slow_at()
        level = logging.WARNING if state == OPEN else logging.INFO
        breaker = self.breaker if tag is None else self.tag_breakers.get(tag)
        fields: dict[str, Any] = {} if tag is None else {"tag": tag}
        self.log.emit(
            level,
            f"breaker.{state}",
            **fields,
            wait_in_open_s=breaker.config.wait_in_open if breaker else None,
            in_use=self.gate.in_use,
        )

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
        extras = self.config.capture_call_sites or self._async or self.gate.tripped
        self.gate.slow_at = float("-inf") if extras else self._next_scan

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

    def _attach(self, pool: GuardedPoolMixin) -> None:
        """Guard ``pool``: the first pool, or one recreated by ``dispose()``.

        Everything is built before the pool sees its gate: a ``dispose()``
        (which recreates the pool and attaches it here) or a checkout racing
        this waits on the attach lock and finds the finished gate.
        """
        with self._attach_lock:
            first = self._pool is None
            # Known first, so that a recreate() meanwhile attaches its copy
            # here (and waits for this attach) instead of leaving it unguarded.
            pool._poolguard = self
            adopted: dict[object, Hold] = {}
            if first:
                # Connections already checked out (wrap() of a busy engine)
                # hold capacity without a permit: adopt them, so that their
                # return gives the permit back like any other.
                records = _checked_out_records(pool)
                gate = Gate(_capacity(pool), adopted=len(records))
                gate.recorder = self.recorder
                use = self.recorder.use
                gate.checkins = lambda: use.count
                now = perf_counter()
                for record in records:
                    adopted[record] = gate.out[record] = new_hold(now, 0.0, 0, None)
                gate.tripped = self.gate.tripped
                self.gate = gate
                self.retry_budget = RetryBudget(self.config.retry_budget, lambda: gate.acquired)
                self._apply_policies()
                self._listen(pool)
            else:
                # A copy made by a plain recreate() before the listeners were
                # added (dispose() racing wrap()) lacks them.
                for name, fn in self._listeners:
                    # (event.contains() does not see listeners copied by recreate())
                    if fn not in list(getattr(pool.dispatch, name)):
                        event.listen(pool, name, fn, asyncio=False)
            self._pool = pool
            self._async = bool(pool._is_asyncio)
            self._time_creator(pool)
            self._update_slow_at()
            # An adopted connection returned before the gate is published goes
            # back without its permit: give it back here, once. Swept before
            # publishing (nobody else touches these holds yet) and after (for
            # one returned in between).
            self._release_returned(adopted)
            # Published last: a checkout or checkin sees the whole gate or none.
            pool._poolguard_gate = self.gate
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
            from .queries import QueryTimer

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
            from .otel import Exporter

            self.exporter = Exporter(self)
        self._exporter_settings = wanted

    def _time_creator(self, pool: Pool) -> None:
        # Connection set-up (db.client.connection.create_time), retried within
        # the budget: wrap the function every record calls to open its DBAPI
        # connection.
        inner = pool._invoke_creator
        if getattr(inner, "_poolguard_timed", False):
            return
        recorder = self.recorder

        def timed(record: Any) -> Any:
            start = perf_counter()
            try:
                retries = self.config.connect_retries
                budget = self.retry_budget
                if retries and budget is not None:
                    # A checkout takes at most the acquire timeout, retries
                    # included (the request's deadline, if sooner, also ends them).
                    return connect_with_retries(
                        inner, record, retries=retries, budget=budget, on_retry=self._on_retry,
                        give_up_at=_give_up_at(self.acquire_timeout()),
                    )
                return inner(record)
            finally:
                elapsed = perf_counter() - start
                recorder.create.add(elapsed)
                buf = recorder.export_create
                if buf is not None:
                    buf.append(elapsed)

        timed._poolguard_timed = True  # type: ignore[attr-defined]
        timed._poolguard_inner = inner  # type: ignore[attr-defined]
        pool._invoke_creator = timed  # type: ignore[assignment]

    def _on_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        self.log.emit(
            logging.INFO,
            "connect.retry",
            attempt=state.attempt_number,
            error_type=type(error).__qualname__ if error is not None else None,
            sleep_ms=round((state.upcoming_sleep or 0.0) * 1000, 1),
        )

    def _listen(self, pool: Pool) -> None:
        def on_connect(dbapi_conn: Any, record: Any) -> None:
            with self._lock:
                self._opened += 1

        def on_close(dbapi_conn: Any, record: Any = None) -> None:
            with self._lock:
                self._closed += 1

        def on_invalidate(dbapi_conn: Any, record: Any, exc: Any) -> None:
            with self._lock:
                self._invalidated += 1

        handlers: dict[str, Callable[..., None]] = {
            "connect": on_connect,
            "close": on_close,
            "close_detached": on_close,
            "invalidate": on_invalidate,
        }
        for name in _EVENTS:
            # asyncio=False: these counters never await, so they need no
            # asyncio-aware run-once mutex on the event. Left to its default
            # (pool._is_asyncio read now, at the first checkout of a pool built
            # with poolclass=Guarded...), it would give that mutex to a pool
            # whose own listeners were added while it was sync, and its first
            # connect outside a greenlet fails with MissingGreenlet. An async
            # pool's engine has set the flag already: it never goes back.
            event.listen(pool, name, handlers[name], asyncio=False)
            self._listeners.append((name, handlers[name]))

    def _detach(self) -> None:
        """Stop guarding: listeners off, waiters let through to the pool."""
        pool = self._pool
        if pool is not None:
            for name, fn in self._listeners:
                if event.contains(pool, name, fn):
                    event.remove(pool, name, fn)
            inner = getattr(pool._invoke_creator, "_poolguard_inner", None)
            if inner is not None:
                pool._invoke_creator = inner
        self._listeners.clear()
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
        self._alert_callbacks.append(callback)
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

    def acquire_slow(self, pool: Pool, waiter: _Waiter | None = None) -> float:
        """Wait for a permit, bounded by the acquire timeout and the request's deadline.

        Returns the seconds waited; raises :class:`PoolTimeout` (or
        :class:`LoadShed`). With ``waiter`` (:meth:`Gate.new_waiter`), an
        exception that reaches the caller while ``waiter.granted`` is true
        leaves the caller holding the permit, to give back.
        """
        timeout = self.acquire_timeout()
        by_deadline = False
        request = _current.get()
        priority, tag = NORMAL, None
        if request is not None:
            priority, tag = request.priority, request.tag
            if request.deadline is not None:
                left = request.deadline - time.monotonic()
                if timeout is None or left < timeout:
                    timeout = max(0.0, left)
                    by_deadline = True
        start = perf_counter()
        self.maybe_scan(start)
        reason = None
        try:
            granted = self.gate.acquire(
                timeout, asyncio_mode=bool(pool._is_asyncio), priority=priority, tag=tag,
                waiter=waiter,
            )
        except Refused as refused:
            reason = refused.reason
        except BaseException:
            # Cancelled or interrupted while waiting: a half-open probe that
            # never reaches the database would hold its probe slot forever.
            self._probe_forfeit()
            raise
        if reason is not None:
            # Raised here, not in the handler: no misleading "during handling
            # of the above exception" chain in the traceback.
            if reason == "queue_delay":  # it waited, then was shed: still a wait
                self.recorder.add_wait(perf_counter() - start, SHED)
            self._probe_forfeit()
            raise self._shed(reason, priority)
        waited = perf_counter() - start
        self._interval_wait_max = max(self._interval_wait_max, waited)
        if not granted:
            self.recorder.add_wait(waited, TIMED_OUT)
            error = self._timeout_error(timeout if timeout is not None else waited, by_deadline)
            if self.breakers_on:
                self.breaker_record(error, waited, request)
            raise error
        if pool._pre_ping:
            # The pre-ping, still to come inside the checkout, gets what is
            # left of the acquire timeout and adds to this wait: recorded
            # once, by queries.count_ping.
            _gate_wait.set(waited)
            return waited
        self.recorder.add_wait(waited)
        return waited

    def retry_after(self) -> float:
        """Seconds after which a shed request has a fair chance: the queue ahead
        drained at the pool's mean hold time (0.1 s to 30 s)."""
        gate = self.gate
        use = self.recorder.use
        count = use.count
        mean = use.sum / count if count else 0.0  # not snapshot(): no quantiles on a shed
        capacity = gate.capacity or 1
        return min(30.0, max(0.1, mean * (gate.waiting + 1) / capacity))

    def _shed(self, reason: str, priority: str) -> LoadShed:
        key = (reason, priority)
        with self._lock:
            self.rejections[key] = self.rejections.get(key, 0) + 1
        gate = self.gate
        in_use, capacity, waiting = gate.in_use, gate.capacity, gate.waiting
        retry_after = self.retry_after()
        if self.log.debug:
            self.log.emit(
                logging.DEBUG, "request.shed", reason=reason, priority=priority,
                in_use=in_use, capacity=capacity, waiting=waiting,
            )
        return LoadShed(
            f"pool {self.name!r}: {priority} request shed ({reason}); "
            f"{in_use}/{capacity} in use, {waiting} waiting; retry after {retry_after:.1f}s",
            reason=reason,
            priority=priority,
            retry_after=retry_after,
            pool_name=self.name,
        )

    def _timeout_error(self, timeout: float, by_deadline: bool) -> PoolTimeout:
        gate = self.gate
        in_use, capacity, waiting = gate.in_use, gate.capacity, gate.waiting
        limit = "the request's deadline" if by_deadline else "acquire_timeout"
        groups = self.exhausted("timeout")
        held = f"; held by: {describe_groups(groups)}" if groups else ""
        message = (
            f"pool {self.name!r}: no connection within {timeout:.3f}s (limited by {limit}); "
            f"{in_use}/{capacity if capacity is not None else 'unbounded'} in use, "
            f"{waiting} waiting{held}"
        )
        return PoolTimeout(
            message,
            pool_name=self.name,
            timeout=timeout,
            in_use=in_use,
            capacity=capacity,
            waiting=waiting,
        )

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
        if self.gate.tripped:  # a half-open probe got a working connection
            self._probe_succeeded()
        self.maybe_scan(now)

    def after_checkin(self, hold: Hold, held: float) -> None:
        """A connection that was reported as held too long came back."""
        self.log.emit(
            logging.INFO,
            "connection.returned_after_warning",
            held_ms=round(held * 1000, 1),
            site=hold[SITE],
        )

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
        threshold = self.config.leak_threshold
        if threshold is not None:
            holds: list[Hold] = list(self.gate.out.values())
            for hold in holds:
                if not hold[WARNED] and now - hold[T0] >= threshold:
                    self._warn_leak(hold, now)
        self.log.refresh()
        exporter = self.exporter
        if exporter is not None:
            exporter.poll()  # an SDK installed since wrap(): keep samples from now on
        self._check_alerts(now)

    def _warn_leak(self, hold: Hold, now: float) -> None:
        hold[WARNED] = True
        with self._lock:
            self.leak_warnings += 1
        (item,) = holders([hold], now, self.db_system)
        self.log.emit(
            logging.WARNING,
            "connection.held_too_long",
            held_ms=round(item.age * 1000, 1),
            threshold_ms=round((self.config.leak_threshold or 0) * 1000, 1),
            tag=item.tag,
            fingerprint=item.fingerprint,
            statement=item.statement,
            running=item.running,
            idle_in_transaction=item.idle_in_transaction,
            site=item.site,
            site_kind="checkout" if hold[SITE] else "now",
        )

    def _check_alerts(self, now: float) -> None:
        capacity = self.gate.capacity
        wait_max, self._interval_wait_max = self._interval_wait_max, 0.0
        for alert in self._alerts:
            if alert.name == "utilization":
                if not capacity:
                    continue
                value = self.gate.in_use / capacity
            else:
                value = wait_max
            changed = alert.update(value, now)
            if changed is None:
                continue
            ev = AlertEvent(
                pool=self.name,
                name=alert.name,
                firing=changed,
                value=value,
                threshold=alert.threshold,
                since=now,
            )
            self.log.emit(
                logging.WARNING if changed else logging.INFO,
                f"alert.{alert.name}",
                state="firing" if changed else "cleared",
                value=round(value, 4),
                threshold=alert.threshold,
                in_use=self.gate.in_use,
                capacity=capacity,
                waiting=self.gate.waiting,
            )
            if changed and alert.name == "utilization":
                self.exhausted("utilization")
            for callback in list(self._alert_callbacks):
                try:
                    callback(ev)
                except Exception:  # noqa: PERF203 - one failing callback must not stop the rest
                    logging.getLogger("poolguard").exception("alert callback %r failed", callback)

    # -- diagnostics ----------------------------------------------------------

    def holders(self) -> list[Holder]:
        """Every connection checked out now: age, statement, tag, site."""
        holds: list[Hold] = list(self.gate.out.values())
        return holders(holds, perf_counter(), self.db_system)

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
            gate = self.gate
            self.log.emit(
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
                    }
                    for g in groups[:5]
                ],
                summary=describe_groups(groups),
            )
        return groups

    # -- statements ------------------------------------------------------------

    def query_fields(
        self,
        fp: Fingerprint,
        duration: float,
        rows: int,
        hold: Hold | None,
        parameters: Any,
    ) -> dict[str, Any]:
        """The fields of a query event (never parameter values unless opted in)."""
        request = hold[REQUEST] if hold is not None else _current.get()
        fields: dict[str, Any] = {
            "fingerprint": fp.id,
            "statement": fp.text,
            "summary": fp.summary,
            "duration_ms": round(duration * 1000, 3),
            "rows": rows if rows >= 0 else None,
            "wait_ms": round(hold[WAIT] * 1000, 3) if hold is not None else None,
            "tag": request.tag if request is not None else None,
        }
        if self.config.log_parameters:
            fields["parameters"] = repr(parameters)[:1000]
        return fields

    def on_slow_query(
        self,
        fp: Fingerprint,
        duration: float,
        rows: int,
        hold: Hold | None,
        statement: str,
        parameters: Any,
        cursor: Any,
    ) -> None:
        """Log ``query.slow`` with where it came from; EXPLAIN it once if asked."""
        fields = self.query_fields(fp, duration, rows, hold, parameters)
        fields["threshold_ms"] = round((self.config.slow_query_threshold or 0) * 1000, 3)
        fields["site"] = current_site(3)
        self.log.emit(logging.WARNING, "query.slow", **fields)
        if self.config.explain_slow_queries and fp.id not in self._explained:
            self._explained.add(fp.id)
            from .explain import explain

            explain(self, cursor, fp, statement, parameters)

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
        pool_size: int | None = None
        max_overflow: int | None = None
        idle = 0
        if isinstance(pool, QueuePool):
            pool_size = pool.size()
            max_overflow = pool._max_overflow
            idle = pool.checkedin()
            in_use = pool.checkedout()
        else:
            in_use = gate.in_use
            if isinstance(pool, SingletonThreadPool):
                pool_size = pool.size
                idle = max(0, len(pool._all_conns) - in_use)
            elif isinstance(pool, StaticPool):
                pool_size = 1
                idle = int("connection" in pool.__dict__ and in_use == 0)
            elif isinstance(pool, NullPool):
                pool_size = 0
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
        with self._lock:
            opened, closed, invalidated = self._opened, self._closed, self._invalidated
            leaks = self.leak_warnings
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
            leak_warnings=leaks,
            use_time=self.recorder.use.snapshot(),
            wait_time=wait_time,
            create_time=self.recorder.create.snapshot(),
        )

    def __repr__(self) -> str:
        gate = self.gate
        return f"<Guard {self.name!r} permits={gate.in_use}/{gate.capacity} waiting={gate.waiting}>"

