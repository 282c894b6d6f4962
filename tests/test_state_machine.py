"""Stateful test: a guarded engine's permits match the connections held, always.

A Hypothesis state machine checks connections out of a real guarded engine
(SQLite file, QueuePool of 3 + 2 overflow) by every checkout path, returns
them by every return path, checks out on a full pool, and disposes the engine
while connections are out. After every step the guard's permits must equal
the connections the machine holds. ``acquire_timeout=0`` makes a checkout on a
full pool fail at once, so nothing ever sleeps.
"""

from __future__ import annotations

import gc
import os
import tempfile
from typing import Any

import pytest
import sqlalchemy as sa
import sqlalchemy.exc
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import poolguard

POOL_SIZE = 3
MAX_OVERFLOW = 2
CAPACITY = POOL_SIZE + MAX_OVERFLOW

KINDS = ("engine.connect", "engine.raw_connection", "pool.connect")

kinds = st.sampled_from(KINDS)
# An index into the held connections, taken modulo their number.
picks = st.integers(min_value=0, max_value=CAPACITY - 1)


class GuardMachine(RuleBasedStateMachine):
    """Model: the list of connections held, and the number of timeouts seen."""

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="poolguard-sm-")
        path = os.path.join(self._tmp.name, "sm.sqlite3")
        self.engine = poolguard.wrap(
            sa.create_engine(f"sqlite:///{path}", pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW),
            acquire_timeout=0,
        )
        self.guard = poolguard.get_guard(self.engine)
        # (kind, connection) pairs; never returned from rules, so that Hypothesis
        # keeps no reference to them (the GC rule drops the last one).
        self.held: list[tuple[str, Any]] = []
        self.checkouts = 0
        self.timeouts = 0
        self.disposals = 0

    # -- helpers --------------------------------------------------------------

    def _checkout(self, kind: str) -> Any:
        if kind == "engine.connect":
            return self.engine.connect()
        if kind == "engine.raw_connection":
            return self.engine.raw_connection()
        return self.engine.pool.connect()

    def _take(self, pick: int) -> tuple[str, Any]:
        return self.held.pop(pick % len(self.held))

    def _expect_timeout(self, kind: str) -> None:
        with pytest.raises(poolguard.PoolTimeout) as info:
            self._checkout(kind)
        self.timeouts += 1
        error = info.value
        assert isinstance(error, sqlalchemy.exc.TimeoutError)
        assert isinstance(error, poolguard.PoolguardError)
        assert error.in_use == CAPACITY
        assert error.capacity == CAPACITY
        assert error.waiting == 0
        assert error.timeout == 0
        assert error.pool_name == self.guard.name

    def _full(self) -> bool:
        return len(self.held) >= CAPACITY

    # -- checkouts ----------------------------------------------------------------

    @precondition(lambda self: not self._full())
    @rule(kind=kinds)
    def checkout(self, kind: str) -> None:
        conn = self._checkout(kind)
        self.held.append((kind, conn))
        self.checkouts += 1

    @precondition(lambda self: not self._full())
    @rule(several=st.lists(kinds, min_size=2, max_size=CAPACITY))
    def checkout_several(self, several: list[str]) -> None:
        # Returns outnumber checkouts among the rules: this gets to a full pool.
        for kind in several[: CAPACITY - len(self.held)]:
            self.checkout(kind)

    @precondition(lambda self: self._full())
    @rule(kind=kinds)
    def checkout_when_full(self, kind: str) -> None:
        self._expect_timeout(kind)

    @rule(kind=kinds)
    def checkout_in_expired_request(self, kind: str) -> None:
        # A request with no time left gets no connection, full pool or not,
        # and the refusal happens before the gate: no timeout is counted.
        with poolguard.request(timeout=0), pytest.raises(poolguard.DeadlineExceeded) as info:
            self._checkout(kind)
        assert isinstance(info.value, sqlalchemy.exc.TimeoutError)

    # -- returns --------------------------------------------------------------

    @precondition(lambda self: bool(self.held))
    @rule(pick=picks)
    def close(self, pick: int) -> None:
        _, conn = self._take(pick)
        conn.close()

    @precondition(lambda self: bool(self.held))
    @rule(pick=picks)
    def invalidate(self, pick: int) -> None:
        _, conn = self._take(pick)
        conn.invalidate()
        # The permit is back already: the record returned to the pool.
        assert self.guard.gate.in_use == len(self.held)
        conn.close()

    @precondition(lambda self: bool(self.held))
    @rule(pick=picks)
    def detach_then_close(self, pick: int) -> None:
        _, conn = self._take(pick)
        conn.detach()
        # The record returned to the pool at detach; its connection lives on.
        assert self.guard.gate.in_use == len(self.held)
        conn.close()

    @precondition(lambda self: bool(self.held))
    @rule(pick=picks)
    def drop_and_collect(self, pick: int) -> None:
        _, conn = self._take(pick)
        del conn  # the last reference: the pool's finalizer returns the record
        gc.collect()

    # -- the pool replaced under connections that are out ---------------------

    @precondition(lambda self: bool(self.held))
    @rule()
    def dispose(self) -> None:
        old_pool = self.engine.pool
        self.engine.dispose()
        self.disposals += 1
        assert self.engine.pool is not old_pool
        assert poolguard.get_guard(self.engine) is self.guard
        assert self.guard.pool is self.engine.pool

    # -- invariants -----------------------------------------------------------

    @invariant()
    def permits_match_connections_held(self) -> None:
        held = len(self.held)
        assert held <= CAPACITY
        assert self.guard.gate.in_use == held
        stats = self.guard.stats()
        assert stats.permits == held
        assert stats.permits <= CAPACITY
        assert stats.capacity == CAPACITY
        if not self.held:
            assert stats.permits == 0

    @invariant()
    def nobody_waits(self) -> None:
        assert self.guard.gate.waiting == 0
        assert self.guard.stats().waiting == 0

    @invariant()
    def counters_match_the_model(self) -> None:
        stats = self.guard.stats()
        assert stats.timeouts == self.timeouts
        assert stats.acquisitions == self.checkouts
        assert stats.waits == 0  # acquire_timeout=0 never waits

    def teardown(self) -> None:
        try:
            while self.held:
                _, conn = self.held.pop()
                conn.close()
            self.engine.dispose()
        finally:
            self._tmp.cleanup()


GuardMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestGuardStateMachine = GuardMachine.TestCase
