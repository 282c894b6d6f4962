"""Admission policies: the pure functions, their enforcement by the gate, the
options that configure them, and load shedding through a real engine.

The pure policies (:mod:`poolguard._policies`) are tested with explicit times.
The gate is tested with a fake clock and threads: real time only makes things
happen (a waiter queues, a short slough timeout runs out); no assertion is
about how long anything took.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
import sqlalchemy.exc

import poolguard
from _support import SAFETY_TIMEOUT, FakeClock, wait_until
from poolguard import Config
from poolguard._context import RequestContext
from poolguard._gate import AdmissionRefused, Gate
from poolguard._hold import new_hold
from poolguard._policies import (
    BACKGROUND,
    CRITICAL,
    HEALTH,
    NORMAL,
    PRIORITIES,
    Codel,
    check_tag_limits,
    may_take,
    parse_tag_limits,
    rank,
    reserve_size,
    tag_limit,
)


class Waiters:
    """Threads that wait at a gate; each appends ``(name, outcome)`` when through.

    The outcome is ``True`` (granted), ``False`` (timed out) or the reason of
    a :class:`AdmissionRefused`.
    """

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.results: list[tuple[str, object]] = []
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(
        self,
        name: str,
        *,
        priority: str = NORMAL,
        tag: str | None = None,
        timeout: float = SAFETY_TIMEOUT,
        queued: bool = True,
    ) -> None:
        """Start a waiter; with ``queued``, return once it is in the queue."""
        before = self.gate.waiting

        def run() -> None:
            try:
                outcome: object = self.gate.acquire(
                    timeout, asyncio_mode=False, priority=priority, tag=tag
                )
            except AdmissionRefused as refused:
                outcome = refused.reason
            with self._lock:
                self.results.append((name, outcome))

        thread = threading.Thread(target=run, daemon=True, name=f"waiter-{name}")
        self.threads.append(thread)
        thread.start()
        if queued:
            wait_until(lambda: self.gate.waiting == before + 1, f"waiter {name} to queue")

    def wait_for(self, count: int) -> list[tuple[str, object]]:
        """Wait until ``count`` waiters are through; return the outcomes so far."""
        wait_until(lambda: len(self.results) >= count, f"{count} waiters to get through")
        with self._lock:
            return list(self.results)

    def close(self) -> None:
        """Let every waiter through (even after a failed assertion) and join them."""
        self.gate.close()
        for thread in self.threads:
            thread.join(SAFETY_TIMEOUT)
            assert not thread.is_alive(), f"{thread.name} still waiting after close()"


@pytest.fixture
def waiters() -> Iterator[Callable[[Gate], Waiters]]:
    made: list[Waiters] = []

    def make(gate: Gate) -> Waiters:
        w = Waiters(gate)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def policy_gate(capacity: int, clock: FakeClock | None = None, **policy: Any) -> Gate:
    gate = Gate(capacity, clock=clock or FakeClock())
    gate.configure_policy(**policy)
    assert gate.policies_on
    return gate


def take(gate: Gate, priority: str = NORMAL, tag: str | None = None) -> object:
    """One attempt that never waits: True, False or the refusal's reason."""
    try:
        return gate.acquire(0, asyncio_mode=False, priority=priority, tag=tag)
    except AdmissionRefused as refused:
        return refused.reason


def overload(codel: Codel, clock: FakeClock) -> None:
    """Drive ``codel`` into the overloaded state with explicit times."""
    start = clock.now
    codel.on_empty(start)  # a fresh interval from now
    codel.on_grant(codel.target * 10, start + codel.interval / 2)
    clock.now = start + codel.interval
    codel.on_grant(codel.target * 10, clock.now)
    assert codel.overloaded


# -- pure policies ----------------------------------------------------------------


def test_rank_serves_critical_then_health_then_normal_then_background() -> None:
    order = sorted(PRIORITIES, key=rank)
    assert order == [CRITICAL, HEALTH, NORMAL, BACKGROUND]
    with pytest.raises(KeyError):
        rank("urgent")


@pytest.mark.parametrize(
    ("reserved", "capacity", "expected"),
    [
        (2, 10, 2),  # a count
        (2.0, 10, 2),
        (0.2, 10, 2),  # a share
        (0.25, 10, 3),  # a share rounds up: 2.5 -> 3
        (0.01, 10, 1),  # any share reserves at least one
        (0.99, 3, 3),
        (20, 10, 10),  # capped at capacity
        (0, 10, 0),
        (0.0, 10, 0),
        (0.5, 0, 0),
    ],
)
def test_reserve_size(reserved: float, capacity: int, expected: int) -> None:
    assert reserve_size(reserved, capacity) == expected


@pytest.mark.parametrize("priority", [NORMAL, BACKGROUND, HEALTH])
def test_may_take_keeps_the_reserve_from_non_critical(priority: str) -> None:
    assert may_take(priority, 3, 2) is True
    assert may_take(priority, 2, 2) is False
    assert may_take(priority, 1, 2) is False
    assert may_take(priority, 1, 0) is True
    assert may_take(priority, 0, 0) is False


@pytest.mark.parametrize("priority", [NORMAL, BACKGROUND, HEALTH])
def test_may_take_counts_what_critical_holds_toward_the_reserve(priority: str) -> None:
    # The reserve guarantees critical work its share of the pool; permits
    # critical requests hold already are that share, not a reason to keep
    # more idle beside them while others queue.
    assert may_take(priority, 2, 2, critical_held=1) is True
    assert may_take(priority, 1, 2, critical_held=1) is False  # 1 more kept for critical
    assert may_take(priority, 1, 2, critical_held=2) is True
    assert may_take(priority, 1, 2, critical_held=6) is True
    assert may_take(priority, 0, 2, critical_held=6) is False


def test_may_take_lets_critical_take_the_last_permit() -> None:
    assert may_take(CRITICAL, 1, 2) is True
    assert may_take(CRITICAL, 1, 1) is True
    assert may_take(CRITICAL, 0, 0) is False
    assert may_take(CRITICAL, 0, 2) is False


@pytest.mark.parametrize(
    ("limit", "capacity", "expected"),
    [(2, 10, 2), (2.0, 10, 2), (0.25, 10, 2), (0.5, 10, 5), (0.05, 10, 1), (0.99, 10, 9)],
)
def test_tag_cap(limit: float, capacity: int, expected: int) -> None:
    assert tag_limit(limit, capacity) == expected


def test_parse_tag_limits_reads_pairs() -> None:
    assert parse_tag_limits("reports=2,search=0.25") == {"reports": 2.0, "search": 0.25}
    assert parse_tag_limits(" reports = 2 , , search=0.25 ,") == {"reports": 2.0, "search": 0.25}
    assert parse_tag_limits("") == {}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("reports", "expected tag=limit pairs"),
        ("=2", "expected tag=limit pairs"),
        ("reports=2;search=1", "'search=1'|'2;search=1'"),
        ("reports=many", "'many'"),
        ("reports=", "'reports'"),
    ],
)
def test_parse_tag_limits_rejects_bad_text_clearly(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_tag_limits(text)


def test_check_tag_limits_accepts_counts_and_shares() -> None:
    checked = check_tag_limits({"reports": 2, "search": 0.25})
    assert checked == {"reports": 2.0, "search": 0.25}
    assert all(type(v) is float for v in checked.values())


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        ({"": 1}, "tag '' must be a non-empty string"),
        ({3: 1}, "tag 3 must be a non-empty string"),
        ({"reports": "2"}, "limit of tag 'reports' must be a number, got '2'"),
        ({"reports": True}, "limit of tag 'reports' must be a number, got True"),
        ({"reports": 0}, r"limit of tag 'reports' is 0: expected a share of the pool \(0 < x"),
        ({"reports": -1}, "limit of tag 'reports' is -1"),
        ({"reports": 1.5}, "whole number of connections"),
        ({"reports": math.nan}, "limit of tag 'reports' is nan"),
        ({"reports": math.inf}, "limit of tag 'reports' is inf"),
    ],
)
def test_check_tag_limits_rejects_bad_limits_clearly(
    limits: dict[Any, Any], fragment: str
) -> None:
    with pytest.raises(ValueError, match=fragment):
        check_tag_limits(limits)


def test_codel_burst_that_met_the_target_is_not_overload() -> None:
    codel = Codel(target=0.005, interval=0.1)
    codel.on_grant(0.050, 0.00)  # the interval starts at the first grant
    codel.on_grant(0.001, 0.03)  # one waiter of the burst was served fast
    codel.on_grant(0.080, 0.09)
    assert not codel.overloaded
    codel.on_grant(0.090, 0.10)  # interval over: its minimum (1 ms) met the target
    assert not codel.overloaded


def test_codel_is_overloaded_only_after_a_whole_bad_interval() -> None:
    codel = Codel(target=0.005, interval=0.1)
    codel.on_grant(0.050, 0.00)
    codel.on_grant(0.500, 0.05)
    codel.on_grant(0.020, 0.0999)
    assert not codel.overloaded  # a bad half interval is a burst, not a standing queue
    codel.on_grant(0.020, 0.10)
    assert codel.overloaded  # the shortest wait of the whole interval was 20 ms > 5 ms
    codel.on_grant(0.001, 0.15)  # still overloaded until the next interval ends
    assert codel.overloaded


def test_codel_recovers_after_a_good_interval() -> None:
    codel = Codel(target=0.005, interval=0.1)
    codel.on_grant(0.05, 0.0)
    codel.on_grant(0.05, 0.1)
    assert codel.overloaded
    codel.on_grant(0.05, 0.15)
    codel.on_grant(0.004, 0.18)
    codel.on_grant(0.05, 0.2)
    assert not codel.overloaded  # the minimum of [0.1, 0.2) was 4 ms


def test_codel_on_empty_ends_overload_and_starts_a_fresh_interval() -> None:
    codel = Codel(target=0.005, interval=0.1)
    codel.on_grant(0.05, 0.0)
    codel.on_grant(0.05, 0.1)
    assert codel.overloaded
    codel.on_empty(0.12)
    assert not codel.overloaded
    codel.on_grant(0.05, 0.2)  # before 0.12 + 0.1: no verdict yet
    assert not codel.overloaded
    codel.on_grant(0.05, 0.22)
    assert codel.overloaded


@pytest.mark.parametrize("target", [0.005, 0.02, 1.0])
def test_codel_slough_timeout_is_twice_the_target(target: float) -> None:
    assert Codel(target=target).slough_timeout == 2 * target


def test_codel_defaults_are_fail_at_scale() -> None:
    codel = Codel()
    assert (codel.target, codel.interval, codel.overloaded) == (0.005, 0.1, False)


# -- the gate enforces them --------------------------------------------------------


def test_reserve_keeps_the_last_permits_for_critical() -> None:
    gate = policy_gate(4, reserved=2)
    assert take(gate, NORMAL) is True
    assert take(gate, BACKGROUND) is True
    assert take(gate, NORMAL) is False  # 2 free, both reserved
    assert take(gate, BACKGROUND) is False
    assert take(gate, HEALTH) == "health_busy"
    assert gate.timeouts == 2
    assert take(gate, CRITICAL) is True
    assert take(gate, CRITICAL) is True
    assert gate.in_use == 4
    assert take(gate, CRITICAL) is False  # nothing left, even for critical
    gate.release()
    assert take(gate, NORMAL) is False  # the one free permit is reserved
    assert take(gate, CRITICAL) is True


def hold_as(gate: Gate, priority: str) -> object:
    """Register one connection out under a request of ``priority``, as the pool does."""
    record = object()
    gate.out[record] = new_hold(0.0, 0.0, 0, RequestContext(None, None, priority))
    return record


def test_permits_critical_holds_count_toward_the_reserve() -> None:
    # Regression (the postmortem's uniform control): logins held 6 of 10
    # connections, yet 2 more were kept free beside them while API calls
    # queued until they were late. What critical holds is its reserve.
    gate = policy_gate(4, reserved=2)
    assert take(gate, CRITICAL) is True
    hold_as(gate, CRITICAL)
    assert take(gate, NORMAL) is True
    assert take(gate, NORMAL) is True  # 2 were free: critical holds 1, 1 kept
    assert take(gate, NORMAL) is False  # the last one is kept for critical
    assert take(gate, CRITICAL) is True
    hold_as(gate, CRITICAL)  # critical holds its 2
    gate.release()  # a normal one comes back: nothing is kept idle beside critical's 2
    assert take(gate, NORMAL) is True
    assert gate.in_use == 4
    assert take(gate, CRITICAL) is False  # a full pool: critical waits its turn


def test_waiting_normal_gets_a_permit_once_critical_holds_the_reserve(
    waiters: Callable[[Gate], Waiters],
) -> None:
    gate = policy_gate(3, reserved=2)
    assert take(gate, NORMAL) is True
    w = waiters(gate)
    w.start("normal")  # 2 free, both reserved
    assert take(gate, CRITICAL) is True
    hold_as(gate, CRITICAL)
    assert take(gate, CRITICAL) is True
    hold_as(gate, CRITICAL)  # critical holds 2: the reserve is in use
    gate.release()  # the first normal's permit comes back: the waiter's now
    assert w.wait_for(1) == [("normal", True)]
    assert gate.in_use == 3


def test_waiting_normal_is_not_handed_a_reserved_permit(
    waiters: Callable[[Gate], Waiters],
) -> None:
    gate = policy_gate(2, reserved=1)
    assert take(gate, NORMAL) is True
    w = waiters(gate)
    w.start("normal")  # one permit free, but it is the reserve
    assert take(gate, CRITICAL) is True
    gate.release()  # the critical one's permit: again only the reserve is free
    assert gate.waiting == 1
    assert gate.in_use == 1
    gate.release()  # now two are free: the normal waiter may take one
    assert w.wait_for(1) == [("normal", True)]
    assert gate.in_use == 1


def test_released_permit_goes_to_critical_before_an_earlier_normal(
    waiters: Callable[[Gate], Waiters],
) -> None:
    gate = policy_gate(1, max_waiting={NORMAL: 10})
    assert take(gate, NORMAL) is True
    w = waiters(gate)
    w.start("normal")
    w.start("background", priority=BACKGROUND)
    w.start("critical", priority=CRITICAL)
    gate.release()
    assert w.wait_for(1) == [("critical", True)]
    gate.release()
    assert w.wait_for(2)[1] == ("normal", True)
    gate.release()
    assert w.wait_for(3)[2] == ("background", True)


def test_waiters_of_one_priority_are_served_in_arrival_order(
    waiters: Callable[[Gate], Waiters],
) -> None:
    gate = policy_gate(1, codel=Codel(target=SAFETY_TIMEOUT, interval=1.0))
    assert take(gate, NORMAL) is True
    w = waiters(gate)
    for name in ("a", "b", "c"):
        w.start(name)
    for n in (1, 2, 3):
        gate.release()
        w.wait_for(n)
    assert w.results == [("a", True), ("b", True), ("c", True)]


def test_overloaded_codel_serves_the_newest_waiter_first(
    waiters: Callable[[Gate], Waiters],
) -> None:
    clock = FakeClock(100.0)
    # A target this long never cuts a waiter short: only the order is tested.
    codel = Codel(target=SAFETY_TIMEOUT, interval=1.0)
    gate = policy_gate(1, clock, codel=codel)
    assert take(gate, NORMAL) is True
    overload(codel, clock)
    w = waiters(gate)
    for name in ("a", "b", "c"):
        w.start(name)
    w.start("critical", priority=CRITICAL)
    for n in (1, 2, 3, 4):
        gate.release()
        w.wait_for(n)
        # The clock stood still: no new verdict until the queue empties.
        assert codel.overloaded is (n < 4)
    # Priority still comes first; within it, newest first (adaptive LIFO).
    assert w.results == [("critical", True), ("c", True), ("b", True), ("a", True)]


def test_max_waiting_per_priority_refuses_at_once(
    waiters: Callable[[Gate], Waiters],
) -> None:
    gate = policy_gate(1, max_waiting={NORMAL: 1, BACKGROUND: 0, CRITICAL: None})
    assert take(gate, CRITICAL) is True
    # A long timeout: a refused caller must not wait for it (or it would time
    # out after SAFETY_TIMEOUT and return False instead of raising).
    with pytest.raises(AdmissionRefused) as info:
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, priority=BACKGROUND)
    assert info.value.reason == "queue_full"
    w = waiters(gate)
    w.start("normal-1")
    with pytest.raises(AdmissionRefused) as info:
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, priority=NORMAL)
    assert info.value.reason == "queue_full"
    assert str(info.value) == "queue_full"
    for name in ("critical-1", "critical-2"):  # no limit for critical
        w.start(name, priority=CRITICAL)
    assert gate.waiting == 3
    assert gate.timeouts == 0  # a refusal is not a timeout
    for n in (1, 2, 3):
        gate.release()
        w.wait_for(n)
    assert [name for name, _ in w.results] == ["critical-1", "critical-2", "normal-1"]


def test_health_never_waits() -> None:
    gate = policy_gate(2, reserved=1)
    assert take(gate, HEALTH) is True  # two free: the health lane takes one
    gate.release()
    assert take(gate, CRITICAL) is True
    # One free, and it is the reserve: health is refused, with a long timeout.
    with pytest.raises(AdmissionRefused) as info:
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, priority=HEALTH)
    assert info.value.reason == "health_busy"
    assert take(gate, CRITICAL) is True
    with pytest.raises(AdmissionRefused, match="health_busy"):
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, priority=HEALTH)
    assert gate.waiting == 0
    assert gate.in_use == 2


def test_tag_cap_refuses_past_the_cap_and_release_frees_the_slot() -> None:
    gate = policy_gate(5, tag_limits={"report": 2})
    assert take(gate, NORMAL, "report") is True
    assert take(gate, BACKGROUND, "report") is True
    assert gate.tag_in_use == {"report": 2}
    assert take(gate, NORMAL, "report") == "tag_limit"  # 3 permits are still free
    assert take(gate, CRITICAL, "report") == "tag_limit"  # the bulkhead holds for all
    assert take(gate, NORMAL, "search") is True  # other tags are not affected
    assert take(gate, NORMAL) is True
    gate.release("report")
    assert gate.tag_in_use == {"report": 1}
    assert take(gate, NORMAL, "report") is True
    gate.untag("report")  # what the pool's checkin does before giving the permit back
    assert gate.tag_in_use == {"report": 1}
    gate.untag("search")  # an uncapped tag: nothing to count
    gate.untag(None)
    assert gate.tag_in_use == {"report": 1}


def test_tag_cap_holds_for_callers_that_waited(waiters: Callable[[Gate], Waiters]) -> None:
    # The pool is full of other work; callers of a capped tag arrive while
    # fewer than its cap run. Once permits come back, the tag must still hold
    # at most its cap.
    gate = policy_gate(4, tag_limits={"report": 1})
    for _ in range(4):
        assert take(gate, NORMAL) is True
    w = waiters(gate)
    w.start("report-1", tag="report")
    # Cap 1 and one report already waiting for it: the next one is shed now,
    # not queued to take a second report connection later.
    with pytest.raises(AdmissionRefused) as info:
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, tag="report")
    assert info.value.reason == "tag_limit"
    for _ in range(4):
        gate.release()
    assert w.wait_for(1) == [("report-1", True)]
    assert gate.tag_in_use == {"report": 1}
    assert gate.in_use == 1


def test_slough_timeout_refuses_a_non_critical_waiter_with_queue_delay() -> None:
    clock = FakeClock(10.0)
    codel = Codel(target=0.005, interval=0.1)  # slough timeout: 10 ms of real time
    gate = policy_gate(1, clock, codel=codel)
    assert take(gate, CRITICAL) is True
    overload(codel, clock)
    with pytest.raises(AdmissionRefused) as info:
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, priority=NORMAL)
    assert info.value.reason == "queue_delay"
    assert gate.waiting == 0
    assert gate.in_use == 1
    assert gate.timeouts == 1
    assert not codel.overloaded  # the queue emptied
    overload(codel, clock)
    with pytest.raises(AdmissionRefused, match="queue_delay"):
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, priority=BACKGROUND)
    # A caller whose own timeout is shorter than the slough timeout just times out.
    overload(codel, clock)
    assert gate.acquire(0.001, asyncio_mode=False, priority=NORMAL) is False
    # Critical is never cut short by CoDel: it waits its own timeout.
    overload(codel, clock)
    assert gate.acquire(0.03, asyncio_mode=False, priority=CRITICAL) is False
    assert gate.timeouts == 4


def test_codel_sees_a_standing_normal_queue_that_critical_callers_pass(
    waiters: Callable[[Gate], Waiters],
) -> None:
    # Regression (the postmortem's uniform control, before the reserve
    # counted what critical holds): logins took free permits at once while
    # 15 API calls stood in the queue for ~0.83 s each, for seconds. Each
    # immediate critical grant counted as a wait of 0, so CoDel never found
    # the standing queue and every API call waited until it was late.
    clock = FakeClock(100.0)
    codel = Codel(target=0.005, interval=0.1)
    gate = policy_gate(3, clock, codel=codel, reserved=1)
    assert take(gate, NORMAL) is True
    assert take(gate, NORMAL) is True  # 1 free: the reserve
    w = waiters(gate)
    w.start("api-1")
    for granted in (1, 2):
        if granted == 2:
            w.start("api-3")  # api-2 will not leave the queue empty
        for _ in range(3):
            clock.now += 0.05
            assert take(gate, CRITICAL) is True  # passes the queue, waits nothing
            gate.release()
        gate.release()  # a normal permit back: the head of the queue takes it
        w.wait_for(granted)
        if granted == 1:
            assert not codel.overloaded  # the queue emptied: no verdict
            w.start("api-2")  # 1 free again: the reserve
    assert [name for name, _ in w.results] == ["api-1", "api-2"]
    assert codel.overloaded  # a whole interval of waits of 0.3 s: a standing queue
    with pytest.raises(AdmissionRefused, match="queue_delay"):
        gate.acquire(SAFETY_TIMEOUT, asyncio_mode=False, priority=NORMAL)


def test_queue_delay_needs_an_overloaded_queue() -> None:
    clock = FakeClock(10.0)
    gate = policy_gate(1, clock, codel=Codel(target=0.005, interval=0.1))
    assert take(gate, NORMAL) is True
    # Not overloaded: the waiter waits its whole (short) timeout and times out.
    assert gate.acquire(0.03, asyncio_mode=False) is False


def test_configure_policy_with_nothing_turns_the_fast_path_back_on() -> None:
    gate = Gate(2, clock=FakeClock())
    fast = gate.take
    assert fast == gate._tokens.pop  # type: ignore[union-attr]
    gate.configure_policy(reserved=1)
    assert gate.policies_on
    assert gate.take != fast
    with pytest.raises(IndexError):  # with a policy, every caller goes through acquire()
        gate.take()
    assert gate.in_use == 0
    gate.configure_policy()
    assert not gate.policies_on
    assert gate.take == gate._tokens.pop  # type: ignore[union-attr]
    assert gate.admission is None
    gate.take()
    gate.take()
    assert gate.in_use == 2


def test_max_waiting_of_none_alone_is_no_policy() -> None:
    gate = Gate(2, clock=FakeClock())
    gate.configure_policy(max_waiting={NORMAL: None, BACKGROUND: None})
    assert not gate.policies_on
    gate.configure_policy(max_waiting={BACKGROUND: 0})
    assert gate.policies_on


def test_gate_without_a_limit_ignores_policies() -> None:
    gate = Gate(None, clock=FakeClock())
    gate.configure_policy(reserved=1, tag_limits={"report": 1})
    assert not gate.policies_on
    assert gate.acquire(0, asyncio_mode=False, tag="report") is True


def test_reconfiguring_caps_off_and_on_keeps_the_count_true() -> None:
    # A guard can be reconfigured while connections are out (wrap() again).
    # The pool registers each connection it hands out in gate.out with the
    # request it was taken under; the gate recounts a tag from there when its
    # cap is (re)introduced, so no count goes stale.
    gate = policy_gate(3, tag_limits={"report": 1})
    assert take(gate, NORMAL, "report") is True
    held = object()
    gate.out[held] = new_hold(0.0, 0.0, 0, RequestContext(None, "report", NORMAL))
    gate.configure_policy(reserved=1)  # cap off while the report connection is out
    assert take(gate, NORMAL, "report") is True  # no cap now
    gate.release("report")
    gate.out.pop(held)
    gate.release("report")
    gate.configure_policy(tag_limits={"report": 1})  # cap back on, nothing held
    assert take(gate, NORMAL, "report") is True  # not refused by a stale count
    assert gate.tag_in_use == {"report": 1}


def test_reconfiguring_a_cap_counts_connections_already_out() -> None:
    gate = policy_gate(4, reserved=1)
    assert take(gate, NORMAL, "report") is True
    gate.out[object()] = new_hold(0.0, 0.0, 0, RequestContext(None, "report", NORMAL))
    gate.out[object()] = new_hold(0.0, 0.0, 0, None)  # no request
    gate.configure_policy(tag_limits={"report": 1})
    assert gate.tag_in_use == {"report": 1}
    assert take(gate, NORMAL, "report") == "tag_limit"


def test_relaxing_the_reserve_serves_waiters_at_once(
    waiters: Callable[[Gate], Waiters],
) -> None:
    gate = policy_gate(3, reserved=2)
    assert take(gate, NORMAL) is True
    w = waiters(gate)
    w.start("normal")  # 2 free, both reserved
    gate.configure_policy(reserved=1)
    assert w.wait_for(1) == [("normal", True)]
    assert gate.in_use == 2


def test_turning_policies_off_serves_waiters_at_once(
    waiters: Callable[[Gate], Waiters],
) -> None:
    gate = policy_gate(3, reserved=2)
    assert take(gate, NORMAL) is True
    w = waiters(gate)
    w.start("normal")
    gate.configure_policy()
    assert w.wait_for(1) == [("normal", True)]
    assert gate.in_use == 2


# -- options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("reserved_critical", -1, "0, a whole number of connections, or a share 0 < x < 1"),
        ("reserved_critical", 1.5, "0, a whole number of connections, or a share 0 < x < 1"),
        ("reserved_critical", "2", "0, a whole number of connections, or a share 0 < x < 1"),
        ("reserved_critical", True, "0, a whole number of connections, or a share 0 < x < 1"),
        ("reserved_critical", math.nan, "0, a whole number of connections, or a share 0 < x < 1"),
        ("reserved_critical", None, "0, a whole number of connections, or a share 0 < x < 1"),
        ("max_waiting_critical", -1, "a whole number >= 0, or None"),
        ("max_waiting_normal", 1.5, "a whole number >= 0, or None"),
        ("max_waiting_background", "0", "a whole number >= 0, or None"),
        ("max_waiting_background", False, "a whole number >= 0, or None"),
        ("codel", 1, "True or False"),
        ("codel", "yes", "True or False"),
        ("codel_target", -0.001, "a finite number of seconds >= 0"),
        ("codel_target", None, "a finite number of seconds >= 0"),
        ("codel_interval", math.inf, "a finite number of seconds >= 0"),
        ("tag_limits", "reports=2", "a mapping of tag to a count or a share of the pool"),
        ("tag_limits", ["reports"], "a mapping of tag to a count or a share of the pool"),
    ],
)
def test_bad_policy_option_names_option_value_and_allowed(
    option: str, value: object, allowed: str
) -> None:
    with pytest.raises(ValueError, match=option) as info:
        Config(**{option: value})
    message = str(info.value)
    assert f"poolguard option {option}={value!r} is invalid" in message
    assert allowed in message


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        ({"reports": 0}, "limit of tag 'reports' is 0"),
        ({"reports": 2.5}, "limit of tag 'reports' is 2.5"),
        ({"": 1}, "tag '' must be a non-empty string"),
    ],
)
def test_bad_tag_limits_name_the_option_and_the_tag(
    limits: dict[str, float], fragment: str
) -> None:
    with pytest.raises(ValueError, match="tag_limits") as info:
        Config(tag_limits=limits)
    assert f"poolguard option tag_limits={limits!r} is invalid" in str(info.value)
    assert fragment in str(info.value)


def test_good_policy_options() -> None:
    cfg = Config(
        reserved_critical=0.2,
        max_waiting_critical=None,
        max_waiting_normal=5,
        max_waiting_background=0,
        codel=True,
        codel_target=0.01,
        codel_interval=0.2,
        tag_limits={"report": 0.5, "export": 2},
    )
    assert cfg.policies_on
    assert cfg.reserved_critical == 0.2
    assert cfg.max_waiting_background == 0
    assert dict(cfg.tag_limits or {}) == {"report": 0.5, "export": 2.0}
    with pytest.raises(TypeError):
        cfg.tag_limits["report"] = 1  # type: ignore[index]  # frozen like the rest
    assert Config(reserved_critical=3).reserved_critical == 3
    assert not Config().policies_on
    assert not Config(codel_target=0.1, tag_limits={}).policies_on
    assert Config(max_waiting_normal=0).policies_on


def test_policy_options_from_the_environment() -> None:
    cfg = Config.from_env({
        "POOLGUARD_TAG_LIMITS": "reports=2,search=0.25",
        "POOLGUARD_MAX_WAITING_BACKGROUND": "0",
        "POOLGUARD_MAX_WAITING_NORMAL": "none",
        "POOLGUARD_MAX_WAITING_CRITICAL": "12",
        "POOLGUARD_RESERVED_CRITICAL": "0.2",
        "POOLGUARD_CODEL": "on",
        "POOLGUARD_CODEL_TARGET": "0.01",
        "POOLGUARD_CODEL_INTERVAL": "0.2",
    })
    assert dict(cfg.tag_limits or {}) == {"reports": 2.0, "search": 0.25}
    assert cfg.max_waiting_background == 0
    assert cfg.max_waiting_normal is None
    assert cfg.max_waiting_critical == 12
    assert cfg.reserved_critical == 0.2
    assert cfg.codel is True
    assert (cfg.codel_target, cfg.codel_interval) == (0.01, 0.2)
    assert Config.from_env({"POOLGUARD_TAG_LIMITS": "none"}).tag_limits is None
    assert Config.from_env({"POOLGUARD_TAG_LIMITS": " "}).tag_limits is None


@pytest.mark.parametrize(
    ("var", "raw", "fragment"),
    [
        ("POOLGUARD_TAG_LIMITS", "reports", "expected tag=limit pairs"),
        ("POOLGUARD_TAG_LIMITS", "reports=many", "'many'"),
        ("POOLGUARD_TAG_LIMITS", "reports=0", "limit of tag 'reports' is 0"),
        ("POOLGUARD_TAG_LIMITS", "reports=1.5", "limit of tag 'reports' is 1.5"),
        ("POOLGUARD_MAX_WAITING_BACKGROUND", "-1", "a whole number >= 0, or None"),
        ("POOLGUARD_MAX_WAITING_NORMAL", "0.5", "expected a whole number"),
        ("POOLGUARD_RESERVED_CRITICAL", "none", "expected a number"),
        ("POOLGUARD_RESERVED_CRITICAL", "2.5", "0, a whole number of connections"),
        ("POOLGUARD_CODEL", "maybe", "expected true/false"),
    ],
)
def test_bad_policy_environment_names_the_variable(var: str, raw: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=var) as info:
        Config.from_env({var: raw})
    message = str(info.value)
    assert message.startswith(f"environment variable {var}={raw!r}: ")
    assert fragment in message


# -- poolguard.request ----------------------------------------------------------------


def test_request_priority_must_be_known() -> None:
    with pytest.raises(ValueError, match="priority") as info:
        poolguard.request(priority="urgent")
    message = str(info.value)
    assert "priority='urgent'" in message
    for allowed in ("critical", "normal", "background", "health"):
        assert allowed in message


def test_request_tag_must_be_a_non_empty_string() -> None:
    with pytest.raises(ValueError, match="tag=''"):
        poolguard.request(tag="")


def test_nested_requests_inherit_priority_and_tag() -> None:
    assert poolguard.current_request() is None
    with poolguard.request(priority=CRITICAL, tag="login") as outer:
        assert (outer.priority, outer.tag) == (CRITICAL, "login")
        with poolguard.request(timeout=5) as inner:
            assert (inner.priority, inner.tag) == (CRITICAL, "login")
            with poolguard.request(priority=BACKGROUND, tag="audit") as innermost:
                assert (innermost.priority, innermost.tag) == (BACKGROUND, "audit")
            assert poolguard.current_request() is inner
        assert poolguard.current_request() is outer
    with poolguard.request() as plain:
        assert (plain.priority, plain.tag) == (NORMAL, None)
    assert poolguard.current_request() is None


def test_request_decorator_sets_the_priority_per_call() -> None:
    seen: list[str] = []

    @poolguard.request(priority=BACKGROUND)
    def job() -> None:
        ctx = poolguard.current_request()
        assert ctx is not None
        seen.append(ctx.priority)

    job()
    with poolguard.request(priority=CRITICAL):
        job()  # the decorator's own priority wins inside the call
    assert seen == [BACKGROUND, BACKGROUND]


# -- through a real engine --------------------------------------------------------------


@pytest.fixture
def guarded(sqlite_url: str) -> Iterator[sa.Engine]:
    engine = poolguard.wrap(
        sa.create_engine(sqlite_url, pool_size=3, max_overflow=0),
        name="shed-test",
        reserved_critical=1,
        max_waiting_normal=0,
        max_waiting_background=0,
        tag_limits={"report": 1},
        acquire_timeout=0.05,
    )
    try:
        yield engine
    finally:
        engine.dispose()


def test_load_shed_through_the_engine(guarded: sa.Engine) -> None:
    guard = poolguard.get_guard(guarded)
    gate = guard.gate
    assert gate.capacity == 3
    assert gate.admission is not None
    assert gate.admission.reserved == 1
    held = [guarded.connect(), guarded.connect()]  # normal: up to the reserve
    assert gate.in_use == 2
    with pytest.raises(poolguard.LoadShed) as info:
        guarded.connect()  # only the reserve is free; normal may not wait
    error = info.value
    assert isinstance(error, poolguard.Rejected)
    assert isinstance(error, poolguard.PoolguardError)
    assert isinstance(error, sqlalchemy.exc.TimeoutError)
    assert (error.reason, error.priority, error.pool_name) == ("queue_full", NORMAL, "shed-test")
    assert error.retry_after > 0
    message = str(error)
    assert "pool 'shed-test'" in message
    assert "normal request shed (queue_full)" in message
    assert "2/3 in use, 0 waiting" in message
    assert "retry after" in message
    assert gate.in_use == 2  # nothing leaked

    with poolguard.request(priority=BACKGROUND), pytest.raises(poolguard.LoadShed) as info:
        guarded.connect()
    assert (info.value.reason, info.value.priority) == ("queue_full", BACKGROUND)
    assert gate.in_use == 2

    with poolguard.request(priority=CRITICAL):
        held.append(guarded.connect())  # critical takes the reserve
        assert gate.in_use == 3
        # Critical is never shed: it waits and times out like plain SQLAlchemy.
        with pytest.raises(poolguard.PoolTimeout):
            guarded.connect()
    assert gate.in_use == 3

    with poolguard.request(priority=HEALTH), pytest.raises(poolguard.LoadShed) as info:
        guarded.connect()
    assert info.value.reason == "health_busy"
    assert gate.in_use == 3

    assert guard.rejections == {
        ("queue_full", NORMAL): 1,
        ("queue_full", BACKGROUND): 1,
        ("health_busy", HEALTH): 1,
    }
    for conn in held:
        conn.close()
    assert gate.in_use == 0
    assert guard.stats().in_use == 0
    with guarded.connect() as conn:  # the pool works as before
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    assert gate.in_use == 0


def test_critical_connections_out_count_toward_the_reserve_through_the_engine(
    guarded: sa.Engine,
) -> None:
    # The pool registers each connection with the request it was taken
    # under: one critical connection out is the whole reserve (1 of 3).
    gate = poolguard.get_guard(guarded).gate
    with poolguard.request(priority=CRITICAL):
        login = guarded.connect()
    api = guarded.connect()
    assert gate.in_use == 2
    last = guarded.connect()  # normal: the reserve is held by critical work
    assert gate.in_use == 3
    for conn in (login, api, last):
        conn.close()
    assert gate.in_use == 0
    held = [guarded.connect(), guarded.connect()]  # nothing critical out: kept
    with pytest.raises(poolguard.LoadShed):
        guarded.connect()
    for conn in held:
        conn.close()


def test_tag_limit_through_the_engine_frees_on_checkin(guarded: sa.Engine) -> None:
    guard = poolguard.get_guard(guarded)
    gate = guard.gate
    with poolguard.request(tag="report"):
        report = guarded.connect()
        with pytest.raises(poolguard.LoadShed) as info:
            guarded.connect()
    assert (info.value.reason, info.value.priority) == ("tag_limit", NORMAL)
    assert "normal request shed (tag_limit)" in str(info.value)
    assert gate.tag_in_use == {"report": 1}
    assert gate.in_use == 1
    other = guarded.connect()  # other work is not affected
    # Returned outside the request: the checkout's tag is what counts.
    report.close()
    assert gate.tag_in_use == {"report": 0}
    with poolguard.request(tag="report"), guarded.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        assert gate.tag_in_use == {"report": 1}
    other.close()
    assert gate.in_use == 0
    assert gate.tag_in_use == {"report": 0}
    assert guard.rejections == {("tag_limit", NORMAL): 1}


def test_shed_session_leaves_the_pool_balanced(guarded: sa.Engine) -> None:
    from sqlalchemy.orm import Session

    guard = poolguard.get_guard(guarded)
    holders = [guarded.connect(), guarded.connect()]
    for _ in range(20):
        with Session(guarded) as session, pytest.raises(poolguard.LoadShed):
            session.execute(sa.text("SELECT 1"))
        assert guard.gate.in_use == 2
    assert guard.rejections == {("queue_full", NORMAL): 20}
    for conn in holders:
        conn.close()
    assert guard.gate.in_use == 0
    assert guarded.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_retry_after_stays_within_its_bounds(guarded: sa.Engine) -> None:
    guard = poolguard.get_guard(guarded)
    assert guard.retry_after() == 0.1  # nothing measured yet: the floor
    with guarded.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert 0.1 <= guard.retry_after() <= 30.0


def test_rewrap_without_policies_turns_them_off(sqlite_url: str) -> None:
    engine = poolguard.wrap(
        sa.create_engine(sqlite_url, pool_size=2, max_overflow=0), max_waiting_normal=0
    )
    try:
        guard = poolguard.get_guard(engine)
        assert guard.gate.policies_on
        poolguard.wrap(engine)  # reconfigured without policies
        assert not guard.gate.policies_on
        assert guard.gate.take == guard.gate._tokens.pop  # type: ignore[union-attr]
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        assert guard.gate.in_use == 0
    finally:
        engine.dispose()


def test_health_never_waits_even_without_policies(sqlite_url: str) -> None:
    # request(priority="health") is documented as "never waits": it must not
    # depend on some other policy being configured.
    engine = poolguard.wrap(
        sa.create_engine(sqlite_url, pool_size=1, max_overflow=0), acquire_timeout=SAFETY_TIMEOUT
    )
    try:
        guard = poolguard.get_guard(engine)
        assert not guard.gate.policies_on
        with poolguard.request(priority=HEALTH):
            with engine.connect() as conn:  # a free connection: served
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
            held = engine.connect()
            # Full: refused at once (with SAFETY_TIMEOUT it would otherwise wait).
            with pytest.raises(poolguard.LoadShed) as info:
                engine.connect()
        assert (info.value.reason, info.value.priority) == ("health_busy", HEALTH)
        assert guard.gate.waiting == 0
        assert guard.gate.timeouts == 0
        held.close()
        assert guard.gate.in_use == 0
        assert guard.rejections == {("health_busy", HEALTH): 1}
    finally:
        engine.dispose()
