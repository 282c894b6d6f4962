"""The fleet's fair share of server connections per request tag (issue 14).

Behind a transaction pooler with fewer server connections than
``replicas`` x the pool, a tag not known fast may hold at most its fair part
of the replica's share of server connections while another tag uses the
pooler; a tag known fast (short checkouts) is never capped.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import poolguard
from _support import named, wait_until
from poolguard import _fleet
from poolguard._fleet import FairCaps
from test_pooler import _bouncer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from _pgbouncer import PgBouncer


def test_fair_caps_arithmetic() -> None:
    caps = FairCaps({"stated": 3}, share=10 / 6, active=frozenset({"api"}),
                    exempt=frozenset({"api"}))
    assert "api" not in caps  # known fast: never capped
    assert caps.cap("api") is None
    assert caps.cap("report") == 1  # new next to api: 1.67 / 2, at least one
    assert caps.cap("stated") == 3  # a stated limit wins
    assert None not in caps  # untagged code is not capped
    both = FairCaps({}, share=5.0, active=frozenset({"a", "b"}), exempt=frozenset())
    assert both.cap("a") == 2
    assert both.cap("c") == 1
    alone = FairCaps({}, share=5.0, active=frozenset({"a"}), exempt=frozenset())
    assert alone.cap("a") is None  # nobody else uses the pooler: no cap
    assert bool(FairCaps({}, share=1.0, active=frozenset(), exempt=frozenset()))


@pytest.fixture
def bouncer(postgresql_url: str) -> Iterator[tuple[PgBouncer, str]]:
    running, database = _bouncer(postgresql_url, default_pool_size=2, query_wait_timeout=8)
    with running:
        yield running, database


def _engine(url: str, **options: Any) -> sa.Engine:
    return poolguard.wrap(
        sa.create_engine(url, pool_size=4, max_overflow=0,
                         connect_args={"prepare_threshold": None}),
        connect_retries=0, pooler="transaction", codel=True, **options,
    )


def _warm_api(engine: sa.Engine, guard: poolguard.Guard) -> None:
    guard.fleet.sample(time.perf_counter())  # the fair share learns from checkins on
    for _ in range(8):
        with poolguard.request(tag="api"), engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    guard.fleet.sample(time.perf_counter())


@pytest.mark.postgresql
def test_a_slow_tag_is_held_to_its_fair_share_and_the_fast_tag_goes_on(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # 2 replicas x pool 4 for 2 server connections: this replica's share is 1.
    # Before: the second report took PgBouncer's other server connection too
    # and the api waited in its queue behind them.
    running, database = bouncer
    engine = _engine(running.url(database), replicas=2, server_connections=2)
    guard = poolguard.get_guard(engine)
    try:
        _warm_api(engine, guard)
        caps = guard.fleet.fair.caps
        assert caps is not None
        assert caps.cap("api") is None
        assert caps.cap("report") == 1
        started = threading.Event()

        def report() -> None:
            with poolguard.request(tag="report"), engine.connect() as conn:
                started.set()
                conn.exec_driver_sql("SELECT pg_sleep(1.5)")

        first = threading.Thread(target=report, daemon=True)
        first.start()
        assert started.wait(10)
        with pytest.raises(poolguard.LoadShed) as shed:
            with poolguard.request(tag="report"), engine.connect() as conn:
                conn.exec_driver_sql("SELECT pg_sleep(1.5)")
        assert shed.value.reason == "fair_share"
        began = time.monotonic()
        with poolguard.request(tag="api"), engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
        assert time.monotonic() - began < 1.0  # not behind a second report in PgBouncer
        first.join(10)
        wait_until(lambda: guard.gate.tag_in_use.get("report", 0) == 0, "the report's slot back")
        with poolguard.request(tag="report"), engine.connect() as conn:  # its slot is back
            conn.exec_driver_sql("SELECT 1")
    finally:
        engine.dispose()


@pytest.mark.postgresql
@pytest.mark.parametrize(
    "facts",
    [{"replicas": 2, "server_connections": 8}, {"server_connections": 2}],
    ids=["enough-servers", "no-replicas"],
)
def test_no_fair_share_without_the_facts_or_the_need(
    bouncer: tuple[PgBouncer, str], facts: dict[str, Any], events: list[dict[str, Any]],
) -> None:
    running, database = bouncer
    engine = _engine(running.url(database), **facts)
    guard = poolguard.get_guard(engine)
    try:
        _warm_api(engine, guard)
        assert guard.fleet.fair.caps is None
        assert guard.gate.checkin_seen is None
        # Stated server connections, or no replicas: PgBouncer is not asked.
        assert named(events, "fleet.server_connections") == []
        assert not _probing()
    finally:
        engine.dispose()


def _probing() -> bool:
    return any(t.name.startswith("poolguard-pgbouncer-probe") for t in threading.enumerate())


def _found(events: list[dict[str, Any]]) -> dict[str, Any]:
    wait_until(lambda: named(events, "fleet.server_connections"), "PgBouncer's pool size read")
    (event,) = named(events, "fleet.server_connections")
    return event


@pytest.mark.postgresql
def test_the_guard_reads_the_server_connections_from_pgbouncer_by_itself(
    bouncer: tuple[PgBouncer, str], events: list[dict[str, Any]],
) -> None:
    # replicas and a transaction pooler, nothing else: the guard asks
    # PgBouncer's admin console once (the engine's credentials; the test bed's
    # user is in admin_users) for the pool size of its database: 2.
    running, database = bouncer
    engine = _engine(running.url(database), replicas=2)
    guard = poolguard.get_guard(engine)
    try:
        _warm_api(engine, guard)
        event = _found(events)
        assert event["level"] == "info"
        assert (event["server_connections"], event["pool_mode"], event["found_by"]) == (
            2, "transaction", "admin console")
        assert event["pgbouncer"] == f"127.0.0.1:{running.port}"
        guard.fleet.sample(time.perf_counter())
        assert guard.fleet.fair.caps is not None  # share 2 / 2 = 1
        _warm_api(engine, guard)  # api uses the pooler (seen at checkin from now on)
        caps = guard.fleet.fair.caps
        assert caps is not None
        assert caps.cap("report") == 1
        assert guard.fleet.pgbouncer() is None  # no reader was started: one read
        admins = [c for c in running.admin("SHOW CLIENTS") if c["database"] == "pgbouncer"]
        assert len(admins) == 1  # this one: the guard's read closed its connection
        for _ in range(3):
            guard.fleet.sample(time.perf_counter())
        assert len(named(events, "fleet.server_connections")) == 1  # read once
    finally:
        engine.dispose()


@pytest.mark.postgresql
def test_a_pooler_found_by_its_backend_pid_gets_its_mode_and_size_from_pgbouncer(
    bouncer: tuple[PgBouncer, str], events: list[dict[str, Any]],
) -> None:
    # pooler="auto" (the default): the first connection tells a pooler is
    # there, not how it pools; PgBouncer's admin console tells both.
    running, database = bouncer
    engine = poolguard.wrap(
        sa.create_engine(running.url(database), pool_size=4, max_overflow=0,
                         connect_args={"prepare_threshold": None}),
        connect_retries=0, codel=True, replicas=2)
    guard = poolguard.get_guard(engine)
    try:
        _warm_api(engine, guard)
        assert _found(events)["server_connections"] == 2
        guard.fleet.sample(time.perf_counter())
        behind = guard.pooler.behind
        assert behind is not None
        assert (behind.mode, behind.how) == ("transaction", "admin console")
        assert guard.fleet.fair.caps is not None
    finally:
        engine.dispose()


@pytest.mark.postgresql
def test_a_user_pgbouncer_does_not_let_in_gives_one_warning_and_no_fair_share(
    postgresql_url: str, events: list[dict[str, Any]],
) -> None:
    # The engine's user is not in PgBouncer's stats_users/admin_users: one
    # WARNING that says how to state the server connections, no retry.
    running, database = _bouncer(postgresql_url, default_pool_size=2, admin_user="pgb_admin")
    with running:
        engine = _engine(running.url(database), replicas=2)
        guard = poolguard.get_guard(engine)
        try:
            _warm_api(engine, guard)
            event = _found(events)
            assert event["level"] == "warning"
            assert event["server_connections"] is None
            assert event["reason"] == "the user is not in PgBouncer's stats_users or admin_users"
            assert event["error_type"] == "OperationalError"
            assert "server_connections=N" in event["message"]
            assert "pgbouncer_admin_url" in event["message"]
            wait_until(lambda: not _probing(), "the read's thread gone")
            for _ in range(3):
                _warm_api(engine, guard)
            assert guard.fleet.fair.caps is None
            assert guard.gate.checkin_seen is None
            assert len(named(events, "fleet.server_connections")) == 1  # tried once
        finally:
            engine.dispose()


@pytest.mark.postgresql
def test_the_read_never_holds_up_the_scan_or_a_request(
    bouncer: tuple[PgBouncer, str], monkeypatch: pytest.MonkeyPatch,
    events: list[dict[str, Any]],
) -> None:
    # An admin console that does not answer: the sample that starts the
    # read returns, requests go on; the read ends on its own thread.
    running, database = bouncer
    release = threading.Event()
    read_on: list[threading.Thread] = []

    def stalled(target: Any) -> tuple[int, str]:
        read_on.append(threading.current_thread())
        assert release.wait(30)
        return 2, "transaction"

    monkeypatch.setattr(_fleet, "read_once", stalled)
    engine = _engine(running.url(database), replicas=2)
    guard = poolguard.get_guard(engine)
    try:
        _warm_api(engine, guard)
        wait_until(lambda: read_on, "the read started")
        with poolguard.request(tag="api"), engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        guard.fleet.sample(time.perf_counter())
        assert not release.is_set()  # all of the above while the read was stuck
        assert read_on[0] is not threading.current_thread()
        assert guard.fleet.fair.caps is None  # not known yet
        release.set()
        _found(events)
        guard.fleet.sample(time.perf_counter())
        assert guard.fleet.fair.caps is not None
        assert len(read_on) == 1
    finally:
        release.set()
        engine.dispose()


@pytest.mark.postgresql
def test_the_admin_console_tells_the_pool_mode_and_the_server_connections(
    bouncer: tuple[PgBouncer, str],
) -> None:
    # A pool opened before it was wrapped: its first checkout is probed (a
    # pooler is there, of unknown mode); PgBouncer's admin console says that
    # it pools by transaction, and how many server connections it keeps (2).
    running, database = bouncer
    engine = sa.create_engine(running.url(database), pool_size=4, max_overflow=0,
                              connect_args={"prepare_threshold": None})
    conns = [engine.connect() for _ in range(4)]
    for conn in conns:
        conn.exec_driver_sql("SELECT 1")
        conn.close()
    poolguard.wrap(engine, codel=True, replicas=2, pgbouncer_admin_url="auto",
                   pgbouncer_poll_interval=0.1)
    guard = poolguard.get_guard(engine)
    try:
        with poolguard.request(tag="api"), engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        assert guard.pooler.behind is not None
        assert guard.pooler.behind.how == "backend pid"  # the first checkout, looked at
        wait_until(lambda: (guard.fleet.pgbouncer() or _NONE).pool_size == 2,
                   "PgBouncer's numbers read")
        guard.fleet.sample(time.perf_counter())
        behind = guard.pooler.behind
        assert behind is not None
        assert (behind.mode, behind.how) == ("transaction", "admin console")
        assert guard.fleet.fair.caps is not None  # share 2 / 2 = 1 server connection
        with poolguard.request(tag="api"), engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")  # api uses the pooler now
        guard.fleet.sample(time.perf_counter())
        caps = guard.fleet.fair.caps
        assert caps is not None
        assert caps.cap("report") == 1
    finally:
        engine.dispose()


class _NONE:
    pool_size = None
