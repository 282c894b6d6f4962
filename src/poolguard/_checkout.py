"""The slow path of a checkout: wait at the gate, shed, time out, and word the errors.

The guarded pool's ``connect()`` comes here only when no permit is free at
once (or a policy must decide). The wait is bounded by the acquire timeout
and the request's deadline; a refusal becomes :class:`LoadShed`, a wait
that ran out :class:`PoolTimeout` with who holds the connections.
"""

from __future__ import annotations

import logging
import time
from time import perf_counter
from typing import TYPE_CHECKING

from ._compat import is_asyncio, pre_ping
from ._context import _current
from ._gate import AdmissionRefused
from ._hold import WIRE
from ._holders import describe_groups
from ._policies import NORMAL
from ._queries import _gate_wait
from ._recorder import SHED, TIMED_OUT
from .errors import LoadShed, PoolTimeout

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.pool import Pool

    from ._breakers import Breakers
    from ._gate import _Waiter
    from ._holders import HolderGroup
    from ._parts import GuardParts
    from ._recorder import Recorder

__all__ = ["SlowCheckout"]


class SlowCheckout:
    """Waits for a permit for one guard's checkouts, and words the refusals."""

    def __init__(
        self,
        parts: GuardParts,
        recorder: Recorder,
        breakers: Breakers,
        *,
        maybe_scan: Callable[[float], None],
        note_wait: Callable[[float], None],
        exhausted: Callable[[str], list[HolderGroup]],
    ) -> None:
        self._parts = parts
        self._log = parts.log
        self._recorder = recorder
        self._breakers = breakers
        self._maybe_scan = maybe_scan
        self._note_wait = note_wait
        self._exhausted = exhausted

    def acquire(self, pool: Pool, waiter: _Waiter | None = None) -> float:
        """Wait for a permit, bounded by the acquire timeout and the request's deadline.

        Returns the seconds waited; raises :class:`PoolTimeout` (or
        :class:`LoadShed`). With ``waiter`` (:meth:`Gate.new_waiter`), an
        exception that reaches the caller while ``waiter.granted`` is true
        leaves the caller holding the permit, to give back.
        """
        timeout = self._parts.acquire_timeout()
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
        self._maybe_scan(start)
        reason = None
        try:
            granted = self._parts.gate().acquire(
                timeout, asyncio_mode=is_asyncio(pool), priority=priority, tag=tag,
                waiter=waiter,
            )
        except AdmissionRefused as refused:
            reason = refused.reason
        except BaseException:
            # Cancelled or interrupted while waiting: a half-open probe that
            # never reaches the database would hold its probe slot forever.
            self._breakers.probe_forfeit()
            raise
        if reason is not None:
            # Raised here, not in the handler: no misleading "during handling
            # of the above exception" chain in the traceback.
            if reason == "queue_delay":  # it waited, then was shed: still a wait
                self._recorder.add_wait(perf_counter() - start, SHED)
            self._breakers.probe_forfeit()
            raise self.shed(reason, priority)
        waited = perf_counter() - start
        self._note_wait(waited)
        if not granted:
            self._recorder.add_wait(waited, TIMED_OUT)
            error = self._timeout_error(timeout if timeout is not None else waited, by_deadline)
            breakers = self._breakers
            # Connections out waiting in a pooler's queue for a server
            # connection: the pooler is saturated, the database not failing.
            if breakers.on and not any(
                    h[WIRE] is not None for h in list(self._parts.gate().out.values())):
                # The guard-wide breaker only: a tag that waited in vain for a
                # pool others hold is their victim, its own statements may be fine.
                breakers.record(error, waited)
            raise error
        if pre_ping(pool):
            # The pre-ping, still to come inside the checkout, gets what is
            # left of the acquire timeout and adds to this wait: recorded
            # once, by queries.count_ping.
            _gate_wait.set(waited)
            return waited
        self._recorder.add_wait(waited)
        return waited

    def retry_after(self) -> float:
        """Seconds after which a shed request has a fair chance: the queue ahead
        drained at the pool's mean hold time (0.1 s to 30 s)."""
        gate = self._parts.gate()
        use = self._recorder.use
        count = use.count
        mean = use.sum / count if count else 0.0  # not snapshot(): no quantiles on a shed
        capacity = gate.capacity or 1
        return min(30.0, max(0.1, mean * (gate.waiting + 1) / capacity))

    def shed(self, reason: str, priority: str) -> LoadShed:
        self._parts.reject(reason, priority)
        gate = self._parts.gate()
        in_use, capacity, waiting = gate.in_use, gate.capacity, gate.waiting
        retry_after = self.retry_after()
        if self._log.debug:
            self._log.emit(
                logging.DEBUG, "request.shed", reason=reason, priority=priority,
                in_use=in_use, capacity=capacity, waiting=waiting,
            )
        return LoadShed(
            f"pool {self._log.pool_name!r}: {priority} request shed ({reason}); "
            f"{in_use}/{capacity} in use, {waiting} waiting; retry after {retry_after:.1f}s",
            reason=reason,
            priority=priority,
            retry_after=retry_after,
            pool_name=self._log.pool_name,
        )

    def _timeout_error(self, timeout: float, by_deadline: bool) -> PoolTimeout:
        gate = self._parts.gate()
        in_use, capacity, waiting = gate.in_use, gate.capacity, gate.waiting
        limit = "the request's deadline" if by_deadline else "acquire_timeout"
        groups = self._exhausted("timeout")
        held = f"; held by: {describe_groups(groups)}" if groups else ""
        name = self._log.pool_name
        message = (
            f"pool {name!r}: no connection within {timeout:.3f}s (limited by {limit}); "
            f"{in_use}/{capacity if capacity is not None else 'unbounded'} in use, "
            f"{waiting} waiting{held}"
        )
        return PoolTimeout(
            message,
            pool_name=self._log.pool_name,
            timeout=timeout,
            in_use=in_use,
            capacity=capacity,
            waiting=waiting,
        )
