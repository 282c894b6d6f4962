"""The admission gate: one permit per connection handed out, one queue of waiters.

The gate holds as many permits as the pool can hand out connections. A
checkout takes a permit before it reaches the pool, so the pool's own queue
never has to wait: waiting, its timeout and (later) its order and shedding
all happen here, in one place.

The hot path takes no lock. Free permits are tokens in a :class:`deque`,
whose ``pop`` and ``append`` are atomic, so taking a free permit is one
``pop`` and giving one back is one ``append``. The lock guards only the
waiters: a caller that finds no token queues itself under the lock and then
tries once more, and a release that sees waiters wakes one under the lock,
so no wake-up is lost between the two. Without a policy, a release skips
that section while a waiter it woke has not run yet (``Gate.signalled``):
there is nothing to dispatch, and whoever clears the mark looks at the free
permits afterwards and passes the wake-up on.

Under contention the gate does not hand each free permit to a parked
waiter (a convoy: every checkout would park and be scheduled again).
Instead the release wakes the first waiter in line to take the permit
itself, one waiter at a time, and a caller already running may take it
first, as in SQLAlchemy's own queue (barging). Barging is bounded, as in
Go's ``sync.Mutex``: a woken waiter that lost that race parks again at the
head of the line, and once ``Gate.barge_bound`` has passed since it was
first woken, it is owed the next permit, which is handed to it directly
(nobody takes a permit ahead of it then). From then on the gate is in
hand-off mode, until the queue is empty or a waiter is served within the
bound of its arrival: besides any owed hand-off, one release in
``Gate.handoff_every`` hands its permit to the head of the queue, whoever
it is. So the queue moves at a share of the pool's pace, not one waiter per
bound (a queue of 250 took seconds), while running callers still take most
permits (a permit handed to a parked thread idles until the thread gets the
GIL: handing every one over, as Go's starvation mode does, cut throughput
by half at 256 threads). Each waiter is passed over for at most the bound
once it is first in line, and waits for those ahead of it at that share of
the pace; a head waiter that has used half of its timeout is handed every
permit until it has one (``URGENT_SHARE``), so a pace too slow for a short
timeout speeds up instead of timing callers out. With a policy on,
waiters queue by priority (one lane each), only newcomers of the woken
waiter's priority or better may pass it, and while nobody waits a policy of
bounded queues only takes permits without the lock.

The caller keeps track of which permits it holds (the pool marks each
checked-out record with its permit and pops the mark to release it, so each
permit is released once).

Two hazards shape the locked sections:

* Re-entry. A connection dropped without ``close()`` comes back when the
  garbage collector finalises it, on whatever thread allocated at that
  moment, possibly inside one of the gate's own locked sections. The lock is
  re-entrant, and a checkin that finds its own thread inside a section
  (``_busy``) only records what it owes (a wake-up, an untag, a hold sample);
  the section pays it when it ends (:meth:`Gate._drain`).
* Interrupts. A signal handler may raise at any bytecode boundary where
  CPython checks for pending calls (a function's entry, a loop's back edge,
  the end of a call). State that must change together is changed with
  attribute and item stores, which never check, with a C call (whose effect
  is complete when it returns) as the last step, and each waiter carries
  its own state (``granted``, ``tagged``) so an interrupted acquire can undo
  exactly what happened, however far it got. The undo runs again while it
  is interrupted: it takes the lock, and a blocked ``lock.acquire()`` runs
  the signal handlers, for as long as the holder is descheduled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable  # noqa: TC003 - used at run time for _discard
from typing import Any

from ._compat import await_only
from ._hold import REQUEST
from ._policies import CRITICAL, HEALTH, NORMAL, PRIORITIES, Admission, rank

__all__ = ["Gate"]


# Gives a permit back to a gate without a limit: there is nothing to keep.
_discard: Callable[[object], None] = deque[object](maxlen=0).append


#: How many times an undo runs while interrupted (see Gate.acquire): enough
#: for an interrupt every 0.1 ms while it blocks on the lock for 100 ms; a
#: bound, so that an undo failing for another reason cannot spin for ever.
_UNDO_TRIES = range(1000)


#: Serving order by priority (``rank()``), read inline on the policy's paths:
#: a dict item, not a Python call, per lane and per owed count looked at.
_RANK: dict[str, int] = {p: rank(p) for p in PRIORITIES}


#: The bound on barging reads the system's monotonic clock, not the gate's
#: (injected, scripted in tests: its readings are the waits it reports).
_monotonic = time.monotonic

#: In hand-off mode, a head waiter that has waited this share of its timeout
#: is handed every permit until it has one: the mode's usual pace (one permit
#: in ``Gate.handoff_every``) keeps the queue moving, this keeps a waiter from
#: timing out behind running callers when the pace is too slow for its
#: timeout (a short timeout, a long queue).
URGENT_SHARE = 0.5


def _zero() -> int:
    return 0


def _count_value(counter: itertools.count[int]) -> int:
    # itertools.count increments atomically (one C call) and shows its next
    # value only in its repr: "count(42)".
    return int(repr(counter)[6:-1])


class AdmissionRefused(Exception):
    """The admission policy turned a caller away without waiting (``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# The fast path's take() while a policy is on: every caller goes through
# acquire(), where the policy is applied under the lock. A C callable, so no
# interrupt can land inside it.
_empty: Callable[[], object] = deque[object](maxlen=0).pop


def _one_fewer(counts: dict[str, int], key: str | None) -> bool:
    # Never below 0: an undo cut short by an interrupt may run again.
    if key in counts and counts[key] > 0:
        counts[key] -= 1
        return True
    return False


def _wait_seconds(timeout: float) -> float | None:
    """A timeout as the blocking primitives take it: None for "forever", else
    at most ``threading.TIMEOUT_MAX`` (beyond which ``Lock.acquire`` raises)."""
    if timeout >= threading.TIMEOUT_MAX:
        return None
    return timeout


class _Waiter:
    """One caller's claim on a permit.

    ``granted`` is true while the caller holds a permit it got through this
    waiter and has not passed on: whoever holds the waiter gives the permit
    back if an exception cuts the checkout short. ``tagged``: its tag's
    in-use count includes it.
    """

    __slots__ = ("deadline", "event", "first_signal", "future", "granted", "handoff", "loop",
                 "priority", "queued", "queued_at", "since", "tag", "tagged", "urgent_at",
                 "woken")

    def __init__(self, priority: str = NORMAL, tag: str | None = None, since: float = 0.0) -> None:
        self.granted = False
        self.tagged = False
        self.woken = False
        #: False: not in the queue. True: in it, or just removed (the flag is
        #: set before the append and cleared after the removal).
        self.queued = False
        #: It was passed over (a running caller took the permit it was woken
        #: for) past the gate's ``barge_bound``: the next permit is handed to
        #: it directly.
        self.handoff = False
        #: When (``time.monotonic()``) it was first woken to take a free permit
        #: itself: the bound on barging counts from there.
        self.first_signal = math.inf
        #: When (``time.monotonic()``) it joined the queue: a hand-off to a
        #: waiter that waited less than the bound ends the hand-off mode.
        self.queued_at = math.inf
        #: When (``time.monotonic()``) half of its time to wait has gone: at
        #: the head from then on, hand-off mode hands it every permit.
        self.urgent_at = math.inf
        self.priority = priority
        self.tag = tag
        self.since = since
        self.event: threading.Lock | None = None
        self.future: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: asyncio: when (``loop.time()``) its wait times out (the gate's sweep).
        self.deadline = math.inf

    def arm(self, asyncio_mode: bool) -> None:
        """Set up what the wait blocks on (asyncio mode: RuntimeError without a running loop)."""
        if asyncio_mode:
            self.loop = asyncio.get_running_loop()
            self.future = self.loop.create_future()
        else:
            self.event = threading.Lock()
            self.event.acquire()

    def wake(self) -> None:
        # Once only: an interrupted dispatch may wake the same waiter again.
        # An asyncio waiter's flag can be up with no wake-up scheduled (an
        # interrupt at the end of a call below, after the store): while its
        # future is pending, it is woken again (a second _resolve does
        # nothing). Else the next dispatch dequeued it, granted, unwoken and
        # out of its loop's sweep: it waited for good, holding the permit.
        if self.woken and (self.future is None or self.future.done()):
            return
        self.woken = True
        if self.event is not None:
            self.event.release()
        elif self.loop is not None and self.future is not None:
            if asyncio._get_running_loop() is self.loop:
                # From the loop's own thread (a task released): resolved at
                # once. set_result() only schedules the task's wake-up (a
                # call_soon, nothing runs here), so the waiter runs in the
                # loop's next pass, not the one after (a callback that
                # resolves it would cost a pass: under load, one more
                # select() and GIL hand-over per wait), and no self-pipe
                # write either.
                _resolve(self.future)
                return
            # A closed loop raises RuntimeError: nobody waits on it any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Gate:
    """Counts permits and queues the callers that wait for one.

    ``barge_bound`` (seconds): how long a waiter first in line may be passed
    over by running callers, counted from when it is first woken to take a
    free permit; past it, the next permit is handed to it.

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

    #: See the class docstring. 5 ms: long enough that a running caller mostly
    #: takes the permit it gave back (no parked task or thread to schedule per
    #: checkout), short against a checkout's timeout (benchmarks/
    #: bench_contention.py measured 1, 5 and 20 ms).
    barge_bound = 0.005
    #: In hand-off mode, one dispatch in this many hands a permit to the head
    #: of the queue (see the module docstring). 16: each hand-off idles its
    #: permit until the parked caller runs, which on some machines costs
    #: 20% of the throughput at 4 (benchmarks/bench_contention.py); a head
    #: waiter close to its timeout gets every permit (URGENT_SHARE).
    handoff_every = 16

    def __init__(
        self,
        capacity: int | None,
        *,
        adopted: int = 0,
        clock: Callable[[], float] = time.monotonic,
        checkins: Callable[[], int] = _zero,
    ) -> None:
        # Re-entrant: a GC finaliser may return a connection on a thread that
        # is inside a locked section (see the module docstring).
        self._lock = threading.RLock()
        #: A locked section is running (read under the lock: on this thread).
        self._busy = False
        #: Work a re-entrant checkin left for the end of the running section.
        self._rewake = False
        self._deferred: list[tuple[str | None, float]] = []
        self._clock = clock
        self.capacity = capacity
        #: Every waiter, in arrival order.
        self.waiters: deque[_Waiter] = deque()
        #: With a policy on, the same waiters by priority, best first: the
        #: dispatch looks at the heads of a few queues, not at every waiter.
        self._lanes: tuple[tuple[str, deque[_Waiter]], ...] = tuple(
            (p, deque()) for p in sorted(PRIORITIES, key=rank)
        )
        self._lane = dict(self._lanes)
        #: The policy needs no lock while nobody waits (bounded queues only):
        #: take() is the lock-free pop whenever the queue is empty.
        self._fast_policy = False
        #: The waiter woken to take a free permit itself, not yet run (no
        #: policy): one at a time, so a release wakes nobody in vain. While
        #: set without a policy, it is the head and owed nothing, so a
        #: release's dispatch would do nothing: the pool's checkin and
        #: :meth:`returned` skip it (no lock), except in hand-off mode.
        #: Whoever clears it looks at the free permits afterwards and passes
        #: the wake-up on.
        self.signalled: _Waiter | None = None
        #: Queued waiters owed a hand-off (they lost a race once), by
        #: priority; newcomers of that priority or worse queue behind them.
        self._owed: dict[str, int] = {}
        #: Hand-off mode (see the module docstring): set when a waiter is
        #: first owed a hand-off, cleared when the queue empties or a waiter
        #: served had waited less than the bound. While set, every release
        #: dispatches (even while a waiter is signalled) and one dispatch in
        #: ``handoff_every`` hands a permit to the head (``_turns`` counts).
        self.handing_off = False
        self._turns = 0
        #: Connection records out under a permit of this gate, to their holds.
        self.out: dict[object, Any] = {}
        #: Checkouts in their pre-ping (not in ``out`` yet): DBAPI connection
        #: -> (perf_counter() at its start, what the holders report says).
        self.pinging: dict[object, tuple[float, str]] = {}
        self.adopted = adopted
        self.closed = False
        self.take: Callable[[], object]
        #: Put one permit back (a C call on a bounded gate): the pool's checkin
        #: path calls it inline, then :meth:`returned` or counts it itself.
        self.give: Callable[[object], None]
        self._tokens: deque[object] | None = None
        self._released = itertools.count()
        #: How many permits the pool's checkin path gave back without
        #: :meth:`release` (it counts them itself, as the use-time
        #: histogram's count).
        self.checkins: Callable[[], int] = checkins
        if capacity is None:
            # No limit: taking always succeeds (and only counts), giving back
            # discards. The count is the number of permits granted.
            self._granted = itertools.count()
            self.take = self._granted.__next__
            self.give = _discard
        else:
            # Free permits are tokens; permits granted are derived on read.
            self._tokens = deque([None] * max(0, capacity - adopted))
            self.take = self._tokens.pop
            self.give = self._tokens.append
        self._take_token = self.take
        #: take() for a caller of the last priority (background): with a
        #: policy on it may not pass anybody waiting, so it is the lock-free
        #: pop only while nobody waits.
        self.take_last: Callable[[], object] = self.take
        #: The admission policy (configure_policy), consulted only when not
        #: None: without one, the fast path stays lock-free.
        self.admission: Admission | None = None
        #: Connections out by tag, for the policy's tag caps (its enforcement).
        self.tag_in_use: dict[str, int] = {}
        #: A checkin must call :meth:`on_checkin` (tag caps or adaptive limit on).
        self.policy_checkin = False
        #: Told each checkin's tag and hold time while the fleet's fair share
        #: caps tags (``_fleet.FairShare``), else None.
        self.checkin_seen: Callable[[str | None, float], None] | None = None
        # Waiting counters, updated under the lock (slow path only).
        self.waits = 0
        self.wait_total = 0.0
        self.wait_max = 0.0
        self.timeouts = 0
        #: asyncio waits: each loop's next sweep, (when, its TimerHandle).
        self._sweeps: dict[asyncio.AbstractEventLoop, tuple[float, asyncio.TimerHandle]] = {}

    # -- locked sections --------------------------------------------------------
    #
    # Each one is written out as
    #
    #     with self._lock:
    #         try:
    #             self._busy = True
    #             ...
    #         finally:
    #             self._busy = False
    #             if self._rewake or self._deferred:
    #                 self._drain()
    #
    # (a helper would be a Python call, where an interrupt may land between
    # taking the lock and the try).

    @property
    def policies_on(self) -> bool:
        """An admission policy is on."""
        return self.admission is not None

    def _set_take(self) -> None:
        # In a section, as the queue, the hand-offs owed or the policy change.
        # An interrupt before the stores leaves the old ones until the next
        # change: a lock-free take one caller too many (a newcomer passes a
        # waiter once) or too few (it takes the lock), never a lost permit.
        if self.admission is None:
            if not self.closed:
                self.take = self.take_last = self._take_token
        elif not self._fast_policy:
            self.take = self.take_last = _empty
        elif not self.waiters:
            self.take = self.take_last = self._take_token
        elif not self._lane[CRITICAL] and not any(self._owed.values()):
            # Bounded queues only, normal (or background) waiters, none owed
            # a hand-off: a newcomer of normal priority or better may pass
            # them (what _admit_locked decides too), so it needs no lock. A
            # background newcomer must not: it takes take_last.
            self.take = self._take_token
            self.take_last = _empty
        else:
            self.take = self.take_last = _empty

    def _dequeue(self, waiter: _Waiter) -> None:
        # In a section: out of the queue (and its lane), wherever it is.
        if waiter.queued:
            # try/except, not contextlib.suppress(): no context manager to
            # build (two calls each) on every wait's way out.
            try:  # noqa: SIM105
                self.waiters.remove(waiter)
            except ValueError:
                pass
            try:  # noqa: SIM105
                self._lane[waiter.priority].remove(waiter)
            except ValueError:
                pass
            waiter.queued = False
            if not self.waiters:
                # The store first, the C call last: an interrupt after
                # clear() must not leave hand-off mode on for an empty queue.
                self.handing_off = False
                self._owed.clear()
        if waiter.handoff:
            # As in _abandon: the count, then the flag, with no call between.
            owed, mine = self._owed, waiter.priority
            if mine in owed and owed[mine] > 0:
                owed[mine] -= 1
            waiter.handoff = False
        if self.signalled is waiter:
            self.signalled = None
        if self._fast_policy:
            self._set_take()

    def _drain(self) -> None:
        # Under the lock, between sections: pay what re-entrant checkins left.
        while self._rewake or self._deferred:
            try:
                self._busy = True
                deferred, self._deferred = self._deferred, []
                self._rewake = False
                for tag, held in deferred:
                    self._settle_locked(tag, held)
                if self.waiters:
                    self._dispatch()
            finally:
                self._busy = False

    def configure_policy(self, admission: Admission | None = None, **settings: Any) -> None:
        """Turn an admission policy on (or off): an :class:`Admission`, or its settings.

        Policies apply to a gate with a capacity; a gate without a limit
        never makes anybody wait, so there is nothing to order or shed.
        """
        if admission is None and settings:
            admission = Admission(**settings)
        if admission is not None and not (
            admission.on and self._tokens is not None and not self.closed
        ):
            admission = None
        with self._lock:
            try:
                self._busy = True
                old = self.admission
                old_caps = old.tag_limits if old is not None else {}
                caps = admission.tag_limits if admission is not None else {}
                # A tag that stays capped keeps its count; one capped anew is
                # counted from the connections out now (uncapped, nothing counted).
                counts = {t: n for t, n in self.tag_in_use.items() if t in old_caps}
                fresh = caps.keys() - old_caps.keys()
                for hold in list(self.out.values()) if fresh else ():
                    request = hold[REQUEST]
                    if request is not None and request.tag in fresh:
                        counts[request.tag] = counts.get(request.tag, 0) + 1
                self.tag_in_use = {t: n for t, n in counts.items() if t in caps}
                self.admission = admission
                self.policy_checkin = admission is not None and admission.on_checkin
                # Bounded queues alone shape only who waits: with nobody
                # waiting, a checkout may take a free permit without the lock.
                self._fast_policy = admission is not None and not admission.shapes_grants
                for lane in self._lane.values():
                    lane.clear()
                if admission is not None:
                    for waiter in self.waiters:
                        self._lane[waiter.priority].append(waiter)
                self._set_take()
                # A relaxed policy may let waiters through now.
                self._rewake = bool(self.waiters)
            finally:
                self._busy = False
                if self._rewake or self._deferred:
                    self._drain()

    def set_tag_caps(self, caps: dict[str, int]) -> bool:
        """Replace the policy's tag caps (the fleet's fair share); whether a policy was there.

        Every tag capped is counted afresh from the connections out now.
        """
        with self._lock:
            try:
                self._busy = True
                admission = self.admission
                if admission is None:
                    return False
                counts: dict[str, int] = {}
                for hold in list(self.out.values()):
                    request = hold[REQUEST]
                    tag = request.tag if request is not None else None
                    if tag is not None and tag in caps:
                        counts[tag] = counts.get(tag, 0) + 1
                admission.tag_limits = caps
                self.tag_in_use = counts
                self.policy_checkin = admission.on_checkin
                self._fast_policy = not admission.shapes_grants
                self._set_take()
                self._rewake = bool(self.waiters)
                return True
            finally:
                self._busy = False
                if self._rewake or self._deferred:
                    self._drain()

    def on_checkin(self, request: Any, held: float) -> None:
        """A connection comes back: its tag's slot, the adaptive limit's sample."""
        if (admission := self.admission) is None:  # turned off since the pool looked
            return
        if admission.tag_limits and request is not None:
            seen = self.checkin_seen
            if seen is not None:
                seen(request.tag, held)
            self.untag(request.tag)
        if admission.adaptive is not None:
            self.sample_hold(held)

    def sample_hold(self, held: float) -> None:
        """Feed a hold time to the adaptive limit (when on)."""
        admission = self.admission
        if admission is not None and admission.adaptive is not None:
            self._settle(None, held)

    def _settle(self, tag: str | None, held: float) -> None:
        # A checkin's untag (``tag``), else its hold sample (``held``), in a
        # section of its own, or owed to the running one when re-entered.
        with self._lock:
            if self._busy:  # re-entered (a GC finaliser): after the section
                self._deferred.append((tag, held))
                return
            try:
                self._busy = True
                self._settle_locked(tag, held)
            finally:
                self._busy = False
                if self._rewake or self._deferred:
                    self._drain()

    def _settle_locked(self, tag: str | None, held: float) -> None:
        if tag is not None:
            self._untag_locked(tag)
        else:
            self._sample_locked(held)

    def _sample_locked(self, held: float) -> None:
        admission = self.admission
        adaptive = admission.adaptive if admission is not None else None
        if adaptive is None:
            return
        before = adaptive.limit
        adaptive.update(held)
        if adaptive.limit > before and self.waiters:
            self._rewake = True

    def untag(self, tag: str | None) -> None:
        """A connection taken under ``tag`` came back (tag bulkheads)."""
        admission = self.admission
        if tag is not None and admission is not None and tag in admission.tag_limits:
            self._settle(tag, 0.0)

    def _untag_locked(self, tag: str) -> None:
        if _one_fewer(self.tag_in_use, tag) and self.waiters:  # one of that tag may go now
            self._rewake = True

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
        # The permit first: an interrupt after it loses a count, not a permit.
        self.give(None)
        next(self._released)
        if self.policy_checkin:
            self.untag(tag)
        if self.waiters and (self.signalled is None or self.admission is not None
                             or self.handing_off):
            self.wake()

    def returned(self) -> None:
        """Count a permit the pool put back with :attr:`give`, and wake a waiter.

        The pool's own release path: ``give(None)`` (one C call: once it
        returns the permit is back, whatever interrupts next), then this.
        """
        next(self._released)
        # No dispatch (no lock) while a waiter is signalled without a policy
        # (see ``signalled``), unless in hand-off mode (its turns count releases).
        if self.waiters and (self.signalled is None or self.admission is not None
                             or self.handing_off):
            self.wake()

    def wake(self) -> None:
        """Hand free permits to waiters (after a release)."""
        with self._lock:
            if self._busy:  # re-entered (a GC finaliser): after the section
                self._rewake = True
                return
            try:
                self._busy = True
                self._dispatch()
            finally:
                self._busy = False
                if self._rewake or self._deferred:
                    self._drain()

    def _dispatch(self) -> None:
        # Under the lock, in a section. Without a policy, a free permit is
        # not handed to the head waiter: the head is woken to take it itself,
        # and a running caller may take it first (no convoy of parked
        # threads, as in SQLAlchemy's own queue). A head passed over for
        # longer than ``barge_bound`` gets the next permit handed over.
        admission = self.admission
        if admission is not None:
            self._dispatch_by_policy(admission)
            return
        waiters = self.waiters
        take = self.take
        while waiters:
            waiter = waiters[0]
            if not waiter.granted:
                if not (waiter.handoff or self._overdue(waiter)
                        or (self.handing_off and self._tokens and self._handoff_turn(waiter))):
                    if self.signalled is None and self._tokens:
                        self._signal(waiter)
                    return
                waiter.granted = True
                try:
                    take()
                except IndexError:
                    waiter.granted = False
                    return
            # Woken before it leaves the queue: an interrupt in between leaves
            # a granted waiter at the head, which the next pass finishes.
            waiter.wake()
            if waiters and waiters[0] is waiter:
                waiters.popleft()
                waiter.queued = False
                if self.signalled is waiter:  # handed the permit it was woken to race for
                    self.signalled = None
                if not waiters:
                    self.handing_off = False

    def _signal(self, waiter: _Waiter) -> None:
        # In a section: wake ``waiter`` to take a free permit itself. An
        # asyncio waiter, released from its own loop, is woken only once the
        # releasing task has run on to its next await (a loop callback): if
        # that task, or another running one, took the permit meanwhile (as it
        # mostly does), the waiter is owed the next one instead and stays
        # parked, instead of being scheduled to find nothing and park again.
        if waiter.first_signal == math.inf:
            waiter.first_signal = _monotonic()
        loop = waiter.loop
        if loop is not None and asyncio._get_running_loop() is loop:
            loop.call_soon(self._signal_soon, waiter)
        else:
            waiter.wake()
        self.signalled = waiter

    def _signal_soon(self, waiter: _Waiter) -> None:
        # A loop callback (see _signal): wake the waiter if a permit is still
        # free, else leave it parked, first in line (owed the next permit
        # once past the bound). Nothing to do if it was woken, granted, owed
        # or dequeued meanwhile.
        with self._lock:
            try:
                self._busy = True
                if waiter.queued and not (waiter.woken or waiter.granted or waiter.handoff):
                    if self._tokens and not self.closed:
                        waiter.woken = True
                        if waiter.future is not None:
                            _resolve(waiter.future)  # on its loop's thread: at once
                    else:
                        if self.signalled is waiter:
                            self.signalled = None
                        self._overdue(waiter)
                        # A release that saw it signalled woke nobody: a permit
                        # given back since the look above is dispatched now.
                        self._rewake = bool(self._tokens)
            finally:
                self._busy = False
                if self._rewake or self._deferred:
                    self._drain()

    def _dispatch_by_policy(self, admission: Admission) -> None:
        # Best eligible waiter first: by priority, then in arrival order, or
        # newest first while CoDel finds a standing queue. Only the heads of
        # the lanes are looked at (and past a head only for tag caps).
        tokens = self._tokens
        capacity = self.capacity
        assert tokens is not None
        assert capacity is not None
        now = self._clock()
        codel = admission.codel
        lifo = codel is not None and codel.overloaded
        while tokens:
            free = len(tokens)
            best: _Waiter | None = None
            for priority, lane in self._lanes:
                if lane and admission.eligible(
                    priority, free, capacity,
                    self._critical_held()
                    if free <= admission.reserved and priority != CRITICAL else 0,
                ):
                    best = (  # _ready(), inline without tag caps
                        self._ready(admission, lane, lifo)
                        if admission.tag_limits
                        else (lane[-1] if lifo else lane[0])
                    )
                    if best is not None:
                        break
            if best is None:
                break
            if not best.granted:
                signalled = self.signalled
                if not best.handoff and (
                    signalled is None
                    or signalled is best
                    or _RANK[signalled.priority] <= _RANK[best.priority]
                ) and not self._overdue(best) and not (
                    self.handing_off and self._handoff_turn(best)
                ):
                    # Woken to take the permit itself, one waiter at a time:
                    # a running caller of its priority or better may take it
                    # first (no convoy), for up to barge_bound; past it, it
                    # is handed the next one.
                    if signalled is None:
                        self._signal(best)
                    break
                if not self._grant(admission, best):
                    break
                if codel is not None and best.priority != CRITICAL:
                    # CoDel sheds non-critical waits: their queue is the one
                    # it watches (critical waiters pass it, and wait little).
                    codel.on_grant(now - best.since, now)
            best.wake()
            self._dequeue(best)
        if not self.waiters and codel is not None:
            codel.on_empty(now)

    def _overdue(self, waiter: _Waiter) -> bool:
        # In a section: ``waiter`` is owed a hand-off, made so now if it was
        # first woken longer than ``barge_bound`` ago (while nobody is owed
        # one, a running caller may take a free permit ahead of it).
        if waiter.handoff:
            return True
        if waiter.first_signal == math.inf or _monotonic() - waiter.first_signal < self.barge_bound:
            return False
        # The count, then the flag, no call between (as _dequeue).
        owed, mine = self._owed, waiter.priority
        owed[mine] = (owed[mine] if mine in owed else 0) + 1  # noqa: SIM401 - no call
        waiter.handoff = True
        self.handing_off = True  # hand-off mode (see the module docstring)
        if self._fast_policy:
            self._set_take()  # owed first: no lock-free take now
        return True

    def _handoff_turn(self, head: _Waiter) -> bool:
        # In a section, in hand-off mode: this dispatch hands a permit to the
        # head (one in handoff_every, or every one while the head has used
        # up half of its time to wait).
        self._turns += 1
        if self._turns < self.handoff_every and _monotonic() < head.urgent_at:
            return False
        self._turns = 0
        return True

    def _owed_at_or_above(self, priority: str) -> bool:
        # In a section: a waiter of this priority or better is owed a hand-off.
        my_rank = _RANK[priority]
        for p, n in self._owed.items():  # noqa: SIM110 - a loop: no generator frames
            if n > 0 and _RANK[p] <= my_rank:
                return True
        return False

    def _better_waiting(self, admission: Admission, priority: str) -> bool:
        # In a section: a waiter of a better priority could be served now.
        my_rank = _RANK[priority]
        for p, lane in self._lanes:
            if _RANK[p] >= my_rank:
                return False
            if lane and (
                not admission.tag_limits or self._ready(admission, lane, False) is not None
            ):
                return True
        return False

    def _ready(self, admission: Admission, lane: deque[_Waiter], lifo: bool) -> _Waiter | None:
        # The waiter of ``lane`` to serve first whose tag is not at its cap.
        if not admission.tag_limits:
            return lane[-1] if lifo else lane[0]
        in_use = self.tag_in_use
        for waiter in reversed(lane) if lifo else lane:
            if waiter.granted or not admission.tag_full(waiter.tag, in_use):
                return waiter
        return None

    def _grant(self, admission: Admission, waiter: _Waiter) -> bool:
        # In a section, policy on: take a token for ``waiter``. Stores first,
        # the pop last: no interrupt can split them. The pop fails only when
        # a lock-free take (a bounded-queue policy, nobody queued) won it.
        tokens = self._tokens
        assert tokens is not None
        waiter.granted = True
        tag = waiter.tag
        counts = self.tag_in_use
        tagged = tag is not None and tag in admission.tag_limits
        if tagged:
            counts[tag] = (counts[tag] if tag in counts else 0) + 1  # type: ignore[index]  # noqa: SIM401 - no call
            waiter.tagged = True
        try:
            tokens.pop()
        except IndexError:
            if tagged:
                counts[tag] -= 1  # type: ignore[index]
                waiter.tagged = False
            waiter.granted = False
            return False
        return True

    def _admit_locked(self, admission: Admission, waiter: _Waiter, now: float) -> bool:
        """Policy admission without waiting; raises :class:`AdmissionRefused` to shed."""
        tokens = self._tokens
        capacity = self.capacity
        assert tokens is not None
        assert capacity is not None
        priority, tag = waiter.priority, waiter.tag
        # The tag's waiters count against its cap: each will hold a connection.
        if tag in admission.tag_limits and admission.tag_full(
            tag, self.tag_in_use, sum(w.tag == tag for w in self.waiters)
        ):
            # A cap the fair share set (a tag with no stated limit): its own reason.
            raise AdmissionRefused("tag_limit" if dict.__contains__(admission.tag_limits, tag)
                                   else "fair_share")
        # Waiters of a better priority go first, and so do those owed a
        # hand-off; a newcomer may take a free permit ahead of waiters of its
        # own priority (the woken one among them takes the next, handed over).
        queued_ahead = self._better_waiting(admission, priority) or (
            bool(self._owed) and self._owed_at_or_above(priority)  # no call while none owed
        )
        free = len(tokens)
        if (
            not queued_ahead
            and admission.eligible(
                priority, free, capacity,
                self._critical_held()
                if free <= admission.reserved and priority != CRITICAL else 0,
            )
            and self._grant(admission, waiter)
        ):
            if admission.codel is not None and not self.waiters:
                # No wait, and nobody queued: no standing queue. A caller
                # taking a permit past queued ones (critical) says nothing
                # about how long those wait.
                admission.codel.on_grant(0.0, now)
            return True
        if priority == HEALTH:
            raise AdmissionRefused("health_busy")
        if admission.queue_full(priority, len(self._lane[priority])):
            raise AdmissionRefused("queue_full")
        return False


    # -- waiting ----------------------------------------------------------------

    def acquire(  # noqa: PLR0912 - one frame: its handler covers every step
        self,
        timeout: float | None,
        *,
        asyncio_mode: bool,
        priority: str = NORMAL,
        tag: str | None = None,
        waiter: _Waiter | None = None,
    ) -> bool:
        """Take a permit, waiting up to ``timeout`` seconds; ``False`` on timeout.

        ``timeout=None`` waits as long as it takes (SQLAlchemy's
        ``pool_timeout=None``). With ``asyncio_mode`` the caller must run
        inside SQLAlchemy's greenlet on the event loop thread: the wait
        suspends the greenlet and lets the loop run, instead of blocking it.
        With a policy on, a caller can be turned away at once:
        :class:`AdmissionRefused` (with the reason).

        ``waiter`` (from :meth:`new_waiter`) lets the caller see, if an
        exception reaches it after the permit was granted, that it holds
        one (``waiter.granted``). An exception raised out of ``acquire``
        itself leaves nothing behind: no queued waiter, no permit.
        """
        if waiter is None:
            waiter = _Waiter(priority, tag)
        else:
            waiter.priority, waiter.tag = priority, tag
            waiter.first_signal = math.inf
        limit = math.inf if timeout is None else timeout
        try:
            with self._lock:
                try:
                    self._busy = True
                    queued = self._enqueue_locked(waiter, limit)
                    if queued > 0 and not waiter.granted:
                        waiter.arm(asyncio_mode)
                finally:
                    self._busy = False
                    if self._rewake or self._deferred:
                        self._drain()
            if waiter.granted:
                return True
            if queued <= 0:  # no time to wait: a timeout
                with self._lock:
                    self.timeouts += 1
                return False
            start = self._clock()
            left = queued
            while True:
                self._wait(waiter, left)
                waited = self._clock() - start
                verdict = self._finish(waiter, waited, queued)
                if verdict is not None:
                    break
                left = queued - waited  # woken, but a running caller took the permit
            if verdict:
                return True
        except BaseException:
            # However far it got (a signal's exception can land between any
            # two steps, even in the clean-up): undo it, again while
            # interrupted. Mostly it is interrupted while it blocks on the
            # lock (a lock's wait runs the signal handlers), for as long as a
            # holder is descheduled: a fixed number of tries ran out there,
            # and left the waiter queued for good (a later hand-off gave it a
            # permit nobody held). The first exception propagates.
            for _ in _UNDO_TRIES:
                try:
                    self._abandon(waiter)
                except BaseException:  # noqa: BLE001, S112 - interrupted again: once more
                    continue
                break
            raise
        if queued < limit:
            raise AdmissionRefused("queue_delay")
        return False

    @staticmethod
    def new_waiter() -> _Waiter:
        """A waiter for :meth:`acquire`'s ``waiter`` argument."""
        return _Waiter()

    def _enqueue_locked(self, waiter: _Waiter, timeout: float) -> float:
        """In a section: grant a permit at once (``waiter.granted``), or queue
        the waiter and return how long it may wait (not queued if <= 0)."""
        admission = self.admission
        if admission is not None:
            waiter.since = self._clock()
            if self._admit_locked(admission, waiter, waiter.since):
                return timeout
            codel = admission.codel
            if (
                codel is not None
                and codel.overloaded
                and waiter.priority != CRITICAL
                and codel.slough_timeout < timeout
            ):
                # A standing queue: don't wait behind it for long.
                timeout = codel.slough_timeout
            if timeout > 0:
                waiter.queued_at = _monotonic()
                waiter.urgent_at = waiter.queued_at + timeout * URGENT_SHARE
                waiter.queued = True
                self.waiters.append(waiter)
                self._lane[waiter.priority].append(waiter)
                self._set_take()  # queued callers first, unless a newcomer may pass them
            return timeout
        # Queue first, then try again: a release between our failed take and
        # now either left its token for this take or sees us queued.
        waiter.queued_at = _monotonic()
        waiter.urgent_at = waiter.queued_at + timeout * URGENT_SHARE
        waiter.queued = True
        self.waiters.append(waiter)
        waiter.granted = True  # true once the take below returns
        try:
            self.take()
        except IndexError:
            waiter.granted = False
        else:
            self.waiters.pop()  # ours: appends happen only in sections
            waiter.queued = False
            return timeout
        if timeout <= 0 or waiter.priority == HEALTH:
            self.waiters.pop()
            waiter.queued = False
            if waiter.priority == HEALTH:  # the health lane never waits, policy or not
                raise AdmissionRefused("health_busy")
        return timeout

    def _wait(self, waiter: _Waiter, timeout: float) -> None:
        seconds = _wait_seconds(timeout)
        if waiter.event is not None:
            if seconds is None:
                waiter.event.acquire()
            else:
                waiter.event.acquire(timeout=seconds)
            return
        assert waiter.loop is not None
        assert waiter.future is not None
        if seconds is not None:
            # No timer of its own (a TimerHandle, pushed on and later popped
            # off the loop's heap, a few Python comparisons each): the gate's
            # sweep for this loop resolves it at its deadline. Deadlines come
            # in about the order of arrival, so mostly the sweep already due
            # earlier covers it. Not asyncio.wait_for(): before Python 3.12 it
            # swallows a cancellation that comes once the future is resolved
            # (gh-86296).
            loop = waiter.loop
            deadline = waiter.deadline = loop.time() + seconds
            due = self._sweeps.get(loop)
            if due is None or due[0] > deadline:
                self._sweep_at(loop, deadline)
        await_only(waiter.future)

    def _sweep_at(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        # On ``loop``'s thread (the only one that touches its entry): the
        # loop's sweep runs at ``when``, not later. A loop closed meanwhile
        # never runs its sweep: its entry is dropped here.
        due = self._sweeps.get(loop)
        if due is not None:
            due[1].cancel()
        for other in [lp for lp in self._sweeps if lp is not loop and lp.is_closed()]:
            self._sweeps.pop(other, None)
        self._sweeps[loop] = (when, loop.call_at(when, self._sweep, loop))

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        # A loop callback at the earliest deadline of its waiters: resolve
        # the futures of those past their deadline (each then finds it timed
        # out, as it would after a timer of its own), and run again at the
        # next deadline. At most once per deadline, whatever the traffic.
        self._sweeps.pop(loop, None)
        with self._lock:
            now = loop.time()
            upcoming = math.inf
            for waiter in list(self.waiters):
                future = waiter.future
                if waiter.loop is not loop or future is None or future.done():
                    continue
                if waiter.deadline <= now:
                    future.set_result(None)
                elif waiter.deadline < upcoming:
                    upcoming = waiter.deadline
        if upcoming < math.inf:
            self._sweep_at(loop, upcoming)

    def give_back(self, waiter: _Waiter) -> None:
        """Give back the permit ``waiter`` was granted and the caller never
        passed on (a checkout that failed after its wait). Idempotent: a call
        cut short by an interrupt can simply run again.

        An interrupt inside does not cut it short (it runs again, as the
        undo in :meth:`acquire`): it propagates once the permit is back. Only
        one at its very entry does, for the caller to call it again.
        """
        error: BaseException | None = None
        for _ in _UNDO_TRIES:
            try:
                self._abandon(waiter, counted=True)
            except BaseException as exc:  # noqa: BLE001 - interrupted: once more
                if error is None:
                    error = exc
                continue
            break
        if error is not None:
            raise error

    def _abandon(self, waiter: _Waiter, *, counted: bool = False) -> None:
        # Interrupted (a signal, a cancelled task): leave nothing behind.
        # Idempotent: the waiter's flags say what is left to undo.
        with self._lock:
            try:
                self._busy = True
                self._dequeue(waiter)
                if waiter.tagged:
                    # _one_fewer() spelled out: no call, so no interrupt
                    # between the count and the flag (the flag last).
                    tag, counts = waiter.tag, self.tag_in_use
                    if tag in counts and counts[tag] > 0:
                        counts[tag] -= 1
                    waiter.tagged = False
                if waiter.granted:
                    waiter.granted = False
                    self.give(None)  # the permit is back once this returns
                    if counted:  # a permit acquire() returned: a release
                        next(self._released)
                if self.waiters and self._tokens:  # its wake-up, passed on
                    self._rewake = True
            finally:
                self._busy = False
                if self._rewake or self._deferred:
                    self._drain()

    def _finish(  # noqa: PLR0912 - one locked section
        self, waiter: _Waiter, waited: float, timeout: float = 0.0
    ) -> bool | None:
        """After a wait: True (a permit), False (timed out), or None: woken
        without a permit, to wait again (no policy: a running caller took it)."""
        with self._lock:
            try:
                self._busy = True
                admission = self.admission
                codel = admission.codel if admission is not None else None
                if waiter.granted:
                    pass
                elif admission is None:
                    # Woken to take a free permit (or timed out while one is
                    # free): take it. The flag first, as in _enqueue_locked.
                    waiter.granted = True
                    try:
                        self.take()
                    except IndexError:
                        waiter.granted = False
                elif (
                    waiter.woken and self._take_as_woken(admission, waiter) and codel is not None
                    and waiter.priority != CRITICAL
                ):
                    codel.on_grant(waited, self._clock())
                if not waiter.granted and waited < timeout and waiter.woken and not self.closed:
                    # Lost the race: wait again, first in line (owed a
                    # hand-off once passed over for longer than the bound).
                    if self.signalled is waiter:
                        self.signalled = None
                    self._overdue(waiter)
                    waiter.woken = False
                    if waiter.future is not None:
                        waiter.arm(True)
                    self._rewake = bool(self._tokens)
                    return None
                # Granted or not: an interrupted dispatch may leave a granted
                # waiter queued (its wake-up lost, not its permit).
                self._dequeue(waiter)
                self.waits += 1
                self.wait_total += waited
                if waited > self.wait_max:
                    self.wait_max = waited
                if self.waiters and self._tokens:  # pass the wake-up on
                    self._rewake = True
                if waiter.granted:
                    if self.handing_off and _monotonic() - waiter.queued_at < self.barge_bound:
                        # Served soon after it came: the queue moves (the
                        # empty queue ends it in _dequeue).
                        self.handing_off = False
                    if self.signalled is None and not self.waiters and codel is not None:
                        codel.on_empty(self._clock())  # took the last queued permit itself
                    return True
                self.timeouts += 1
                if not self.waiters and codel is not None:
                    codel.on_empty(self._clock())
                return False
            finally:
                self._busy = False
                if self._rewake or self._deferred:
                    self._drain()

    def _take_as_woken(self, admission: Admission, waiter: _Waiter) -> bool:
        # In a section, policy on: a waiter woken to take a free permit takes
        # it, if the policy still lets it (nobody better queued meanwhile).
        tokens = self._tokens
        capacity = self.capacity
        assert tokens is not None
        assert capacity is not None
        free, priority = len(tokens), waiter.priority
        return (
            not self._better_waiting(admission, priority)
            and not admission.tag_full(waiter.tag, self.tag_in_use)
            and admission.eligible(
                priority, free, capacity,
                self._critical_held()
                if free <= admission.reserved and priority != CRITICAL else 0,
            )
            and self._grant(admission, waiter)
        )

    def _critical_held(self) -> int:
        # In a section, only when a non-critical caller meets the critical
        # reserve: the permits critical requests hold count toward it
        # (policies.may_take). Checkouts still in their pre-ping are not in
        # ``out`` yet: not counted, the reserve errs on the strict side.
        held = 0
        for hold in list(self.out.values()):
            request = hold[REQUEST]
            if request is not None and request.priority == CRITICAL:
                held += 1
        return held

    def close(self) -> None:
        """Stop gating: let every waiter through now and every caller from now on."""
        with self._lock:
            try:
                self._busy = True
                self.closed = True
                self.admission = None
                self.policy_checkin = False
                self.take = self.take_last = itertools.repeat(None).__next__
                self.give = _discard
                self.out.clear()
                for lane in self._lane.values():
                    lane.clear()
                while self.waiters:
                    waiter = self.waiters[0]
                    waiter.granted = True
                    waiter.wake()
                    self.waiters.popleft()
                    waiter.queued = False
            finally:
                self._busy = False
