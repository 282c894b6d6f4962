"""PgBouncer's own numbers (issue 14, item 4): the admin console read off the request path.

With ``pgbouncer_admin_url``, a thread of the guard's reads ``SHOW POOLS``,
``SHOW STATS`` and ``SHOW CONFIG`` from a real PgBouncer (``tests/_pgbouncer.py``)
and ``guard.stats().pgbouncer``, the metrics and ``pool.exhausted`` tell what
PgBouncer sees. A failing admin console never reaches a request, and no
password is ever logged. The parsing of the rows is tested on rows as
PgBouncer 1.18 returns them.
"""

from __future__ import annotations

import logging
import threading
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import poolguard
from _pgbouncer import PgBouncer, find_binary, free_port
from _proxy import Proxy
from _support import async_wait_until, named, wait_until
from poolguard._log import EventLog
from poolguard._pgbouncer import (
    AdminReader,
    AdminTarget,
    admin_target,
    read_numbers,
    why_not,
)
from test_otel import collect, points, value

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

    from poolguard import Guard

POLL = 0.1
SECRET = "s3cret-pw-7f3a"  # noqa: S105 - a marker to look for in the logs


@pytest.fixture
def bouncer(postgresql_url: str) -> Iterator[tuple[PgBouncer, str]]:
    """Our own PgBouncer: one server connection, a long query_wait_timeout."""
    if find_binary() is None:
        pytest.skip("pgbouncer not installed")
    bouncer, database = PgBouncer.in_front_of(
        postgresql_url, default_pool_size=1, query_wait_timeout=30, max_client_conn=50
    )
    with bouncer:
        yield bouncer, database


def _engine(bouncer: PgBouncer, database: str, pool_size: int = 3, **options: Any) -> Engine:
    plain = sa.create_engine(
        bouncer.url(database),
        pool_size=pool_size,
        max_overflow=0,
        connect_args={"prepare_threshold": None},
    )
    return poolguard.wrap(plain, pgbouncer_poll_interval=POLL, **options)


def _bouncer_stats(guard: Guard) -> Any:
    stats = guard.stats().pgbouncer
    assert stats is not None
    return stats


def _hold(engine: Engine, seconds: float, started: threading.Event | None = None) -> None:
    with engine.connect() as conn:
        if started is not None:
            started.set()
        conn.execute(sa.text("select pg_sleep(:s)"), {"s": seconds})


# -- the rows, parsed ------------------------------------------------------------------------

_TARGET = AdminTarget("h", 6432, "stats", None, database="app", pool_user="web")


def _pool(database: str, user: str, **numbers: int) -> dict[str, Any]:
    row: dict[str, Any] = {"database": database, "user": user, "pool_mode": "transaction"}
    for column in (
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "sv_used",
        "maxwait",
        "maxwait_us",
    ):
        row[column] = numbers.get(column, 0)
    return row


def test_rows_of_the_engines_database_and_user_are_kept() -> None:
    pools = [
        _pool(
            "app", "web", cl_active=7, cl_waiting=50, sv_active=10, maxwait=5, maxwait_us=250_000
        ),
        _pool("app", "batch", cl_active=1, cl_waiting=9, sv_active=2, maxwait=30),
        _pool("other", "web", cl_waiting=99, maxwait=60),
        _pool("pgbouncer", "pgbouncer", cl_active=1),
    ]
    stats = [
        {
            "database": "app",
            "avg_query_time": Decimal(1500),
            "avg_xact_time": Decimal(2500),
            "avg_wait_time": Decimal(4_000_000),
        },
        {"database": "other", "avg_query_time": Decimal(9)},
    ]
    config = {
        "default_pool_size": "20",
        "max_client_conn": "1000",
        "query_wait_timeout": "120",
        "pool_mode": "session",
    }
    databases = [{"name": "app", "pool_size": 10, "pool_mode": None}]
    numbers = read_numbers(_TARGET, pools, stats, config, databases)
    assert numbers == {
        "clients_active": 7,
        "clients_waiting": 50,
        "servers_active": 10,
        "servers_idle": 0,
        "servers_used": 0,
        "max_wait": 5.25,
        "pool_mode": "transaction",
        "avg_query_time": 0.0015,
        "avg_xact_time": 0.0025,
        "avg_wait_time": 4.0,
        "default_pool_size": 20,
        "max_client_conn": 1000,
        "query_wait_timeout": 120.0,
        # The database's own pool size wins over default_pool_size.
        "pool_size": 10,
    }
    # Without a user in the engine's URL, every user's pool of the database counts.
    anyone = AdminTarget("h", 6432, None, None, database="app", pool_user=None)
    numbers = read_numbers(anyone, pools, stats, config, [])
    assert (numbers["clients_waiting"], numbers["max_wait"], numbers["pool_size"]) == (59, 30, 20)
    # No client connected yet: zeros, and PgBouncer's defaults.
    numbers = read_numbers(_TARGET, [], [], config, [])
    assert (numbers["clients_waiting"], numbers["pool_mode"]) == (0, "session")


def test_max_db_connections_caps_the_pool_size() -> None:
    # SHOW DATABASES' max_connections (the database's max_db_connections, else
    # the global one; 0: none) caps every pool of the database together.
    config = {"default_pool_size": "20"}
    capped = [{"name": "app", "pool_size": 10, "pool_mode": None, "max_connections": 6}]
    assert read_numbers(_TARGET, [], [], config, capped)["pool_size"] == 6
    unlimited = [{"name": "app", "pool_size": 10, "pool_mode": None, "max_connections": 0}]
    assert read_numbers(_TARGET, [], [], config, unlimited)["pool_size"] == 10
    # A database PgBouncer makes on demand (the "*" entry) has no row until a
    # client asks for it: the global max_db_connections caps it all the same.
    global_cap = {"default_pool_size": "20", "max_db_connections": "6"}
    assert read_numbers(_TARGET, [], [], global_cap, [])["pool_size"] == 6
    assert read_numbers(_TARGET, [], [], {**global_cap, "max_db_connections": "0"},
                        [])["pool_size"] == 20
    # A row without the column (an older PgBouncer): the global cap holds.
    no_column = [{"name": "app", "pool_size": 10, "pool_mode": None}]
    assert read_numbers(_TARGET, [], [], global_cap, no_column)["pool_size"] == 6


def test_a_databases_own_pool_mode_wins_over_the_global_one() -> None:
    # PgBouncer: a database's pool_mode overrides the global one (the row
    # shows NULL when it inherits); SHOW POOLS, when it has the engine's
    # pool, shows the mode in force and wins over both.
    config = {"default_pool_size": "20", "pool_mode": "transaction"}
    own = [{"name": "app", "pool_size": 10, "pool_mode": "session", "max_connections": 0}]
    inherits = [{"name": "app", "pool_size": 10, "pool_mode": None, "max_connections": 0}]
    assert read_numbers(_TARGET, [], [], config, own)["pool_mode"] == "session"
    assert read_numbers(_TARGET, [], [], config, inherits)["pool_mode"] == "transaction"
    pools = [{"database": "app", "user": _TARGET.pool_user, "pool_mode": "statement"}]
    assert read_numbers(_TARGET, pools, [], config, own)["pool_mode"] == "statement"


@pytest.mark.parametrize(
    ("message", "meaning"),
    [
        ('connection to server at "h", port 6432 failed: FATAL:  not allowed',
         "the user is not in PgBouncer's stats_users or admin_users"),
        ('connection to server at "h", port 5432 failed: FATAL:  database "pgbouncer" '
         "does not exist", "no admin console there (a pooler other than PgBouncer?)"),
        (f"FATAL: password authentication failed for user {SECRET}",
         "PgBouncer refused the password"),
        ("something else entirely", "the admin console could not be read"),
    ],
)
def test_why_the_admin_console_could_not_be_read_in_words(message: str, meaning: str) -> None:
    assert why_not(RuntimeError(message)) == meaning
    assert why_not(ImportError("psycopg")) == "neither psycopg nor psycopg2 is installed"


def test_admin_target_auto_and_explicit() -> None:
    engine_url = sa.make_url(f"postgresql+psycopg://web:{SECRET}@db.example:6432/app")
    auto = admin_target("auto", engine_url)
    assert auto == AdminTarget("db.example", 6432, "web", SECRET, database="app", pool_user="web")
    assert SECRET not in repr(auto)
    given = admin_target("postgresql://stats:pw@bouncer:7432/pgbouncer", engine_url)
    assert given == AdminTarget("bouncer", 7432, "stats", "pw", database="app", pool_user="web")
    assert admin_target(None, engine_url) is None
    with pytest.raises(ValueError, match="needs a PostgreSQL engine"):
        admin_target("auto", sa.make_url("sqlite://"))


def test_numbers_of_a_stuck_reader_turn_stale() -> None:
    reading = AdminReader(_TARGET, 1.0, EventLog("p"))
    assert (reading.stats().state, reading.stats().age) == ("unavailable", None)
    reading._last = ({"clients_waiting": 4}, time.monotonic() - 5, "ok", None)
    assert reading.stats().state == "ok"
    # 3 intervals + 10 s without a new read, though the last one worked.
    reading._last = ({"clients_waiting": 4}, time.monotonic() - 14, "ok", None)
    stale = reading.stats()
    assert (stale.state, stale.clients_waiting) == ("stale", 4)
    assert "read 14 s ago" in stale.describe()


@pytest.mark.parametrize(
    "bad",
    [
        f"postgresql://u:{SECRET}@h:6432/app",  # not the admin console
        f"mysql://u:{SECRET}@h/pgbouncer",
        "not a url",
        5,
    ],
)
def test_a_bad_admin_url_is_refused_without_its_password(bad: Any) -> None:
    with pytest.raises(ValueError, match="pgbouncer_admin_url") as info:
        poolguard.Config(pgbouncer_admin_url=bad)
    assert SECRET not in str(info.value)
    assert "database pgbouncer" in str(info.value)


def test_a_bad_admin_url_in_the_environment_is_refused_without_its_password() -> None:
    env = {"POOLGUARD_PGBOUNCER_ADMIN_URL": f"postgresql://u:{SECRET}@h:6432/app"}
    with pytest.raises(ValueError, match="POOLGUARD_PGBOUNCER_ADMIN_URL") as info:
        poolguard.Config.from_env(env)
    assert SECRET not in str(info.value)
    config = poolguard.Config.from_env(
        {
            "POOLGUARD_PGBOUNCER_ADMIN_URL": f"postgresql://u:{SECRET}@h:6432/pgbouncer",
            "POOLGUARD_PGBOUNCER_POLL_INTERVAL": "2.5",
        }
    )
    assert config.pgbouncer_poll_interval == 2.5
    assert SECRET not in repr(config)


@pytest.mark.parametrize("bad", [0, 0.05, 7200, float("nan"), "5", True])
def test_poll_interval_is_checked(bad: Any) -> None:
    with pytest.raises(ValueError, match="pgbouncer_poll_interval"):
        poolguard.Config(pgbouncer_poll_interval=bad)


# -- against a real PgBouncer ------------------------------------------------------------------


@pytest.mark.postgresql
@pytest.mark.timing
def test_waiting_clients_appear_in_stats_and_in_pool_exhausted(
    bouncer: tuple[PgBouncer, str],
    events: list[dict[str, Any]],
) -> None:
    pgb, database = bouncer
    engine = _engine(pgb, database, pgbouncer_admin_url="auto")
    guard = poolguard.get_guard(engine)
    try:
        wait_until(lambda: _bouncer_stats(guard).state == "ok", "a first read")
        first = _bouncer_stats(guard)
        assert (first.address, first.database, first.user) == (
            f"127.0.0.1:{pgb.port}",
            database,
            pgb.user,
        )
        assert (first.pool_mode, first.default_pool_size, first.pool_size) == ("transaction", 1, 1)
        assert (first.max_client_conn, first.query_wait_timeout) == (50, 30.0)
        assert first.clients_waiting == 0

        # One request holds PgBouncer's only server connection; the next queues there.
        started = threading.Event()
        holder = threading.Thread(target=_hold, args=(engine, 6.0, started), daemon=True)
        holder.start()
        assert started.wait(10)
        queued = threading.Thread(target=_hold, args=(engine, 0.0), daemon=True)
        queued.start()
        try:
            wait_until(
                lambda: (
                    (_bouncer_stats(guard).clients_waiting or 0) >= 1
                    and (_bouncer_stats(guard).max_wait or 0) > 0
                ),
                "PgBouncer's queue in the guard's numbers",
            )
            seen = _bouncer_stats(guard)
            assert seen.servers_active == 1
            assert seen.state == "ok"
            assert seen.age is not None
            assert seen.age < 5
            assert guard.stats().as_dict()["pgbouncer"]["clients_waiting"] >= 1
            guard.diagnostics.exhausted("test")
        finally:
            holder.join(15)
            queued.join(15)
        (event,) = named(events, "pool.exhausted")
        assert event["pgbouncer"]["clients_waiting"] >= 1
        assert event["pgbouncer"]["max_wait_s"] > 0
        assert "PgBouncer 127.0.0.1:" in event["summary"]
        assert "1 client waiting, longest" in event["summary"]
        # Drained: nobody waits, and PgBouncer's averages are known.
        wait_until(
            lambda: (
                _bouncer_stats(guard).clients_waiting == 0
                and _bouncer_stats(guard).avg_query_time is not None
            ),
            "the queue drained",
        )
        assert (_bouncer_stats(guard).avg_query_time or 0) > 0
        # Many reads on one admin connection, none failed (psycopg would prepare
        # a statement run 5 times: the admin console refuses that).
        reading = guard.fleet._reader
        assert reading is not None
        wait_until(lambda: reading.reads >= 12, "twelve reads")
        assert named(events, "pgbouncer.unavailable") == []
    finally:
        poolguard.unwrap(engine)
        engine.dispose()


@pytest.mark.postgresql
def test_numbers_reach_the_metrics(
    bouncer: tuple[PgBouncer, str],
    reader: Any,
    provider: Any,
) -> None:
    pgb, database = bouncer
    engine = _engine(
        pgb, database, pgbouncer_admin_url=pgb.admin_url(), name="bounced", meter_provider=provider
    )
    try:
        guard = poolguard.get_guard(engine)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        # A read after the statement (one during the connect may see it queued).
        wait_until(
            lambda: (
                _bouncer_stats(guard).clients_waiting == 0
                and (_bouncer_stats(guard).clients_active or 0) >= 1
            ),
            "a read of the client",
        )
        metrics = collect(reader)
        base = {"db.client.connection.pool.name": "bounced"}
        assert value(metrics, "poolguard.pgbouncer.up", base) == 1
        assert value(metrics, "poolguard.pgbouncer.pool_size", base) == 1
        assert value(metrics, "poolguard.pgbouncer.clients.waiting", base) == 0
        assert value(metrics, "poolguard.pgbouncer.clients.active", base) >= 1
        assert value(metrics, "poolguard.pgbouncer.wait.max", base) == 0
        for name in ("poolguard.pgbouncer.servers.active", "poolguard.pgbouncer.servers.idle"):
            assert len(points(metrics, name, base)) == 1
    finally:
        poolguard.unwrap(engine)
        engine.dispose()


@pytest.mark.postgresql
def test_an_unreachable_admin_console_never_reaches_a_request(
    bouncer: tuple[PgBouncer, str],
    events: list[dict[str, Any]],
    reader: Any,
    provider: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pgb, database = bouncer
    nowhere = f"postgresql://{pgb.user}:{SECRET}@127.0.0.1:{free_port()}/pgbouncer"
    engine = _engine(
        pgb, database, pgbouncer_admin_url=nowhere, name="blind", meter_provider=provider
    )
    guard = poolguard.get_guard(engine)
    caplog.set_level(logging.DEBUG)
    try:
        reading = guard.fleet._reader
        assert reading is not None
        for _ in range(20):
            with engine.connect() as conn:
                assert conn.execute(sa.text("select 1")).scalar_one() == 1
        wait_until(lambda: reading._failures >= 3, "three failed reads")
        stats = _bouncer_stats(guard)
        assert (stats.state, stats.error, stats.clients_waiting) == (
            "unavailable",
            "OperationalError",
            None,
        )
        assert "no numbers" in stats.describe()
        # Logged once for the run of failures, with the address and the error's type only.
        (event,) = named(events, "pgbouncer.unavailable")
        assert event["pgbouncer"] == nowhere.split("@")[1].split("/", maxsplit=1)[0]
        assert event["error_type"] == "OperationalError"
        assert guard.stats().acquisitions >= 20
        metrics = collect(reader)
        base = {"db.client.connection.pool.name": "blind"}
        assert value(metrics, "poolguard.pgbouncer.up", base) == 0
        assert points(metrics, "poolguard.pgbouncer.clients.waiting", base) == []
    finally:
        poolguard.unwrap(engine)
        engine.dispose()
    assert not reading.running
    everything = "\n".join([*(r.getMessage() for r in caplog.records), *map(repr, events)])
    assert SECRET not in everything


@pytest.mark.postgresql
@pytest.mark.timing
def test_numbers_go_stale_and_come_back_with_the_admin_console(
    bouncer: tuple[PgBouncer, str],
    events: list[dict[str, Any]],
) -> None:
    pgb, database = bouncer
    with Proxy("127.0.0.1", pgb.port) as proxy:
        admin = f"postgresql://{pgb.user}:{SECRET}@{proxy.host}:{proxy.port}/pgbouncer"
        engine = _engine(pgb, database, pgbouncer_admin_url=admin)
        guard = poolguard.get_guard(engine)
        try:
            wait_until(lambda: _bouncer_stats(guard).state == "ok", "a first read")
            proxy.set_mode("reset")
            wait_until(lambda: _bouncer_stats(guard).state == "stale", "stale numbers")
            stale = _bouncer_stats(guard)
            assert stale.pool_size == 1  # the last numbers are kept, with their age
            assert stale.age is not None
            assert stale.error is not None
            with engine.connect() as conn:  # requests go on (they do not use the admin)
                assert conn.execute(sa.text("select 2")).scalar_one() == 2
            proxy.set_mode("pass")
            wait_until(
                lambda: _bouncer_stats(guard).state == "ok", "fresh numbers again", timeout=30
            )
            assert (
                named(events, "pgbouncer.unavailable", "pgbouncer.available")[-1]["event"]
                == "pgbouncer.available"
            )
        finally:
            poolguard.unwrap(engine)
            engine.dispose()
    assert SECRET not in repr(events)


@pytest.mark.postgresql
def test_the_reader_lives_as_long_as_the_guard(bouncer: tuple[PgBouncer, str]) -> None:
    pgb, database = bouncer
    engine = _engine(pgb, database, pgbouncer_admin_url="auto")
    guard = poolguard.get_guard(engine)
    try:
        reading = guard.fleet._reader
        assert reading is not None
        assert reading.running
        engine.dispose()  # keeps the guard, and its reader
        assert guard.fleet._reader is reading
        assert reading.running
        # wrap() again with the same settings: the same reader.
        poolguard.wrap(engine, pgbouncer_admin_url="auto", pgbouncer_poll_interval=POLL)
        assert guard.fleet._reader is reading
        poolguard.wrap(engine)  # turned off: stopped
        wait_until(lambda: not reading.running, "the reader stopped")
        assert guard.stats().pgbouncer is None
        poolguard.wrap(engine, pgbouncer_admin_url="auto")
        again = guard.fleet._reader
        assert again is not None
        assert again is not reading
        wait_until(lambda: _bouncer_stats(guard).state == "ok", "a read by the new reader")
    finally:
        poolguard.unwrap(engine)
        engine.dispose()
    wait_until(lambda: not again.running, "the reader stopped at unwrap")
    assert guard.fleet.pgbouncer() is None


@pytest.mark.postgresql
def test_psycopg2_reads_the_admin_console_too(
    bouncer: tuple[PgBouncer, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    from poolguard import _pgbouncer

    monkeypatch.setattr(_pgbouncer, "_driver", lambda: psycopg2)
    pgb, database = bouncer
    engine = _engine(pgb, database, pgbouncer_admin_url="auto")
    guard = poolguard.get_guard(engine)
    try:
        reading = guard.fleet._reader
        assert reading is not None
        wait_until(lambda: reading.reads >= 8, "eight reads with psycopg2")
        assert type(reading._conn).__module__.startswith("psycopg2")
        stats = _bouncer_stats(guard)
        assert (stats.state, stats.pool_size, stats.pool_mode) == ("ok", 1, "transaction")
    finally:
        poolguard.unwrap(engine)
        engine.dispose()


@pytest.mark.postgresql
async def test_an_asyncpg_engine_finds_the_admin_console_from_its_url(
    bouncer: tuple[PgBouncer, str],
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    pgb, database = bouncer
    engine = poolguard.wrap(
        create_async_engine(
            pgb.url(database, driver="asyncpg"),
            pool_size=2,
            connect_args={"statement_cache_size": 0},
        ),
        pgbouncer_admin_url="auto",
        pgbouncer_poll_interval=POLL,
    )
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("select 3"))).scalar_one() == 3
        guard = poolguard.get_guard(engine)
        await async_wait_until(lambda: _bouncer_stats(guard).state == "ok", "a read")
        assert _bouncer_stats(guard).address == f"127.0.0.1:{pgb.port}"
    finally:
        poolguard.unwrap(engine)
        await engine.dispose()
