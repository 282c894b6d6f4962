"""The postmortem on PostgreSQL, short: every storm variant, plain and guarded.

The scenario is the benchmark's (``benchmarks/postmortem.py``): a 10-connection
pool and a fixed set of worker threads serving logins, API calls and batch
jobs that arrive at a fixed rate (an open loop), then a storm in one of the
variants nobody told the guard about, run against plain SQLAlchemy and
against exactly ``poolguard.recommended.options()``. Only the robust parts are
asserted: every scheduled request is counted once, what plain SQLAlchemy fails
to serve is counted as failed, plain SQLAlchemy sheds nothing, nothing leaks,
the culprit statement ran (or, in the control, none did), and the guard never
isolates anything but the culprit (nothing at all in the control). No
assertion compares a time with a fixed threshold, and none asks for a goodput
figure: that is the benchmark's verdict, not a test's.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from poolguard import recommended
from poolguard.cli.scenario import NO_WORKER, QUEUE_FULL, arrivals, assess

# The benchmark's scenario itself, not a copy of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import postmortem

# Real traffic from threads over wall-clock phases: the outcome depends on the scheduler.
pytestmark = [pytest.mark.postgresql, pytest.mark.timing]

TRAFFIC = postmortem.Traffic(pre=1.0, storm=2.0, culprit_query=2.0, drain_timeout=60.0)
CULPRIT_VARIANTS = ("tagged", "untagged", "critical")


@pytest.fixture(scope="module", params=list(postmortem.VARIANTS))
def results(
    request: pytest.FixtureRequest, _postgresql_server: str
) -> dict[str, postmortem.SideResult]:
    traffic = dataclasses.replace(TRAFFIC, variant=request.param)
    return postmortem.run(_postgresql_server, traffic)


def test_every_scheduled_request_is_counted_once(
    results: dict[str, postmortem.SideResult],
) -> None:
    traffic = results["plain"].traffic
    schedule = arrivals(traffic)
    for result in results.values():
        for phase, (lo, hi) in traffic.bounds().items():
            for kind, stats in result.phases[phase].items():
                expected = sum(1 for at, k in schedule if k == kind and lo <= at < hi)
                assert stats.requests == expected, (result.side, phase, kind)
                assert stats.served + stats.failed + stats.shed == stats.requests
            protected = result.protected[phase]
            assert protected.requests == sum(
                result.phases[phase][k].requests for k in traffic.kind.protected
            )


def test_plain_sqlalchemy_fails_to_serve_and_it_counts(
    results: dict[str, postmortem.SideResult],
) -> None:
    plain = results["plain"]
    # Plain SQLAlchemy sheds nothing: it only makes callers wait.
    assert all(st.shed == 0 for phase in plain.phases.values() for st in phase.values())
    assert plain.rejections == {}
    if plain.traffic.variant not in CULPRIT_VARIANTS:
        return
    storm = plain.protected["storm"]
    # The culprit holds the pool; protected requests got no worker in time, found the
    # accept queue full or were answered late: not served, and counted.
    assert storm.failed > 0
    assert set(storm.errors) <= {NO_WORKER, QUEUE_FULL, "late", "timeout"}
    assert plain.peak_culprits["storm"] > 0
    assert plain.peak_culprits["pre"] == 0  # the culprit comes with the storm


def test_the_guarded_side_is_the_recommended_setting_and_judged(
    results: dict[str, postmortem.SideResult],
) -> None:
    guarded = results["guarded"]
    assert postmortem.guarded_options() == recommended.options()
    verdict = assess(guarded)
    assert verdict["variant"] == guarded.traffic.variant
    assert verdict["protected"] == "+".join(guarded.traffic.kind.protected)
    assert verdict["verdict"].startswith("PASS" if verdict["pass"] else "FAIL")
    # Whatever the guard isolates must be the culprit; in the control, nothing.
    assert verdict["false_isolations"] == 0, guarded.isolations
    if guarded.traffic.variant == "uniform":
        assert guarded.isolations == []
        assert guarded.peak_culprits == dict.fromkeys(guarded.peak_culprits, 0)


def test_nothing_leaks(results: dict[str, postmortem.SideResult]) -> None:
    assert results["plain"].leftover == {"pool_checkedout": 0}
    left = results["guarded"].leftover
    assert left["pool_checkedout"] == 0
    assert left["permits"] == 0
    assert left["waiting"] == 0
    assert all(n == 0 for n in left["tag_in_use"].values()), left
