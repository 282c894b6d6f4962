"""Pin the Python call count that the guard adds to one checkout/checkin cycle.

Wall-clock time is noisy on a shared machine; the number of calls is not. If a
change adds work to the hot path, this test fails and the change has to update
the pinned number on purpose (and run the benchmark in benchmarks/).
"""

from __future__ import annotations

import cProfile
import gc
import math
import pstats
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

import poolguard
from poolguard._compat import use_gated_queue

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from sqlalchemy.engine import Engine

# Calls the guard adds to a checkout/checkin cycle, as cProfile counts them:
# the C calls deque.pop (take a permit), deque.append (give it back),
# ContextVar.get (the request), get_ident (the holder's thread), two
# perf_counter (use time) and bisect_left (its histogram bucket). No Python
# call: GuardedPoolMixin.connect and ._return_conn replace Pool.connect and
# Pool._return_conn, which only call the next step. The record leaves
# Gate.out by item read and delete (no call: see _return_conn on why not
# dict.pop).
GUARD_EXTRA_CALLS = 7

# Calls it adds to one statement: QueryTimer's wrapper, two perf_counter,
# one dict.get for the holder and one for the statement's stats row, and
# bisect_left for the duration's bucket.
STATEMENT_EXTRA_CALLS = 6


def _calls(cycle: Callable[[], None]) -> int:
    for _ in range(3):  # warm: connection opened, caches filled
        cycle()
    # A collection inside the measured cycle runs the finalizers of whatever
    # earlier tests left behind, in this thread, and cProfile counts their
    # calls (seen in the full suite: 17 instead of 13). Collect first, and
    # keep the collector off while measuring.
    gc.collect()
    gc.disable()
    try:
        profiler = cProfile.Profile()
        profiler.enable()
        cycle()
        profiler.disable()
    finally:
        gc.enable()
    return pstats.Stats(profiler).total_calls  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    url = f"sqlite:///{tmp_path / 'calls.db'}"
    plain = sa.create_engine(url)
    # The guarded pool's idle records sit in a GatedQueue (no lock while
    # nobody waits); the plain side gets one too, so that what is counted
    # is the guard's own work (the queue's share: test_gated_queue_...).
    use_gated_queue(plain.pool)
    guarded = poolguard.wrap(sa.create_engine(url))
    # The once-a-second scan is not the fast path: on a loaded machine the
    # warm-up and the measured cycle can straddle its deadline and count its
    # calls too (seen: 14 instead of 10). It stays off here.
    scanner = poolguard.get_guard(guarded).scanner
    scanner.next_scan = math.inf
    scanner.update_slow_at()
    yield plain, guarded
    plain.dispose()
    guarded.dispose()


def test_engine_connect_close_adds_pinned_calls(engines: tuple[Engine, Engine]) -> None:
    plain, guarded = engines
    extra = _calls(lambda: guarded.connect().close()) - _calls(lambda: plain.connect().close())
    assert extra == GUARD_EXTRA_CALLS


def test_pool_connect_close_adds_pinned_calls(engines: tuple[Engine, Engine]) -> None:
    plain, guarded = engines
    extra = _calls(lambda: guarded.pool.connect().close()) - _calls(
        lambda: plain.pool.connect().close()
    )
    assert extra == GUARD_EXTRA_CALLS


def test_statement_adds_pinned_calls(engines: tuple[Engine, Engine]) -> None:
    plain, guarded = engines
    stmt = sa.text("SELECT 1")

    def run(engine: Engine) -> Callable[[], None]:
        def cycle() -> None:
            with engine.connect() as conn:
                conn.execute(stmt).scalar()

        return cycle

    extra = _calls(run(guarded)) - _calls(run(plain))
    assert extra == GUARD_EXTRA_CALLS + STATEMENT_EXTRA_CALLS


def test_waiting_path_is_not_taken_when_permits_are_free(engines: tuple[Engine, Engine]) -> None:
    _, guarded = engines
    guard = poolguard.get_guard(guarded)
    for _ in range(20):
        guarded.connect().close()
    stats = guard.stats()
    assert stats.acquisitions == 20
    assert stats.waits == 0
    assert stats.permits == 0


# Calls SQLAlchemy's own queue makes per get and put that the GatedQueue does
# not (Condition enter/exit, _empty, _get/_put, notify and its _is_owned), at
# least: in the full suite it was seen to make more (28; what an earlier test
# left in threading or logging), never fewer.
QUEUE_SAVED_CALLS = 16


def test_gated_queue_saves_pinned_calls(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queue.db'}"
    sqlalchemys, gated = sa.create_engine(url), sa.create_engine(url)
    use_gated_queue(gated.pool)
    try:
        saved = _calls(lambda: sqlalchemys.pool.connect().close()) - _calls(
            lambda: gated.pool.connect().close()
        )
    finally:
        sqlalchemys.dispose()
        gated.dispose()
    assert saved >= QUEUE_SAVED_CALLS
