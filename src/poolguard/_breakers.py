"""The circuit breakers of one guard (guard-wide, per tag) and each checkout's probe.

The state machines are in :mod:`poolguard.breaker`; this module feeds them
(a checkout while a breaker is not closed, each call's outcome), ties a
half-open probe slot to the checkout that took it (its outcome, forfeit or
reclaim frees it) and words :class:`CircuitOpen`. It knows the guard only
through the narrow callables it is given.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from contextvars import ContextVar
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._context import _current
from ._policies import NORMAL
from ._timeouts import is_timeout_error
from .breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    CircuitBreaker,
    TagBreaker,
    default_classifier,
)
from .errors import CircuitOpen, DeadlineExceeded, PoolTimeout, StatementTimeout

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import Config
    from ._context import RequestContext
    from ._parts import GuardParts

__all__ = ["MAX_TAG_BREAKERS", "Breakers"]

#: Tags with a breaker of their own (``breaker_per_tag``); later tags have none.
MAX_TAG_BREAKERS = 100

#: The half-open probe slots the checkout under way in this context (thread,
#: or asyncio task) took in :meth:`Breakers.admit`: the breakers, the
#: breaker and the half-open period of its slot, the tag's breaker and its
#: period. The checkout's outcome, or its forfeit, clears it: a probe that
#: never gets an outcome must not keep its slot (a breaker half-open for good).
_Probe = tuple["Breakers", "CircuitBreaker | None", int, "TagBreaker | None", int]
_probe: ContextVar[_Probe | None] = ContextVar("poolguard_probe", default=None)


class Breakers:
    """The guard-wide breaker (``breaker=True``) and those of tags (``breaker_per_tag``)."""

    def __init__(
        self,
        parts: GuardParts,
        *,
        changed: Callable[[], None],
        tripped: Callable[[], bool],
        dialect: Callable[[], Any],
    ) -> None:
        self._parts = parts
        self._log = parts.log
        self._changed = changed  # a breaker changed state: refresh the gate's flags
        self._tripped = tripped
        self._driver_dialect = dialect
        #: The circuit breaker (``breaker=True``), else None.
        self.breaker: CircuitBreaker | None = None
        #: The breakers of request tags (``breaker_per_tag=True``), by tag.
        self.tag_breakers: dict[str, TagBreaker] = {}
        self._tag_settings: BreakerConfig | None = None
        #: Some breaker records outcomes (guard-wide or per tag).
        self.on = False
        self.lock = threading.Lock()
        self._classify: Callable[[BaseException], bool] = default_classifier
        self._classifier_failed = False
        #: perf_counter() time of the last statement that succeeded: a timeout
        #: of a call that ran while the database answered others is that
        #: call's, not the database's (see :meth:`record`).
        self.answered_at = float("-inf")

    def not_closed(self) -> bool:
        """Some breaker is open or half-open: checkouts must consult :meth:`admit`."""
        breaker = self.breaker
        return (breaker is not None and breaker.state != CLOSED) or any(
            b.state != CLOSED for b in list(self.tag_breakers.values())
        )

    def configure(self, cfg: Config) -> None:
        """Build, keep or drop the breakers for ``cfg``; a changed setting starts afresh."""
        classify = cfg.breaker_classifier or default_classifier
        if classify is not self._classify:
            self._classify = classify
            self._classifier_failed = False
        # Each setting X is the option breaker_X (one name per concept).
        settings = BreakerConfig(**{
            field.name: getattr(cfg, f"breaker_{field.name}")
            for field in dataclasses.fields(BreakerConfig)
        })
        with self.lock:
            if not cfg.breaker:
                self.breaker = None
            elif self.breaker is None or self.breaker.config != settings:
                self.breaker = CircuitBreaker(settings)
            if not cfg.breaker_per_tag or settings != self._tag_settings:
                self.tag_breakers = {}
            self._tag_settings = settings if cfg.breaker_per_tag else None
        self.on = self.breaker is not None or self._tag_settings is not None
        self._changed()

    def tag_breaker(self, request: RequestContext | None) -> TagBreaker | None:
        """The breaker of the request's tag, made on first use (under :attr:`lock`)."""
        if request is None or request.tag is None or self._tag_settings is None:
            return None
        breakers = self.tag_breakers
        breaker = breakers.get(request.tag)
        if breaker is None and len(breakers) < MAX_TAG_BREAKERS:
            breaker = breakers[request.tag] = TagBreaker(self._tag_settings)
        return breaker

    def admit(self, pool: object = None) -> None:
        """A checkout while a breaker is not closed: a probe, or CircuitOpen."""
        breaker = self.breaker
        request = _current.get()
        now = perf_counter()
        allowed, entered, tag_entered = True, None, None
        retry_after = 0.0
        probe: CircuitBreaker | None = None
        tag_probe: TagBreaker | None = None
        reclaimed = 0
        with self.lock:
            if breaker is not None:
                if breaker.state == HALF_OPEN:
                    # A probe has its acquire wait, then wait_in_open, to report.
                    # (Waits without limit are given the pool's default 30 s.)
                    acquire = self._parts.acquire_timeout()
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
            self._log.emit(logging.WARNING, "breaker.probes_reclaimed", probes=reclaimed)
        if entered is not None:
            self._breaker_changed(entered)
        if tag_entered is not None:
            self._breaker_changed(tag_entered, request.tag if request is not None else None)
        if allowed or breaker is None:
            return
        priority = request.priority if request is not None else NORMAL
        self._parts.reject("circuit_open", priority)
        retry_after = max(retry_after, 0.05)
        name = self._log.pool_name
        if breaker is self.breaker:
            message = (f"pool {name!r}: circuit breaker {breaker.state}, the database is "
                       f"failing; not dialing it (retry after {retry_after:.1f}s)")
        else:
            tag = request.tag if request is not None else None
            message = (f"pool {name!r}: circuit breaker of tag {tag!r} {breaker.state}, "
                       f"its statements are slow or failing; not dialing the database "
                       f"(retry after {retry_after:.1f}s)")
        raise CircuitOpen(
            message,
            reason="circuit_open",
            priority=priority,
            retry_after=retry_after,
            pool_name=name,
        )

    def record(
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
            self.probe_forfeit()
            return
        if self._tripped() and _probe.get() is not None:
            _probe.set(None)  # this checkout's outcome, recorded now
        breaker = self.breaker
        failed = error is not None and self._is_failure(error)
        now = perf_counter()
        if error is None:
            self.answered_at = now
        # The guard-wide breaker is about the database: a call that timed out
        # (its statement's limit, the request's deadline, an acquire timeout)
        # while the database answered other calls is one slow query class,
        # or a full pool, not a failing database. Its tag's breaker counts it.
        db_failed = failed and not (
            self.answered_at >= now - duration and self._timed_out(error))
        entered = tag_entered = None
        with self.lock:
            if breaker is not None:
                entered = breaker.record(db_failed, duration, now)
            tag_breaker = self.tag_breaker(request)
            if tag_breaker is not None:
                tag_entered = tag_breaker.record(failed, duration, now)
        if entered is not None:
            self._breaker_changed(entered)
        if tag_entered is not None and request is not None:
            self._breaker_changed(tag_entered, request.tag)

    def _timed_out(self, error: BaseException | None) -> bool:
        """``error`` is a time limit's (a statement's, a deadline's, an acquire
        timeout's), not a failed connection."""
        if isinstance(error, (PoolTimeout, DeadlineExceeded, StatementTimeout)):
            return True
        orig = getattr(error, "orig", error)
        return orig is not None and is_timeout_error(self._parts.db_system(), orig)

    def probe_forfeit(self) -> None:
        """The checkout under way gets no outcome (shed, cancelled, interrupted):
        give back the probe slots it took, if any, of their half-open period."""
        probe = _probe.get()
        if probe is None:
            return
        _probe.set(None)
        guard, breaker, probe_round, tag_breaker, tag_round = probe
        if guard is not self:
            return
        with self.lock:
            if breaker is not None:
                breaker.forfeit(probe_round)
            if tag_breaker is not None:
                tag_breaker.forfeit(tag_round)

    def probe_succeeded(self) -> None:
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
        with self.lock:
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
                    self._log.pool_name, classify, type(error).__qualname__,
                )
            return default_classifier(error)

    def _sqlalchemy_error(self, error: BaseException) -> BaseException:
        """``error`` as SQLAlchemy raises it: a driver error wrapped in its
        ``sqlalchemy.exc.DBAPIError`` subclass (the driver's in ``.orig``)."""
        import sqlalchemy.exc as sa_exc

        if isinstance(error, sa_exc.SQLAlchemyError) or not isinstance(error, Exception):
            return error
        dialect: Any = self._driver_dialect()
        base = getattr(getattr(dialect, "dbapi", None), "Error", None)
        if not isinstance(base, type) or not isinstance(error, base):
            return error  # not the driver's (an OSError, a poolguard error)
        try:
            # As SQLAlchemy decides it for a failed connect: the error alone.
            invalidated = bool(dialect.is_disconnect(error, None, None))
        except Exception:  # noqa: BLE001 - a dialect that needs a connection to tell
            invalidated = False
        if is_timeout_error(self._parts.db_system(), error):
            # A statement cancelled on time is an OperationalError whatever
            # class the driver gives it (asyncpg's adapter: a bare Error).
            return sa_exc.OperationalError(
                None, None, error, connection_invalidated=invalidated
            )
        return sa_exc.DBAPIError.instance(
            None, None, error, base, connection_invalidated=invalidated, dialect=dialect
        )

    def _breaker_changed(self, state: str, tag: str | None = None) -> None:
        self._changed()
        level = logging.WARNING if state == OPEN else logging.INFO
        breaker = self.breaker if tag is None else self.tag_breakers.get(tag)
        fields: dict[str, Any] = {} if tag is None else {"tag": tag}
        self._log.emit(
            level,
            f"breaker.{state}",
            **fields,
            wait_in_open_s=breaker.config.wait_in_open if breaker else None,
            in_use=self._parts.gate().in_use,
        )
