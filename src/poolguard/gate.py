"""The admission gate: one permit per connection handed out, one queue of waiters.

The gate holds as many permits as the pool can hand out connections. A
checkout takes a permit before it reaches the pool, so the pool's own queue
never has to wait: waiting, its timeout and (later) its order and shedding
all happen here, in one place.

The hot path takes no lock. Free permits are tokens in a :class:`deque`,
whose ``pop`` and ``append`` are atomic, so taking a free permit is one
``pop`` and giving one back is one ``append``. The lock guards only the
waiters: a caller that finds no token queues itself under the lock and then
tries once more, and a release that sees waiters hands tokens to them under
the lock, so no wake-up is lost between the two.

The caller keeps track of which permits it holds (the pool marks each
checked-out record with its permit and pops the mark to release it, so each
permit is released once).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable  # noqa: TC003 - used at run time for _discard
from typing import Any

from ._compat import await_only
from .policies import CRITICAL, HEALTH, NORMAL, Codel, Gradient2, may_take, rank
from .recorder import REQUEST

__all__ = ["Gate"]


# Gives a permit back to a gate without a limit: there is nothing to keep.
_discard: Callable[[object], None] = deque[object](maxlen=0).append


def _zero() -> int:
    return 0


def _count_value(counter: itertools.count[int]) -> int:
    # itertools.count increments atomically (one C call) and shows its next
    # value only in its repr: "count(42)".
    return int(repr(counter)[6:-1])


class Refused(Exception):
    """The admission policy turned a caller away without waiting (``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _empty() -> object:
    # The fast path's take() while a policy is on: every caller goes through
    # acquire(), where the policy is applied under the lock.
    raise IndexError


class _Waiter:
    __slots__ = ("event", "future", "granted", "loop", "priority", "since", "tag")

    def __init__(self, priority: str = NORMAL, tag: str | None = None, since: float = 0.0) -> None:
        self.granted = False
        self.priority = priority
        self.tag = tag
        self.since = since
        self.event: threading.Lock | None = None
        self.future: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def arm(self, asyncio_mode: bool) -> None:
        """Set up what the wait blocks on (asyncio mode: RuntimeError without a running loop)."""
        if asyncio_mode:
            self.loop = asyncio.get_running_loop()
            self.future = self.loop.create_future()
        else:
            self.event = threading.Lock()
            self.event.acquire()

    def wake(self) -> None:
        if self.event is not None:
            self.event.release()
        elif self.loop is not None and self.future is not None:
            # A closed loop raises RuntimeError: nobody waits on it any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Gate:
    """Counts permits and queues the callers that wait for one.

    Args:
        capacity: Number of permits, or ``None`` for no limit.
        adopted: Permits already held by connections checked out before the
            gate existed; they come back through :meth:`release` like the
            others, but were never counted as acquired.
        clock: Monotonic clock in seconds (injectable for tests).

    ``take()`` takes a free permit or raises :class:`IndexError`;
    :meth:`acquire` waits for one. Each granted permit is given back once
    with :meth:`release`.
    """

    def __init__(
        self,
        capacity: int | None,
        *,
        adopted: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.capacity = capacity
        self.waiters: deque[_Waiter] = deque()
        #: Connection records out under a permit of this gate, to their holds.
        self.out: dict[object, Any] = {}
        #: perf_counter() time from which the next checkout calls the guard's
        #: after_checkout() (set by the guard: its next scan, or -inf).
        self.slow_at = 0.0
        #: The guard's recorder, for the checkin path (set by the guard).
        self.recorder: Any = None
        #: The guard's circuit breaker is not closed: checkouts must ask it.
        self.tripped = False
        self.adopted = adopted
        self.closed = False
        self.take: Callable[[], object]
        self._give: Callable[[object], None]
        self._tokens: deque[object] | None = None
        self._released = itertools.count()
        #: How many permits the pool's checkin path gave back without
        #: :meth:`release` (it counts them itself, as the use-time
        #: histogram's count); set by the guard.
        self.checkins: Callable[[], int] = _zero
        if capacity is None:
            # No limit: taking always succeeds (and only counts), giving back
            # discards. The count is the number of permits granted.
            self._granted = itertools.count()
            self.take = self._granted.__next__
            self._give = _discard
        else:
            # Free permits are tokens; permits granted are derived on read.
            self._tokens = deque([None] * max(0, capacity - adopted))
            self.take = self._tokens.pop
            self._give = self._tokens.append
        self._take_token = self.take
        # Admission policies (configure_policy); off: the fast path stays lock-free.
        self.policy_on = False
        self.reserved = 0
        self.max_waiting: dict[str, int | None] = {}
        self.codel: Codel | None = None
        self.tag_caps: dict[str, int] = {}
        self.tag_in_use: dict[str, int] = {}
        #: Adaptive limit below capacity for non-critical callers, or None.
        self.adaptive: Gradient2 | None = None
        #: A checkin must call :meth:`on_checkin` (tag caps or adaptive limit on).
        self.policy_checkin = False
        # Waiting counters, updated under the lock (slow path only).
        self.waits = 0
        self.wait_total = 0.0
        self.wait_max = 0.0
        self.timeouts = 0

    def configure_policy(
        self,
        *,
        reserved: int = 0,
        max_waiting: dict[str, int | None] | None = None,
        codel: Codel | None = None,
        tag_caps: dict[str, int] | None = None,
        adaptive: Gradient2 | None = None,
    ) -> None:
        """Turn admission policies on (or all off): see :mod:`poolguard.policies`.

        Policies apply to a gate with a capacity; a gate without a limit
        never makes anybody wait, so there is nothing to order or shed.
        """
        with self._lock:
            self.reserved = reserved
            self.max_waiting = dict(max_waiting or {})
            self.codel = codel
            old_caps, self.tag_caps = self.tag_caps, dict(tag_caps or {})
            # A tag that stays capped keeps its count; one capped anew is
            # counted from the connections out now (uncapped, nothing counted).
            counts = {t: n for t, n in self.tag_in_use.items() if t in old_caps}
            fresh = self.tag_caps.keys() - old_caps.keys()
            for hold in list(self.out.values()) if fresh else ():
                request = hold[REQUEST]
                if request is not None and request.tag in fresh:
                    counts[request.tag] = counts.get(request.tag, 0) + 1
            self.tag_in_use = {t: n for t, n in counts.items() if t in self.tag_caps}
            self.adaptive = adaptive
            self.policy_checkin = bool(self.tag_caps) or adaptive is not None
            on = bool(
                reserved or codel or self.tag_caps or adaptive
                or any(v is not None for v in self.max_waiting.values())
            )
            self.policy_on = on and self._tokens is not None and not self.closed
            self.take = _empty if self.policy_on else self._take_token
        if self.waiters:  # a relaxed policy may let waiters through now
            self._wake()

    def on_checkin(self, request: Any, held: float) -> None:
        """A connection comes back: its tag's slot, the adaptive limit's sample."""
        if self.tag_caps and request is not None:
            self.untag(request.tag)
        if self.adaptive is not None:
            self.sample_hold(held)

    def sample_hold(self, held: float) -> None:
        """Feed a hold time to the adaptive limit (when on)."""
        adaptive = self.adaptive
        if adaptive is None:
            return
        with self._lock:
            before = adaptive.limit
            adaptive.update(held)
            grew = adaptive.limit > before
        if grew and self.waiters:
            self._wake()

    def _eligible(self, priority: str, free: int) -> bool:
        # Under the lock: reserve, then the adaptive limit (critical is exempt).
        if not may_take(priority, free, self.reserved):
            return False
        adaptive = self.adaptive
        if adaptive is None or priority == CRITICAL:
            return True
        assert self.capacity is not None
        return self.capacity - free < int(adaptive.limit)

    def untag(self, tag: str | None) -> None:
        """A connection taken under ``tag`` came back (tag bulkheads)."""
        if tag is not None and tag in self.tag_caps:
            with self._lock:
                n = self.tag_in_use.get(tag, 0)
                if n > 0:
                    self.tag_in_use[tag] = n - 1

    # -- reading --------------------------------------------------------------

    @property
    def released(self) -> int:
        """Permits given back so far."""
        return _count_value(self._released) + self.checkins()

    @property
    def acquired(self) -> int:
        """Permits granted so far."""
        released = self.released
        if self._tokens is None:
            return _count_value(self._granted)
        assert self.capacity is not None
        return released + self.capacity - len(self._tokens) - self.adopted

    @property
    def in_use(self) -> int:
        """Permits held right now (granted and not given back, adopted included)."""
        if self._tokens is None:
            released = self.released  # first, so the result is never low
            return _count_value(self._granted) - released + self.adopted
        assert self.capacity is not None
        return self.capacity - len(self._tokens)

    @property
    def waiting(self) -> int:
        """Number of callers waiting for a permit right now."""
        return len(self.waiters)

    # -- giving back ------------------------------------------------------------

    def release(self, tag: str | None = None) -> None:
        """Give back one granted permit (to the first waiter, if any)."""
        next(self._released)
        if self.tag_caps:
            self.untag(tag)
        self._give(None)
        if self.waiters:
            self._wake()

    def _wake(self) -> None:
        with self._lock:
            if self.policy_on:
                self._wake_by_policy()
                return
            while self.waiters:
                try:
                    self.take()
                except IndexError:
                    return
                waiter = self.waiters.popleft()
                waiter.granted = True
                waiter.wake()

    def _wake_by_policy(self) -> None:
        # Under the lock. Best eligible waiter first: by priority, then in
        # arrival order, or newest first while CoDel finds a standing queue.
        tokens = self._tokens
        assert tokens is not None
        now = self._clock()
        lifo = self.codel is not None and self.codel.overloaded
        while self.waiters and tokens:
            free = len(tokens)
            best: _Waiter | None = None
            for waiter in self.waiters:
                if not self._eligible(waiter.priority, free) or self._tag_full(waiter.tag):
                    continue
                if best is None or rank(waiter.priority) < rank(best.priority) or (
                    lifo and rank(waiter.priority) == rank(best.priority)
                ):
                    best = waiter
            if best is None:
                return
            tokens.pop()
            self.waiters.remove(best)
            self._count_tag(best.tag)
            if self.codel is not None:
                self.codel.on_grant(now - best.since, now)
            best.granted = True
            best.wake()
        if not self.waiters and self.codel is not None:
            self.codel.on_empty(now)

    def _tag_full(self, tag: str | None, queued: int = 0) -> bool:
        # Under the lock: ``tag`` holds its cap (with ``queued`` of its waiters).
        cap = self.tag_caps.get(tag) if tag is not None else None
        return cap is not None and self.tag_in_use.get(tag, 0) + queued >= cap  # type: ignore[arg-type]

    def _count_tag(self, tag: str | None) -> None:
        if tag is not None and tag in self.tag_caps:
            self.tag_in_use[tag] = self.tag_in_use.get(tag, 0) + 1

    def _admit_locked(self, priority: str, tag: str | None, now: float) -> bool:
        """Policy admission without waiting; raises :class:`Refused` to shed."""
        tokens = self._tokens
        assert tokens is not None
        # The tag's waiters count against its cap: each will hold a connection.
        if tag in self.tag_caps and self._tag_full(tag, sum(w.tag == tag for w in self.waiters)):
            raise Refused("tag_limit")
        my_rank = rank(priority)
        queued_ahead = any(
            rank(w.priority) <= my_rank and not self._tag_full(w.tag) for w in self.waiters
        )
        if not queued_ahead and self._eligible(priority, len(tokens)):
            tokens.pop()
            self._count_tag(tag)
            if self.codel is not None:
                self.codel.on_grant(0.0, now)
            return True
        if priority == HEALTH:
            raise Refused("health_busy")
        limit = self.max_waiting.get(priority)
        if limit is not None and sum(w.priority == priority for w in self.waiters) >= limit:
            raise Refused("queue_full")
        return False


    # -- waiting ----------------------------------------------------------------

    def acquire(
        self,
        timeout: float,
        *,
        asyncio_mode: bool,
        priority: str = NORMAL,
        tag: str | None = None,
    ) -> bool:
        """Take a permit, waiting up to ``timeout`` seconds; ``False`` on timeout.

        With ``asyncio_mode`` the caller must run inside SQLAlchemy's greenlet
        on the event loop thread: the wait suspends the greenlet and lets the
        loop run, instead of blocking it. With a policy on, a caller can be
        turned away at once: :class:`Refused` (with the reason).
        """
        waiter = _Waiter(priority, tag)
        with self._lock:
            queued = self._enqueue_locked(waiter, timeout)
            if queued is None or queued <= 0:
                if queued is not None:  # no time to wait: a timeout
                    self.timeouts += 1
                return queued is None
            slough = queued < timeout
            try:
                waiter.arm(asyncio_mode)
            except BaseException:
                self.waiters.remove(waiter)  # a queued waiter nobody waits on leaks
                raise
        try:
            start = self._clock()  # inside: an exception here must unqueue too
            self._wait(waiter, queued)
        except BaseException:
            self._abandon(waiter)
            raise
        if self._finish(waiter, self._clock() - start):
            return True
        if slough:
            raise Refused("queue_delay")
        return False

    def _enqueue_locked(self, waiter: _Waiter, timeout: float) -> float | None:
        """Under the lock: ``None`` if a permit was taken at once, else the
        time the (now queued, unless <= 0) waiter may wait."""
        if self.policy_on:
            waiter.since = self._clock()
            if self._admit_locked(waiter.priority, waiter.tag, waiter.since):
                return None
            codel = self.codel
            if (
                codel is not None
                and codel.overloaded
                and waiter.priority != CRITICAL
                and codel.slough_timeout < timeout
            ):
                # A standing queue: don't wait behind it for long.
                timeout = codel.slough_timeout
            if timeout > 0:
                self.waiters.append(waiter)
            return timeout
        # Queue first, then try again: a release between our failed take and
        # now either left its token for this take or sees us queued.
        self.waiters.append(waiter)
        try:
            self.take()
        except IndexError:
            pass
        else:
            self.waiters.pop()  # ours: appends happen only under the lock
            return None
        if timeout <= 0 or waiter.priority == HEALTH:
            self.waiters.pop()
            if waiter.priority == HEALTH:  # the health lane never waits, policy or not
                raise Refused("health_busy")
        return timeout

    def _wait(self, waiter: _Waiter, timeout: float) -> None:
        if waiter.event is not None:
            waiter.event.acquire(timeout=timeout)
            return
        assert waiter.loop is not None
        assert waiter.future is not None
        # Not asyncio.wait_for(): before Python 3.12 it swallows a
        # cancellation that comes once the future is resolved (gh-86296).
        timer = waiter.loop.call_later(timeout, _resolve, waiter.future)
        try:
            await_only(waiter.future)
        finally:
            timer.cancel()

    def _abandon(self, waiter: _Waiter) -> None:
        # Interrupted (a signal, a cancelled task): leave nothing behind.
        with self._lock:
            granted = waiter.granted
            if not granted:
                self.waiters.remove(waiter)
        if granted:
            if self.tag_caps:
                self.untag(waiter.tag)
            self._give(None)
            if self.waiters:
                self._wake()

    def _finish(self, waiter: _Waiter, waited: float) -> bool:
        with self._lock:
            self.waits += 1
            self.wait_total += waited
            self.wait_max = max(self.wait_max, waited)
            if waiter.granted:
                return True
            self.waiters.remove(waiter)
            self.timeouts += 1
            if not self.waiters and self.codel is not None:
                self.codel.on_empty(self._clock())
            return False

    def close(self) -> None:
        """Stop gating: let every waiter through now and every caller from now on."""
        with self._lock:
            self.closed = True
            self.policy_on = False
            self.policy_checkin = False
            self.take = itertools.repeat(None).__next__
            self._give = _discard
            self.out.clear()
            while self.waiters:
                waiter = self.waiters.popleft()
                waiter.granted = True
                waiter.wake()
