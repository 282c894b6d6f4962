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

from .breaker import default_classifier
from .context import _current

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


class _stop_at_deadline(stop_base):  # noqa: N801 - tenacity's naming
    def __call__(self, retry_state: RetryCallState) -> bool:
        request = _current.get()
        if request is None or request.deadline is None:
            return False
        sleep = retry_state.upcoming_sleep or 0.0
        return time.monotonic() + sleep >= request.deadline


class _retry_transient(retry_base):  # noqa: N801 - tenacity's naming
    def __init__(self, budget: RetryBudget, attempts: int) -> None:
        self.budget = budget
        self.attempts = attempts

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
        request = _current.get()
        deadline = request.deadline if request is not None else None
        return deadline is None or time.monotonic() < deadline


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
) -> Any:
    """Call ``connect(record)``, retrying transient failures as described above."""
    retrying = Retrying(
        stop=stop_after_attempt(retries + 1) | _stop_at_deadline() | _stop_without_budget(budget),
        wait=wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05),
        retry=_retry_transient(budget, retries + 1),
        reraise=True,
        before_sleep=on_retry,
    )
    return retrying(connect, record)
