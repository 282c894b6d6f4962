"""The demo's steady traffic is paced like independent users, not in lockstep.

``poolguard demo`` used to shed background work on a healthy pool before the
storm: every thread of the steady traffic started at the same instant and kept
to the same grid (the periods share a multiple every 0.2 s), and a thread
running late caught up at once, so after any stall of a loaded machine every
thread sent together. Such a burst can hold all of the 8 connections
non-critical work may use, and the guarded side (``max_waiting_background=0``)
rightly sheds the batch job that arrives in it: a false alarm of the client's
making. These tests pin the schedule itself (pure functions, no clock).
"""

from __future__ import annotations

import itertools

import pytest

from poolguard.cli.scenario import KINDS, Traffic, _periods, next_start, start_offsets


def _planned_starts(traffic: Traffic, until: float) -> list[tuple[float, str]]:
    offsets = start_offsets(traffic)
    starts = []
    for kind, (count, period) in _periods(traffic).items():
        if not period:
            continue
        for i in range(count):
            at = offsets[kind][i]
            while at < until:
                starts.append((at, kind))
                at += period
    return sorted(starts)


@pytest.mark.parametrize("traffic", [Traffic(), Traffic(login_threads=7, api_threads=5)])
def test_no_two_steady_requests_are_planned_for_the_same_instant(traffic: Traffic) -> None:
    starts = _planned_starts(traffic, until=2.0)
    close = [(a, b) for a, b in itertools.pairwise(starts) if b[0] - a[0] <= 1e-4]
    assert close == []
    # Every thread starts within its first period.
    for kind, (count, period) in _periods(traffic).items():
        assert len(start_offsets(traffic)[kind]) == count
        assert all(0 <= at < max(period, 1e-9) for at in start_offsets(traffic)[kind])


def test_the_storm_still_starts_at_once() -> None:
    # The unoptimized query's callers are a burst on purpose.
    assert set(start_offsets(Traffic())["report"]) == {0.0}
    assert set(KINDS) == set(start_offsets(Traffic()))


def test_a_late_thread_skips_to_its_own_next_slot() -> None:
    assert next_start(1.0, 0.1, 0.95) == 1.0  # on time: its slot
    assert next_start(1.0, 0.1, 1.25) == pytest.approx(1.3)  # late: the next slot, no catch-up
    assert next_start(1.0, 0.0, 1.25) == 1.25  # unpaced (the storm): at once
    # After a stall, threads of different phases stay apart instead of firing together.
    traffic = Traffic()
    offsets = start_offsets(traffic)
    period = _periods(traffic)["login"][1]
    resumed = 0.5 + 0.0031  # a 100 ms stall ends here
    after = sorted(next_start(at, period, resumed) for at in offsets["login"])
    assert len(set(after)) == len(after)
    assert after[-1] - after[0] == pytest.approx(period * 3 / 4)
