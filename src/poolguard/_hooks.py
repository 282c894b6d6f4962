"""The switches a guarded pool's checkout and checkin read of their guard, in one object.

The gate holds permits and waiters only; what the hot path needs beyond
them (the recorder to count a checkin, when to call the guard's
``after_checkout()``, whether a breaker must be asked) lives here. The guard
owns one for its life and sets its fields; the pool reads them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._recorder import Recorder

__all__ = ["CheckoutHooks"]


class CheckoutHooks:
    """What the guarded pool reads of its guard on every checkout and checkin."""

    __slots__ = ("asyncio", "call_at", "recorder", "slow_at", "tripped")

    def __init__(self, recorder: Recorder) -> None:
        #: The guard's recorder: the checkin path adds the use time to it.
        self.recorder = recorder
        #: perf_counter() time from which a checkout looks at the extras
        #: below (call_at, or -inf for an asyncio pool): one comparison for
        #: the rest.
        self.slow_at = 0.0
        #: perf_counter() time from which the next checkout calls the guard's
        #: after_checkout() (its next scan, or -inf for per-checkout extras).
        self.call_at = 0.0
        #: Some circuit breaker is not closed: checkouts must ask it.
        self.tripped = False
        #: The pool serves an asyncio engine: a checkout records its task.
        self.asyncio = False
