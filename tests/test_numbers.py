"""The numbers poolguard reports agree with each other and with what happened.

Quantiles stay within what was observed; the stats snapshot, the histogram
and the OpenTelemetry export count the same waits; ``poolguard.pool.exhausted``
counts the events it is named after. Workloads run against real databases;
the histogram's arithmetic is checked on its own.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

import poolguard
from _support import EngineFactory, named, wait_until
from poolguard._histogram import BOUNDS, Histogram

if TYPE_CHECKING:

    from sqlalchemy.engine import Engine

POOL = "db.client.connection.pool.name"
#: Upper bound of any wait for another thread: it only stops a broken test from hanging.
SAFETY_TIMEOUT = 10.0


# -- quantiles stay within what was observed ---------------------------------------


def test_zeros_give_zero_quantiles() -> None:
    hist = Histogram()
    snap = hist.snapshot(extra_zeros=100)
    assert (snap.count, snap.sum, snap.max) == (100, 0.0, 0.0)
    assert (snap.p50, snap.p95, snap.p99) == (0.0, 0.0, 0.0)
    for _ in range(100):
        hist.add(0.0)
    snap = hist.snapshot()
    assert (snap.p50, snap.p95, snap.p99) == (0.0, 0.0, 0.0)


def test_quantiles_among_zeros_are_zero_and_the_rest_within_max() -> None:
    hist = Histogram()
    for _ in range(10):
        hist.add(1.0)
    snap = hist.snapshot(extra_zeros=90)  # 90 checkouts that did not wait, 10 that waited 1 s
    assert snap.p50 == 0.0
    assert 0.0 < snap.p95 <= 1.0
    assert snap.p99 == 1.0  # the bucket's interpolation, clamped to the largest value seen


def test_quantiles_never_leave_the_observed_range() -> None:
    # One value in the upper part of its bucket: interpolation alone would
    # report values below it (and above it, for the higher quantiles).
    value = next(b for b in BOUNDS if b > 1.0) * 0.99
    hist = Histogram(track_min=True)
    for _ in range(1000):
        hist.add(value)
    for q in (0.01, 0.5, 0.95, 0.99, 1.0):
        assert hist.quantile(q) == value
    # Without a tracked minimum (inline hot-path updates), still never above max.
    inline = Histogram()
    for _ in range(1000):
        inline.add(value)
    assert all(inline.quantile(q) <= value for q in (0.01, 0.5, 0.99))


def test_merged_summary_covers_every_part() -> None:
    granted, failed = Histogram(track_min=True), Histogram(track_min=True)
    for v in (0.001, 0.002):
        granted.add(v)
    failed.add(0.5)
    snap = granted.merged((failed,), 3)
    assert snap.count == 6
    assert snap.sum == pytest.approx(0.503)
    assert snap.max == 0.5
    assert snap.p50 == 0.0  # 3 of 6 are zeros
    assert 0.001 <= snap.p95 <= 0.5


def test_checkouts_that_never_waited_report_zero_wait_percentiles(db_url: str) -> None:
    # The regression: 100 checkouts that never waited gave max=0.0 p50=1.25e-05.
    engine = poolguard.wrap(sa.create_engine(db_url, pool_size=2, max_overflow=0),
                            metrics=False)
    try:
        for _ in range(100):
            engine.connect().close()
        wait = poolguard.get_guard(engine).stats().wait_time
        assert wait.count == 100
        assert (wait.max, wait.p50, wait.p95, wait.p99) == (0.0, 0.0, 0.0, 0.0)
    finally:
        engine.dispose()


# -- one meaning of "wait time" everywhere ----------------------------------------------


@pytest.fixture
def make_engine(make_engine: EngineFactory, provider: MeterProvider) -> EngineFactory:
    """Guarded one-connection engines reporting to ``provider``, no utilization alert."""
    return make_engine.using(meter_provider=provider, alert_utilization=None)


def _wait_point(reader: InMemoryMetricReader, name: str) -> HistogramDataPoint:
    data = reader.get_metrics_data()
    assert data is not None
    found = [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "db.client.connection.wait_time"
        for p in m.data.data_points
        if (p.attributes or {}).get(POOL) == name
    ]
    assert len(found) == 1
    point = found[0]
    assert isinstance(point, HistogramDataPoint)
    return point


def _checkout_in_thread(engine: Engine) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            engine.connect().close()
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.timing
def test_timed_out_waits_count_in_the_histogram_and_the_total_alike(
    db_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    # The regression: wait_time_total had the timed-out waits, wait_time.sum did not.
    timeout = 0.1
    engine = make_engine(db_url, acquire_timeout=timeout)
    guard = poolguard.get_guard(engine)
    with engine.connect():
        with pytest.raises(poolguard.PoolTimeout):
            engine.connect()  # waits its whole timeout
        waiter, errors = _checkout_in_thread(engine)
        wait_until(lambda: guard.gate.waiting == 1, "the thread to wait at the gate")
    waiter.join(SAFETY_TIMEOUT)  # granted once the holder returned its connection
    assert not waiter.is_alive()
    assert errors == []

    stats = guard.stats()
    assert stats.timeouts == 1
    assert stats.waits == 2
    wait = stats.wait_time
    assert wait.count == 3  # the holder (no wait), the timed-out one, the granted one
    assert stats.wait_time_total == wait.sum
    assert stats.wait_time_max == wait.max
    assert wait.sum >= timeout
    assert wait.max >= timeout
    point = _wait_point(reader, guard.name)
    assert point.count == wait.count
    assert point.sum == pytest.approx(wait.sum, rel=1e-9)
    assert point.max == pytest.approx(wait.max, rel=1e-9)


@pytest.mark.timing
def test_a_queue_delay_shed_is_a_wait_and_a_rejection_not_a_timeout(
    sqlite_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader
) -> None:
    engine = make_engine(sqlite_url, codel=True, acquire_timeout=SAFETY_TIMEOUT)
    guard = poolguard.get_guard(engine)
    assert guard.gate.admission is not None
    codel = guard.gate.admission.codel
    assert codel is not None
    with engine.connect():
        codel.overloaded = True  # a standing queue: waits are cut to 2 x target
        with pytest.raises(poolguard.LoadShed) as shed:
            engine.connect()
    assert shed.value.reason == "queue_delay"
    stats = guard.stats()
    assert stats.timeouts == 0
    assert guard.rejections == {("queue_delay", "normal"): 1}
    assert stats.wait_time.count == 2
    assert stats.wait_time_total == stats.wait_time.sum >= 2 * codel.target
    point = _wait_point(reader, guard.name)
    assert point.count == 2
    assert point.sum == pytest.approx(stats.wait_time.sum, rel=1e-9)


# -- poolguard.pool.exhausted counts pool.exhausted events --------------------------------


def test_pool_exhausted_counts_the_events_logged(
    db_url: str, make_engine: EngineFactory, reader: InMemoryMetricReader,
    events: list[dict[str, Any]],
) -> None:
    # The regression: the counter read 49 while 3 pool.exhausted events were logged.
    engine = make_engine(db_url, acquire_timeout=0)
    guard = poolguard.get_guard(engine)
    with engine.connect():
        for _ in range(5):
            with pytest.raises(poolguard.PoolTimeout):
                engine.connect()
    logged = named(events, "pool.exhausted")
    assert len(logged) == 1  # one per 10 s
    assert guard.exhaustion_events == 1
    assert guard.stats().timeouts == 5
    data = reader.get_metrics_data()
    assert data is not None
    (value,) = [
        p.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "poolguard.pool.exhausted"
        for p in m.data.data_points
        if (p.attributes or {}).get(POOL) == guard.name
    ]
    assert value == len(logged)
