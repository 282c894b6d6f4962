"""Retries of connection set-up, with tenacity, inside a retry budget.

Only opening a connection is retried: it has no side effects, and a refused
or reset connect is the classic transient failure. A statement is never
retried. Backoff is exponential with jitter and a cap; the attempts stop at
the request's deadline; and a budget keeps retries to a share of recent
checkouts, so that during an outage retries never multiply the load.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from tenacity import (
    RetryCallState,
    Retrying,
    retry_base,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base

from ._context import _current
from .breaker import default_classifier

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["RetryBudget", "connect_with_retries"]


class RetryBudget:
    """Retries allowed: ``ratio`` per checkout, banked up to ``burst``.

    Deposits are computed from the number of permits granted since the last
    look (``acquired()``), so the hot path pays nothing for the budget.
    """

    def __init__(self, ratio: float, acquired: Callable[[], int], burst: float = 10.0) -> None:
        self.ratio = ratio
        self.burst = burst
        self._acquired = acquired
        self._seen = acquired()
        self._tokens = burst
        self._lock = threading.Lock()
        self.spent = 0
        self.denied = 0

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one."""
        with self._lock:
            now_acquired = self._acquired()
            self._tokens = min(self.burst,
                               self._tokens + self.ratio * (now_acquired - self._seen))
            self._seen = now_acquired
            if self._tokens >= 1:
                self._tokens -= 1
                self.spent += 1
                return True
            self.denied += 1
            return False


def _end_by(give_up_at: float | None) -> float | None:
    """The time (``time.monotonic``) the connect attempts must end by, if any."""
    request = _current.get()
    deadline = request.deadline if request is not None else None
    if deadline is not None and (give_up_at is None or deadline < give_up_at):
        return deadline
    return give_up_at


class _stop_at_deadline(stop_base):  # noqa: N801 - tenacity's naming
    # No attempt that would end past the request's deadline or the acquire
    # timeout: the sleep, plus an attempt as long as the ones so far took
    # on average (a blackholed dial takes the whole connect_timeout each
    # time, so one more would overrun).
    def __init__(self, give_up_at: float | None = None) -> None:
        self.give_up_at = give_up_at

    def __call__(self, retry_state: RetryCallState) -> bool:
        give_up_at = _end_by(self.give_up_at)
        if give_up_at is None:
            return False
        sleep = retry_state.upcoming_sleep or 0.0
        now = time.monotonic()
        spent = now - retry_state.start_time - retry_state.idle_for
        attempt = max(spent, 0.0) / max(retry_state.attempt_number, 1)
        return now + sleep + attempt >= give_up_at


class _retry_transient(retry_base):  # noqa: N801 - tenacity's naming
    def __init__(
        self, budget: RetryBudget, attempts: int, give_up_at: float | None = None
    ) -> None:
        self.budget = budget
        self.attempts = attempts
        self.give_up_at = give_up_at

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        if outcome is None or not outcome.failed:
            return False
        error = outcome.exception()
        if error is None or not default_classifier(error):
            return False
        # tenacity asks this before its stop conditions, which spend the
        # budget (see _stop_without_budget).
        if retry_state.attempt_number >= self.attempts:
            return False
        give_up_at = _end_by(self.give_up_at)
        return give_up_at is None or time.monotonic() < give_up_at


class _stop_without_budget(stop_base):  # noqa: N801 - tenacity's naming
    # Last of the stop conditions (tenacity asks them in order and stops at
    # the first that says stop, after computing the sleep): the budget pays
    # only for a retry that the attempt limit and the deadline let happen.
    def __init__(self, budget: RetryBudget) -> None:
        self.budget = budget

    def __call__(self, retry_state: RetryCallState) -> bool:
        return not self.budget.try_spend()


def connect_with_retries(
    connect: Callable[[Any], Any],
    record: Any,
    *,
    retries: int,
    budget: RetryBudget,
    on_retry: Callable[[RetryCallState], None] | None = None,
    give_up_at: float | None = None,
) -> Any:
    """Call ``connect(record)``, retrying transient failures as described above.

    ``give_up_at`` (``time.monotonic()``): no retry that would end after it
    (the checkout's acquire timeout); the request's deadline, if sooner, wins.
    """
    retrying = Retrying(
        stop=(stop_after_attempt(retries + 1) | _stop_at_deadline(give_up_at)
              | _stop_without_budget(budget)),
        wait=wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
        retry=_retry_transient(budget, retries + 1, give_up_at),
        reraise=True,
        before_sleep=on_retry,
    )
    return retrying(connect, record)
