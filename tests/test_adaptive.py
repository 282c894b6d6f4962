"""The Gradient2 adaptive limit: pure algorithm, then enforced by the gate."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

import poolguard
from poolguard._gate import Gate
from poolguard._policies import CRITICAL, NORMAL, Gradient2


def test_steady_hold_times_keep_the_limit_at_capacity() -> None:
    limit = Gradient2(20)
    for _ in range(500):
        limit.update(0.01)
    assert int(limit.limit) == 20


def test_slower_holds_shrink_the_limit_and_recovery_restores_it() -> None:
    limit = Gradient2(20)
    for _ in range(300):
        limit.update(0.01)
    for _ in range(60):
        limit.update(0.2)  # the database got 20x slower
    shrunk = limit.limit
    assert shrunk < 10
    for _ in range(400):
        limit.update(0.01)
    assert limit.limit > shrunk
    assert int(limit.limit) == 20


def test_limit_stays_within_bounds() -> None:
    limit = Gradient2(8, min_limit=2)
    for value in [0.001, 5.0] * 200:
        assert 2 <= limit.update(value) <= 8
        assert 2 <= limit.limit <= 8


def test_gate_enforces_the_limit_for_non_critical_only() -> None:
    gate = Gate(10)
    adaptive = Gradient2(10)
    adaptive.limit = 3.0
    gate.configure_policy(adaptive=adaptive)
    for _ in range(3):
        assert gate.acquire(0, asyncio_mode=False, priority=NORMAL)
    assert not gate.acquire(0, asyncio_mode=False, priority=NORMAL)
    assert gate.acquire(0, asyncio_mode=False, priority=CRITICAL)
    assert gate.in_use == 4


def test_engine_with_adaptive_limit_balances_permits(tmp_path: Path) -> None:
    engine = poolguard.wrap(
        sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}", pool_size=3, max_overflow=0),
        adaptive_limit=True,
        acquire_timeout=0,
    )
    guard = poolguard.get_guard(engine)
    assert guard.gate.admission is not None
    assert guard.gate.admission.adaptive is not None
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    assert guard.stats().permits == 0
    assert guard.gate.admission.adaptive.limit == pytest.approx(3.0)
    engine.dispose()
