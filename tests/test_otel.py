"""OpenTelemetry metrics of a guarded engine, read back with the SDK's ``InMemoryMetricReader``.

Every test passes its own SDK ``MeterProvider`` to ``poolguard.wrap`` (the
global provider is never set), runs a known workload against a real database
and checks each metric's name, instrument type, unit, attributes and value.

Histogram samples are kept from ``wrap()`` on (an SDK provider is behind it),
so the first collection reports the warm-up checkout too; tests collect once
(the baseline) after the warm-up and count their workload on top of it. Real
time is used only to
make something happen (hold a connection, let a leak threshold pass); values
are checked against lower bounds that the workload guarantees, never against
how long anything took.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import (
    Counter,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics import Histogram as SDKHistogram
from opentelemetry.sdk.metrics._internal.instrument import _Histogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
    Sum,
)

import poolguard
from _support import SAFETY_TIMEOUT, EngineFactory, named, wait_until
from poolguard import _histogram as pg_histogram
from poolguard._fingerprint import fingerprint
from poolguard._otel import DURATION_BUCKETS
from poolguard.testing import capture_events

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

    from opentelemetry.sdk.metrics.export import Metric
    from sqlalchemy.engine import Engine

# Upper bound of any wait for another thread to get somewhere: it only stops a
# broken test from hanging, and no assertion depends on it.
#: How long the workload holds a connection (use_time's lower bound).
HOLD = 0.05

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

UPDOWN, COUNTER, HISTOGRAM = "up-down counter", "counter", "histogram"

#: Instrument type and unit of every metric poolguard reports.
SPEC: dict[str, tuple[str, str]] = {
    "db.client.connection.count": (UPDOWN, "{connection}"),
    "db.client.connection.idle.max": (UPDOWN, "{connection}"),
    "db.client.connection.idle.min": (UPDOWN, "{connection}"),
    "db.client.connection.max": (UPDOWN, "{connection}"),
    "db.client.connection.pending_requests": (UPDOWN, "{request}"),
    "db.client.connection.timeouts": (COUNTER, "{timeout}"),
    "db.client.connection.create_time": (HISTOGRAM, "s"),
    "db.client.connection.wait_time": (HISTOGRAM, "s"),
    "db.client.connection.use_time": (HISTOGRAM, "s"),
    "db.client.operation.duration": (HISTOGRAM, "s"),
    "poolguard.connection.leak_warnings": (COUNTER, "{warning}"),
    "poolguard.pool.exhausted": (COUNTER, "{event}"),
    "poolguard.query.time": (COUNTER, "s"),
    "poolguard.query.calls": (COUNTER, "{call}"),
}
LEGACY_SPEC: dict[str, tuple[str, str]] = {
    "db.client.connections.usage": (UPDOWN, "{connection}"),
    "db.client.connections.idle.max": (UPDOWN, "{connection}"),
    "db.client.connections.idle.min": (UPDOWN, "{connection}"),
    "db.client.connections.max": (UPDOWN, "{connection}"),
    "db.client.connections.pending_requests": (UPDOWN, "{request}"),
    "db.client.connections.timeouts": (COUNTER, "{timeout}"),
    "db.client.connections.create_time": (HISTOGRAM, "ms"),
    "db.client.connections.wait_time": (HISTOGRAM, "ms"),
    "db.client.connections.use_time": (HISTOGRAM, "ms"),
}
#: poolguard's placeholders: nothing fills them yet, so nothing may be reported.
PLACEHOLDERS = (
    "poolguard.rejections",
    "poolguard.circuit_breaker.state",
    "poolguard.circuit_breaker.transitions",
)

#: db.system.name by SQLAlchemy dialect name (the MySQL dialect talks to MariaDB here).
SYSTEM = {"sqlite": "sqlite", "postgresql": "postgresql", "mysql": "mariadb"}
#: error.type of (a duplicate key, a missing table): the DBAPI exception's class name.
ERRORS = {
    "sqlite": ("IntegrityError", "OperationalError"),
    "postgresql": ("UniqueViolation", "UndefinedTable"),
    "mysql": ("IntegrityError", "ProgrammingError"),
}


# -- reading metrics ----------------------------------------------------------


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    """One collection, by metric name (each name reported at most once)."""
    data = reader.get_metrics_data()
    found: dict[str, Metric] = {}
    for rm in data.resource_metrics if data is not None else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                assert metric.name not in found, f"{metric.name} reported twice"
                found[metric.name] = metric
    return found


def points(metrics: Mapping[str, Metric], name: str, attrs: Mapping[str, Any]) -> list[Any]:
    """Data points of ``name`` whose attributes include ``attrs`` (none if not reported)."""
    metric = metrics.get(name)
    if metric is None:
        return []
    return [
        p for p in metric.data.data_points
        if all((p.attributes or {}).get(k) == v for k, v in attrs.items())
    ]


def value(metrics: Mapping[str, Metric], name: str, attrs: Mapping[str, Any]) -> float:
    """The value of the one sum/gauge point of ``name`` matching ``attrs``."""
    found = points(metrics, name, attrs)
    assert len(found) == 1, f"{name} {dict(attrs)}: {found}"
    assert isinstance(found[0], NumberDataPoint)
    return found[0].value


def hist(metrics: Mapping[str, Metric], name: str, attrs: Mapping[str, Any]) -> HistogramDataPoint:
    """The one histogram point of ``name`` matching ``attrs``."""
    found = points(metrics, name, attrs)
    assert len(found) == 1, f"{name} {dict(attrs)}: {found}"
    assert isinstance(found[0], HistogramDataPoint)
    return found[0]


def check_kind(metric: Metric, kind: str, unit: str) -> None:
    """``metric`` is a ``kind`` instrument (cumulative) in ``unit``."""
    assert metric.unit == unit, metric.name
    data = metric.data
    if kind == HISTOGRAM:
        assert isinstance(data, Histogram), metric.name
    else:
        assert isinstance(data, Sum), metric.name
        assert data.is_monotonic is (kind == COUNTER), metric.name
    assert data.aggregation_temporality is AggregationTemporality.CUMULATIVE


# -- set-up -------------------------------------------------------------------


@pytest.fixture
def make_engine(make_engine: EngineFactory, provider: MeterProvider) -> EngineFactory:
    """Guarded engines (2 connections + 1 overflow) reporting to ``provider``."""
    # No utilization alert (a pool.exhausted event) unless a test causes one.
    return make_engine.using(
        pool={"pool_size": 2, "max_overflow": 1}, meter_provider=provider, alert_utilization=None
    )


@pytest.fixture
def table(db_url: str) -> Iterator[str]:
    """A fresh table ``(id primary key, name)`` in ``db_url``'s database; dropped after."""
    name = f"otel_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, name VARCHAR(20))"))
    yield name
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE {name}"))
    engine.dispose()


#: Checkouts (and connections opened) of warm_up(), reported with the workload's.
WARM = 1


def warm_up(engine: Engine) -> None:
    """Open the first connection, so the dialect's set-up is done before the baseline."""
    engine.connect().close()


def counts_since(before: Mapping[str, Metric], after: Mapping[str, Metric], name: str
                 ) -> dict[frozenset[tuple[str, Any]], int]:
    """Histogram samples of ``name`` by attributes, recorded between two collections."""
    def by_attrs(metrics: Mapping[str, Metric]) -> dict[frozenset[tuple[str, Any]], int]:
        metric = metrics.get(name)
        points = metric.data.data_points if metric is not None else []
        return {frozenset(p.attributes.items()): p.count for p in points}

    old = by_attrs(before)
    return {k: n - old.get(k, 0) for k, n in by_attrs(after).items() if n != old.get(k, 0)}


class Waiter(threading.Thread):
    """A thread that checks a connection out (waiting at the gate) and returns it."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(daemon=True)
        self.engine = engine
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.engine.connect().close()
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(SAFETY_TIMEOUT)
        assert not self.is_alive()
        assert self.error is None, self.error


# -- the metrics after a known workload ----------------------------------------


def test_pool_and_operation_metrics_after_workload(
    db_url: str, table: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    engine = make_engine(db_url)
    guard = poolguard.get_guard(engine)
    dialect = engine.dialect.name
    warm_up(engine)
    baseline = collect(reader)  # the first collection: what happened since wrap()
    assert hist(baseline, "db.client.connection.wait_time", {}).count == WARM

    insert = sa.text(f"INSERT INTO {table} (id, name) VALUES (:id, :name)")
    select = sa.text(f"SELECT name FROM {table} WHERE id = :id")
    missing = sa.text(f"SELECT name FROM {table}_missing WHERE id = :id")
    with engine.begin() as conn:  # 1 checkout, 3 statements
        for i in range(3):
            conn.execute(insert, {"id": i, "name": f"n{i}"})
    for i in range(4):  # 4 checkouts, 4 statements
        with engine.connect() as conn:
            assert conn.execute(select, {"id": i % 3}).scalar_one() == f"n{i % 3}"
    with engine.connect() as a, engine.connect():  # 2 checkouts, 1 new connection
        a.execute(sa.text("SELECT 1"))
        during = collect(reader)
        time.sleep(HOLD)
    with pytest.raises(sa.exc.IntegrityError) as duplicate, engine.begin() as conn:
        conn.execute(insert, {"id": 0, "name": "again"})  # 1 checkout, 1 failing statement
    with pytest.raises(sa.exc.DBAPIError) as absent, engine.connect() as conn:
        conn.execute(missing, {"id": 0})  # 1 checkout, 1 failing statement
    checkouts, statements = 9, 10
    duplicate_error, missing_error = ERRORS[dialect]
    assert type(duplicate.value.orig).__name__ == duplicate_error
    assert type(absent.value.orig).__name__ == missing_error

    metrics = collect(reader)
    assert set(metrics) == set(SPEC)  # no legacy names, no placeholders
    for name, (kind, unit) in SPEC.items():
        check_kind(metrics[name], kind, unit)
        for point in metrics[name].data.data_points:
            assert point.attributes[POOL] == guard.name
    pool = {POOL: guard.name}

    # Pool state: two connections, both used during the hold, both idle now.
    used, idle = {**pool, STATE: "used"}, {**pool, STATE: "idle"}
    assert len(points(metrics, "db.client.connection.count", pool)) == 2
    assert value(during, "db.client.connection.count", used) == 2
    assert value(during, "db.client.connection.count", idle) == 0
    assert value(metrics, "db.client.connection.count", used) == 0
    assert value(metrics, "db.client.connection.count", idle) == 2
    assert value(metrics, "db.client.connection.idle.max", pool) == 2
    assert value(metrics, "db.client.connection.idle.min", pool) == 0
    assert value(metrics, "db.client.connection.max", pool) == 3
    assert value(metrics, "db.client.connection.pending_requests", pool) == 0
    assert value(metrics, "db.client.connection.timeouts", pool) == 0
    assert value(metrics, "poolguard.connection.leak_warnings", pool) == 0
    assert value(metrics, "poolguard.pool.exhausted", pool) == 0

    # Histograms: samples since the baseline, in the advised buckets.
    for name in ("create_time", "wait_time", "use_time"):
        point = hist(metrics, f"db.client.connection.{name}", pool)
        assert point.attributes == pool
        assert point.explicit_bounds == DURATION_BUCKETS
        assert sum(point.bucket_counts) == point.count
    wait = hist(metrics, "db.client.connection.wait_time", pool)
    assert wait.count == WARM + checkouts  # none waited: replayed as 0.0 values
    assert wait.sum == 0.0
    assert wait.bucket_counts[0] == WARM + checkouts
    use = hist(metrics, "db.client.connection.use_time", pool)
    assert use.count == WARM + checkouts  # one per checkin
    assert use.sum >= 2 * HOLD
    assert use.max >= HOLD
    create = hist(metrics, "db.client.connection.create_time", pool)
    assert create.count == WARM + 1
    assert create.sum > 0

    # db.client.operation.duration: one sample per statement, by operation and table.
    system = {**pool, "db.system.name": SYSTEM[dialect]}
    ins = {**system, "db.operation.name": "INSERT", "db.collection.name": table}
    sel = {**system, "db.operation.name": "SELECT", "db.collection.name": table}
    expected = {
        frozenset(ins.items()): 3,
        frozenset({**ins, "error.type": duplicate_error}.items()): 1,
        frozenset(sel.items()): 4,
        frozenset({**sel, "db.collection.name": f"{table}_missing",
                   "error.type": missing_error}.items()): 1,
        frozenset({**system, "db.operation.name": "SELECT"}.items()): 1,  # SELECT 1: no table
    }
    assert counts_since(baseline, metrics, "db.client.operation.duration") == expected
    assert sum(expected.values()) == statements
    duration = metrics["db.client.operation.duration"].data.data_points
    for point in duration:
        assert point.explicit_bounds == DURATION_BUCKETS
        assert point.sum > 0

    # poolguard.query.*: calls and total time per statement shape (errors included).
    def shape(statement: str) -> dict[str, str]:
        fp = fingerprint(statement)
        return {**pool, "poolguard.query.fingerprint": fp.id, "db.query.summary": fp.summary}

    by_shape = [
        (shape(f"INSERT INTO {table} (id, name) VALUES (?, ?)"), f"INSERT {table}", 4, ins),
        (shape(f"SELECT name FROM {table} WHERE id = ?"), f"SELECT {table}", 4, sel),
    ]
    for attrs, summary, calls, op in by_shape:
        assert attrs["db.query.summary"] == summary
        assert value(metrics, "poolguard.query.calls", attrs) == calls
        total = sum(p.sum for p in points(metrics, "db.client.operation.duration", op))
        assert value(metrics, "poolguard.query.time", attrs) == pytest.approx(total, rel=1e-9)
    select_one = shape("SELECT 1")
    assert select_one["db.query.summary"] == "SELECT"
    assert value(metrics, "poolguard.query.calls", select_one) == 1
    for point in metrics["poolguard.query.calls"].data.data_points:
        assert point.attributes["poolguard.query.fingerprint"] in {
            s.fingerprint for s in guard.top_queries(1000)
        }


@pytest.mark.timing
def test_pending_requests_and_wait_time_of_a_waiting_checkout(
    db_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    engine = make_engine(db_url, pool_size=1, max_overflow=0, acquire_timeout=SAFETY_TIMEOUT)
    guard = poolguard.get_guard(engine)
    pool = {POOL: guard.name}
    warm_up(engine)
    collect(reader)

    held = engine.connect()
    waiter = Waiter(engine)
    waiter.start()
    try:
        wait_until(lambda: guard.gate.waiting == 1, "a checkout waiting")
        queued_at = time.perf_counter()  # the waiter started waiting before this
        waiting = collect(reader)
        time.sleep(HOLD)
    finally:
        released_at = time.perf_counter()  # ... and stops waiting after this
        held.close()
    waiter.finish()
    metrics = collect(reader)

    assert value(waiting, "db.client.connection.pending_requests", pool) == 1
    assert value(waiting, "db.client.connection.count", {**pool, STATE: "used"}) == 1
    assert value(metrics, "db.client.connection.pending_requests", pool) == 0
    assert value(metrics, "db.client.connection.count", {**pool, STATE: "used"}) == 0
    wait = hist(metrics, "db.client.connection.wait_time", pool)
    assert wait.count == WARM + 2  # the holder's (0.0) and the waiter's
    assert wait.min == 0.0
    assert wait.max >= released_at - queued_at >= HOLD
    assert wait.sum == wait.max
    assert hist(metrics, "db.client.connection.use_time", pool).count == WARM + 2
    assert value(metrics, "db.client.connection.timeouts", pool) == 0


def test_timeouts_and_pool_exhausted(
    db_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    engine = make_engine(db_url, pool_size=1, max_overflow=0, acquire_timeout=0)
    guard = poolguard.get_guard(engine)
    pool = {POOL: guard.name}
    warm_up(engine)
    collect(reader)

    with engine.connect():
        for _ in range(3):
            with pytest.raises(poolguard.PoolTimeout):
                engine.connect()
    metrics = collect(reader)

    assert value(metrics, "db.client.connection.timeouts", pool) == 3
    # One pool.exhausted event per 10 s (the first timeout's): the counter counts events.
    assert value(metrics, "poolguard.pool.exhausted", pool) == 1
    assert guard.exhaustion_events == 1
    assert value(metrics, "db.client.connection.pending_requests", pool) == 0
    # Every checkout's wait, timed out or not; use_time only of connections handed out.
    assert hist(metrics, "db.client.connection.wait_time", pool).count == WARM + 1 + 3
    assert hist(metrics, "db.client.connection.use_time", pool).count == WARM + 1


def test_leak_warnings(
    db_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    engine = make_engine(db_url, leak_threshold=0.01)
    guard = poolguard.get_guard(engine)
    pool = {POOL: guard.name}
    warm_up(engine)
    assert value(collect(reader), "poolguard.connection.leak_warnings", pool) == 0

    with engine.connect(), engine.connect():
        time.sleep(0.02)  # both past the threshold
        guard.scan()
        guard.scan()  # one warning per connection, not per scan
        metrics = collect(reader)
    assert value(metrics, "poolguard.connection.leak_warnings", pool) == 2
    with engine.connect():  # returned at once: no warning
        guard.scan()
    assert value(collect(reader), "poolguard.connection.leak_warnings", pool) == 2


def test_legacy_names(
    db_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    engine = make_engine(db_url, metrics_legacy_names=True)
    guard = poolguard.get_guard(engine)
    warm_up(engine)
    collect(reader)
    with engine.connect() as a, engine.connect():
        a.execute(sa.text("SELECT 1"))
        during = collect(reader)
        time.sleep(HOLD)
    for _ in range(3):
        engine.connect().close()
    metrics = collect(reader)

    assert set(metrics) == set(SPEC) | set(LEGACY_SPEC)
    for name, (kind, unit) in LEGACY_SPEC.items():
        check_kind(metrics[name], kind, unit)
    legacy, pool = {"pool.name": guard.name}, {POOL: guard.name}
    for name in LEGACY_SPEC:
        for point in metrics[name].data.data_points:
            assert point.attributes["pool.name"] == guard.name
            assert POOL not in point.attributes
    assert value(during, "db.client.connections.usage", {**legacy, "state": "used"}) == 2
    assert value(metrics, "db.client.connections.usage", {**legacy, "state": "used"}) == 0
    assert value(metrics, "db.client.connections.usage", {**legacy, "state": "idle"}) == 2
    for name, expected in (("idle.max", 2), ("idle.min", 0), ("max", 3),
                           ("pending_requests", 0), ("timeouts", 0)):
        assert value(metrics, f"db.client.connections.{name}", legacy) == expected
        assert value(metrics, f"db.client.connection.{name}", pool) == expected
    for name, count in (("create_time", WARM + 1), ("wait_time", WARM + 5),
                        ("use_time", WARM + 5)):
        ms = hist(metrics, f"db.client.connections.{name}", legacy)
        s = hist(metrics, f"db.client.connection.{name}", pool)
        assert ms.attributes == legacy
        assert ms.explicit_bounds == tuple(b * 1000 for b in DURATION_BUCKETS)
        assert ms.count == s.count == count
        assert ms.sum == pytest.approx(s.sum * 1000, rel=1e-9)
        assert ms.max == pytest.approx(s.max * 1000, rel=1e-9)
    assert hist(metrics, "db.client.connections.use_time", legacy).sum >= 2 * HOLD * 1000


# -- reporting on and off --------------------------------------------------------


def test_metrics_false_reports_nothing(
    sqlite_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    engine = make_engine(sqlite_url, metrics=False)
    guard = poolguard.get_guard(engine)
    assert collect(reader) == {}
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    assert collect(reader) == {}
    assert guard.exporter is None
    assert guard.recorder.export_use is None


def test_unwrap_stops_reporting(sqlite_url: str, make_engine: EngineFactory) -> None:
    # A cumulative reader keeps a sync instrument's last point; a delta one shows news only.
    cumulative = InMemoryMetricReader()
    delta = InMemoryMetricReader(
        preferred_temporality=dict.fromkeys(
            (Counter, UpDownCounter, SDKHistogram, ObservableCounter,
             ObservableUpDownCounter, ObservableGauge),
            AggregationTemporality.DELTA,
        )
    )
    provider = MeterProvider(metric_readers=[cumulative, delta])
    try:
        engine = make_engine(sqlite_url, meter_provider=provider)
        pool = {POOL: poolguard.get_guard(engine).name}
        warm_up(engine)
        collect(cumulative)
        collect(delta)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        before = collect(cumulative)
        assert points(collect(delta), "db.client.connection.count", pool)
        assert hist(before, "db.client.connection.use_time", pool).count == WARM + 1

        poolguard.unwrap(engine)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        after = collect(cumulative)
        assert collect(delta) == {}
        for name, (kind, _) in SPEC.items():
            if kind != HISTOGRAM:
                assert points(after, name, pool) == [], name
            else:  # the last cumulative point, unchanged
                for old, new in zip(points(before, name, pool), points(after, name, pool),
                                    strict=True):
                    assert (new.attributes, new.count, new.sum) == (
                        old.attributes, old.count, old.sum)
    finally:
        provider.shutdown()


def test_global_provider_without_sdk_keeps_nothing(tmp_path: Path) -> None:
    # No meter_provider: the API's global one, which is a no-op until an
    # application installs an SDK (this test installs none).
    engines = [
        poolguard.wrap(sa.create_engine(f"sqlite:///{tmp_path / f'{i}.db'}"), name=f"global{i}")
        for i in range(2)
    ]
    try:
        for engine in engines:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            guard = poolguard.get_guard(engine)
            assert guard.exporter is not None
            assert guard.recorder.export_use is None
            assert guard.recorder.export_ops is None
        poolguard.unwrap(engines[0])
        assert poolguard.get_guard(engines[1]).exporter is not None
    finally:
        for engine in engines:
            engine.dispose()


def test_first_collection_reports_samples_since_wrap(
    sqlite_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    # The regression: samples were kept only from the first collection on, so
    # the first scrape after a busy start had no histograms at all.
    engine = make_engine(sqlite_url)
    guard = poolguard.get_guard(engine)
    for _ in range(100):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    assert guard.recorder.use.count == 100

    metrics = collect(reader)  # the first collection
    pool = {POOL: guard.name}
    assert hist(metrics, "db.client.connection.wait_time", pool).count == 100
    assert hist(metrics, "db.client.connection.use_time", pool).count == 100
    assert hist(metrics, "db.client.connection.create_time", pool).count == 1
    calls = value(metrics, "poolguard.query.calls",
                  {"poolguard.query.fingerprint": fingerprint("SELECT 1").id})
    assert calls == 100
    # Every statement timed since wrap() (the dialect's own set-up included).
    all_calls = sum(p.value for p in metrics["poolguard.query.calls"].data.data_points)
    duration = metrics["db.client.operation.duration"].data.data_points
    assert sum(p.count for p in duration) == all_calls >= 100


#: Run in a fresh interpreter: the global MeterProvider can be set once per process.
_GLOBAL_SDK_LATER = textwrap.dedent("""
    import json, sys
    import sqlalchemy as sa
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    import poolguard

    engine = poolguard.wrap(sa.create_engine(sys.argv[1]), name="late-sdk")
    guard = poolguard.get_guard(engine)
    engine.connect().close()
    kept_before = guard.recorder.export_use is not None  # no SDK yet: nothing kept
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    guard.scan()  # the periodic scan notices the SDK
    for _ in range(7):
        engine.connect().close()
    data = json.loads(reader.get_metrics_data().to_json())
    counts = {
        m["name"]: sum(p["count"] for p in m["data"]["data_points"])
        for rm in data["resource_metrics"] for sm in rm["scope_metrics"]
        for m in sm["metrics"] if m["name"].endswith(("wait_time", "use_time"))
    }
    print(json.dumps({"kept_before": kept_before, "counts": counts}))
""")


def test_global_sdk_installed_after_wrap_gets_samples_from_the_next_scan(
    sqlite_url: str,
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", _GLOBAL_SDK_LATER, sqlite_url],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kept_before"] is False
    # The checkouts after the scan, reported by the SDK's first collection.
    assert result["counts"] == {
        "db.client.connection.wait_time": 7, "db.client.connection.use_time": 7,
    }


def test_export_buffers_are_bounded_without_checkouts_or_collections(
    sqlite_url: str,
    make_engine: EngineFactory,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The regression: the bound was enforced by the scan, which runs only on
    # checkouts; one connection held while it ran statements grew the buffer
    # without limit.
    from poolguard import _recorder as recorder_module

    monkeypatch.setattr(recorder_module, "EXPORT_BUFFER_MAX", 10)
    engine = make_engine(sqlite_url)
    guard = poolguard.get_guard(engine)
    warm_up(engine)
    collect(reader)
    select = sa.text("SELECT 1 AS bounded")
    with engine.connect() as conn:
        for _ in range(25):
            conn.execute(select)
        assert len(guard.recorder.export_ops or ()) == 10
        with capture_events(logging.WARNING) as logged:
            metrics = collect(reader)
    # The newest 10 are reported; the 15 dropped are logged, once, by count.
    shape = {"poolguard.query.fingerprint": fingerprint("SELECT 1 AS bounded").id}
    assert value(metrics, "poolguard.query.calls", shape) == 25
    select_points = points(metrics, "db.client.operation.duration",
                           {"db.operation.name": "SELECT"})
    assert sum(p.count for p in select_points) == 10
    dropped = named(logged, "metrics.samples_dropped")
    assert len(dropped) == 1
    assert dropped[0]["samples"] == 15
    assert guard.recorder.export_ops is not None
    assert len(guard.recorder.export_ops) == 0
    # Nothing dropped since: the next collection logs nothing.
    with capture_events(logging.WARNING) as logged:
        collect(reader)
    assert named(logged, "metrics.samples_dropped") == []


def test_hot_path_makes_no_sdk_call_per_checkout(
    sqlite_url: str,
    make_engine: EngineFactory,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    record = _Histogram.record

    def counting(self: _Histogram, amount: float, *args: Any, **kwargs: Any) -> None:
        calls.append(self.name)
        record(self, amount, *args, **kwargs)

    monkeypatch.setattr(_Histogram, "record", counting)
    engine = make_engine(sqlite_url)
    pool = {POOL: poolguard.get_guard(engine).name}
    warm_up(engine)
    collect(reader)  # records the warm-up's samples, on this thread
    assert calls.count("db.client.connection.use_time") == WARM
    calls.clear()

    for _ in range(50):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    assert calls == []  # nothing per checkout or statement

    metrics = collect(reader)
    assert calls.count("db.client.connection.wait_time") == 50
    assert calls.count("db.client.connection.use_time") == 50
    assert calls.count("db.client.operation.duration") == 50
    assert len(calls) == 150
    assert hist(metrics, "db.client.connection.use_time", pool).count == WARM + 50


# -- several guards, one provider ----------------------------------------------------


def test_two_engines_on_one_provider_both_report(
    tmp_path: Path, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    first = make_engine(f"sqlite:///{tmp_path / 'first.db'}", name="first")
    second = make_engine(f"sqlite:///{tmp_path / 'second.db'}", name="second", pool_size=4)
    for engine in (first, second):
        warm_up(engine)
    collect(reader)
    for _ in range(2):
        first.connect().close()
    second.connect().close()
    metrics = collect(reader)

    for name, size, checkouts in (("first", 2, WARM + 2), ("second", 4, WARM + 1)):
        pool = {POOL: name}
        assert value(metrics, "db.client.connection.idle.max", pool) == size
        assert value(metrics, "db.client.connection.max", pool) == size + 1
        assert value(metrics, "db.client.connection.count", {**pool, STATE: "idle"}) == 1
        assert hist(metrics, "db.client.connection.wait_time", pool).count == checkouts
        assert hist(metrics, "db.client.connection.use_time", pool).count == checkouts


def test_a_failing_guard_does_not_hide_the_others(
    tmp_path: Path,
    make_engine: EngineFactory,
    reader: InMemoryMetricReader,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = make_engine(f"sqlite:///{tmp_path / 'broken.db'}", name="broken")
    make_engine(f"sqlite:///{tmp_path / 'fine.db'}", name="fine")

    def fail() -> None:
        raise RuntimeError("stats unavailable")

    monkeypatch.setattr(poolguard.get_guard(broken), "stats", fail)
    with caplog.at_level("ERROR", logger="poolguard"):
        metrics = collect(reader)
    assert value(metrics, "db.client.connection.max", {POOL: "fine"}) == 3
    assert points(metrics, "db.client.connection.max", {POOL: "broken"}) == []
    assert value(metrics, "poolguard.connection.leak_warnings", {POOL: "broken"}) == 0
    assert any("broken" in r.getMessage() for r in caplog.records)


def test_wrap_again_after_unwrap_reports_again(
    sqlite_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader,
    provider: MeterProvider,
) -> None:
    engine = make_engine(sqlite_url, name="again")
    pool = {POOL: "again"}
    warm_up(engine)
    collect(reader)
    poolguard.unwrap(engine)
    poolguard.wrap(engine, meter_provider=provider, name="again")
    collect(reader)  # the new guard's baseline
    for _ in range(3):
        engine.connect().close()
    metrics = collect(reader)
    assert value(metrics, "db.client.connection.count", {**pool, STATE: "idle"}) == 1
    # The first guard's warm-up (the same cumulative series), then the new guard's three.
    assert hist(metrics, "db.client.connection.wait_time", pool).count == WARM + 3


# -- wait_time counts every checkout once ----------------------------------------------


def test_wait_time_counts_a_checkout_granted_during_a_collection_once(
    sqlite_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    engine = make_engine(sqlite_url, pool_size=1, max_overflow=0, acquire_timeout=SAFETY_TIMEOUT)
    guard = poolguard.get_guard(engine)
    pool = {POOL: guard.name}
    granted, proceed = threading.Event(), threading.Event()

    class Stalling(pg_histogram.Histogram):
        """Stops the waiter between being granted a permit and recording its wait."""

        __slots__ = ()

        def add(self, value: float) -> None:
            granted.set()
            proceed.wait(SAFETY_TIMEOUT)
            super().add(value)

    guard.recorder.wait = Stalling()
    warm_up(engine)
    collect(reader)

    held = engine.connect()
    waiter = Waiter(engine)
    waiter.start()
    try:
        wait_until(lambda: guard.gate.waiting == 1, "a checkout waiting")
        time.sleep(HOLD)
        held.close()  # hands the permit to the waiter
        assert granted.wait(SAFETY_TIMEOUT)
        collect(reader)  # while the waiter's wait is not recorded yet
    finally:
        proceed.set()
    waiter.finish()
    metrics = collect(reader)
    wait = hist(metrics, "db.client.connection.wait_time", pool)
    assert wait.count == WARM + 2  # the holder's checkout and the waiter's, once each
    assert wait.min == 0.0
    assert wait.max >= HOLD
    assert wait.sum == wait.max


def test_meter_version_is_the_package_version(
    sqlite_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    # The distribution is sqlalchemy-poolguard: looking up "poolguard" in the
    # installed metadata finds nothing, or an unrelated project of that name.
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    data = reader.get_metrics_data()
    assert data is not None
    scopes = {(sm.scope.name, sm.scope.version) for rm in data.resource_metrics
              for sm in rm.scope_metrics}
    assert scopes == {("poolguard", poolguard.__version__)}
