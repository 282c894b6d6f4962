"""The contention benchmark runs end to end, tiny (its structure, never its timings),
and the gate's policy fast path keeps what the queue promises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
import sqlalchemy as sa

import poolguard
from poolguard._gate import AdmissionRefused, Gate
from poolguard._policies import BACKGROUND, CRITICAL, NORMAL
from poolguard.cli import _hotpath as hotpath


def test_quick_contention_run_reports_every_case() -> None:
    threads_before = threading.active_count()
    results = hotpath.run_contention(quick=True, callers=(1, 3))
    # Every case's callers exited and its engines' threads ended.
    assert threading.active_count() == threads_before
    cases = {(r.mode, r.callers, r.policy, r.aa) for r in results}
    assert cases == {(m, n, p, False) for m in ("threads", "asyncio") for n in (1, 3)
                     for p in (False, True)}
    for r in results:
        assert r.rounds == 3  # pairs of slices
        assert r.plain_us > 0
        assert r.guarded_us > 0
        assert r.ratio > 0
        assert r.ratio_p25 <= r.ratio <= r.ratio_p75
        assert r.plain_ops_s > 0
        assert r.guarded_ops_s > 0
        assert r.guarded_max_wait_ms >= r.guarded_p99_wait_ms >= 0
        assert r.plain_max_wait_ms >= r.plain_p99_wait_ms >= 0
        assert r.guarded_wait_cv >= 0
    table = hotpath.format_contention(results)
    assert table.count("\n") == len(results) + 1
    assert "p99 wait" in table
    assert " aa " not in table


def test_the_aa_check_compares_two_plain_engines_in_rows_of_its_own(
    capsys: pytest.CaptureFixture[str],
) -> None:
    threads_before = threading.active_count()
    assert hotpath.contention_main(quick=True, callers=(2,), modes=("threads",),
                                   policies=(False,), aa=True) == 0
    assert threading.active_count() == threads_before
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("threads ")]
    assert [row[:3] for row in rows] == [["threads", "2", "off"], ["threads", "2", "aa"]]
    assert "A/A self-check" in out
    assert "from one continuous 0.05 s run per side" in out
    assert "over 3 ABBA pairs\nof 0.02 s slices" in out


def test_slices_alternate_in_abba_pairs() -> None:
    plan = hotpath._Plan(pairs=3, slice_s=0.1, fair_s=2.0)
    assert list(plan.slices()) == ["plain", "guarded", "guarded", "plain", "plain", "guarded"]


def test_parked_caller_threads_take_part_in_every_run_and_exit_on_close(
    sqlite_url: str,
) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(sqlite_url, pool_size=2, max_overflow=0)
    threads_before = threading.active_count()
    callers = hotpath._ThreadCallers(engine, 6)
    try:
        assert threading.active_count() == threads_before + 6
        # Runs far shorter than a thread's wake-up: a thread released late
        # must still join the run it was released for (and park once), never
        # miss it and hang the next one.
        for _ in range(50):
            callers.run(0.0)
        done = callers.run(0.05, record=True)
        assert done.ops > 0
        assert 0 < len(done.waits) <= done.ops
        # A wait counts up to the run's end at most, never the drain after it.
        assert all(0 <= w <= done.wall for w in done.waits)
        assert callers.run(0.01).waits == []  # waits only in a continuous run
    finally:
        callers.close()
        engine.dispose()
    assert threading.active_count() == threads_before


def test_a_failing_caller_thread_fails_the_run_and_close_still_ends_them_all(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sqlalchemy as sa

    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # expected, not noise
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    threads_before = threading.active_count()
    callers = hotpath._ThreadCallers(engine, 3)
    try:
        with pytest.raises(sa.exc.OperationalError):
            callers.run(0.01)
    finally:
        callers.close()
        engine.dispose()
    assert threading.active_count() == threads_before


async def test_parked_caller_tasks_take_part_in_every_run_and_exit_on_close(
    aiosqlite_url: str, make_async_engine: Any,
) -> None:
    import asyncio

    engine = make_async_engine(aiosqlite_url, pool_size=2, max_overflow=0)
    callers = hotpath._TaskCallers(engine, 6)
    try:
        for _ in range(50):  # as with threads: a late task still joins its run
            await callers.run(0.0)
        done = await callers.run(0.05, record=True)
        assert done.ops > 0
        assert 0 < len(done.waits) <= done.ops
        assert all(0 <= w <= done.wall for w in done.waits)
    finally:
        await callers.close()
    assert all(task.done() and task.exception() is None for task in callers._tasks)
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_a_failing_caller_task_fails_the_run_and_close_still_ends_them_all(
    tmp_path: Any,
) -> None:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'x.db'}")
    callers = hotpath._TaskCallers(engine, 3)
    try:
        with pytest.raises(sa.exc.OperationalError):
            await callers.run(0.01)
    finally:
        await callers.close()
        await engine.dispose()
    assert all(task.done() for task in callers._tasks)


def test_gate_rows_take_the_guarded_sides_statement_timer_off(
    capsys: pytest.CaptureFixture[str], sqlite_url: str,
) -> None:
    # The helper both modes use: the guard stays (its gate and pool), only
    # the dialect's statement wrappers go.
    engine = hotpath._guarded(sa.create_engine(sqlite_url), {}, timer_off=True)
    kept = hotpath._guarded(sa.create_engine(sqlite_url), {}, timer_off=False)
    try:
        assert "do_execute" not in engine.dialect.__dict__
        assert "do_execute" in kept.dialect.__dict__
        assert isinstance(poolguard.get_guard(engine), poolguard.Guard)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        assert poolguard.get_guard(engine).stats().acquisitions == 1
        assert poolguard.get_guard(engine).top_queries() == []  # not timed
    finally:
        engine.dispose()
        kept.dispose()
    threads_before = threading.active_count()
    assert hotpath.contention_main(quick=True, callers=(2,), policies=(False,), gate=True) == 0
    assert threading.active_count() == threads_before
    out = capsys.readouterr().out
    rows = [line.split()[:3] for line in out.splitlines()
            if line.startswith(("threads ", "asyncio "))]
    assert rows == [["threads", "2", "off"], ["threads", "2", "gate"],
                    ["asyncio", "2", "off"], ["asyncio", "2", "gate"]]
    assert "policy gate: the guarded side with its statement timer taken off" in out
    assert "SQLite, a file in a temporary folder" in out


def test_contention_runs_against_a_server_of_ones_own(
    capsys: pytest.CaptureFixture[str], postgresql_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = hotpath.run_contention(quick=True, callers=(2,), policies=(False,),
                                     url=postgresql_url)
    assert [(r.mode, r.callers) for r in results] == [("threads", 2), ("asyncio", 2)]
    assert all(r.plain_ops_s > 0 and r.guarded_ops_s > 0 for r in results)
    assert hotpath.contention_main(quick=True, callers=(1,), modes=("threads",),
                                   policies=(False,), url=postgresql_url) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert sa.make_url(postgresql_url).render_as_string(hide_password=True) in head
    password = sa.make_url(postgresql_url).password
    assert not password or password not in head
    # The cases run on that server, not on the default SQLite file: a
    # database that does not exist fails the run.
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # expected, not noise
    missing = sa.make_url(postgresql_url).set(database="poolguard_no_such_database")
    with pytest.raises(sa.exc.OperationalError, match="poolguard_no_such_database"):
        hotpath.run_contention(quick=True, callers=(1,), modes=("threads",), policies=(False,),
                               url=missing.render_as_string(hide_password=False))


def test_bench_hot_path_contention_cli_json() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "poolguard.cli", "bench", "--hot-path", "--contention", "--quick",
         "--json"],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["command"] == "bench --hot-path --contention"
    assert report["meta"]["quick"] is True
    assert (report["meta"]["pairs"], report["meta"]["slice_s"], report["meta"]["fair_s"]) == (
        3, 0.02, 0.05)
    assert all(r["rounds"] == 3 and r["aa"] is False for r in report["results"])
    assert {r["callers"] for r in report["results"]} == {1, 4}
    assert {r["mode"] for r in report["results"]} == {"threads", "asyncio"}



def test_bench_hot_path_contention_cli_takes_a_url(postgresql_url: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(  # noqa: S603 - our own interpreter and module, the test server's URL
        [sys.executable, "-m", "poolguard.cli", "bench", "--hot-path", "--contention", "--quick",
         "--json", "--url", postgresql_url],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    shown = sa.make_url(postgresql_url).render_as_string(hide_password=True)
    assert report["meta"]["database"] == shown
    assert {r["mode"] for r in report["results"]} == {"threads", "asyncio"}
    assert all(r["plain_ops_s"] > 0 and r["guarded_ops_s"] > 0 for r in report["results"])

# -- the lock-free take of a bounded-queue policy ---------------------------------------


def test_bounded_queue_policy_takes_without_the_lock_unless_a_waiter_is_owed() -> None:
    gate = Gate(1)
    gate.barge_bound = 0.0  # owed a hand-off as soon as it is passed over once
    gate.configure_policy(max_waiting={NORMAL: 5})
    assert gate.policies_on
    assert gate.take == gate.take_last == gate._take_token  # nobody waits: the fast path
    gate.take()
    results: list[bool] = []
    thread = threading.Thread(
        target=lambda: results.append(gate.acquire(10.0, asyncio_mode=False)), daemon=True
    )
    thread.start()
    deadline = threading.Event()
    while gate.waiting == 0 and not deadline.wait(0.001):
        pass
    # A normal waiter, passed over by nobody yet: a normal newcomer may take a
    # free permit ahead of it without the lock (as the locked admission lets
    # it), a background one may not.
    assert gate.take == gate._take_token
    assert gate.take_last != gate._take_token
    with pytest.raises(IndexError):
        gate.take_last()
    # The release wakes the waiter to take the permit; a running caller takes
    # it first (the lock held: the waiter cannot look before).
    with gate._lock:
        gate.release()
        gate.take()
    while not any(gate._owed.values()) and thread.is_alive() and not deadline.wait(0.001):
        pass
    # Passed over once, it is owed the next permit: nobody takes without the lock.
    assert any(gate._owed.values())
    assert gate.take != gate._take_token
    with pytest.raises(IndexError):
        gate.take()
    gate.release()  # handed to it
    thread.join(10.0)
    assert results == [True]
    assert (gate.in_use, gate.waiting) == (1, 0)
    assert gate.take == gate.take_last == gate._take_token  # the queue is empty again
    gate.release()
    assert gate.in_use == 0


@pytest.mark.parametrize(
    "policy",
    [{"reserved": 1}, {"tag_limits": {"t": 1}}],
    ids=["reserve", "tag-cap"],
)
def test_policies_that_shape_who_takes_keep_every_checkout_under_the_lock(
    policy: dict[str, Any],
) -> None:
    gate = Gate(2)
    gate.configure_policy(**policy)
    with pytest.raises(IndexError):
        gate.take()


def test_lanes_serve_by_priority_then_arrival_and_bound_each_queue() -> None:
    gate = Gate(1)
    gate.configure_policy(max_waiting={BACKGROUND: 1, NORMAL: 2})
    gate.take()
    order: list[str] = []
    threads = []
    for i, priority in enumerate([BACKGROUND, NORMAL, NORMAL, CRITICAL]):
        def run(priority: str = priority, i: int = i) -> None:
            if gate.acquire(10.0, asyncio_mode=False, priority=priority):
                order.append(f"{priority}{i}")
                gate.release()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        stop = threading.Event()
        while gate.waiting < i + 1 and not stop.wait(0.001):
            pass
    with pytest.raises(AdmissionRefused) as refused:  # the normal queue holds two already
        gate.acquire(10.0, asyncio_mode=False, priority=NORMAL)
    assert refused.value.reason == "queue_full"
    gate.release()
    for thread in threads:
        thread.join(10.0)
    assert order == ["critical3", "normal1", "normal2", "background0"]
    assert (gate.in_use, gate.waiting) == (0, 0)


async def test_policy_lets_a_newcomer_take_a_woken_waiters_permit_only_at_its_priority() -> None:
    import asyncio

    from sqlalchemy.util import greenlet_spawn

    gate = Gate(1)
    gate.barge_bound = 0.0  # owed a hand-off as soon as it is passed over once
    gate.configure_policy(max_waiting={NORMAL: 5, BACKGROUND: 5})
    assert gate.acquire(0, asyncio_mode=False) is True
    waiter = asyncio.ensure_future(greenlet_spawn(gate.acquire, 10.0, asyncio_mode=True))
    while gate.waiting == 0:
        await asyncio.sleep(0.001)
    gate.release()  # wakes the normal waiter, which has not run yet
    assert gate.in_use == 0
    # A worse priority may not pass it; the same priority may (no convoy).
    assert gate.acquire(0, asyncio_mode=False, priority=BACKGROUND) is False
    assert gate.acquire(0, asyncio_mode=False, priority=NORMAL) is True
    await asyncio.sleep(0.01)  # the waiter runs, finds nothing, waits again
    assert not waiter.done()
    # Owed a hand-off now: its own priority may not pass it again, a better one may.
    with gate._lock:
        assert gate._owed_at_or_above(NORMAL)
        assert not gate._owed_at_or_above(CRITICAL)
    gate.release()  # handed over
    assert gate.in_use == 1
    assert gate.acquire(0, asyncio_mode=False, priority=NORMAL) is False
    assert await asyncio.wait_for(waiter, 10.0) is True
    assert (gate.in_use, gate.waiting) == (1, 0)
    with gate._lock:
        assert not gate._owed_at_or_above(BACKGROUND)  # settled once it left the queue


@pytest.mark.timing
@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_no_waiter_starves_with_many_threads_on_few_permits(policy: bool) -> None:
    # 64 threads share 2 permits in a closed loop: every acquire must succeed
    # well within its (generous) timeout, barging or not.
    import time

    gate = Gate(2)
    if policy:
        gate.configure_policy(max_waiting={NORMAL: 1000})
    stop = threading.Event()
    failures: list[str] = []
    counts: list[int] = []

    def worker() -> None:
        n = 0
        while not stop.is_set():
            if not gate.acquire(20.0, asyncio_mode=False):
                failures.append("timed out")
                return
            n += 1
            gate.release()
            time.sleep(0)
        counts.append(n)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(64)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(30.0)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert len(counts) == 64
    assert (gate.in_use, gate.waiting) == (0, 0)
    assert gate.timeouts == 0


@pytest.mark.parametrize("policy", [{}, {"max_waiting_normal": 100}], ids=["no-policy", "policy"])
async def test_an_asyncio_waiter_is_not_woken_for_a_permit_a_running_task_retakes(
    aiosqlite_url: str, make_async_engine: Any, monkeypatch: pytest.MonkeyPatch,
    policy: dict[str, Any],
) -> None:
    import asyncio

    import sqlalchemy as sa

    import poolguard
    from poolguard._gate import _Waiter

    engine = poolguard.wrap(make_async_engine(aiosqlite_url, pool_size=1, max_overflow=0),
                            **policy)
    arms: list[bool] = []
    real_arm = _Waiter.arm

    def arm(self: _Waiter, asyncio_mode: bool) -> None:
        arms.append(asyncio_mode)
        real_arm(self, asyncio_mode)

    monkeypatch.setattr(_Waiter, "arm", arm)
    holder = await engine.connect()
    waiter = asyncio.ensure_future(engine.connect())
    while poolguard.get_guard(engine).gate.waiting == 0:
        await asyncio.sleep(0)
    # The holder gives its connection back and takes one again at once, as a
    # task looping over requests does: it keeps the permit (no convoy), and
    # the waiter, parked once, stays parked (owed the next permit) instead of
    # being woken to find nothing.
    await holder.close()
    holder = await engine.connect()
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await holder.close()  # handed over to the waiter
    conn = await asyncio.wait_for(waiter, 10.0)
    assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
    await conn.close()
    assert arms == [True]  # armed once: never woken in vain, never re-armed


# -- bounded barging ------------------------------------------------------------------


def _queue_a_thread_waiter(gate: Gate, results: list[bool], n: int = 1) -> threading.Thread:
    """Queue a thread for a permit, the ``n``-th waiter in line."""
    thread = threading.Thread(
        target=lambda: results.append(gate.acquire(10.0, asyncio_mode=False)), daemon=True
    )
    thread.start()
    deadline = threading.Event()
    while gate.waiting < n and thread.is_alive() and not deadline.wait(0.001):
        pass
    assert gate.waiting == n
    return thread


def _pass_over(gate: Gate) -> None:
    """Release a permit and take it back at once, as a running caller does,
    before the waiter woken for it can look; return once it waits again."""
    with gate._lock:
        gate.release()
        assert gate.signalled is gate.waiters[0]  # woken to take it itself
        gate.take()
    deadline = threading.Event()
    while gate.signalled is not None and not deadline.wait(0.001):
        pass
    assert gate.signalled is None
    assert gate.waiting == 1  # parked again, its place kept


def _barging(
    policy: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[Gate, list[float], threading.Thread, list[bool]]:
    """A gate of one permit, taken, a bound of 5 ms on a scripted clock
    (``now[0]``), and a thread queued for the permit (its result in ``results``)."""
    from poolguard import _gate

    now = [1000.0]
    monkeypatch.setattr(_gate, "_monotonic", lambda: now[0])
    gate = Gate(1)
    gate.barge_bound = 0.005
    if policy:
        gate.configure_policy(max_waiting={NORMAL: 5})
    gate.take()
    results: list[bool] = []
    return gate, now, _queue_a_thread_waiter(gate, results), results


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_running_callers_may_pass_the_head_waiter_within_the_bound(
    policy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, now, thread, results = _barging(policy, monkeypatch)
    for _ in range(3):  # passed over again and again while within the bound
        now[0] += 0.001
        _pass_over(gate)
        waiter = gate.waiters[0]
        assert not waiter.handoff
        assert not any(gate._owed.values())
        if policy:
            assert gate.take == gate._take_token  # a newcomer still takes without the lock
    # A permit nobody takes goes to the waiter, woken to take it.
    gate.release()
    thread.join(10.0)
    assert results == [True]
    assert (gate.in_use, gate.waiting) == (1, 0)
    gate.release()
    assert gate.in_use == 0


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_a_waiter_passed_over_past_the_bound_gets_the_next_permit_before_any_newcomer(
    policy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, now, thread, results = _barging(policy, monkeypatch)
    _pass_over(gate)  # first woken at 1000.0, passed over
    assert not gate.waiters[0].handoff
    now[0] += 0.006  # the bound has passed since it was first woken
    with gate._lock:  # the waiter cannot take the permit itself before the newcomer looks
        gate.release()
        # Handed over at the release: no newcomer gets it, locked or not.
        assert gate.in_use == 1
        with pytest.raises(IndexError):
            gate.take()
        assert gate.acquire(0, asyncio_mode=False) is False
    thread.join(10.0)
    assert results == [True]
    assert (gate.in_use, gate.waiting) == (1, 0)
    assert not any(gate._owed.values())
    gate.release()
    assert gate.in_use == 0


async def test_an_async_waiter_is_passed_over_only_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from sqlalchemy.util import greenlet_spawn

    from poolguard import _gate

    now = [1000.0]
    monkeypatch.setattr(_gate, "_monotonic", lambda: now[0])
    gate = Gate(1)
    gate.barge_bound = 0.005
    gate.take()
    waiter = asyncio.ensure_future(greenlet_spawn(gate.acquire, 10.0, asyncio_mode=True))
    while gate.waiting == 0:
        await asyncio.sleep(0.001)
    for _ in range(2):
        gate.release()  # from the loop: the waiter is woken on the loop's next pass...
        gate.take()  # ...and a running task takes the permit first
        await asyncio.sleep(0.001)
        # Within the bound: it stays parked, first in line, owed nothing.
        assert gate.waiting == 1
        assert not gate.waiters[0].handoff
        assert gate.signalled is None
        assert not waiter.done()
        now[0] += 0.002
    now[0] += 0.002  # past the bound since it was first woken
    gate.release()  # handed to it at once
    with pytest.raises(IndexError):
        gate.take()
    assert await asyncio.wait_for(waiter, 10.0) is True
    assert (gate.in_use, gate.waiting) == (1, 0)
    gate.release()


def _handed_to_head(gate: Gate, waiter: Any) -> None:
    """Release the permit held; it must go to ``waiter`` (the head) at once."""
    with gate._lock:  # the waiter cannot run before the newcomer looks
        gate.release()
        assert waiter.granted  # handed over at the release, not woken to race for it
        assert gate.in_use == 1
        with pytest.raises(IndexError):
            gate.take()  # a newcomer takes nothing without the lock...
        assert gate.acquire(0, asyncio_mode=False) is False  # ...nor with it


def _releases_until_handed(gate: Gate, waiter: Any, most: int) -> int | None:
    """Release the permit held, up to ``most`` times; each time the head is
    not handed it, a running caller takes it back first (the head, woken to
    take it, parks again). How many releases it took, or None."""
    for n in range(1, most + 1):
        with gate._lock:
            gate.release()
            if waiter.granted:
                assert gate.in_use == 1
                return n
            gate.take()
        deadline = threading.Event()
        while gate.signalled is not None and not deadline.wait(0.001):
            pass
    return None


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_once_a_waiter_is_owed_the_queue_keeps_moving_at_a_share_of_the_releases(
    policy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: only the waiter passed over past the bound was owed the
    # next permit; the one behind it was woken to race running callers again,
    # and owed nothing until passed over for another bound. The queue moved
    # one waiter per bound at best (at 256 threads on 8 connections some
    # waited out a whole 5 s run). Now the first owed hand-off puts the gate
    # in hand-off mode: one release in handoff_every goes to the head.
    gate, now, first, results = _barging(policy, monkeypatch)
    gate.handoff_every = 4
    _pass_over(gate)  # the head, first woken at 1000.0, passed over
    others = [_queue_a_thread_waiter(gate, results, n) for n in (2, 3)]
    now[0] += 0.006  # past the bound: the head is owed the next permit
    queued = list(gate.waiters)
    _handed_to_head(gate, queued[0])
    first.join(10.0)
    # The clock stands still from here: nobody else is ever passed over past
    # the bound, yet each next waiter gets a permit within handoff_every
    # releases, in order, while running callers take the others.
    for waiter, thread in zip(queued[1:], others, strict=True):
        took = _releases_until_handed(gate, waiter, gate.handoff_every)
        assert took is not None
        thread.join(10.0)
    assert results == [True, True, True]
    assert (gate.in_use, gate.waiting) == (1, 0)
    assert not gate.handing_off  # the queue is empty: barging as before
    assert gate.take == gate._take_token
    gate.release()
    assert gate.in_use == 0


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_in_hand_off_mode_a_head_past_half_its_timeout_is_handed_the_next_permit(
    policy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: in hand-off mode the head was handed one permit in
    # handoff_every whatever its timeout, so a pace too slow for a short
    # timeout timed waiters out behind running callers. A head that has used
    # half of its time to wait (10 s here) now gets the next permit.
    gate, now, first, results = _barging(policy, monkeypatch)
    _pass_over(gate)
    second = _queue_a_thread_waiter(gate, results, 2)
    now[0] += 0.006  # past the bound: the head is owed, hand-off mode
    queued = list(gate.waiters)
    _handed_to_head(gate, queued[0])
    first.join(10.0)
    assert gate.handing_off
    # From here only the timeout can make it the second's turn: no turns, and
    # it is never owed (however long it is passed over).
    gate.handoff_every = 10**9
    gate.barge_bound = 10**9
    assert _releases_until_handed(gate, queued[1], 8) is None  # running callers pass it
    now[0] += 4.9  # it came at 1000.0: 4.906 s waited, short of half its 10 s
    assert _releases_until_handed(gate, queued[1], 8) is None
    now[0] += 0.1  # 5.006 s: past half
    assert _releases_until_handed(gate, queued[1], 1) == 1
    second.join(10.0)
    assert results == [True, True]
    gate.release()
    assert (gate.in_use, gate.waiting) == (0, 0)


@pytest.mark.parametrize("policy", [False, True], ids=["no-policy", "policy"])
def test_hand_off_mode_ends_once_a_waiter_is_served_within_the_bound(
    policy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, now, first, results = _barging(policy, monkeypatch)
    _pass_over(gate)
    now[0] += 0.006
    # Two more arrive now: they will have waited less than the bound.
    second = _queue_a_thread_waiter(gate, results, 2)
    third = _queue_a_thread_waiter(gate, results, 3)
    queued = list(gate.waiters)
    _handed_to_head(gate, queued[0])  # waited 6 ms: still hand-off mode
    first.join(10.0)
    assert gate.handing_off
    assert _releases_until_handed(gate, queued[1], gate.handoff_every) is not None
    second.join(10.0)
    # Served 0 ms after it came: the queue moves, hand-off mode ends although
    # the third still waits: running callers may pass it (within the bound).
    assert not gate.handing_off
    assert _releases_until_handed(gate, queued[2], 3 * gate.handoff_every) is None
    assert not queued[2].handoff
    gate.release()  # a permit nobody takes: the third is woken and takes it
    third.join(10.0)
    assert results == [True, True, True]
    gate.release()
    assert (gate.in_use, gate.waiting) == (0, 0)
