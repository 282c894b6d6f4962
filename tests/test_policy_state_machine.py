"""Stateful test of the gate with every admission policy combined.

A Hypothesis state machine drives one :class:`poolguard._gate.Gate` (capacity
4, a fake clock, no threads, no sleeping) through:

* attempts with a random priority and tag and timeout 0: each one is granted,
  times out at once or is refused, and nothing blocks;
* parked waiters: a waiter is queued the way :meth:`Gate.acquire` queues it
  (``_enqueue_locked`` under the lock) but nobody blocks on it; releases and
  reconfigurations hand it a permit by policy, and a later step finishes it
  (``_finish``, as a woken or timed-out caller does);
* releases of held permits, with the tag they were taken under;
* CoDel driven into and out of overload through ``on_grant``/``on_empty``;
* reconfiguring the policies (reserve, per-priority waiter bounds, CoDel,
  tag caps), including all off.

Each held permit is registered in ``gate.out`` as the pool registers its
connections, with the request it was taken under (the gate recounts a newly
capped tag from there).

After every step: permits held never exceed capacity and equal what the
machine holds; a tag's count equals the permits held under it and never
exceeds its cap (unless the cap was lowered below what was already held);
critical is never refused while a permit is free; no non-critical caller got
a permit while ``free <= reserved`` less the permits critical callers hold
(the reserve is a guarantee, what critical holds counts); and no waiter is left waiting while a
permit it may take is free.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from _support import FakeClock
from poolguard._context import RequestContext
from poolguard._gate import AdmissionRefused, Gate, _Waiter
from poolguard._hold import new_hold
from poolguard._policies import (
    BACKGROUND,
    CRITICAL,
    HEALTH,
    NORMAL,
    PRIORITIES,
    Admission,
    Codel,
    may_take,
    rank,
)

CAPACITY = 4
CAPPED_TAGS = ("report", "search")
WAIT = 5.0  # a parked waiter's timeout: it never runs out, the machine finishes it

priorities = st.sampled_from(PRIORITIES)
tags = st.sampled_from((None, "login", *CAPPED_TAGS))
picks = st.integers(min_value=0, max_value=64)
policies = st.fixed_dictionaries({
    "reserved": st.integers(min_value=0, max_value=CAPACITY),
    "max_waiting": st.fixed_dictionaries({
        p: st.none() | st.integers(min_value=0, max_value=3)
        for p in (CRITICAL, NORMAL, BACKGROUND)
    }),
    "codel": st.booleans(),
    "tag_limits": st.dictionaries(
        st.sampled_from(CAPPED_TAGS), st.integers(min_value=1, max_value=CAPACITY)
    ),
})



class Parked(_Waiter):
    """A queued waiter nobody blocks on: its wake-up is recorded instead."""

    def __init__(self, machine: PolicyGateMachine, priority: str, tag: str | None) -> None:
        super().__init__(priority, tag)
        self.machine = machine
        self.key = object()

    def wake(self) -> None:
        # Called by the gate under its lock: right after it took the token
        # for this waiter, or (no policy) to let it take a free one itself.
        if self.granted:
            self.machine.on_grant(self.key, self.priority, self.tag)
        else:
            self.woken = True


class PolicyGateMachine(RuleBasedStateMachine):
    """Model: the permits held (by key: priority, tag) and the parked waiters."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(1000.0)
        self.gate = Gate(CAPACITY, clock=self.clock)
        self.held: dict[object, tuple[str, str | None]] = {}
        self.parked: list[Parked] = []
        self.violations: list[str] = []
        #: Per capped tag, what was held when its cap was set below that.
        self.allowance: dict[str, int] = {}
        self.configure_gate(
            {"reserved": 1, "max_waiting": {BACKGROUND: 1}, "codel": True,
             "tag_limits": {"report": 2}}
        )

    # -- helpers --------------------------------------------------------------

    @property
    def policy(self) -> Admission:
        """The gate's admission policy (all off: one that decides nothing)."""
        return self.gate.admission or Admission()

    @property
    def free(self) -> int:
        return CAPACITY - self.gate.in_use

    @property
    def kept(self) -> int:
        """Free permits non-critical callers must leave: the reserve less what critical holds."""
        return self.policy.reserved - sum(p == CRITICAL for p, _ in self.held.values())

    def held_with(self, tag: str) -> int:
        return sum(t == tag for _, t in self.held.values())

    def waiting(self) -> list[Parked]:
        return [w for w in self.parked if not w.granted]

    def tag_full(self, tag: str | None, queued: int = 0) -> bool:
        cap = self.policy.tag_limits.get(tag) if tag is not None else None
        return cap is not None and self.held_with(tag) + queued >= cap  # type: ignore[arg-type]

    def may_take_now(self, priority: str, tag: str | None) -> bool:
        """Whether a caller may take a free permit now (the policy, from the model)."""
        if not self.gate.policies_on:
            return self.free > 0
        return may_take(priority, self.free, self.kept) and not self.tag_full(tag)

    def on_grant(self, key: object, priority: str, tag: str | None) -> None:
        """A permit was granted: check the policy held, and register it like the pool."""
        free_before = len(self.gate._tokens or ()) + 1  # the gate took the token just now
        if priority != CRITICAL and free_before <= self.kept:
            self.violations.append(
                f"{priority} got a permit with {free_before} free, {self.policy.reserved} "
                f"reserved, {self.kept} of them not held by critical"
            )
        cap = self.policy.tag_limits.get(tag) if tag is not None else None
        if cap is not None and self.gate.tag_in_use.get(tag, 0) > cap:  # type: ignore[arg-type]
            self.violations.append(f"a grant took tag {tag!r} past its cap {cap}")
        self.held[key] = (priority, tag)
        self.gate.out[key] = new_hold(0.0, 0.0, 0, RequestContext(None, tag, priority))

    def check_refusal(self, reason: str, priority: str, tag: str | None) -> None:
        queued = self.waiting()
        if reason == "tag_limit":
            assert self.tag_full(tag, sum(w.tag == tag for w in queued))
        elif reason == "health_busy":
            assert priority == HEALTH
        elif reason == "queue_full":
            limit = self.policy.max_waiting.get(priority)
            assert limit is not None
            assert sum(w.priority == priority for w in queued) >= limit
        else:
            raise AssertionError(f"unexpected refusal {reason!r}")
        if priority == CRITICAL and self.free > 0:
            # Critical is never refused while a permit is free, except by its own bulkhead.
            assert reason == "tag_limit", reason

    def blocked(self, priority: str, tag: str | None) -> bool:
        """Whether a caller that did not get a permit had to go without."""
        if self.free == 0:
            return True
        if priority != CRITICAL and self.free <= self.kept:
            return True
        return any(
            rank(w.priority) <= rank(priority) and not self.tag_full(w.tag)
            for w in self.waiting()
        )

    def configure_gate(self, policy: dict[str, Any]) -> None:
        caps = policy["tag_limits"]
        for tag, cap in caps.items():
            held = self.held_with(tag)
            self.allowance[tag] = held if held > cap else 0
        self.gate.configure_policy(
            reserved=policy["reserved"],
            max_waiting=policy["max_waiting"],
            codel=Codel(target=0.005, interval=0.1) if policy["codel"] else None,
            tag_limits=caps,
        )

    # -- rules -------------------------------------------------------------------

    @rule(priority=priorities, tag=tags)
    def attempt(self, priority: str, tag: str | None) -> None:
        free = self.free
        blocked = self.blocked(priority, tag)
        key = object()
        try:
            granted = self.gate.acquire(0, asyncio_mode=False, priority=priority, tag=tag)
        except AdmissionRefused as refused:
            self.check_refusal(refused.reason, priority, tag)
            return
        if granted:
            self.on_grant(key, priority, tag)
            return
        # Timed out at once: only when it could not have taken a permit.
        assert blocked, (priority, tag, free, self.policy.reserved)
        assert priority != HEALTH, "health times out instead of being refused"
        assert not (priority == CRITICAL and free > 0), f"critical timed out with {free} free"

    @rule(priority=priorities, tag=tags)
    def park(self, priority: str, tag: str | None) -> None:
        waiter = Parked(self, priority, tag)
        try:
            with self.gate._lock:
                left = self.gate._enqueue_locked(waiter, WAIT)
        except AdmissionRefused as refused:
            self.check_refusal(refused.reason, priority, tag)
            return
        if waiter.granted:  # a permit at once, without queueing
            self.on_grant(waiter.key, priority, tag)
            return
        assert priority != HEALTH, "health must never wait"
        assert left > 0
        assert self.gate.waiting == len(self.waiting()) + 1
        self.parked.append(waiter)

    @precondition(lambda self: self.parked)
    @rule(pick=picks, waited=st.floats(min_value=0, max_value=1))
    def finish(self, pick: int, waited: float) -> None:
        """A parked caller wakes up: with its permit, or timed out."""
        waiter = self.parked.pop(pick % len(self.parked))
        handed = waiter.granted
        granted = self.gate._finish(waiter, waited)
        assert granted is waiter.granted
        if granted and not handed:
            # Woken to take a free permit (or, no policy, done waiting with
            # one free), it took the permit itself.
            self.on_grant(waiter.key, waiter.priority, waiter.tag)
        assert (waiter.key in self.held) is granted

    @precondition(lambda self: self.held)
    @rule(pick=picks)
    def release(self, pick: int) -> None:
        keys = [k for k in self.held if not any(w.key is k for w in self.parked)]
        if not keys:
            return
        key = keys[pick % len(keys)]
        _, tag = self.held.pop(key)
        self.gate.out.pop(key)  # the pool's checkin: unregister, then give back
        self.gate.release(tag)

    @rule(policy=policies)
    def reconfigure(self, policy: dict[str, Any]) -> None:
        self.configure_gate(policy)

    @rule()
    def all_off(self) -> None:
        self.configure_gate({"reserved": 0, "max_waiting": {}, "codel": False, "tag_limits": {}})
        assert not self.gate.policies_on

    @precondition(lambda self: self.policy.codel is not None)
    @rule()
    def overload(self) -> None:
        codel = self.policy.codel
        assert codel is not None
        with self.gate._lock:
            codel.on_empty(self.clock.now)
            codel.on_grant(1.0, self.clock.now)
            self.clock.now += codel.interval
            codel.on_grant(1.0, self.clock.now)
        assert codel.overloaded

    @precondition(lambda self: self.policy.codel is not None)
    @rule()
    def relieve(self) -> None:
        codel = self.policy.codel
        assert codel is not None
        with self.gate._lock:
            codel.on_empty(self.clock.now)
        assert not codel.overloaded

    @rule(dt=st.floats(min_value=0, max_value=0.5))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def no_policy_was_broken(self) -> None:
        assert not self.violations, self.violations

    @invariant()
    def permits_match_what_is_held(self) -> None:
        assert 0 <= self.gate.in_use <= CAPACITY
        assert self.gate.in_use == len(self.held)
        assert self.gate.waiting == len(self.waiting())
        assert set(self.gate.out) == set(self.held)

    @invariant()
    def tag_counts_match_and_respect_caps(self) -> None:
        for tag in CAPPED_TAGS:
            cap = self.policy.tag_limits.get(tag)
            count = self.gate.tag_in_use.get(tag, 0)
            if cap is None:
                assert tag not in self.gate.tag_in_use
                continue
            assert count == self.held_with(tag), (tag, count, self.held)
            assert count <= max(cap, self.allowance.get(tag, 0)), (tag, count, cap)
        assert "login" not in self.gate.tag_in_use
        assert None not in self.gate.tag_in_use

    @invariant()
    def no_waiter_left_behind_a_free_permit(self) -> None:
        blocked = [w for w in self.waiting() if self.may_take_now(w.priority, w.tag)]
        if blocked:
            # A free permit one of them may take: a waiter is woken to take it
            # itself (one at a time; a running caller may take it first). It
            # is in flight, not lost.
            signalled = self.gate.signalled
            assert signalled is not None, "a free permit and nobody woken for it"
            assert signalled.woken
            return
        for waiter in self.waiting():
            assert not self.may_take_now(waiter.priority, waiter.tag), (
                f"{waiter.priority}/{waiter.tag} waits with {self.free} free, "
                f"{self.policy.reserved} reserved, caps {self.policy.tag_limits}, "
                f"in use {self.gate.tag_in_use}"
            )


PolicyGateMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None
)
TestPolicyGate = PolicyGateMachine.TestCase
