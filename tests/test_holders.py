"""Who holds the connections: ``Guard.holders()``, ``holders_report()``, leak warnings and
the holders named by ``PoolTimeout``, on real connections.

Sites are ``path:line in function`` of application code: the tests compute the exact
line they expect from their own source (``_line_of``), so a site that points one frame
too far in or out fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import poolguard
from _support import SAFETY_TIMEOUT, async_wait_until, named, wait_until
from poolguard._fingerprint import fingerprint
from poolguard._holders import Holder, describe_groups, group_holders

#: Events go to the stdlib logger: structlog not configured (see conftest).
pytestmark = pytest.mark.usefixtures("structlog_unconfigured")

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    from _support import EngineFactory

JOIN_TIMEOUT = 15.0
HERE = os.path.relpath(__file__)  # how poolguard shows this file in a site


# -- helpers ------------------------------------------------------------------------------




@pytest.fixture
def make_engine(make_engine: EngineFactory) -> EngineFactory:
    """``make_engine(url, pool_size, **wrap_options)`` with alerts off unless asked
    for, so that only what a test does is logged."""
    return make_engine.using(alert_utilization=None, alert_wait_time=None)


def _line_of(fn: Callable[..., Any], marker: str) -> int:
    """The line of ``fn``'s source that holds ``marker`` (exactly one)."""
    lines, start = inspect.getsourcelines(fn)
    (offset,) = [i for i, line in enumerate(lines) if marker in line]
    return start + offset


def _site(fn: Callable[..., Any], marker: str) -> str:
    """The site poolguard shows for ``fn`` at the line marked ``marker``."""
    return f"{HERE}:{_line_of(fn, marker)} in {fn.__name__}"


def _caller_site() -> str:
    """The site of the caller's current line."""
    frame = inspect.currentframe()
    assert frame is not None
    assert frame.f_back is not None
    caller = frame.f_back
    return f"{HERE}:{caller.f_lineno} in {caller.f_code.co_name}"


class Threads:
    """Start functions in threads; join them (bounded) and re-raise their errors."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, fn: Callable[..., None], *args: Any) -> None:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        self.threads.append(thread)
        thread.start()

    def join(self) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert [t for t in self.threads if t.is_alive()] == []
        assert self.errors == []


@pytest.fixture
def threads() -> Iterator[Threads]:
    started = Threads()
    yield started
    started.join()


# Application code the holders' sites must point at.


def _hold_running(engine: Engine, sql: str) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text(sql))  # running here


def _sleeper(engine: Engine) -> None:
    with engine.connect() as conn:
        # Long enough that the test's checkout times out while both still run,
        # however late the scheduler lets the test thread in.
        conn.execute(sa.text("select pg_sleep(3)"))  # sleeping here


def _checkout_here(engine: Engine) -> Connection:
    return engine.connect()  # checkout site


def _checkout_other(engine: Engine) -> Connection:
    return engine.connect()  # other checkout site


def _orm_checkout(session: Session) -> None:
    session.execute(sa.text("SELECT 1"))  # ORM checkout site


def _raw_checkout(engine: Engine) -> Any:
    return engine.raw_connection()  # raw checkout site


def _leak(engine: Engine) -> Connection:
    conn = engine.connect()  # leaked here
    conn.execute(sa.text("SELECT 7"))
    return conn


async def _hold_in_task(engine: AsyncEngine, ready: asyncio.Event, release: asyncio.Event
                        ) -> None:
    async with poolguard.request(tag="job"), engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
        ready.set()
        await release.wait()  # suspended here


# -- Guard.holders() on real connections ------------------------------------------------------


def test_holder_fields_age_wait_tag_statement_site(
    db_url: str, make_engine: EngineFactory
) -> None:
    engine = make_engine(db_url, 2)
    guard = poolguard.get_guard(engine)
    assert guard.holders() == []
    with poolguard.request(tag="checkout"):
        conn = engine.connect()
    try:
        (fresh,), site = guard.holders(), _caller_site()
        assert fresh.statement is None
        assert fresh.fingerprint is None
        assert (fresh.running, fresh.running_for, fresh.idle_in_transaction) == (False, 0.0, False)
        assert fresh.tag == "checkout"
        assert fresh.wait == 0.0  # a free connection: no wait
        # Held by this thread, so the site is where this test is now.
        assert fresh.site == site

        sql = "SELECT 4242 AS answer, 'sentinel-literal' AS word"
        conn.execute(sa.text(sql)).all()
        time.sleep(0.05)
        (item,) = guard.holders()
        assert item.statement == "SELECT ? AS answer, ? AS word"
        assert "4242" not in item.statement
        assert "sentinel" not in item.statement
        assert item.fingerprint == fingerprint(sql).id
        assert item.running is False
        assert item.running_for == 0.0
        assert item.idle_in_transaction is True  # a statement ran; still checked out
        assert item.age >= 0.05
        assert item.age > fresh.age
        assert item.tag == "checkout"
    finally:
        conn.close()
    assert guard.holders() == []


@pytest.mark.timing
def test_holder_wait_is_the_time_its_checkout_waited(
    sqlite_url: str, make_engine: EngineFactory, threads: Threads
) -> None:
    engine = make_engine(sqlite_url, 1, acquire_timeout=30)
    guard = poolguard.get_guard(engine)
    got = threading.Event()
    release = threading.Event()

    def waiter() -> None:
        with engine.connect():
            got.set()
            release.wait(JOIN_TIMEOUT)

    first = engine.connect()
    try:
        threads.start(waiter)
        wait_until(lambda: guard.gate.waiting == 1, "the second checkout to wait")
        time.sleep(0.1)
    finally:
        first.close()
    try:
        assert got.wait(JOIN_TIMEOUT)
        (item,) = guard.holders()
        assert item.wait >= 0.1
        assert item.site is not None
        assert item.site.endswith(" in waiter")  # its thread is in waiter(), at release.wait
    finally:
        release.set()


@pytest.mark.parametrize(
    ("backend", "sql", "normalised"),
    [
        # Long enough to still run when the test looks, on a loaded machine.
        pytest.param("postgresql", "SELECT pg_sleep(3)", "SELECT pg_sleep(?)",
                     marks=pytest.mark.postgresql, id="postgresql"),
        pytest.param("mariadb", "SELECT SLEEP(3)", "SELECT SLEEP(?)",
                     marks=pytest.mark.mariadb, id="mariadb"),
    ],
)
@pytest.mark.timing
def test_running_statement_in_another_thread(
    backend: str, sql: str, normalised: str, request: pytest.FixtureRequest,
    make_engine: EngineFactory, threads: Threads,
) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    engine = make_engine(url, 2)
    guard = poolguard.get_guard(engine)
    threads.start(_hold_running, engine, sql)
    wait_until(lambda: any(h.running for h in guard.holders()), "the statement to run")

    (item,) = guard.holders()
    assert item.running is True
    assert item.running_for > 0.0
    assert item.running_for <= item.age
    assert item.idle_in_transaction is False
    assert item.statement == normalised
    assert item.fingerprint == fingerprint(sql).id
    assert item.tag is None
    # Where the other thread is now: inside the driver call, so its application frame.
    assert item.site == _site(_hold_running, "# running here")

    (group,) = guard.holders_report(fresh=True)
    assert (group.count, group.running, group.idle_in_transaction) == (1, 1, 0)
    assert group.site == item.site
    threads.join()
    assert guard.holders() == []


async def test_site_of_an_asyncio_task_holder(async_db_url: str) -> None:
    engine = create_async_engine(async_db_url, pool_size=2, max_overflow=0)
    poolguard.wrap(engine, alert_utilization=None, alert_wait_time=None)
    guard = poolguard.get_guard(engine)
    ready, release = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(_hold_in_task(engine, ready, release))
    try:
        await asyncio.wait_for(ready.wait(), SAFETY_TIMEOUT)
        (item,) = guard.holders()
        # The task is suspended in _hold_in_task: that is where it holds the connection.
        assert item.site == _site(_hold_in_task, "# suspended here")
        assert item.tag == "job"
        assert item.statement == "SELECT ?"
        assert (item.running, item.idle_in_transaction) == (False, True)
    finally:
        release.set()
        await asyncio.wait_for(task, JOIN_TIMEOUT)
        await engine.dispose()
    assert guard.holders() == []


async def _sleep_in_task(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(sa.text("select pg_sleep(1)"))  # awaiting the statement here


@pytest.mark.postgresql
async def test_site_of_an_asyncio_task_running_a_statement(asyncpg_url: str) -> None:
    engine = create_async_engine(asyncpg_url, pool_size=2, max_overflow=0)
    poolguard.wrap(engine, alert_utilization=None, alert_wait_time=None)
    guard = poolguard.get_guard(engine)
    task = asyncio.create_task(_sleep_in_task(engine))
    try:
        await async_wait_until(
            lambda: any(h.running for h in guard.holders()), "the statement to run"
        )
        (item,) = guard.holders()
        assert item.running is True
        assert item.statement == "select pg_sleep(?)"
        assert item.site == _site(_sleep_in_task, "# awaiting the statement here")
    finally:
        await asyncio.wait_for(task, JOIN_TIMEOUT)
        await engine.dispose()
    assert guard.holders() == []


async def _async_checkout_here(engine: AsyncEngine) -> Any:
    return await engine.connect()  # async checkout site


async def _async_query_here(conn: Any) -> None:
    await conn.execute(sa.text("SELECT 2"))  # async query site


async def test_capture_call_sites_of_an_asyncio_checkout(
    async_db_url: str, events: list[dict[str, Any]]
) -> None:
    # The checkout runs inside SQLAlchemy's greenlet, whose frames end at the greenlet's
    # start: the application frame is in the task that awaits it.
    engine = create_async_engine(async_db_url, pool_size=2, max_overflow=0)
    poolguard.wrap(engine, capture_call_sites=True, slow_query_threshold=0,
                   alert_utilization=None, alert_wait_time=None)
    guard = poolguard.get_guard(engine)
    try:
        conn = await _async_checkout_here(engine)
        try:
            await _async_query_here(conn)
            (item,) = guard.holders()
            assert item.site == _site(_async_checkout_here, "# async checkout site")
        finally:
            await conn.close()
    finally:
        await engine.dispose()
    # The same for the site of a slow statement.
    sites = {e["site"] for e in named(events, "query.slow") if e["statement"] == "SELECT ?"}
    assert sites == {_site(_async_query_here, "# async query site")}


def test_capture_call_sites_reports_the_checkout_site(
    db_url: str, make_engine: EngineFactory
) -> None:
    engine = make_engine(db_url, 4, capture_call_sites=True)
    guard = poolguard.get_guard(engine)
    conn = _checkout_here(engine)
    session = Session(engine)
    raw = _raw_checkout(engine)
    try:
        conn.execute(sa.text("SELECT 1"))
        _orm_checkout(session)
        sites = sorted(h.site or "" for h in guard.holders())
        assert sites == sorted([
            _site(_checkout_here, "# checkout site"),
            _site(_orm_checkout, "# ORM checkout site"),
            _site(_raw_checkout, "# raw checkout site"),
        ])
    finally:
        raw.close()
        session.close()
        conn.close()
    assert guard.holders() == []

    # Without the option the same holder shows where its thread is now.
    plain = make_engine(db_url, 1)
    conn = _checkout_here(plain)
    try:
        (item,), site = poolguard.get_guard(plain).holders(), _caller_site()
        assert item.site == site
    finally:
        conn.close()


# -- grouping, sorting, describing ------------------------------------------------------------


def test_holders_report_groups_by_fingerprint_and_site(
    sqlite_url: str, make_engine: EngineFactory
) -> None:
    engine = make_engine(sqlite_url, 6, capture_call_sites=True)
    guard = poolguard.get_guard(engine)
    here, other = _site(_checkout_here, "# checkout site"), _site(_checkout_other, "# other")
    conns: list[Connection] = []

    def take(checkout: Callable[[Engine], Connection], sql: str | None, tag: str | None = None
             ) -> None:
        with poolguard.request(tag=tag) if tag else contextlib.nullcontext():
            conn = checkout(engine)
        conns.append(conn)
        if sql is not None:
            conn.execute(sa.text(sql))
        time.sleep(0.01)  # distinct ages

    try:
        take(_checkout_here, "SELECT 1", "alpha")
        take(_checkout_other, "SELECT 2")  # same shape, other site
        take(_checkout_here, "SELECT 3", "beta")
        take(_checkout_here, "SELECT 1, 2")  # same site, other shape
        take(_checkout_here, "SELECT 4", "alpha")
        take(_checkout_here, None)  # no statement yet
        groups = guard.holders_report(fresh=True)
    finally:
        for conn in conns:
            conn.close()

    one, two = fingerprint("SELECT 1"), fingerprint("SELECT 1, 2")
    assert [(g.fingerprint, g.statement, g.site, g.count) for g in groups] == [
        (one.id, "SELECT ?", here, 3),
        (one.id, "SELECT ?", other, 1),  # the older of the groups of one
        (two.id, "SELECT ?, ?", here, 1),
        (None, None, here, 1),
    ]
    top = groups[0]
    assert top.tags == ("alpha", "beta")
    assert (top.running, top.idle_in_transaction) == (0, 3)
    assert top.oldest > top.youngest > 0.0
    assert groups[1].oldest > groups[2].oldest > groups[3].oldest
    assert groups[3].idle_in_transaction == 0

    held = r"\(held \d+\.\d-\d+\.\ds"
    assert re.fullmatch(
        rf"3x 'SELECT \?' at {re.escape(here)} tag=alpha,beta {held}; 3 idle in transaction\); "
        rf"1x 'SELECT \?' at {re.escape(other)} {held}; 1 idle in transaction\); "
        rf"1x 'SELECT \?, \?' at {re.escape(here)} {held}; 1 idle in transaction\); "
        r"\+1 more",
        describe_groups(groups),
    ), describe_groups(groups)
    assert re.search(
        rf"; 1x 'no statement yet' at {re.escape(here)} {held}\)$", describe_groups(groups, limit=4)
    )


def _holder(fp: str | None, site: str | None, age: float, *, running: bool = False,
            idle: bool = False, tag: str | None = None, statement: str | None = None
            ) -> Holder:
    return Holder(age=age, wait=0.0, tag=tag, fingerprint=fp,
                  statement=statement if statement is not None else (fp and f"SELECT {fp}"),
                  running=running, running_for=1.0 if running else 0.0,
                  idle_in_transaction=idle, site=site)


def test_group_holders_sorts_by_count_then_oldest_and_describe_groups_formats() -> None:
    items = [
        _holder("a", "s1", 1.0, running=True, tag="x"),
        _holder("b", "s1", 9.0, idle=True),
        _holder("a", "s1", 3.0, idle=True, tag="y"),
        _holder("a", "s2", 2.0),
        _holder("c", None, 5.0, running=True),
        _holder("a", "s1", 2.0, running=True, tag="x"),
    ]
    groups = group_holders(items)
    assert [(g.fingerprint, g.site, g.count) for g in groups] == [
        ("a", "s1", 3), ("b", "s1", 1), ("c", None, 1), ("a", "s2", 1),
    ]
    top = groups[0]
    assert (top.oldest, top.youngest, top.running, top.idle_in_transaction, top.tags) == (
        3.0, 1.0, 2, 1, ("x", "y")
    )
    assert describe_groups(groups, limit=1) == (
        "3x 'SELECT a' at s1 tag=x,y (held 1.0-3.0s; 2 running, 1 idle in transaction); +3 more"
    )
    assert describe_groups(groups[2:3]) == (
        "1x 'SELECT c' at unknown site (held 5.0-5.0s; 1 running)"
    )
    assert describe_groups(groups[3:]) == "1x 'SELECT a' at s2 (held 2.0-2.0s)"
    assert describe_groups([]) == ""
    long = group_holders([_holder("d", "s", 1.0, statement="SELECT " + "x, " * 100 + "y")])
    shown = describe_groups(long)
    assert shown.startswith("1x 'SELECT x, x,")
    assert len(re.search(r"'([^']*)'", shown).group(1)) == 120  # type: ignore[union-attr]


def test_holders_report_is_reused_for_a_second_unless_fresh(
    sqlite_url: str, make_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(sqlite_url, 2)
    guard = poolguard.get_guard(engine)
    now = [time.perf_counter() + 100.0]
    monkeypatch.setattr("poolguard._diagnostics.perf_counter", lambda: now[0])
    first = engine.connect()
    second = None
    try:
        report = guard.holders_report()
        assert [g.count for g in report] == [1]
        second = engine.connect()
        now[0] += 0.5
        assert guard.holders_report() is report  # within a second: the same report
        assert [g.count for g in guard.holders_report(fresh=True)] == [2]
        now[0] += 1.0
        assert [g.count for g in guard.holders_report()] == [2]
    finally:
        first.close()
        if second is not None:
            second.close()


# -- leak_threshold ---------------------------------------------------------------------------


@pytest.mark.parametrize("capture", [False, True], ids=["site-now", "checkout-site"])
@pytest.mark.timing
def test_held_too_long_warns_once_and_again_on_return(
    db_url: str, capture: bool, make_engine: EngineFactory, events: list[dict[str, Any]],
) -> None:
    engine = make_engine(db_url, 2, leak_threshold=0.05, capture_call_sites=capture)
    guard = poolguard.get_guard(engine)
    guard.scanner.next_scan = math.inf  # only the scans below run
    started = time.perf_counter()
    with poolguard.request(tag="leaky"):
        conn = _leak(engine)
    try:
        # At the checkout's time, not "now": however late this thread runs, the
        # connection is not yet past the threshold at that time.
        guard.scan(started)
        assert named(events, "connection.held_too_long") == []  # not yet past it
        time.sleep(0.1)
        guard.scan(); site_now = _caller_site()  # noqa: E702 - the site is this line
        guard.scan()  # already warned: not again
        assert guard.stats().leak_warnings == 1
        (event,) = named(events, "connection.held_too_long")
        assert event["level"] == "warning"
        assert event["statement"] == "SELECT ?"
        assert event["fingerprint"] == fingerprint("SELECT 7").id
        assert event["tag"] == "leaky"
        assert (event["running"], event["idle_in_transaction"]) == (False, True)
        assert event["threshold_ms"] == 50.0
        assert event["held_ms"] >= 100.0
        if capture:
            assert event["site"] == _site(_leak, "# leaked here")
            assert event["site_kind"] == "checkout"
        else:
            assert event["site"] == site_now  # where its thread (this one) was at the scan
            assert event["site_kind"] == "now"
        assert named(events, "connection.returned_after_warning") == []
    finally:
        conn.close()
    (returned,) = named(events, "connection.returned_after_warning")
    assert returned["level"] == "info"
    assert returned["held_ms"] >= event["held_ms"]
    assert returned["site"] == (_site(_leak, "# leaked here") if capture else None)
    guard.scan()
    assert guard.stats().leak_warnings == 1
    assert len(named(events, "connection.held_too_long")) == 1


def test_connection_returned_in_time_never_warns(
    sqlite_url: str, make_engine: EngineFactory, events: list[dict[str, Any]]
) -> None:
    engine = make_engine(sqlite_url, 1, leak_threshold=1.0)
    guard = poolguard.get_guard(engine)
    guard.scanner.next_scan = math.inf
    conn = engine.connect()
    guard.scan(time.perf_counter() - 10.0)  # a scan long before the threshold passes
    conn.close()
    guard.scan(time.perf_counter() + 10.0)  # after: nothing is out any more
    assert guard.stats().leak_warnings == 0
    assert named(events, "connection.held_too_long", "connection.returned_after_warning") == []


# -- PoolTimeout names the holders ----------------------------------------------------------


@pytest.mark.postgresql
@pytest.mark.timing
def test_pool_timeout_message_names_the_top_holders(
    postgresql_url: str, make_engine: EngineFactory, threads: Threads
) -> None:
    engine = make_engine(postgresql_url, 2, acquire_timeout=0.2)
    guard = poolguard.get_guard(engine)
    for _ in range(2):
        threads.start(_sleeper, engine)
    wait_until(lambda: sum(h.running for h in guard.holders()) == 2, "both sleeps to run")
    with pytest.raises(poolguard.PoolTimeout) as info:
        engine.connect()
    error = info.value
    assert isinstance(error, sa.exc.TimeoutError)
    assert (error.in_use, error.capacity) == (2, 2)
    message = str(error)
    site = _site(_sleeper, "# sleeping here")
    assert f"held by: 2x 'select pg_sleep(?)' at {site} (held " in message
    assert message.endswith("; 2 running)")
    assert "pg_sleep(3)" not in message  # no literal
    threads.join()
    assert guard.gate.in_use == 0
