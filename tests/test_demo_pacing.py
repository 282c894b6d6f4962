"""The postmortem scenario's load: an open loop, and storms the guard is not told about.

``poolguard demo`` and ``benchmarks/postmortem.py`` used to drive logins from
4 blocking threads: when plain SQLAlchemy stopped serving, those threads simply
stopped asking, and the requests it failed to serve were never counted. Now
requests arrive on a fixed schedule (:func:`scenario.arrivals`) and are served
by a bounded set of worker threads behind a bounded accept queue; a request
that got no worker within its deadline counts as failed. The schedule itself
is pinned here with pure functions (no clock); one short run on SQLite checks
that a request nobody served is counted.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from pathlib import Path

import pytest

from poolguard import recommended
from poolguard._fingerprint import fingerprint
from poolguard.cli import scenario
from poolguard.cli.scenario import VARIANTS, Traffic, arrivals, culprit_sql, statements


def _count(schedule: list[tuple[float, str]], lo: float, hi: float) -> Counter[str]:
    return Counter(kind for at, kind in schedule if lo <= at < hi)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_open_loop_offers_the_configured_rates(variant: str) -> None:
    traffic = Traffic(variant=variant, pre=4.0, storm=6.0, after=2.0)
    schedule = arrivals(traffic)
    assert schedule == sorted(schedule)
    assert all(0.0 <= at < traffic.end for at, _ in schedule)
    pre = _count(schedule, 0.0, traffic.pre)
    storm = _count(schedule, traffic.pre, traffic.pre + traffic.storm)
    after = _count(schedule, traffic.pre + traffic.storm, traffic.end)
    rates = {"login": traffic.login_rate, "api": traffic.api_rate, "batch": traffic.batch_rate}
    for phase, counts, seconds in (("pre", pre, 4.0), ("after", after, 2.0)):
        assert counts == {kind: rate * seconds for kind, rate in rates.items()}, phase
    culprits = storm.pop("culprit", 0)
    if variant == "uniform":
        assert culprits == 0  # the control has no culprit
    else:
        assert culprits == traffic.culprit_rate * traffic.storm
    if variant == "critical":
        # The slow logins are logins: the login flow keeps its rate.
        assert storm["login"] + culprits == traffic.login_rate * traffic.storm
        storm["login"] += culprits
    assert storm == {kind: rate * traffic.storm for kind, rate in rates.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_two_requests_are_scheduled_for_the_same_instant(variant: str) -> None:
    schedule = arrivals(Traffic(variant=variant))
    close = [(a, b) for a, b in itertools.pairwise(schedule) if b[0] - a[0] <= 1e-4]
    assert close == []


def test_variants_have_distinct_culprit_shapes_unlike_the_protected_ones() -> None:
    for dialect in ("postgresql", "sqlite", "mysql"):
        shapes = {
            name: fingerprint(culprit_sql(dialect, Traffic(variant=name))).id
            for name, variant in VARIANTS.items()
            if variant.has_culprit
        }
        assert len(set(shapes.values())) == len(shapes) == 3
        normal = statements(dialect, Traffic())
        protected = {fingerprint(str(normal[k])).id for k in ("login", "api", "batch")}
        assert len(protected) == 3
        assert not protected & set(shapes.values())


def test_the_uniform_storm_slows_every_statement_without_changing_its_shape() -> None:
    traffic = Traffic(variant="uniform")
    normal = statements("postgresql", traffic)
    slow = statements("postgresql", traffic, traffic.uniform_extra)
    for kind in ("login", "api", "batch"):
        assert str(slow[kind]) != str(normal[kind])
        assert fingerprint(str(slow[kind])).id == fingerprint(str(normal[kind])).id


def test_the_variants_name_their_culprits_differently() -> None:
    kinds = {name: v.kinds()["culprit"] for name, v in VARIANTS.items()}
    assert kinds["tagged"] == ("normal", "auth-token-scan")
    assert kinds["untagged"] == (None, None)  # no poolguard.request at all
    assert kinds["critical"] == ("critical", "login")  # the login flow itself
    assert VARIANTS["critical"].protected == ("api",)
    assert not VARIANTS["uniform"].has_culprit
    with pytest.raises(ValueError, match="variant='bogus' is invalid: expected one of tagged"):
        Traffic(variant="bogus")


def test_the_guarded_side_is_exactly_the_recommended_setting() -> None:
    assert scenario.guarded_options() == recommended.options()
    # No tag named in advance (breaker_per_tag names none: every tag gets one).
    assert not [k for k in scenario.guarded_options() if "tag" in k and k != "breaker_per_tag"]
    assert not hasattr(scenario, "GUARDED_OPTIONS")
    assert not hasattr(scenario, "named_in_advance")


def _isolated(**fields: object) -> dict[str, object]:
    return {"event": "culprit.isolated", "pool": "postmortem", **fields}


def test_false_isolations_are_the_ones_that_name_no_culprit() -> None:
    tagged = Traffic(variant="tagged")
    shape = fingerprint(culprit_sql("postgresql", tagged)).id
    right = [_isolated(fingerprint=shape, tag=None), _isolated(tag="auth-token-scan")]
    wrong = [_isolated(fingerprint=fingerprint("SELECT 1 AS signed_in").id, tag="login")]
    found = scenario.isolations([*right, *wrong, {"event": "culprit.released"}])
    assert len(found) == 3
    assert scenario.false_isolations(found, tagged, "postgresql") == wrong
    # In the critical variant the login tag is shared with the fast logins: isolating
    # it is false; the slow statement's shape is the culprit.
    critical = Traffic(variant="critical")
    slow = _isolated(statement=culprit_sql("postgresql", critical), tag="login")
    login_tag = _isolated(tag="login")
    assert scenario.false_isolations([slow, login_tag], critical, "postgresql") == [login_tag]
    # The control has no culprit: any isolation is false.
    control = Traffic(variant="uniform")
    assert scenario.false_isolations(right, control, "postgresql") == right


@pytest.mark.timing
def test_a_request_that_gets_no_worker_counts_as_failed(tmp_path: Path) -> None:
    # One worker, a queue of 4: logins at 50/s while each statement takes 0.2 s
    # (the uniform storm). Most never get the worker within their deadline.
    traffic = Traffic(
        variant="uniform",
        pre=0.5,
        storm=1.0,
        workers=1,
        accept_queue=4,
        deadline=0.3,
        login_rate=50.0,
        api_rate=0.0,
        batch_rate=0.0,
        uniform_extra=0.2,
        pool_size=2,
        drain_timeout=30.0,
    )
    result = scenario.run_side(f"sqlite:///{tmp_path / 'open.db'}", guarded=False, traffic=traffic)
    storm = result.stat("storm", "login")
    assert storm.requests == traffic.login_rate * traffic.storm  # every arrival counted
    assert storm.served + storm.failed + storm.shed == storm.requests
    assert storm.served < storm.requests / 2
    assert storm.errors.get(scenario.NO_WORKER, 0) + storm.errors.get(scenario.QUEUE_FULL, 0) > 0
    assert set(storm.errors) <= {scenario.NO_WORKER, scenario.QUEUE_FULL, scenario.LATE}
    # Served ones were answered within the deadline, from arrival.
    assert storm.p99_ms is None or storm.p99_ms <= traffic.deadline * 1000
    assert result.protected["storm"].requests == storm.requests
    assert result.leftover == {"pool_checkedout": 0}
    assert dataclasses.asdict(result)["traffic"]["workers"] == 1
