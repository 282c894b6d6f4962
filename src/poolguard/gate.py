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

__all__ = ["Gate"]


# Gives a permit back to a gate without a limit: there is nothing to keep.
_discard: Callable[[object], None] = deque[object](maxlen=0).append


def _zero() -> int:
    return 0


def _count_value(counter: itertools.count[int]) -> int:
    # itertools.count increments atomically (one C call) and shows its next
    # value only in its repr: "count(42)".
    return int(repr(counter)[6:-1])


class _Waiter:
    __slots__ = ("event", "future", "granted", "loop")

    def __init__(self) -> None:
        self.granted = False
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
        # Waiting counters, updated under the lock (slow path only).
        self.waits = 0
        self.wait_total = 0.0
        self.wait_max = 0.0
        self.timeouts = 0

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

    def release(self) -> None:
        """Give back one granted permit (to the first waiter, if any)."""
        next(self._released)
        self._give(None)
        if self.waiters:
            self._wake()

    def _wake(self) -> None:
        with self._lock:
            while self.waiters:
                try:
                    self.take()
                except IndexError:
                    return
                waiter = self.waiters.popleft()
                waiter.granted = True
                waiter.wake()

    # -- waiting ----------------------------------------------------------------

    def acquire(self, timeout: float, *, asyncio_mode: bool) -> bool:
        """Take a permit, waiting up to ``timeout`` seconds; ``False`` on timeout.

        With ``asyncio_mode`` the caller must run inside SQLAlchemy's greenlet
        on the event loop thread: the wait suspends the greenlet and lets the
        loop run, instead of blocking it.
        """
        waiter = _Waiter()
        with self._lock:
            # Queue first, then try again: a release between our failed take
            # and now either left its token for this take or sees us queued.
            self.waiters.append(waiter)
            try:
                self.take()
            except IndexError:
                pass
            else:
                self.waiters.pop()  # ours: appends happen only under the lock
                return True
            if timeout <= 0:
                self.waiters.pop()
                self.timeouts += 1
                return False
            try:
                waiter.arm(asyncio_mode)
            except BaseException:
                self.waiters.pop()  # ours, as above: a queued waiter nobody waits on leaks
                raise
        try:
            start = self._clock()
            if waiter.event is not None:
                waiter.event.acquire(timeout=timeout)
            else:
                assert waiter.loop is not None
                assert waiter.future is not None
                # Not asyncio.wait_for(): before Python 3.12 it swallows a
                # cancellation that comes once the future is resolved (gh-86296).
                timer = waiter.loop.call_later(timeout, _resolve, waiter.future)
                try:
                    await_only(waiter.future)
                finally:
                    timer.cancel()
        except BaseException:
            # Interrupted (a signal, a cancelled task): leave nothing behind.
            with self._lock:
                granted = waiter.granted
                if not granted:
                    self.waiters.remove(waiter)
            if granted:
                self._give(None)
                if self.waiters:
                    self._wake()
            raise
        waited = self._clock() - start
        with self._lock:
            self.waits += 1
            self.wait_total += waited
            self.wait_max = max(self.wait_max, waited)
            if waiter.granted:
                return True
            self.waiters.remove(waiter)
            self.timeouts += 1
            return False

    def close(self) -> None:
        """Stop gating: let every waiter through now and every caller from now on."""
        with self._lock:
            self.closed = True
            self.take = itertools.repeat(None).__next__
            self._give = _discard
            self.out.clear()
            while self.waiters:
                waiter = self.waiters.popleft()
                waiter.granted = True
                waiter.wake()
