"""The gate under hostile timing: garbage-collector re-entry, interrupts,
unbounded timeouts, and the exceptions a checkout raises.

Every test that could hang on a regression runs its checkouts on a helper
thread and gives up after SAFETY_TIMEOUT, so a deadlock fails the test instead
of hanging the suite (the stuck daemon thread is left behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import poolguard
from _support import wait_until
from poolguard import LoadShed, PoolTimeout
from poolguard._gate import AdmissionRefused, Gate

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import FrameType

    from sqlalchemy.engine import Engine

SAFETY_TIMEOUT = 20.0


class Interrupted(BaseException):
    """What the tests' signal handlers and injected faults raise (a
    BaseException, as KeyboardInterrupt: SQLAlchemy does not wrap it)."""


def run_bounded(fn: Callable[[], Any], what: str, timeout: float = SAFETY_TIMEOUT) -> Any:
    """Run ``fn`` on a daemon thread; fail (not hang) if it has not returned in time."""
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True, name=what)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{what}: still blocked after {timeout}s (deadlock)")
    if error:
        raise error[0]
    return result[0] if result else None



def leak(conn: Any) -> None:
    """Drop ``conn`` without closing it, in a reference cycle: only the
    garbage collector can return it (the README's "dropped" return path)."""
    cycle: list[Any] = [conn]
    cycle.append(cycle)


def collect_inside_enqueue(gate: Gate, *, after: bool) -> list[int]:
    """Make the next waits run ``gc.collect()`` inside the gate's locked section
    (before or after queueing the caller); returns the count of collections."""
    original = gate._enqueue_locked
    ran: list[int] = []

    def enqueue(waiter: Any, timeout: float) -> float:
        if not after:
            ran.append(gc.collect())
        left = original(waiter, timeout)
        if after:
            ran.append(gc.collect())
        return left

    gate._enqueue_locked = enqueue  # type: ignore[method-assign]
    return ran


POLICIES: dict[str, dict[str, Any]] = {
    "no policy": {},
    "policy": {"tag_limits": {"report": 1}, "reserved_critical": 0, "max_waiting_normal": 50,
               "adaptive_limit": True},
}


# -- 1. garbage-collector re-entry ------------------------------------------------


@pytest.mark.parametrize("after", [False, True], ids=["before-queueing", "after-queueing"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_gc_finalising_a_dropped_connection_inside_the_gate_lock_does_not_deadlock(
    sqlite_url: str, policy: str, after: bool
) -> None:
    engine = poolguard.wrap(
        sa.create_engine(sqlite_url, pool_size=1, max_overflow=0), acquire_timeout=SAFETY_TIMEOUT,
        **POLICIES[policy],
    )
    gate = poolguard.get_guard(engine).gate
    gc_was_enabled = gc.isenabled()
    gc.disable()  # only the forced collection may finalise the dropped connection
    try:
        with poolguard.request(tag="report"):
            leak(engine.connect())
        assert gate.in_use == 1
        # One waiter queued behind the leaked connection.
        first: list[bool] = []

        def waiter() -> None:
            with engine.connect() as conn:
                first.append(conn.execute(sa.text("SELECT 1")).scalar() == 1)

        waiting = threading.Thread(target=waiter, daemon=True)
        waiting.start()
        wait_until(lambda: gate.waiting == 1, "the first waiter to queue")
        ran = collect_inside_enqueue(gate, after=after)

        def second() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT 2")).scalar())

        assert run_bounded(second, "checkout with gc inside the gate lock") == 2
        assert ran, "the collection ran"
        assert ran[0] > 0, "the collection found the dropped connection"
        waiting.join(SAFETY_TIMEOUT)
        assert not waiting.is_alive()
        assert first == [True]
        assert (gate.in_use, gate.waiting, len(gate.out)) == (0, 0, 0)
        assert gate.tag_in_use.get("report", 0) == 0
    finally:
        if gc_was_enabled:
            gc.enable()
        engine.dispose()


@pytest.mark.parametrize("policy", list(POLICIES))
def test_gc_finalising_inside_the_gate_lock_under_asyncio(aiosqlite_url: str, policy: str) -> None:
    async def scenario() -> None:
        engine = poolguard.wrap(
            create_async_engine(aiosqlite_url, pool_size=1, max_overflow=0),
            acquire_timeout=SAFETY_TIMEOUT, **POLICIES[policy],
        )
        gate = poolguard.get_guard(engine).gate
        try:
            with poolguard.request(tag="report"):
                conn = await engine.connect()
                await conn.execute(sa.text("SELECT 1"))
            leak(conn)
            del conn
            first = asyncio.ensure_future(_select(engine, 1))
            while gate.waiting < 1:
                await asyncio.sleep(0.001)
            ran = collect_inside_enqueue(gate, after=True)
            assert await asyncio.wait_for(_select(engine, 2), SAFETY_TIMEOUT) == 2
            assert await asyncio.wait_for(first, SAFETY_TIMEOUT) == 1
            assert ran
            assert ran[0] > 0
            assert (gate.in_use, gate.waiting, len(gate.out)) == (0, 0, 0)
        finally:
            await engine.dispose()

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        # On a thread of its own: a frozen loop fails the test instead of hanging it.
        run_bounded(lambda: asyncio.run(scenario()), "event loop with gc inside the gate lock")
    finally:
        if gc_was_enabled:
            gc.enable()


async def _select(engine: Any, n: int) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.text(f"SELECT {n}"))).scalar())


def test_a_release_re_entering_a_locked_section_is_deferred_to_its_end() -> None:
    # What a finaliser does, made explicit: a release (with its tag and hold
    # sample) from inside the section that queues a waiter. It must neither
    # block nor change the queue under the section's feet, and the permit
    # must reach the waiter when the section ends.
    for policy in (False, True):
        gate = Gate(1)
        if policy:
            gate.configure_policy(tag_limits={"t": 2}, reserved=0, max_waiting={"normal": 5})
            assert gate.policies_on
        assert gate.acquire(0, asyncio_mode=False, tag="t") is True
        original = gate._enqueue_locked
        seen: list[int] = []

        def enqueue(waiter: Any, timeout: float, original: Any = original, gate: Gate = gate,
                    seen: list[int] = seen) -> float:
            left = original(waiter, timeout)
            waiting = gate.waiting
            gate.release("t")  # re-entrant: the section is running on this thread
            gate.sample_hold(0.01)
            seen.append(gate.waiting - waiting)  # nothing dequeued yet
            return left

        gate._enqueue_locked = enqueue  # type: ignore[method-assign]
        granted = run_bounded(lambda gate=gate: gate.acquire(1.0, asyncio_mode=False, tag="t"),
                              "re-entrant release")
        assert granted is True, policy
        assert seen == [0]
        assert (gate.in_use, gate.waiting) == (1, 0)
        if policy:
            assert gate.tag_in_use == {"t": 1}


# -- 2. interrupts ------------------------------------------------------------------


def _barrage(interval: float) -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        # Only inside the library (poolguard, SQLAlchemy): the test's own loop
        # must survive to count the interrupts and check the outcome.
        name = frame.f_code.co_filename if frame is not None else ""
        if "/poolguard/" in name or "/sqlalchemy/" in name:
            raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    return old


def _stop(old: Any) -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.timing
@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_interrupt_barrage_on_gate_acquire_leaves_it_consistent(policy: bool) -> None:
    capacity = 2
    gate = Gate(capacity)
    if policy:
        gate.configure_policy(reserved=1, max_waiting={"normal": 100}, tag_limits={"t": 9})
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        # Keeps the permits busy, so the main thread mostly queues and waits.
        try:
            while not stop.is_set():
                if gate.acquire(1.0, asyncio_mode=False, tag="t"):
                    time.sleep(0.0005)
                    gate.release("t")
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(3)]
    for w in workers:
        w.start()
    interrupts = granted = 0
    old = _barrage(0.0002)
    try:
        deadline = time.monotonic() + 3.0
        while interrupts < 5000 and time.monotonic() < deadline:
            waiter = None
            try:
                waiter = gate.new_waiter()
                if gate.acquire(0.05, asyncio_mode=False, tag="t", waiter=waiter,
                                priority="critical" if granted % 3 == 0 else "normal"):
                    granted += 1
                    gate.give_back(waiter)
            except Interrupted:
                interrupts += 1
                while waiter is not None:  # granted, then interrupted on the way out?
                    try:
                        gate.give_back(waiter)  # idempotent: only what is still held
                        waiter = None
                    except Interrupted:  # noqa: PERF203 - the point of the test
                        interrupts += 1
            except AdmissionRefused:
                pass
    finally:
        _stop(old)
        stop.set()
        for w in workers:
            w.join(SAFETY_TIMEOUT)
    assert not errors
    assert interrupts > 100, "the barrage hardly interrupted anything"
    assert gate.waiting == 0
    assert gate.in_use == 0
    if policy:
        assert gate.tag_in_use.get("t", 0) == 0
    for _ in range(capacity):  # every permit can be had again
        assert gate.acquire(0, asyncio_mode=False, priority="critical") is True


@pytest.mark.timing
# An interrupt inside a finaliser (SQLAlchemy's, the GC's) is "unraisable".
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("policy", list(POLICIES))
def test_interrupt_barrage_on_checkouts_leaves_the_gate_consistent(
    sqlite_url: str, policy: str
) -> None:
    engine = poolguard.wrap(
        # pool_timeout: SQLAlchemy's own wait, for a record it lost to an interrupt.
        sa.create_engine(sqlite_url, pool_size=2, max_overflow=0, pool_timeout=0.2),
        acquire_timeout=0.05, **POLICIES[policy],
    )
    gate = poolguard.get_guard(engine).gate
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                    time.sleep(0.0005)
            except sa.exc.TimeoutError:  # noqa: PERF203
                pass

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(3)]
    for w in workers:
        w.start()
    interrupts = 0
    old = _barrage(0.0003)
    try:
        deadline = time.monotonic() + 3.0
        while interrupts < 3000 and time.monotonic() < deadline:
            # The DBAPI connection straight from the pool: fewer SQLAlchemy
            # layers of its own for the barrage to break.
            try:
                conn = engine.raw_connection()
                try:
                    conn.cursor().execute("SELECT 1")
                finally:
                    conn.close()
            except Interrupted:  # noqa: PERF203 - the point of the test
                interrupts += 1
            except sa.exc.TimeoutError:
                pass
    finally:
        _stop(old)
        stop.set()
        for w in workers:
            w.join(SAFETY_TIMEOUT)
    gc.collect()  # connections dropped by an interrupt come back
    assert interrupts > 100, "the barrage hardly interrupted anything"
    assert gate.waiting == 0
    # SQLAlchemy itself may lose a record to an interrupt inside its own code;
    # the gate must agree with the pool on what is out, whatever happened.
    pool = engine.pool
    assert isinstance(pool, sa.pool.QueuePool)
    # A record SQLAlchemy lost inside its own checkin is still out (under its
    # permit); one it lost inside its checkout failed that checkout (its permit
    # given back): the gate counts exactly the records it handed out.
    lost = pool.checkedout()
    assert gate.in_use == len(gate.out) <= lost
    # The pool serves every connection it still has, at once.
    stuck = gate.in_use
    conns = [engine.connect() for _ in range(2 - lost)]
    assert gate.in_use == len(gate.out) == stuck + len(conns)
    for conn in conns:
        conn.close()
    assert gate.waiting == 0
    assert gate.in_use == len(gate.out) <= stuck  # a stuck record may come back meanwhile
    engine.dispose()


class _Faulty:
    """Wraps a callable; raises Interrupted right after the ``n``-th call on
    the main thread returns (as a signal handler running at the end of that
    call would: signal handlers run on the main thread only)."""

    def __init__(self, fn: Callable[..., Any], n: int) -> None:
        self.fn, self.n, self.calls, self.fired = fn, n, 0, False

    def __call__(self, *args: Any) -> Any:
        result = self.fn(*args)
        if threading.current_thread() is not threading.main_thread():
            return result
        self.calls += 1
        if self.calls == self.n:
            self.fired = True
            raise Interrupted
        return result


def _held_gate(policy: bool) -> Gate:
    gate = Gate(2)
    if policy:
        gate.configure_policy(reserved=0, tag_limits={"t": 9}, max_waiting={"normal": 9})
    assert gate.acquire(0, asyncio_mode=False, tag="t")
    assert gate.acquire(0, asyncio_mode=False, tag="t")
    return gate


@pytest.mark.parametrize(("policy", "n"), [(False, 1), (False, 2), (True, 1), (True, 2), (True, 3)])
def test_an_exception_after_any_clock_read_of_a_wait_leaves_nothing_behind(
    policy: bool, n: int
) -> None:
    # The waiting thread reads the clock where acquire queues (policy on),
    # starts and ends the wait: an exception after the n-th read, with a
    # release from another thread making the wait end in a grant.
    gate = _held_gate(policy)
    clock = _Faulty(time.monotonic, n)
    gate._clock = clock
    timer = threading.Timer(0.05, gate.release, args=("t",))
    timer.start()
    waiter = gate.new_waiter()
    try:
        got = gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, tag="t", waiter=waiter)
    except Interrupted:
        got = False
        assert not waiter.granted
    timer.join()
    assert clock.fired
    gate._clock = time.monotonic
    assert gate.waiting == 0
    assert gate.in_use == 1 + got
    if policy:
        assert gate.tag_in_use.get("t", 0) == gate.in_use


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
@pytest.mark.parametrize("where", ["take", "give", "wake"])
def test_an_exception_right_after_a_permit_moves_loses_no_permit(
    policy: bool, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The moments a signal handler can strike right after a permit changed
    # hands: after taking a token, after giving one back, after waking the
    # waiter it was handed to. Injected on the main thread, which releases
    # while another thread waits.
    gate = _held_gate(policy)
    results: list[bool] = []
    thread = threading.Thread(
        target=lambda: results.append(gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, tag="t")),
        daemon=True,
    )
    thread.start()
    wait_until(lambda: gate.waiting == 1, "the waiter to queue")
    waiter = gate.waiters[0]
    waiter.handoff = True  # no policy: a waiter that lost a race once is handed the permit
    if where == "take":
        assert gate._tokens is not None
        fault = _Faulty(gate._tokens.pop, 1)
        if policy:
            gate._tokens = _TokensWithFaultyPop(gate._tokens, fault)  # type: ignore[assignment]
        else:
            gate.take = fault
    elif where == "give":
        fault = _Faulty(gate.give, 1)
        gate.give = fault
    else:
        fault = _Faulty(type(waiter).wake, 1)
        monkeypatch.setattr(type(waiter), "wake", lambda self: fault(self))  # noqa: PLW0108 - a method
    with pytest.raises(Interrupted):
        gate.release("t")
    assert fault.fired
    # Whatever the interrupt cut short, the next release finishes it.
    gate.take = gate._take_token if not policy else gate.take
    thread.join(0.3)
    if thread.is_alive():
        gate.wake()
    thread.join(SAFETY_TIMEOUT)
    assert results == [True]
    assert gate.waiting == 0
    assert gate.in_use == 2


def test_an_interrupt_inside_the_wake_of_an_async_waiter_loses_no_wake_up() -> None:
    # Regression: waking an asyncio waiter from another thread set its
    # ``woken`` flag, then scheduled the wake-up; an interrupt at the end of
    # a call in between (here the look at the running loop) left the flag up
    # and nothing scheduled. The next dispatch woke it "again" (nothing, the
    # flag was up) and dequeued it: granted, never woken, and out of its
    # loop's sweep, so not even its own timeout ended the wait. It waited for
    # good, holding the permit.
    from sqlalchemy.util import greenlet_spawn

    gate = Gate(1)  # no policy: the next dispatch dequeues a granted head it wakes
    assert gate.acquire(0, asyncio_mode=False)
    results: list[object] = []

    async def wait() -> None:
        task = asyncio.ensure_future(greenlet_spawn(gate.acquire, 0.5, asyncio_mode=True))
        try:
            results.append(await asyncio.wait_for(task, SAFETY_TIMEOUT))
        except BaseException as exc:  # reported in results
            results.append(exc)

    loop_thread = threading.Thread(target=lambda: asyncio.run(wait()), daemon=True)
    loop_thread.start()
    wait_until(lambda: gate.waiting == 1, "the async waiter to queue")
    waiter = gate.waiters[0]
    waiter.handoff = True  # owed: the release hands it the permit (from this thread)
    fired: list[bool] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if (event == "c_return" and frame.f_code.co_name == "wake"
                and "/poolguard/" in frame.f_code.co_filename):
            sys.setprofile(None)
            fired.append(True)
            raise Interrupted

    sys.setprofile(profile)
    try:
        with contextlib.suppress(Interrupted):
            gate.release()
    finally:
        sys.setprofile(None)
    assert fired == [True]
    assert waiter.granted  # the permit moved; its wake-up was cut short
    gate.wake()  # a later release's dispatch finishes it
    loop_thread.join(SAFETY_TIMEOUT)  # ends at once (before the fix: never)
    assert results == [True]
    assert gate.waiting == 0
    assert gate.in_use == 1
    gate.release()
    assert gate.in_use == 0


class _TokensWithFaultyPop:
    def __init__(self, tokens: Any, pop: Callable[[], Any]) -> None:
        self._tokens, self.pop = tokens, pop

    def __len__(self) -> int:
        return len(self._tokens)

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def append(self, item: Any) -> None:
        self._tokens.append(item)


# -- 3. unbounded and huge timeouts ---------------------------------------------------


@pytest.mark.parametrize("options", [{"pool_timeout": None}, {"acquire_timeout": 1e10}],
                         ids=["pool_timeout=None", "acquire_timeout=1e10"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_unbounded_timeouts_wait_until_a_connection_comes_back(
    sqlite_url: str, options: dict[str, Any], policy: str
) -> None:
    pool_options = {k: v for k, v in options.items() if k == "pool_timeout"}
    guard_options = {k: v for k, v in options.items() if k != "pool_timeout"}
    engine = poolguard.wrap(
        sa.create_engine(sqlite_url, pool_size=1, max_overflow=0, **pool_options),
        **guard_options, **POLICIES[policy],
    )
    gate = poolguard.get_guard(engine).gate
    try:
        held = engine.connect()
        timer = threading.Timer(0.05, held.close)
        timer.start()

        def checkout() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT 3")).scalar())

        assert run_bounded(checkout, "unbounded wait") == 3
        timer.join()
        assert (gate.in_use, gate.waiting, gate.timeouts) == (0, 0, 0)
    finally:
        engine.dispose()


@pytest.mark.parametrize("timeout", [None, 1e10, float("inf")])
def test_gate_waits_without_limit_on_none_and_huge_timeouts(timeout: float | None) -> None:
    for policy in (False, True):
        gate = Gate(1)
        if policy:
            gate.configure_policy(codel=None, reserved=0, max_waiting={"normal": 3})
        gate.take() if not policy else gate.acquire(0, asyncio_mode=False)
        threading.Timer(0.05, gate.release).start()
        assert run_bounded(lambda gate=gate: gate.acquire(timeout, asyncio_mode=False),
                           "gate wait") is True
        assert (gate.in_use, gate.waiting, gate.timeouts) == (1, 0, 0)


@pytest.mark.parametrize("timeout", [None, 1e10])
def test_async_gate_waits_without_limit(aiosqlite_url: str, timeout: float | None) -> None:
    async def scenario() -> int:
        engine = poolguard.wrap(
            create_async_engine(aiosqlite_url, pool_size=1, max_overflow=0, pool_timeout=timeout)
        )
        try:
            conn = await engine.connect()
            asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(conn.close()))
            return await _select(engine, 4)
        finally:
            await engine.dispose()

    assert run_bounded(lambda: asyncio.run(scenario()), "async unbounded wait") == 4


# -- 4. exceptions without a misleading context ----------------------------------------


@pytest.fixture
def busy_engine(sqlite_url: str) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**options: Any) -> Engine:
        engine = poolguard.wrap(sa.create_engine(sqlite_url, pool_size=1, max_overflow=0),
                                **options)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def _no_context(error: BaseException) -> None:
    assert error.__context__ is None
    assert error.__cause__ is None
    text = "".join(traceback.format_exception(error))
    assert "IndexError" not in text
    assert "During handling" not in text
    assert "AdmissionRefused" not in text


def test_pool_timeout_has_no_index_error_context(busy_engine: Callable[..., Engine]) -> None:
    engine = busy_engine(acquire_timeout=0.01)
    with engine.connect(), pytest.raises(PoolTimeout) as caught:
        engine.connect()
    _no_context(caught.value)


def test_pool_timeout_with_a_policy_has_no_context(busy_engine: Callable[..., Engine]) -> None:
    engine = busy_engine(acquire_timeout=0.01, max_waiting_normal=5)
    with engine.connect(), pytest.raises(PoolTimeout) as caught:
        engine.connect()
    _no_context(caught.value)


def test_load_shed_has_no_refused_context(busy_engine: Callable[..., Engine]) -> None:
    engine = busy_engine(acquire_timeout=1.0, max_waiting_normal=0)
    with engine.connect(), pytest.raises(LoadShed) as caught:
        engine.connect()
    assert caught.value.reason == "queue_full"
    _no_context(caught.value)


def test_health_lane_shed_has_no_context(busy_engine: Callable[..., Engine]) -> None:
    engine = busy_engine(acquire_timeout=1.0)
    with engine.connect(), poolguard.request(priority="health"), \
            pytest.raises(LoadShed) as caught:
        engine.connect()
    assert caught.value.reason == "health_busy"
    _no_context(caught.value)


# -- 5. a half-open breaker's probe that never reaches the database ---------------------


def _half_open(engine: Engine) -> Any:
    from poolguard.breaker import HALF_OPEN

    guard = poolguard.get_guard(engine)
    breaker = guard.breaker
    assert breaker is not None
    breaker._enter(HALF_OPEN, time.perf_counter())
    guard._breaker_changed()  # as the breaker's own transition tells the guard
    assert guard.hooks.tripped
    return breaker


def test_probe_interrupted_while_waiting_frees_its_slot(busy_engine: Callable[..., Engine]) -> None:
    engine = busy_engine(acquire_timeout=SAFETY_TIMEOUT, breaker=True, breaker_half_open_calls=1)
    held = engine.connect()  # before half-open: the pool is busy
    breaker = _half_open(engine)
    assert breaker._probes_left == 1
    old = signal.signal(signal.SIGALRM, _raise_interrupted)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        with pytest.raises(Interrupted):
            engine.connect()  # a probe, waiting for the busy pool
    finally:
        _stop(old)
    assert breaker._probes_left == 1, "the interrupted probe gave its slot back"
    held.close()
    gate = poolguard.get_guard(engine).gate
    assert (gate.in_use, gate.waiting) == (0, 0)


def test_probe_cancelled_while_waiting_frees_its_slot(aiosqlite_url: str) -> None:
    async def scenario() -> None:
        engine = poolguard.wrap(
            create_async_engine(aiosqlite_url, pool_size=1, max_overflow=0),
            acquire_timeout=SAFETY_TIMEOUT, breaker=True, breaker_half_open_calls=1,
        )
        try:
            held = await engine.connect()
            breaker = _half_open(engine.sync_engine)
            probe = asyncio.ensure_future(_select(engine, 1))
            gate = poolguard.get_guard(engine).gate
            while gate.waiting < 1:
                await asyncio.sleep(0.001)
            probe.cancel()
            with pytest.raises(asyncio.CancelledError):
                await probe
            assert breaker._probes_left == 1
            await held.close()
            assert (gate.in_use, gate.waiting) == (0, 0)
        finally:
            await engine.dispose()

    run_bounded(lambda: asyncio.run(scenario()), "cancelled probe")


def test_probe_shed_frees_its_slot(busy_engine: Callable[..., Engine]) -> None:
    engine = busy_engine(acquire_timeout=1.0, breaker=True, breaker_half_open_calls=1,
                         max_waiting_normal=0)
    with engine.connect():
        breaker = _half_open(engine)
        with pytest.raises(LoadShed):
            engine.connect()
        assert breaker._probes_left == 1


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted



def test_gc_finalising_a_dropped_connection_inside_the_connection_counters_lock(
    aiosqlite_url: str,
) -> None:
    # The guard counts connections closed from the pool's events. Under
    # asyncio, a collection terminates a dropped connection at once, so a
    # collection that starts inside one of those counter updates re-enters
    # it on the same thread (the loop's): as with the gate's lock.
    async def scenario() -> tuple[int, int]:
        engine = poolguard.wrap(create_async_engine(aiosqlite_url, pool_size=1, max_overflow=0))
        counters = poolguard.get_guard(engine).connections
        try:
            conn = await engine.connect()
            await conn.execute(sa.text("SELECT 1"))
            leak(conn)
            del conn
            with counters._lock:
                found = gc.collect()
            async with engine.connect() as again:
                assert (await again.execute(sa.text("SELECT 2"))).scalar() == 2
            return found, counters.counts()[1]
        finally:
            await engine.dispose()

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sa.exc.SAWarning)  # "non-checked-in connection"
            found, closed = run_bounded(lambda: asyncio.run(scenario()),
                                        "gc inside the counters' lock")
    finally:
        if gc_was_enabled:
            gc.enable()
    assert found > 0
    assert closed >= 1  # the dropped connection was terminated and counted


def test_an_interrupt_in_the_undo_of_a_tagged_waiter_loses_no_tag_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A signal's exception may land at any call's boundary. The undo of a
    # waiter's tag slot cleared the flag, then called a helper to lower the
    # count: an exception at that call left the count up for good (the undo,
    # run again, saw the flag down). Here the helper raises on its first call.
    import poolguard._gate as gate_module

    gate = Gate(2)
    gate.configure_policy(tag_limits={"t": 1})
    waiter = gate.new_waiter()
    assert gate.acquire(0, asyncio_mode=False, tag="t", waiter=waiter)
    assert gate.tag_in_use == {"t": 1}
    real = gate_module._one_fewer
    calls: list[str | None] = []

    def interrupted(counts: dict[str, int], key: str | None) -> bool:
        calls.append(key)
        if len(calls) == 1:
            raise Interrupted
        return real(counts, key)

    monkeypatch.setattr(gate_module, "_one_fewer", interrupted)
    try:
        gate.give_back(waiter)
    except Interrupted:
        gate.give_back(waiter)  # run again, as acquire() and the pool do
    assert gate.tag_in_use.get("t", 0) == 0
    assert gate.in_use == 0


class _InterruptAt:
    """Raises Interrupted at the ``n``-th point of the main thread's code in
    poolguard or SQLAlchemy where a signal handler can run (a Python
    function's entry, the end of a C call), as a profile function: exact
    where a timer's barrage is random. ``fired``: it got that far."""

    def __init__(self, n: int) -> None:
        self.n, self.seen, self.fired = n, 0, False

    def __enter__(self) -> _InterruptAt:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)

    def _profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event in ("call", "c_return") and (
            "/poolguard/" in frame.f_code.co_filename or "/sqlalchemy/" in frame.f_code.co_filename
        ):
            self.seen += 1
            if self.seen == self.n:
                self.fired = True
                raise Interrupted  # (a profile function that raises is removed)


def _checkout_while_a_checkin_is_in_flight(sqlite_url: str, fault_at: int) -> bool:
    """One record, checked in on a thread paused right after the pool's put;
    meanwhile the main thread checks out (with the other permit) and gets
    that record. Checks that the pool and the gate agree; returns whether
    the interrupt at ``fault_at`` (0: none) fired."""
    engine = poolguard.wrap(sa.create_engine(sqlite_url, pool_size=2, max_overflow=0))
    gate = poolguard.get_guard(engine).gate
    pool = engine.pool
    assert isinstance(pool, sa.pool.QueuePool)
    first = engine.raw_connection()  # the pool's only record so far
    queue = pool._pool  # sqla-private (test)
    put, in_queue, resume = queue.put, threading.Event(), threading.Event()

    def paused_put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        if threading.current_thread() is closer:  # that checkin only
            in_queue.set()
            resume.wait(SAFETY_TIMEOUT)

    queue.put = paused_put  # type: ignore[method-assign]
    closer = threading.Thread(target=first.close, daemon=True)
    closer.start()
    second = None
    try:
        assert in_queue.wait(SAFETY_TIMEOUT)
        with _InterruptAt(fault_at) as fault, contextlib.suppress(Interrupted):
            second = engine.raw_connection()  # the other permit, the same record
    finally:
        resume.set()
        closer.join(SAFETY_TIMEOUT)
    assert not closer.is_alive()
    queue.put = put  # type: ignore[method-assign]
    gc.collect()  # a connection dropped by the interrupt comes back
    try:
        # What is out: the pool, the gate's permits and its records agree (a
        # record SQLAlchemy lost to the interrupt: the gate counts no more).
        assert gate.in_use == len(gate.out) == (second is not None) <= pool.checkedout()
    finally:
        if second is not None:
            second.close()
    assert gate.in_use == len(gate.out) == 0
    assert gate.waiting == 0
    engine.dispose()
    return fault.fired


def test_a_record_back_in_the_queue_is_no_longer_out_under_its_permit(sqlite_url: str) -> None:
    # A checkin puts its record back in the pool's queue, then gives its
    # permit back. In between, a checkout holding the other permit can pop
    # that record: it must find it not out (else it took it for a nested
    # checkout of a record already out, gave its own permit back, and held a
    # connection the gate did not count).
    _checkout_while_a_checkin_is_in_flight(sqlite_url, 0)


def test_an_interrupt_anywhere_in_a_checkout_racing_a_checkin_loses_no_permit(
    sqlite_url: str,
) -> None:
    # The same race, with an interrupt at each point of the checkout in turn.
    # One at the entry of the nested checkout's hand-back kept its permit for
    # good: the gate counted a permit nobody held, the pool nothing out.
    n = 1
    while _checkout_while_a_checkin_is_in_flight(sqlite_url, n):
        n += 1
    assert n > 10  # the checkout has that many points, at least


class _InterruptedLock:
    """The gate's lock, whose waits are interrupted: after ``skip`` entries,
    the next ``n`` entries on the main thread raise Interrupted, as a signal
    handler does when it runs inside a blocked ``lock.acquire()`` (a lock's
    wait runs the handlers) while another thread holds the lock."""

    def __init__(self, lock: Any, skip: int, n: int) -> None:
        self.lock, self.skip, self.n, self.raised = lock, skip, n, 0

    def __enter__(self) -> Any:
        if threading.current_thread() is threading.main_thread():
            if self.skip:
                self.skip -= 1
            elif self.raised < self.n:
                self.raised += 1
                raise Interrupted
        return self.lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.lock.__exit__(*exc)


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_an_undo_interrupted_again_and_again_on_the_lock_leaves_no_waiter(policy: bool) -> None:
    # A wait that ends in an interrupt is undone under the gate's lock; each
    # try can be interrupted again while it blocks on that lock, for as long
    # as its holder is descheduled. Three tries ran out and left the waiter
    # queued for good (a later hand-off would give it a permit nobody holds).
    gate = Gate(1)
    if policy:
        gate.configure_policy(max_waiting={"normal": 9})
    assert gate.acquire(0, asyncio_mode=False)  # the only permit: the next one waits
    # Queued under the first entry; the wait's end (the second) and the next
    # four tries of the undo are interrupted.
    gate._lock = _InterruptedLock(gate._lock, skip=1, n=5)  # type: ignore[assignment]
    waiter = gate.new_waiter()
    with pytest.raises(Interrupted):
        gate.acquire(0.01, asyncio_mode=False, waiter=waiter)
    assert gate.waiting == 0
    assert not waiter.queued
    assert gate._lock.raised == 5  # type: ignore[attr-defined]
    assert gate.in_use == 1
    gate.release()
    assert gate.in_use == 0
    assert gate.acquire(0, asyncio_mode=False)  # the permit can be had again


def test_a_give_back_interrupted_again_and_again_on_the_lock_gives_the_permit_back() -> None:
    # The pool gives back a granted waiter's permit when its checkout fails;
    # interrupts while it blocks on the lock must not keep the permit.
    gate = Gate(1)
    waiter = gate.new_waiter()
    assert gate.acquire(0, asyncio_mode=False, waiter=waiter)
    assert waiter.granted
    gate._lock = _InterruptedLock(gate._lock, skip=0, n=5)  # type: ignore[assignment]
    with pytest.raises(Interrupted):  # the first interrupt, once the permit is back
        gate.give_back(waiter)
    assert not waiter.granted
    assert gate.in_use == 0
    assert gate.acquire(0, asyncio_mode=False)


def test_an_interrupt_anywhere_in_a_checkin_keeps_permits_and_records_in_step(
    sqlite_url: str,
) -> None:
    # A checkin, with an interrupt at each of its points in turn: whatever it
    # cut short, the gate's permits and its records agree. Regression: the
    # record left Gate.out by dict.pop() outside the try that gives the
    # permit back; an interrupt at the end of that C call kept the permit
    # with no record (the holders report, culprit scan and critical reserve
    # read ``out``).
    n = 1
    while True:
        engine = poolguard.wrap(sa.create_engine(sqlite_url, pool_size=2, max_overflow=0))
        gate = poolguard.get_guard(engine).gate
        conn = engine.raw_connection()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a connection dropped by the interrupt
            with _InterruptAt(n) as fault, contextlib.suppress(Interrupted):
                conn.close()
            del conn
            gc.collect()
        assert gate.in_use == len(gate.out), f"interrupt at point {n}"
        engine.dispose()
        if not fault.fired:
            break
        n += 1
    assert n > 10  # the checkin has that many points, at least


@pytest.mark.timing
def test_an_interrupt_as_the_queue_empties_leaves_no_hand_off_mode_behind() -> None:
    # Regression: the empty queue cleared the owed counts (a C call) before
    # leaving hand-off mode; an interrupt at the end of that call left the
    # mode on with nobody queued (the undo finds the waiter already out).
    gate = Gate(1)
    gate.barge_bound = 0.0  # owed as soon as it is passed over once
    assert gate.acquire(0, asyncio_mode=False)
    owed: list[bool] = []

    def pass_over() -> None:
        wait_until(lambda: gate.waiting == 1, "the waiter to queue")
        with gate._lock:  # the release wakes the waiter; a running caller takes it first
            gate.release()
            gate.take()
        wait_until(lambda: gate.handing_off, "the waiter to be owed")
        owed.append(True)

    fired: list[bool] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if (event == "c_return" and frame.f_code.co_name == "_dequeue"
                and getattr(arg, "__name__", "") == "clear"):
            sys.setprofile(None)
            fired.append(True)
            raise Interrupted

    thread = threading.Thread(target=pass_over, daemon=True)
    thread.start()
    sys.setprofile(profile)
    try:
        with contextlib.suppress(Interrupted):
            gate.acquire(1.0, asyncio_mode=False)  # passed over, owed, then times out
    finally:
        sys.setprofile(None)
    thread.join(SAFETY_TIMEOUT)
    assert owed == [True]
    assert fired == [True]
    assert gate.waiting == 0
    assert not gate.handing_off
    assert gate.in_use == 1
