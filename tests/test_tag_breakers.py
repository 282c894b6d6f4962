"""Circuit breakers per request tag (``breaker_per_tag``): one slow query shape's
tag is shed while the other tags keep being served.

Through SQLite with a creator that counts its dials and a ``slow(x)`` function
that moves a hand-driven clock: statement durations are exact, nothing sleeps.
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy.pool import NullPool

import poolguard
from _support import EngineFactory, FakeClock
from poolguard import _breakers as breakers_module
from poolguard import _checkout as checkout_module
from poolguard import _queries as queries_module
from poolguard import _scan as scan_module
from poolguard._config import Config
from poolguard._context import RequestContext
from poolguard.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, TagBreaker

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.engine import Engine

SLOW = 2.0  # seconds a slow(x) statement takes on the test clock

SETTINGS: dict[str, Any] = {
    "breaker_per_tag": True,
    "breaker_window": "count",
    "breaker_window_size": 4,
    "breaker_minimum_calls": 4,
    "breaker_slow_call_duration": 1.0,
    "breaker_slow_call_rate": 0.5,
    "breaker_wait_in_open": 30.0,
    "breaker_half_open_calls": 2,
}


class Dialer:
    """A ``creator`` that counts its dials; its connections know ``slow(x)``."""

    def __init__(self, path: str, clock: FakeClock) -> None:
        self.path = path
        self.clock = clock
        self.dials = 0

    def _slow(self, x: int) -> int:
        self.clock.advance(SLOW)
        return x

    def __call__(self) -> sqlite3.Connection:
        self.dials += 1
        conn = sqlite3.connect(self.path, check_same_thread=False)
        conn.create_function("slow", 1, self._slow)
        return conn


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """A frozen ``perf_counter`` the test (and ``slow(x)``) moves forward."""
    fake = FakeClock(1000.0)
    for module in (checkout_module, scan_module, breakers_module):
        monkeypatch.setattr(module, "perf_counter", fake)
    monkeypatch.setattr(queries_module, "perf_counter", fake)
    return fake


@pytest.fixture
def dialer(tmp_path: Path, clock: FakeClock) -> Dialer:
    path = str(tmp_path / "tags.sqlite3")
    sqlite3.connect(path).close()
    return Dialer(path, clock)


@pytest.fixture
def make_engine(make_engine: EngineFactory, dialer: Dialer) -> EngineFactory:
    """``make_engine(**wrap_options)``: SQLite through ``dialer``, a dial per checkout."""
    return make_engine.using(
        pool={"creator": dialer, "poolclass": NullPool}, connect_retries=0, metrics=False
    )


def _run(engine: Engine, tag: str | None, sql: str = "SELECT 1") -> int:
    with poolguard.request(tag=tag), engine.connect() as conn:
        return int(conn.exec_driver_sql(sql).scalar_one())


def _breaker_events(events: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(e["event"], e.get("tag")) for e in events if e["event"].startswith("breaker.")]


# -- pure ---------------------------------------------------------------------------------


def test_a_tags_breaker_opens_on_slow_calls_while_another_tags_stays_closed(
    make_engine: EngineFactory,
) -> None:
    guard = poolguard.get_guard(make_engine(**SETTINGS))
    report = RequestContext(None, "report")
    login = RequestContext(None, "login")
    for _ in range(4):
        guard.breaker_record(None, 5.0, report)
        guard.breaker_record(None, 0.001, login)
    assert guard.breaker is None
    assert guard.tag_breakers["report"].state == OPEN
    assert guard.tag_breakers["login"].state == CLOSED
    assert guard.hooks.tripped is True  # checkouts now consult breaker_admit
    # Untagged outcomes make no breaker.
    guard.breaker_record(None, 5.0, RequestContext(None))
    guard.breaker_record(None, 5.0, None)
    assert set(guard.tag_breakers) == {"report", "login"}


def test_tag_breakers_are_bounded_in_number(make_engine: EngineFactory) -> None:
    guard = poolguard.get_guard(make_engine(**SETTINGS))
    for i in range(breakers_module.MAX_TAG_BREAKERS + 20):
        guard.breaker_record(None, 5.0, RequestContext(None, f"tag-{i}"))
    assert len(guard.tag_breakers) == breakers_module.MAX_TAG_BREAKERS
    assert f"tag-{breakers_module.MAX_TAG_BREAKERS}" not in guard.tag_breakers


def test_a_half_open_tag_breaker_whose_probes_ran_nothing_probes_again() -> None:
    breaker = TagBreaker(BreakerConfig(window_size=2, minimum_calls=2, slow_call_rate=0.5,
                                       slow_call_duration=1.0, wait_in_open=10.0,
                                       half_open_calls=2))
    breaker.record(False, 5.0, 0.0)
    assert breaker.record(False, 5.0, 0.0) == OPEN
    assert breaker.allow(10.0) == (True, HALF_OPEN)
    assert breaker.allow(10.0) == (True, None)
    assert breaker.allow(10.0) == (False, None)  # both probes out, no outcome yet
    assert breaker.record(False, 0.0, 11.0) is None  # one probe reported
    assert breaker.allow(19.9)[0] is False
    assert breaker.allow(20.0) == (True, None)  # the missing probe, let through again
    assert breaker.allow(20.0)[0] is False
    assert breaker.record(False, 0.0, 20.5) == CLOSED


# -- through an engine ----------------------------------------------------------------------


def test_slow_report_tag_is_shed_without_dialing_while_login_is_served_then_recovers(
    make_engine: EngineFactory, dialer: Dialer, clock: FakeClock,
    events: list[dict[str, Any]],
) -> None:
    engine = make_engine(**SETTINGS)
    guard = poolguard.get_guard(engine)
    for _ in range(4):
        assert _run(engine, "report", "SELECT slow(1)") == 1
        assert _run(engine, "login") == 1
    report = guard.tag_breakers["report"]
    assert report.state == OPEN
    assert guard.tag_breakers["login"].state == CLOSED

    dials = dialer.dials
    for _ in range(5):
        with pytest.raises(poolguard.CircuitOpen) as info:
            _run(engine, "report")
    error = info.value
    assert error.reason == "circuit_open"
    assert "'report'" in str(error)
    assert 0 < error.retry_after <= 30.0
    assert dialer.dials == dials  # never dialed while open
    assert guard.rejections[("circuit_open", "normal")] == 5

    for _ in range(5):  # the other tag, and untagged work, are served
        assert _run(engine, "login") == 1
    assert _run(engine, None) == 1
    assert dialer.dials == dials + 6

    clock.advance(31.0)
    for _ in range(2):  # the two probes: fast again
        assert _run(engine, "report") == 1
    assert report.state == CLOSED
    assert guard.hooks.tripped is False
    assert report.transitions == {OPEN: 1, HALF_OPEN: 1, CLOSED: 1}
    assert _breaker_events(events) == [
        ("breaker.open", "report"), ("breaker.half_open", "report"),
        ("breaker.closed", "report"),
    ]
    assert guard.stats().permits == 0


def test_slow_probes_reopen_the_tags_breaker_and_extra_checkouts_do_not_dial(
    make_engine: EngineFactory, dialer: Dialer, clock: FakeClock,
) -> None:
    engine = make_engine(**SETTINGS)
    guard = poolguard.get_guard(engine)
    for _ in range(4):
        _run(engine, "report", "SELECT slow(1)")
    clock.advance(31.0)
    dials = dialer.dials
    with poolguard.request(tag="report"):
        first, second = engine.connect(), engine.connect()  # the two probes
        with pytest.raises(poolguard.CircuitOpen):
            engine.connect()
        assert dialer.dials == dials + 2
        for conn in (first, second):
            conn.exec_driver_sql("SELECT slow(1)")
            conn.close()
    report = guard.tag_breakers["report"]
    assert report.state == OPEN
    assert report.transitions == {OPEN: 2, HALF_OPEN: 1, CLOSED: 0}
    assert guard.stats().permits == 0


def test_tag_breakers_work_alongside_the_guard_wide_breaker(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(**SETTINGS, breaker=True)
    guard = poolguard.get_guard(engine)
    for _ in range(4):
        _run(engine, "report", "SELECT slow(1)")
        for _ in range(3):
            _run(engine, "login")
    # 1 slow call in 4: the guard-wide window (the last 4 calls) stays closed.
    assert guard.breaker is not None
    assert guard.breaker.state == CLOSED
    assert guard.tag_breakers["report"].state == OPEN
    with pytest.raises(poolguard.CircuitOpen, match="'report'"):
        _run(engine, "report")
    assert _run(engine, "login") == 1


def test_metrics_carry_the_tag_for_tag_breakers_only(tmp_path: Path, dialer: Dialer) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    engine = poolguard.wrap(
        sa.create_engine("sqlite://", creator=dialer, poolclass=NullPool),
        **SETTINGS, breaker=True, connect_retries=0, meter_provider=provider,
    )
    try:
        for _ in range(4):
            _run(engine, "report", "SELECT slow(1)")
            for _ in range(3):
                _run(engine, "login")
        data = reader.get_metrics_data()
        assert data is not None
        found = {
            m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics
            for m in sm.metrics
        }
        states = {
            (p.attributes.get("poolguard.tag"), p.attributes["poolguard.state"]): p.value
            for p in found["poolguard.circuit_breaker.state"].data.data_points
            if p.attributes is not None
        }
        assert states[("report", "open")] == 1
        assert states[("report", "closed")] == 0
        assert states[("login", "closed")] == 1
        assert states[(None, "closed")] == 1  # guard-wide: no tag attribute
        moves = {
            (p.attributes.get("poolguard.tag"), p.attributes["poolguard.state"]): p.value
            for p in found["poolguard.circuit_breaker.transitions"].data.data_points
            if p.attributes is not None
        }
        assert moves[("report", "open")] == 1
        assert moves[(None, "open")] == 0
    finally:
        engine.dispose()
        provider.shutdown()


def test_config_validation_and_environment() -> None:
    assert Config().breaker_per_tag is False
    assert Config.from_env({"POOLGUARD_BREAKER_PER_TAG": "true"}).breaker_per_tag is True
    assert Config.from_env({"POOLGUARD_BREAKER_PER_TAG": "0"}).breaker_per_tag is False
    with pytest.raises(ValueError, match="POOLGUARD_BREAKER_PER_TAG"):
        Config.from_env({"POOLGUARD_BREAKER_PER_TAG": "sometimes"})
    with pytest.raises(ValueError, match="breaker_per_tag"):
        Config(breaker_per_tag="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("guard_wide", [False, True])
def test_option_off_tags_change_nothing(
    make_engine: EngineFactory, dialer: Dialer, guard_wide: bool,
) -> None:
    engine = make_engine(**{**SETTINGS, "breaker_per_tag": False, "breaker": guard_wide})
    guard = poolguard.get_guard(engine)
    assert guard.breakers_on is guard_wide
    for _ in range(4):
        assert _run(engine, "report", "SELECT slow(1)") == 1
    assert guard.tag_breakers == {}
    if guard_wide:  # the guard-wide breaker sheds everyone
        with pytest.raises(poolguard.CircuitOpen, match="the database is failing"):
            _run(engine, "login")
    else:
        assert guard.hooks.tripped is False
        assert _run(engine, "report") == 1
        assert dialer.dials == 5


def test_turning_the_option_off_drops_the_tag_breakers(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(**SETTINGS)
    guard = poolguard.get_guard(engine)
    for _ in range(4):
        _run(engine, "report", "SELECT slow(1)")
    assert guard.hooks.tripped is True
    guard.configure(Config.from_options(guard.config, breaker_per_tag=False))
    assert guard.tag_breakers == {}
    assert guard.breakers_on is False
    assert guard.hooks.tripped is False
    assert _run(engine, "report") == 1


def test_a_tag_that_times_out_waiting_for_the_pool_keeps_its_breaker_closed(
    tmp_path: Path, make_engine: EngineFactory, events: list[dict[str, Any]],
) -> None:
    # Another caller holds the pool's one connection: the "api" checkouts
    # time out in its queue. That says nothing about api's own statements:
    # its breaker must not open (it would shed the victim, not the culprit).
    engine = make_engine.using(pool={"poolclass": sa.pool.QueuePool})(
        f"sqlite:///{tmp_path / 'wait.db'}", 1, max_overflow=0, acquire_timeout=0.01,
        breaker=True, **SETTINGS,
    )
    guard = poolguard.get_guard(engine)
    with engine.connect():
        for _ in range(SETTINGS["breaker_minimum_calls"]):
            with pytest.raises(poolguard.PoolTimeout):
                _run(engine, "api")
    assert guard.tag_breakers.get("api") is None or guard.tag_breakers["api"].state == CLOSED
    # The guard-wide breaker still counts them: a pool that never frees up
    # can mean a database that stopped answering.
    assert guard.breaker is not None
    assert guard.breaker.state == OPEN
    assert ("breaker.open", "api") not in _breaker_events(events)
