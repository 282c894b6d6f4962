"""The postmortem on PostgreSQL, short: logins survive a storm of slow reports.

The scenario is the benchmark's (``benchmarks/postmortem.py``): a 10-connection
pool serving fast ``critical`` logins and ``normal``/``background`` work, then
a storm of slow ``pg_sleep`` queries under the tag ``report``; the same traffic
runs against plain SQLAlchemy and against the guard configured as the README
recommends. Only the robust parts are asserted: critical logins keep being
served through the storm, every rejection carries a reason that fits its
request, the report bulkhead holds, nothing leaks, and plain SQLAlchemy serves
logins worse than the guard on the same run. No assertion compares a time with
a fixed threshold; the two sides are compared with each other.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from poolguard._policies import CRITICAL, tag_limit

# The benchmark's scenario itself, not a copy of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import postmortem

# Real traffic from threads over wall-clock phases: the outcome depends on the scheduler.
pytestmark = [pytest.mark.postgresql, pytest.mark.timing]

TRAFFIC = postmortem.Traffic(
    pre=2.0,
    storm=4.0,
    login_threads=3,
    api_threads=2,
    batch_threads=2,
    report_threads=16,
    report_query=1.0,
    drain_timeout=60.0,
)
SHED_REASONS = {"tag_limit", "queue_full", "queue_delay"}
REPORT_CAP = tag_limit(postmortem.GUARDED_OPTIONS["tag_limits"]["report"], postmortem.POOL_SIZE)


@pytest.fixture(scope="module")
def results(_postgresql_server: str) -> dict[str, postmortem.SideResult]:
    return postmortem.run(_postgresql_server, TRAFFIC)


def test_guarded_logins_are_served_in_every_second_of_the_storm(
    results: dict[str, postmortem.SideResult],
) -> None:
    guarded = results["guarded"]
    assert len(guarded.storm_logins_per_second) == int(TRAFFIC.storm)
    assert all(n > 0 for n in guarded.storm_logins_per_second), guarded.storm_logins_per_second
    logins = guarded.stat("storm", "login")
    assert logins.served > 0
    assert logins.shed == 0  # critical work is never shed
    assert not any(key.endswith(f"/{CRITICAL}") for key in guarded.rejections)


def test_rejections_carry_reasons_that_fit_the_request(
    results: dict[str, postmortem.SideResult],
) -> None:
    guarded = results["guarded"]
    for key in guarded.rejections:
        reason, priority = key.split("/")
        assert reason in SHED_REASONS, key
        assert priority != CRITICAL, key
    storm = guarded.phases["storm"]
    # The storm hit the bulkhead: reports beyond the cap were shed at once.
    assert storm["report"].shed_reasons.get("tag_limit", 0) > 0
    assert set(storm["report"].shed_reasons) <= {"tag_limit", "queue_delay"}
    assert set(storm["batch"].shed_reasons) <= {"queue_full", "queue_delay"}
    assert set(storm["api"].shed_reasons) <= {"queue_full", "queue_delay"}
    # What the clients saw is what the guard counted.
    seen = sum(st.shed for phase in guarded.phases.values() for st in phase.values())
    assert seen == sum(guarded.rejections.values())
    # Plain SQLAlchemy sheds nothing: it only makes callers wait.
    plain = results["plain"]
    assert all(st.shed == 0 for phase in plain.phases.values() for st in phase.values())
    assert plain.rejections == {}


def test_the_report_bulkhead_holds(results: dict[str, postmortem.SideResult]) -> None:
    assert REPORT_CAP == 5
    assert 0 < results["guarded"].peak_reports["storm"] <= REPORT_CAP
    assert results["plain"].peak_reports["storm"] > REPORT_CAP
    assert results["guarded"].peak_reports["pre"] == 0  # reports come with the storm


def test_nothing_leaks(results: dict[str, postmortem.SideResult]) -> None:
    assert results["plain"].leftover == {"pool_checkedout": 0}
    left = results["guarded"].leftover
    assert left["pool_checkedout"] == 0
    assert left["permits"] == 0
    assert left["waiting"] == 0
    assert all(n == 0 for n in left["tag_in_use"].values()), left


def test_plain_sqlalchemy_serves_logins_worse_than_the_guard(
    results: dict[str, postmortem.SideResult],
) -> None:
    plain = results["plain"].stat("storm", "login")
    guarded = results["guarded"].stat("storm", "login")
    assert plain.served < guarded.served
    assert guarded.p99_ms is not None
    # Plain logins queue behind the reports: slower, or not served at all.
    assert plain.p99_ms is None or plain.p99_ms > guarded.p99_ms
    assert min(results["plain"].storm_logins_per_second) < min(
        results["guarded"].storm_logins_per_second
    )
