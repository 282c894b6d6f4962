"""Fleet-wide budgets (issue 14, item 6): a bulkhead or reserve for all replicas at once.

``fleet_tag_limits`` and ``fleet_reserved_critical`` are stated in server
connections for the whole fleet and divided by ``replicas`` (or
``POOLGUARD_REPLICAS``): limits round down (at least 1 per replica), the
reserve rounds up. The arithmetic and the options are pure; the last test
runs three guarded engines as three replicas behind a real PgBouncer and
watches PostgreSQL: the fleet never holds more than its budget, where
per-replica limits did.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
import sqlalchemy as sa

import poolguard
from _pgbouncer import PgBouncer, find_binary
from _support import named, wait_until
from poolguard._admission import admission
from poolguard._fleet import Budget, budgets, divide, fleet_limits
from poolguard._pgbouncer import PgBouncerStats

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

# -- the division ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "replicas", "limit", "reserve"),
    [
        (6, 3, 2, 2),
        (5, 3, 1, 2),  # a limit rounds down (fleet 3 <= 5), a reserve up (fleet 6 >= 5)
        (10, 1, 10, 10),
        (2, 6, 1, 1),  # more replicas than connections: at least one each
        (12, 12, 1, 1),
        (100, 7, 14, 15),
    ],
)
def test_division(budget: int, replicas: int, limit: int, reserve: int) -> None:
    assert divide(budget, replicas) == limit
    assert divide(budget, replicas, reserve=True) == reserve
    assert divide(0, replicas, reserve=True) == 0


def test_a_division_far_from_the_budget_is_flagged() -> None:
    assert not Budget("report", 6, 3, 2).off
    assert Budget("report", 5, 3, 1).off  # 3 of 5: 40% short
    assert Budget("report", 2, 6, 1).off  # 6 > 2: over the budget
    assert not Budget("report", 100, 7, 14).off  # 98 of 100
    assert not Budget(None, 5, 3, 2).off  # a reserve of 6 for 5: within 25%
    assert Budget(None, 2, 6, 1).off  # 6 reserved for 2


# -- the options ---------------------------------------------------------------------------------


def test_fleet_budgets_need_a_replica_count() -> None:
    with pytest.raises(ValueError, match=r"fleet_tag_limits .* needs replicas=N"):
        poolguard.Config.from_options(poolguard.Config(), fleet_tag_limits={"report": 5})
    with pytest.raises(ValueError, match=r"fleet_reserved_critical .* POOLGUARD_REPLICAS"):
        poolguard.Config.from_options(poolguard.Config(), fleet_reserved_critical=2)
    config = poolguard.Config.from_options(
        poolguard.Config(), fleet_tag_limits={"report": 5}, replicas=3
    )
    assert dict(config.fleet_tag_limits or {}) == {"report": 5}


def test_wrap_refuses_a_fleet_budget_without_replicas(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    try:
        with pytest.raises(ValueError, match="needs replicas"):
            poolguard.wrap(engine, fleet_tag_limits={"report": 5})
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("option", "bad", "allowed"),
    [
        ("fleet_tag_limits", {"report": 0.5}, "whole number of server connections"),
        ("fleet_tag_limits", {"report": 2.5}, "whole number of server connections"),
        ("fleet_tag_limits", {"report": 0}, "whole number of server connections"),
        ("fleet_tag_limits", {"report": True}, "whole number of server connections"),
        ("fleet_tag_limits", {"": 3}, "mapping of tag"),
        ("fleet_tag_limits", [("report", 3)], "mapping of tag"),
        ("fleet_reserved_critical", -1, "whole number >= 0"),
        ("fleet_reserved_critical", 0.5, "whole number >= 0"),
        ("replicas", 0, "whole number >= 1"),
        ("replicas", 2.0, "whole number >= 1"),
    ],
)
def test_bad_fleet_options_are_refused_clearly(option: str, bad: Any, allowed: str) -> None:
    with pytest.raises(ValueError, match=option) as info:
        poolguard.Config(**{option: bad})
    assert allowed in str(info.value)


def test_the_replica_count_and_budgets_come_from_the_environment() -> None:
    env = {
        "POOLGUARD_REPLICAS": "6",
        "POOLGUARD_FLEET_TAG_LIMITS": "report=10,export=2",
        "POOLGUARD_FLEET_RESERVED_CRITICAL": "3",
    }
    config = poolguard.Config.from_env(env)
    assert config.replicas == 6
    assert dict(config.fleet_tag_limits or {}) == {"report": 10, "export": 2}
    assert config.fleet_reserved_critical == 3
    # The deployment tells the count; the code states the budget.
    config = poolguard.Config.from_options(
        poolguard.Config.from_env({"POOLGUARD_REPLICAS": "4"}), fleet_tag_limits={"report": 8}
    )
    assert fleet_limits(config) == ({"report": 2}, None)
    with pytest.raises(ValueError, match="POOLGUARD_REPLICAS"):
        poolguard.Config.from_env({"POOLGUARD_REPLICAS": "two"})
    # A budget without a count: one clear error; the rest of the environment still applies.
    config, errors = poolguard.Config._from_env(
        {"POOLGUARD_FLEET_TAG_LIMITS": "report=10", "POOLGUARD_ACQUIRE_TIMEOUT": "2"}
    )
    assert [str(e) for e in errors] == [
        "poolguard option fleet_tag_limits is a budget for the whole fleet: it needs "
        "replicas=N (or POOLGUARD_REPLICAS), the number of replicas sharing it"
    ]
    assert (config.fleet_tag_limits, config.acquire_timeout) == (None, 2.0)


def test_admission_uses_the_per_replica_share() -> None:
    config = poolguard.Config(
        replicas=3,
        tag_limits={"report": 0.5, "search": 2},
        fleet_tag_limits={"report": 5},
        reserved_critical=0.2,
        fleet_reserved_critical=4,
    )
    policy = admission(config, 10)
    assert policy is not None
    # The fleet's share wins over the per-replica option for its tag; others stay.
    assert policy.tag_limits == {"report": 1, "search": 2}
    assert policy.reserved == 2  # ceil(4 / 3), not 0.2 x 10
    # A share above the pool is the whole pool.
    policy = admission(poolguard.Config(replicas=1, fleet_reserved_critical=50), 10)
    assert policy is not None
    assert policy.reserved == 10
    assert [b.name for b in budgets(config)] == ["tag_limits[report]", "reserved_critical"]


def test_wrap_logs_the_division_and_warns_when_it_is_far_off(
    sqlite_url: str,
    events: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POOLGUARD_REPLICAS", "6")
    engine = poolguard.wrap(
        sa.create_engine(sqlite_url, pool_size=5), fleet_tag_limits={"report": 12, "export": 2}
    )
    try:
        (event,) = named(events, "fleet.budget")
        assert event["replicas"] == 6
        assert event["replicas_from"] == "environment"
        assert event["budgets"] == {
            "tag_limits[report]": {"fleet": 12, "per_replica": 2, "fleet_total": 12},
            "tag_limits[export]": {"fleet": 2, "per_replica": 1, "fleet_total": 6},
        }
        assert event["off"] == ["tag_limits[export]"]
        assert event["level"] == "warning"
        # The gate enforces the shares.
        policy = poolguard.get_guard(engine).gate.admission
        assert policy is not None
        assert policy.tag_limits == {"report": 2, "export": 1}
        # wrap() again, same division: not logged again.
        poolguard.wrap(engine, fleet_tag_limits={"report": 12, "export": 2})
        assert len(named(events, "fleet.budget")) == 1
        poolguard.wrap(engine, fleet_tag_limits={"report": 12}, replicas=3)
        event = named(events, "fleet.budget")[-1]
        assert (event["replicas"], event["replicas_from"], event["off"]) == (3, "option", [])
        assert event["level"] == "info"
    finally:
        engine.dispose()


def test_pgbouncer_showing_more_clients_than_the_replicas_can_open_warns(
    sqlite_url: str,
    events: list[dict[str, Any]],
) -> None:
    engine = poolguard.wrap(
        sa.create_engine(sqlite_url, pool_size=5, max_overflow=0),
        replicas=2,
        fleet_tag_limits={"report": 4},
    )
    try:
        fleet = poolguard.get_guard(engine).fleet

        def seen(active: int, waiting: int) -> PgBouncerStats:
            return PgBouncerStats(
                "h:6432",
                "app",
                "web",
                "ok",
                0.0,
                None,
                clients_active=active,
                clients_waiting=waiting,
            )

        fleet._check_replicas(seen(8, 2))  # 10 clients: 2 replicas of 5 can open them
        assert named(events, "fleet.replicas_low") == []
        fleet._check_replicas(seen(12, 3))  # 15: at least 3 replicas
        fleet._check_replicas(seen(13, 2))  # the same count again: not repeated
        (event,) = named(events, "fleet.replicas_low")
        assert (event["replicas"], event["replicas_seen_min"], event["clients"]) == (2, 3, 15)
    finally:
        engine.dispose()


# -- three replicas behind a real PgBouncer -------------------------------------------------------

MARK = "fleet-report"
REPLICAS = 3
BUDGET = 6


def _peak_report_queries(postgresql_url: str, stop: threading.Event, peak: list[int]) -> None:
    """Sample PostgreSQL's running report queries until ``stop``; keep the most seen."""
    url = sa.make_url(postgresql_url)
    with psycopg.connect(
        host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
    ) as conn:
        while not stop.is_set():
            (running,) = conn.execute(
                "select count(*) from pg_stat_activity where state = 'active' "
                "and pid <> pg_backend_pid() and query like %s",
                (f"%{MARK}%",),
            ).fetchone()
            peak[0] = max(peak[0], running)
            time.sleep(0.005)


def _storm(engines: list[Engine], seconds: float) -> tuple[int, int]:
    """Five threads per replica run report queries for ``seconds``: (served, shed)."""
    counts = [0, 0]
    lock = threading.Lock()
    until = time.monotonic() + seconds

    def work(engine: Engine) -> None:
        while time.monotonic() < until:
            try:
                with poolguard.request(tag="report"), engine.connect() as conn:
                    conn.execute(sa.text(f"select /* {MARK} */ pg_sleep(0.15)"))
                served = 1
            except poolguard.LoadShed:
                served = 0
                time.sleep(0.01)
            with lock:
                counts[1 - served] += 1

    threads = [
        threading.Thread(target=work, args=(e,), daemon=True) for e in engines for _ in range(5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
        assert not thread.is_alive()
    return counts[0], counts[1]


@pytest.mark.postgresql
@pytest.mark.timing
def test_three_replicas_never_exceed_the_fleet_budget(postgresql_url: str) -> None:
    if find_binary() is None:
        pytest.skip("pgbouncer not installed")
    bouncer, database = PgBouncer.in_front_of(
        postgresql_url, default_pool_size=20, query_wait_timeout=30
    )

    def replicas(**options: Any) -> list[Engine]:
        return [
            poolguard.wrap(
                sa.create_engine(
                    bouncer.url(database),
                    pool_size=6,
                    max_overflow=0,
                    connect_args={"prepare_threshold": None},
                ),
                name=f"replica-{i}",
                **options,
            )
            for i in range(REPLICAS)
        ]

    def run(engines: list[Engine]) -> tuple[int, int, int]:
        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(
            target=_peak_report_queries, args=(postgresql_url, stop, peak), daemon=True
        )
        sampler.start()
        try:
            served, shed = _storm(engines, 2.0)
        finally:
            stop.set()
            sampler.join(10)
            for engine in engines:
                engine.dispose()
        return peak[0], served, shed

    with bouncer:
        # Per replica, as before: half of each pool, 3 x 3 = 9 for the fleet.
        per_replica_peak, _, _ = run(replicas(tag_limits={"report": 0.5}))
        # For the fleet: 6 server connections in all, 2 per replica.
        fleet_peak, served, shed = run(
            replicas(replicas=REPLICAS, fleet_tag_limits={"report": BUDGET})
        )
    assert per_replica_peak > BUDGET  # the problem: per-replica limits add up
    assert fleet_peak <= BUDGET
    assert fleet_peak > BUDGET // REPLICAS  # more than one replica's share ran at once
    assert served > 0
    assert shed > 0


@pytest.mark.postgresql
def test_more_clients_in_pgbouncer_than_the_told_replicas_can_open_is_reported(
    postgresql_url: str,
    events: list[dict[str, Any]],
) -> None:
    if find_binary() is None:
        pytest.skip("pgbouncer not installed")
    bouncer, database = PgBouncer.in_front_of(postgresql_url, default_pool_size=10)
    with bouncer:
        # Three replicas, each told it is alone: PgBouncer sees them all.
        engines = [
            poolguard.wrap(
                sa.create_engine(
                    bouncer.url(database),
                    pool_size=2,
                    max_overflow=0,
                    connect_args={"prepare_threshold": None},
                ),
                name=f"replica-{i}",
                replicas=1,
                fleet_tag_limits={"report": 2},
                pgbouncer_admin_url="auto",
                pgbouncer_poll_interval=0.1,
            )
            for i in range(3)
        ]
        conns = [engine.connect() for engine in engines for _ in range(2)]
        try:
            for conn in conns:
                conn.execute(sa.text("select 1"))
            wait_until(lambda: named(events, "fleet.replicas_low"), "fleet.replicas_low")
        finally:
            for conn in conns:
                conn.close()
            for engine in engines:
                poolguard.unwrap(engine)
                engine.dispose()
    event = named(events, "fleet.replicas_low")[0]
    assert event["replicas"] == 1
    assert event["capacity"] == 2
    assert event["replicas_seen_min"] >= 2
    assert event["clients"] > 2
