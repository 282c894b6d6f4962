"""A circuit breaker for the pool, as a pure state machine with an injected clock.

Closed, it lets every checkout through and records outcomes in a sliding
window (the last N calls, or the last N seconds). Once the window holds at
least ``minimum_calls`` and the failure rate or the slow-call rate reaches
its threshold, it opens: checkouts fail at once with
:class:`poolguard.CircuitOpen` and never dial the database. After
``wait_in_open`` seconds it lets exactly ``half_open_calls`` probes through;
their outcomes close it again or reopen it.

What counts as a failure is decided by the classifier
(:func:`default_classifier`): the breaker itself only sees "failure",
"success" and "slow".
"""

from __future__ import annotations

import dataclasses
from collections import deque

__all__ = [
    "CLOSED", "HALF_OPEN", "OPEN", "BreakerConfig", "CircuitBreaker", "TagBreaker",
    "default_classifier",
]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclasses.dataclass(frozen=True)
class BreakerConfig:
    """Settings of a breaker (checked by :class:`poolguard.Config`).

    Attributes:
        window: ``"count"`` (the last ``window_size`` calls) or ``"time"``
            (the calls of the last ``window_size`` seconds).
        window_size: calls, or seconds.
        minimum_calls: calls the window must hold before rates count.
        failure_rate: share of failed calls (0..1] that opens the breaker.
        slow_call_rate: share of slow calls (0..1] that opens it.
        slow_call_duration: a call at least this long (seconds) is slow.
        wait_in_open: seconds open before probing.
        half_open_calls: probes let through while half-open.
    """

    window: str = "count"
    window_size: int = 50
    minimum_calls: int = 10
    failure_rate: float = 0.5
    slow_call_rate: float = 1.0
    slow_call_duration: float = 5.0
    wait_in_open: float = 5.0
    half_open_calls: int = 3


class _Window:
    """Counts of calls, failures and slow calls over the sliding window."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.size = size
        # count window: one (failed, slow) per call; time window: one
        # [second, calls, failures, slow] per second.
        self._calls: deque[tuple[bool, bool]] = deque()
        self._buckets: deque[list[float]] = deque()
        self.calls = self.failures = self.slow = 0

    def add(self, failed: bool, slow: bool, now: float) -> None:
        if self.kind == "count":
            self._calls.append((failed, slow))
            if len(self._calls) > self.size:
                old_failed, old_slow = self._calls.popleft()
                self.calls -= 1
                self.failures -= old_failed
                self.slow -= old_slow
        else:
            self.expire(now)
            second = float(int(now))
            if not self._buckets or self._buckets[-1][0] != second:
                self._buckets.append([second, 0, 0, 0])
            bucket = self._buckets[-1]
            bucket[1] += 1
            bucket[2] += failed
            bucket[3] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def expire(self, now: float) -> None:
        if self.kind != "time":
            return
        horizon = now - self.size
        while self._buckets and self._buckets[0][0] <= horizon:
            _, calls, failures, slow = self._buckets.popleft()
            self.calls -= int(calls)
            self.failures -= int(failures)
            self.slow -= int(slow)

    def clear(self) -> None:
        self._calls.clear()
        self._buckets.clear()
        self.calls = self.failures = self.slow = 0


class CircuitBreaker:
    """The breaker's state machine. Not thread-safe: the guard locks around it."""

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.state = CLOSED
        self.opened_at = 0.0
        self._window = _Window(config.window, config.window_size)
        self._probes_left = 0
        self._probe_calls = self._probe_failures = self._probe_slow = 0
        #: Half-open periods entered so far: a probe slot belongs to one.
        self.probe_round = 0
        self._last_probe_at = 0.0
        #: Transitions so far, by the state entered.
        self.transitions: dict[str, int] = {OPEN: 0, HALF_OPEN: 0, CLOSED: 0}

    def retry_after(self, now: float) -> float:
        """Seconds until the breaker will probe again (0 unless open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.config.wait_in_open - now)

    def allow(self, now: float) -> tuple[bool, str | None]:
        """May a call go through now? Also returns the state entered, if any."""
        entered = None
        if self.state == OPEN:
            if now < self.opened_at + self.config.wait_in_open:
                return False, None
            entered = self._enter(HALF_OPEN, now)
        if self.state == HALF_OPEN:
            if self._probes_left <= 0:
                return False, entered
            self._probes_left -= 1
            self._last_probe_at = now
            return True, entered
        return True, entered

    def reclaim(self, now: float, after: float) -> int:
        """Presume lost the probes whose outcomes are still missing ``after``
        seconds after the last one was let through, and let as many through
        again; return how many. A safety net: the guard ties every probe to
        its checkout, but a probe lost on a path it does not see must not
        leave the breaker half-open, refusing everything, for good."""
        if (self.state != HALF_OPEN or self._probes_left > 0
                or now < self._last_probe_at + after):
            return 0
        missing = self.config.half_open_calls - self._probe_calls
        if missing <= 0:
            return 0
        self._probes_left = missing
        self._last_probe_at = now
        return missing

    def forfeit(self, probe_round: int | None = None) -> None:
        """A probe let through never reached the database (shed, cancelled or
        timed out at the gate): its outcome will never come, so let another
        caller probe instead. ``probe_round``: the half-open period the probe
        was let through in; a slot of an earlier one is not given back."""
        if (self.state == HALF_OPEN and self._probes_left < self.config.half_open_calls
                and (probe_round is None or probe_round == self.probe_round)):
            self._probes_left += 1

    def record(self, failed: bool, duration: float, now: float) -> str | None:
        """Record one call's outcome; return the state entered, if any."""
        slow = duration >= self.config.slow_call_duration
        cfg = self.config
        if self.state == HALF_OPEN:
            self._probe_calls += 1
            self._probe_failures += failed
            self._probe_slow += slow
            if self._probe_calls < cfg.half_open_calls:
                return None
            calls = self._probe_calls
            bad = (self._probe_failures / calls >= cfg.failure_rate
                   or self._probe_slow / calls >= cfg.slow_call_rate)
            return self._enter(OPEN if bad else CLOSED, now)
        if self.state == OPEN:
            return None  # late outcome of a call let through before opening
        window = self._window
        window.add(failed, slow, now)
        if window.calls < cfg.minimum_calls:
            return None
        if (window.failures / window.calls >= cfg.failure_rate
                or window.slow / window.calls >= cfg.slow_call_rate):
            return self._enter(OPEN, now)
        return None

    def _enter(self, state: str, now: float) -> str:
        self.state = state
        self.transitions[state] += 1
        if state == OPEN:
            self.opened_at = now
        elif state == HALF_OPEN:
            self.probe_round += 1
            self._last_probe_at = now
            self._probes_left = self.config.half_open_calls
            self._probe_calls = self._probe_failures = self._probe_slow = 0
        else:
            self._window.clear()
        return state


class TagBreaker(CircuitBreaker):
    """The breaker of one request tag (``breaker_per_tag``).

    Its probes' outcomes are their statements, not their checkouts; a probe
    that runs no statement would leave it half-open for good, so once
    ``wait_in_open`` passes with probe outcomes missing, it lets the missing
    number of probes through again.
    """

    def __init__(self, config: BreakerConfig) -> None:
        super().__init__(config)
        self._probing_since = 0.0

    def allow(self, now: float) -> tuple[bool, str | None]:
        if (self.state == HALF_OPEN and self._probes_left <= 0
                and now >= self._probing_since + self.config.wait_in_open):
            self._probing_since = now
            self._probes_left = max(1, self.config.half_open_calls - self._probe_calls)
        return super().allow(now)

    def _enter(self, state: str, now: float) -> str:
        if state == HALF_OPEN:
            self._probing_since = now
        return super()._enter(state, now)


def default_classifier(error: BaseException) -> bool:
    """Whether ``error`` means the database is in trouble (a breaker failure).

    Yes: connection failures and disconnects (``OperationalError``,
    ``InterfaceError``, an error SQLAlchemy marked as a disconnect), acquire
    timeouts (``PoolTimeout``) and statement timeouts. No: errors of the
    request itself (integrity, programming, data errors) - the database
    answered; and the saturation of a pooler in front of the database
    (:class:`poolguard.PoolerSaturated`, or PgBouncer's ``query_wait_timeout``
    and ``max_client_conn`` errors as the driver raises them).

    The guard applies two more rules around any classifier: a time limit's
    error (a statement timeout, a request's deadline, an acquire timeout)
    of a call during which another statement succeeded is not counted by the
    guard-wide breaker (one slow query class, not a failing database; its
    tag's breaker counts it), and a round trip cut by its deadline while it
    waited in a pooler's queue for a server connection is no outcome at all.
    """
    import sqlalchemy.exc as sa_exc

    from ._pooler import SATURATION, pooler_kind
    from .errors import PoolTimeout

    saturated = pooler_kind(error) == SATURATION  # PoolerSaturated included
    if saturated or isinstance(error, PoolTimeout):
        return not saturated
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.DataError)):
        return False
    if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return True
    # A raw DBAPI error (statement timing sees the driver's own exceptions).
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"IntegrityError", "ProgrammingError", "DataError", "NotSupportedError"}:
        return False
    return bool(names & _TROUBLE)


# Exception class names (of any driver) that mean the database or the network
# to it is in trouble.
_TROUBLE = frozenset({
    "OperationalError", "InterfaceError", "QueryCanceled", "QueryCanceledError",
    "ConnectionDoesNotExistError", "PostgresConnectionError", "ConnectionFailureError",
    "CannotConnectNowError", "TimeoutError", "ConnectionError", "OSError",
})

