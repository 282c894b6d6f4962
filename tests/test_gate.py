"""Unit tests of :class:`poolguard._gate.Gate` as a component (no database).

Waits that are measured use an injected clock, so the wait-time counters are
exact. Real time is used only to make things happen (a short timeout runs
out, a signal arrives); no assertion depends on how long anything took.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.util import greenlet_spawn

from _support import async_wait_until, wait_until
from poolguard._gate import Gate

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

# Upper bound of any wait for another thread or task to get somewhere. It only
# stops a broken test from hanging; no assertion is about elapsed time.
SAFETY_TIMEOUT = 10.0


class Interrupted(Exception):
    """Raised by the test's SIGALRM handler while the gate waits."""


class ScriptedClock:
    """A clock that returns the scripted readings in order.

    ``hooks`` maps a call number (0-based) to a function run just before that
    reading is returned, to make something happen at a precise point of the
    gate's code. A call past the script fails the test.
    """

    def __init__(
        self, *readings: float, hooks: dict[int, Callable[[], None]] | None = None
    ) -> None:
        self.readings = list(readings)
        self.hooks = hooks or {}
        self.calls = 0

    def __call__(self) -> float:
        n = self.calls
        self.calls += 1
        if n >= len(self.readings):
            pytest.fail(f"the clock was read {n + 1} times; the script has {len(self.readings)}")
        hook = self.hooks.get(n)
        if hook is not None:
            hook()
        return self.readings[n]




def start_waiter(
    gate: Gate, results: list[Any], tag: object, timeout: float = SAFETY_TIMEOUT
) -> threading.Thread:
    """Start a thread that waits at ``gate`` and appends ``(tag, result)`` when through."""

    def run() -> None:
        results.append((tag, gate.acquire(timeout, asyncio_mode=False)))

    thread = threading.Thread(target=run, daemon=True, name=f"waiter-{tag}")
    thread.start()
    return thread


def join_all(gate: Gate, threads: list[threading.Thread]) -> None:
    """Let every waiter through (even after a failed assertion) and join the threads."""
    gate.close()
    for thread in threads:
        thread.join(SAFETY_TIMEOUT)
        assert not thread.is_alive(), f"{thread.name} still waiting after close()"


# -- counting -------------------------------------------------------------------


def test_take_until_capacity_then_index_error() -> None:
    gate = Gate(3)
    for expected in (1, 2, 3):
        gate.take()
        assert gate.in_use == expected
    with pytest.raises(IndexError):
        gate.take()
    assert gate.in_use == 3
    assert gate.acquired == 3


def test_fresh_gate_counts_nothing() -> None:
    gate = Gate(2)
    assert (gate.in_use, gate.acquired, gate.waiting, gate.timeouts, gate.waits) == (0, 0, 0, 0, 0)
    assert gate.capacity == 2
    assert not gate.closed


def test_release_makes_a_permit_free_again() -> None:
    gate = Gate(1)
    gate.take()
    gate.release()
    assert gate.in_use == 0
    gate.take()  # would raise IndexError if the permit had not come back
    assert gate.in_use == 1
    assert gate.acquired == 2


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(min_value=0, max_value=5),
    ops=st.lists(st.booleans(), max_size=40),
)
def test_permits_never_exceed_capacity(capacity: int, ops: list[bool]) -> None:
    gate = Gate(capacity)
    held = 0
    granted = 0
    for take in ops:
        if take:
            if held < capacity:
                gate.take()
                held += 1
                granted += 1
            else:
                with pytest.raises(IndexError):
                    gate.take()
        elif held:
            gate.release()
            held -= 1
        assert gate.in_use == held
        assert 0 <= gate.in_use <= capacity
        assert gate.acquired == granted


def test_acquire_takes_a_free_permit_without_reading_the_clock() -> None:
    clock = ScriptedClock()  # any read fails the test
    gate = Gate(1, clock=clock)
    assert gate.acquire(5, asyncio_mode=False) is True
    assert gate.in_use == 1
    assert gate.acquired == 1
    assert (gate.waits, gate.timeouts, gate.waiting) == (0, 0, 0)


def test_acquire_timeout_zero_fails_fast_and_counts_a_timeout() -> None:
    clock = ScriptedClock()  # never waiting means never reading the clock
    gate = Gate(1, clock=clock)
    gate.take()
    assert gate.acquire(0, asyncio_mode=False) is False
    assert gate.timeouts == 1
    assert gate.waits == 0
    assert gate.waiting == 0
    assert gate.in_use == 1
    assert gate.acquire(0, asyncio_mode=True) is False  # no event loop needed either
    assert gate.timeouts == 2


def test_negative_timeout_is_treated_as_zero() -> None:
    gate = Gate(1, clock=ScriptedClock())
    gate.take()
    assert gate.acquire(-1, asyncio_mode=False) is False
    assert gate.timeouts == 1
    assert gate.waiting == 0


# -- waiting (threads) --------------------------------------------------------


def test_release_wakes_the_waiter_which_takes_the_permit() -> None:
    gate = Gate(1)
    gate.take()
    results: list[Any] = []
    threads = [start_waiter(gate, results, "a")]
    try:
        wait_until(lambda: gate.waiting == 1, "the waiter to queue")
        gate.release()
        wait_until(lambda: bool(results), "the waiter to get through")
        assert gate.in_use == 1
        assert gate.waiting == 0
        assert results == [("a", True)]
        assert gate.acquired == 2
        assert gate.timeouts == 0
    finally:
        join_all(gate, threads)


def test_waiters_get_through_in_fifo_order() -> None:
    gate = Gate(1)
    gate.take()
    results: list[Any] = []
    threads: list[threading.Thread] = []
    try:
        for i in range(4):
            threads.append(start_waiter(gate, results, i))
            wait_until(lambda n=i + 1: gate.waiting == n, f"waiter {i} to queue")
        for i in range(4):
            gate.release()  # the previous holder gives its permit back
            wait_until(lambda n=i + 1: len(results) == n, f"waiter {i} to get through")
            assert gate.waiting == 3 - i
            assert gate.in_use == 1
        assert results == [(0, True), (1, True), (2, True), (3, True)]
    finally:
        join_all(gate, threads)


def test_timed_out_waiter_is_removed_and_counted() -> None:
    clock = ScriptedClock(100.0, 102.5)
    gate = Gate(1, clock=clock)
    gate.take()
    assert gate.acquire(0.01, asyncio_mode=False) is False
    assert gate.waiting == 0
    assert gate.timeouts == 1
    assert gate.waits == 1
    assert gate.wait_total == pytest.approx(2.5)
    assert gate.wait_max == pytest.approx(2.5)
    assert gate.in_use == 1
    # The removed waiter must not swallow the next permit.
    gate.release()
    assert gate.in_use == 0
    assert gate.acquire(0, asyncio_mode=False) is True


def test_wait_counters_add_up_over_several_waits() -> None:
    clock = ScriptedClock(0.0, 2.0, 10.0, 10.5, 20.0, 23.0)
    gate = Gate(1, clock=clock)
    gate.take()
    for _ in range(3):
        assert gate.acquire(0.001, asyncio_mode=False) is False
    assert clock.calls == 6
    assert gate.waits == 3
    assert gate.timeouts == 3
    assert gate.wait_total == pytest.approx(5.5)
    assert gate.wait_max == pytest.approx(3.0)


def test_waiter_granted_after_its_timeout_keeps_the_permit() -> None:
    # The release lands between the waiter's timeout and its bookkeeping (the
    # clock's second reading): the waiter must take the permit, not leak it.
    gate: Gate

    def release_late() -> None:
        gate.release()

    clock = ScriptedClock(0.0, 1.0, hooks={1: release_late})
    gate = Gate(1, clock=clock)
    gate.take()
    assert gate.acquire(0.001, asyncio_mode=False) is True
    assert gate.in_use == 1
    assert gate.waiting == 0
    assert gate.timeouts == 0
    assert gate.waits == 1
    assert gate.wait_total == pytest.approx(1.0)
    with pytest.raises(IndexError):
        gate.take()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted


def _interrupt_after(seconds: float, handler: Callable[[int, FrameType | None], None]) -> Any:
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return old


def _stop_interrupts(old: Any) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def test_waiter_interrupted_by_a_signal_leaves_nothing_behind() -> None:
    gate = Gate(1, clock=ScriptedClock(0.0))
    gate.take()
    old = _interrupt_after(0.05, _raise_interrupted)
    try:
        with pytest.raises(Interrupted):
            gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False)
    finally:
        _stop_interrupts(old)
    assert gate.waiting == 0
    assert gate.in_use == 1
    assert gate.timeouts == 0
    assert gate.waits == 0
    gate.release()
    assert gate.in_use == 0
    assert gate.acquire(0, asyncio_mode=False) is True
    assert gate.in_use == 1


def test_waiter_interrupted_after_being_granted_gives_the_permit_back() -> None:
    gate = Gate(1, clock=ScriptedClock(0.0))
    gate.take()

    def release_then_interrupt(signum: int, frame: FrameType | None) -> None:
        gate.release()  # grants the permit to the waiting main thread ...
        raise Interrupted  # ... which is interrupted before it can use it

    old = _interrupt_after(0.05, release_then_interrupt)
    try:
        with pytest.raises(Interrupted):
            gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False)
    finally:
        _stop_interrupts(old)
    assert gate.waiting == 0
    assert gate.in_use == 0
    assert gate.acquire(0, asyncio_mode=False) is True


def test_interrupted_waiter_passes_a_granted_permit_on_to_the_next_waiter() -> None:
    gate = Gate(1)
    gate.take()
    results: list[Any] = []
    fired: list[bool] = []

    def release_then_interrupt(signum: int, frame: FrameType | None) -> None:
        # Ticks until the helper has queued behind the main thread, then once:
        if fired or gate.waiting < 2:
            return
        fired.append(True)
        gate.release()  # the main thread queued first: it is granted the permit
        raise Interrupted  # and is interrupted before it can use it

    def queue_behind() -> None:
        wait_until(lambda: gate.waiting == 1, "the main thread to queue")
        results.append(("behind", gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False)))

    thread = threading.Thread(target=queue_behind, daemon=True)
    try:
        old = signal.signal(signal.SIGALRM, release_then_interrupt)
        signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
        try:
            thread.start()
            with pytest.raises(Interrupted):
                gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False)
        finally:
            _stop_interrupts(old)
        wait_until(lambda: bool(results), "the second waiter to get through")
        assert results == [("behind", True)]
        assert gate.waiting == 0
        assert gate.in_use == 1
    finally:
        join_all(gate, [thread])


# -- adopted permits ------------------------------------------------------------


def test_adopted_permits_count_as_in_use_but_not_as_acquired() -> None:
    gate = Gate(3, adopted=2)
    assert gate.in_use == 2
    assert gate.acquired == 0
    gate.take()
    with pytest.raises(IndexError):
        gate.take()
    assert gate.in_use == 3
    assert gate.acquired == 1


def test_adopted_permits_come_back_through_release() -> None:
    gate = Gate(3, adopted=1)
    gate.take()  # one permit granted by the gate itself
    assert gate.in_use == 2
    gate.release()  # the adopted connection returns
    assert gate.in_use == 1
    assert gate.acquired == 1
    gate.release()
    assert gate.in_use == 0
    assert gate.acquired == 1


def test_adopted_permit_release_hands_the_permit_to_a_waiter() -> None:
    gate = Gate(1, adopted=1)
    results: list[Any] = []
    threads = [start_waiter(gate, results, "a")]
    try:
        wait_until(lambda: gate.waiting == 1, "the waiter to queue")
        gate.release()
        wait_until(lambda: bool(results), "the waiter to get through")
        assert results == [("a", True)]
        assert gate.in_use == 1
        assert gate.acquired == 1
    finally:
        join_all(gate, threads)


def test_adopted_permits_on_an_unbounded_gate() -> None:
    gate = Gate(None, adopted=2)
    assert gate.in_use == 2
    gate.take()
    assert gate.in_use == 3
    assert gate.acquired == 1
    gate.release()
    gate.release()
    gate.release()
    assert gate.in_use == 0
    assert gate.acquired == 1


# -- closing ------------------------------------------------------------------


def test_close_lets_waiters_and_later_callers_through() -> None:
    gate = Gate(1)
    gate.take()
    results: list[Any] = []
    threads: list[threading.Thread] = []
    try:
        for i in range(2):
            threads.append(start_waiter(gate, results, i))
            wait_until(lambda n=i + 1: gate.waiting == n, f"waiter {i} to queue")
        gate.close()
        wait_until(lambda: len(results) == 2, "both waiters to get through")
        assert sorted(results) == [(0, True), (1, True)]
        assert gate.closed
        assert gate.waiting == 0
        assert gate.timeouts == 0
        gate.take()  # no IndexError any more
        gate.take()
        assert gate.acquire(0, asyncio_mode=False) is True
        gate.release()  # giving back after close is harmless
    finally:
        join_all(gate, threads)


async def test_close_lets_an_async_waiter_through() -> None:
    gate = Gate(1)
    gate.take()
    task = asyncio.ensure_future(greenlet_spawn(gate.acquire, SAFETY_TIMEOUT, asyncio_mode=True))
    try:
        await async_wait_until(lambda: gate.waiting == 1, "the async waiter to queue")
        gate.close()
        assert await asyncio.wait_for(task, SAFETY_TIMEOUT) is True
        assert gate.waiting == 0
    finally:
        task.cancel()


# -- unbounded ------------------------------------------------------------------


def test_unbounded_gate_never_refuses() -> None:
    gate = Gate(None, clock=ScriptedClock())
    assert gate.capacity is None
    for _ in range(1000):
        gate.take()
    assert gate.acquire(0, asyncio_mode=False) is True
    assert gate.acquire(0, asyncio_mode=True) is True
    assert gate.in_use == 1002
    assert gate.acquired == 1002
    assert gate.timeouts == 0
    assert gate.waits == 0
    for _ in range(1002):
        gate.release()
    assert gate.in_use == 0
    assert gate.acquired == 1002


# -- waiting (asyncio, inside SQLAlchemy's greenlet) -------------------------------


def spawn_async_waiter(gate: Gate, timeout: float = SAFETY_TIMEOUT) -> asyncio.Task[bool]:
    return asyncio.ensure_future(greenlet_spawn(gate.acquire, timeout, asyncio_mode=True))


async def lose_one_race(gate: Gate) -> None:
    """Make the (one) queued async waiter lose a permit to a running caller."""
    gate.barge_bound = 0.0  # owed the next permit as soon as it is passed over once
    gate.release()  # wakes the waiter, which has not run yet
    gate.take()  # a running caller takes the permit first (no await in between)
    await async_wait_until(lambda: gate.waiters[0].handoff, "the waiter to lose the race")


async def test_async_waiter_is_woken_by_a_release_from_another_task() -> None:
    gate = Gate(1)
    gate.take()
    waiter = spawn_async_waiter(gate)
    try:
        await async_wait_until(lambda: gate.waiting == 1, "the async waiter to queue")
        assert not waiter.done()

        async def releaser() -> None:
            gate.release()

        await asyncio.create_task(releaser())
        assert await asyncio.wait_for(waiter, SAFETY_TIMEOUT) is True
        assert gate.waiting == 0
        assert gate.timeouts == 0
        assert gate.acquired == 2
    finally:
        waiter.cancel()


async def test_async_waiter_is_woken_by_a_release_from_another_thread() -> None:
    gate = Gate(1)
    gate.take()
    waiter = spawn_async_waiter(gate)
    try:
        await async_wait_until(lambda: gate.waiting == 1, "the async waiter to queue")
        await asyncio.get_running_loop().run_in_executor(None, gate.release)
        assert await asyncio.wait_for(waiter, SAFETY_TIMEOUT) is True
        assert gate.in_use == 1
        assert gate.waiting == 0
    finally:
        waiter.cancel()


async def test_async_waiters_get_through_in_fifo_order() -> None:
    gate = Gate(1)
    gate.take()
    order: list[int] = []

    def acquire(i: int) -> None:
        assert gate.acquire(SAFETY_TIMEOUT, asyncio_mode=True) is True
        order.append(i)

    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(3):
            tasks.append(asyncio.ensure_future(greenlet_spawn(acquire, i)))
            await async_wait_until(lambda n=i + 1: gate.waiting == n, f"waiter {i} to queue")
        for i in range(3):
            gate.release()
            await async_wait_until(lambda n=i + 1: len(order) == n, f"waiter {i} through")
        assert order == [0, 1, 2]
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def test_async_waiter_times_out() -> None:
    clock = ScriptedClock(50.0, 51.25)
    gate = Gate(1, clock=clock)
    gate.take()
    assert await greenlet_spawn(gate.acquire, 0.01, asyncio_mode=True) is False
    assert gate.waiting == 0
    assert gate.timeouts == 1
    assert gate.waits == 1
    assert gate.wait_total == pytest.approx(1.25)
    assert gate.wait_max == pytest.approx(1.25)
    assert gate.in_use == 1
    gate.release()
    assert gate.in_use == 0  # the timed-out waiter did not swallow the permit


async def test_async_waiters_time_out_at_their_own_deadlines_with_one_timer() -> None:
    # asyncio waits share one sweep per loop instead of a timer each: a later
    # waiter with a shorter timeout still times out first, a longer one is
    # not cut short, and the loop holds one timer for the gate however many wait.
    gate = Gate(1)
    gate.take()
    loop = asyncio.get_running_loop()
    scheduled_before = len(loop._scheduled)  # type: ignore[attr-defined]
    long_ = spawn_async_waiter(gate, timeout=SAFETY_TIMEOUT)
    others = []
    try:
        await async_wait_until(lambda: gate.waiting == 1, "the long waiter to queue")
        for n in range(2, 12):
            others.append(spawn_async_waiter(gate, timeout=SAFETY_TIMEOUT))
            await async_wait_until(lambda n=n: gate.waiting == n, f"waiter {n} to queue")
        assert len(loop._scheduled) == scheduled_before + 1  # type: ignore[attr-defined]
        short = spawn_async_waiter(gate, timeout=0.05)
        assert await asyncio.wait_for(short, SAFETY_TIMEOUT) is False
        assert gate.timeouts == 1
        assert not long_.done()
        assert gate.waiting == 11
        gate.release()
        assert await asyncio.wait_for(long_, SAFETY_TIMEOUT) is True  # first in line
    finally:
        for task in [long_, *others]:
            task.cancel()
        await asyncio.gather(long_, *others, return_exceptions=True)


async def test_cancelled_async_waiter_is_removed() -> None:
    gate = Gate(1, clock=ScriptedClock(0.0))
    gate.take()
    waiter = spawn_async_waiter(gate)
    await async_wait_until(lambda: gate.waiting == 1, "the async waiter to queue")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    assert gate.in_use == 1
    assert gate.timeouts == 0
    assert gate.waits == 0
    gate.release()
    assert gate.in_use == 0
    assert gate.acquire(0, asyncio_mode=False) is True


@pytest.mark.parametrize("elsewhere", [True, False], ids=["grant-pending", "grant-delivered"])
async def test_async_waiter_cancelled_after_being_granted_gives_the_permit_back(
    elsewhere: bool,
) -> None:
    # The permit is granted, then the waiting task is cancelled before it runs
    # (with the grant still pending, or delivered to its future already). The
    # cancellation must not be lost (the task ends cancelled, not holding a
    # connection its caller gave up on) and the permit must come back.
    gate = Gate(1)
    gate.take()
    waiter = spawn_async_waiter(gate)
    await async_wait_until(lambda: gate.waiting == 1, "the async waiter to queue")
    await lose_one_race(gate)  # so the next permit is handed over, not just offered
    future = gate.waiters[0].future
    assert future is not None
    if elsewhere:
        # Released on another thread: the grant reaches the waiter's future
        # through a loop callback that has not run yet (the loop is blocked).
        thread = threading.Thread(target=gate.release)
        thread.start()
        thread.join()
        assert not future.done()
    else:
        gate.release()  # on the loop: its future resolved at once, its task not run since
        assert future.done()
    assert gate.in_use == 1
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 0
    assert gate.in_use == 0  # given back by the cancelled waiter
    assert gate.acquire(0, asyncio_mode=False) is True
    assert gate.in_use == 1


async def test_cancelled_async_waiter_passes_a_granted_permit_on() -> None:
    gate = Gate(1)
    gate.take()
    first = spawn_async_waiter(gate)
    await async_wait_until(lambda: gate.waiting == 1, "the first waiter to queue")
    second = spawn_async_waiter(gate)
    try:
        await async_wait_until(lambda: gate.waiting == 2, "the second waiter to queue")
        gate.release()  # granted to the first waiter ...
        first.cancel()  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await asyncio.wait_for(second, SAFETY_TIMEOUT) is True
        assert gate.in_use == 1
        assert gate.waiting == 0
    finally:
        second.cancel()


def test_async_mode_outside_an_event_loop_leaves_no_waiter() -> None:
    # A sync checkout of an asyncio pool from a thread without a running loop:
    # the error must not leave a waiter queued that swallows the next permit.
    gate = Gate(1)
    gate.take()
    with pytest.raises(RuntimeError):
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=True)
    assert gate.waiting == 0
    gate.release()
    assert gate.in_use == 0
    assert gate.acquire(0, asyncio_mode=False) is True


def test_waiter_interrupted_right_after_queueing_leaves_nothing_behind() -> None:
    # An exception (a signal's) landing between queueing and waiting, made
    # deterministic by the clock's first reading, which happens right there.
    def interrupt() -> None:
        raise Interrupted

    gate = Gate(1, clock=ScriptedClock(0.0, hooks={0: interrupt}))
    gate.take()
    with pytest.raises(Interrupted):
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False)
    assert gate.waiting == 0
    gate.release()
    assert gate.in_use == 0


async def test_a_running_caller_may_take_a_woken_waiters_permit_once() -> None:
    # No policy: a release wakes the head waiter to take the free permit
    # itself, and a caller already running may take it first (no convoy). The
    # waiter that lost the race gets the next permit handed over: it is passed
    # over at most once.
    gate = Gate(1)
    gate.take()
    waiter = spawn_async_waiter(gate)
    await async_wait_until(lambda: gate.waiting == 1, "the async waiter to queue")
    gate.release()  # wakes the waiter, which has not run yet
    assert gate.in_use == 0
    gate.take()  # a running caller barges in (no await in between)
    await asyncio.sleep(0.01)  # the waiter runs, finds nothing, waits again
    assert not waiter.done()
    assert gate.waiting == 1
    gate.release()  # handed over this time
    assert gate.in_use == 1
    with pytest.raises(IndexError):
        gate.take()  # no second barge
    assert await asyncio.wait_for(waiter, SAFETY_TIMEOUT) is True
    assert (gate.in_use, gate.waiting, gate.timeouts) == (1, 0, 0)


class _CountingLock:
    """The gate's lock, counting how often a section takes it."""

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.entries = 0

    def __enter__(self) -> Any:
        self.entries += 1
        return self.lock.__enter__()

    def __exit__(self, *exc: object) -> Any:
        return self.lock.__exit__(*exc)


async def test_a_release_while_a_waiter_is_signalled_takes_no_lock() -> None:
    # No policy: the head waiter woken by a release and not run yet is owed
    # nothing, so a second release has nothing to dispatch: it does not take
    # the gate's lock (one lock section fewer per release under contention).
    # The waiter still gets a permit, and nothing is lost.
    gate = Gate(2)
    gate.take()
    gate.take()
    waiter = spawn_async_waiter(gate)
    try:
        await async_wait_until(lambda: gate.waiting == 1, "the async waiter to queue")
        gate.release()  # signals the waiter (a loop callback, not run yet)
        assert gate.signalled is gate.waiters[0]
        counting = _CountingLock(gate._lock)
        gate._lock = counting  # type: ignore[assignment]
        gate.give(None)  # the pool's checkin path: the permit, then returned()
        gate.returned()
        assert counting.entries == 0
        assert await asyncio.wait_for(waiter, SAFETY_TIMEOUT) is True
        assert (gate.in_use, gate.waiting, gate.timeouts) == (1, 0, 0)
        assert gate.signalled is None
    finally:
        waiter.cancel()
