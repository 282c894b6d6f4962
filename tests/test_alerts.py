"""Threshold alerts: the pure state machine, and the guard's utilisation and wait-time alerts.

:class:`poolguard._alerts.Alert` is fed explicit times (no sleeping): it fires once a
value has stayed at or above the threshold for ``hold_for`` seconds and clears once it
has stayed below ``clear_ratio`` x threshold as long. The guard evaluates its alerts in
:meth:`Guard.scan`, which takes ``now`` on the ``perf_counter`` clock; the tests turn the
periodic scan off (``guard.scanner.next_scan = inf``) and call ``scan`` with synthetic times.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import poolguard
from _support import wait_until
from poolguard import AlertEvent
from poolguard._alerts import Alert
from poolguard.testing import capture_events

#: Events go to the stdlib logger: structlog not configured (see conftest).
pytestmark = pytest.mark.usefixtures("structlog_unconfigured")

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from _support import EngineFactory
    from poolguard import Guard

JOIN_TIMEOUT = 15.0


# -- the state machine ----------------------------------------------------------------------


def _feed(alert: Alert, readings: list[tuple[float, float]]) -> list[tuple[float, bool]]:
    """Feed (now, value) readings; return (now, fired?) of each change."""
    events = []
    for now, value in readings:
        changed = alert.update(value, now)
        if changed is not None:
            events.append((now, changed))
    return events


def test_fires_only_after_the_value_stayed_at_or_above_threshold_for_hold_for() -> None:
    alert = Alert("utilization", threshold=0.5, hold_for=5.0)
    assert alert.update(0.49, 0.0) is None
    assert alert.update(0.5, 1.0) is None  # at the threshold counts: the timer starts
    assert alert.update(0.9, 3.0) is None
    assert alert.update(0.7, 5.999) is None  # 4.999 s above: not yet
    assert not alert.firing
    assert alert.update(0.6, 6.0) is True  # 5 s above
    assert alert.firing
    # Staying above raises nothing more.
    assert _feed(alert, [(t, 1.0) for t in (7.0, 20.0, 1000.0)]) == []
    assert alert.firing


def test_a_dip_below_the_threshold_resets_the_timer() -> None:
    alert = Alert("utilization", threshold=0.5, hold_for=5.0)
    assert alert.update(0.8, 0.0) is None
    assert alert.update(0.8, 4.0) is None
    assert alert.update(0.49, 4.5) is None  # one reading below: start over
    assert alert.update(0.8, 5.0) is None  # 5 s after the first reading, but the timer is new
    assert alert.update(0.8, 9.999) is None
    assert not alert.firing
    assert alert.update(0.8, 10.0) is True


def test_clears_only_after_staying_below_clear_ratio_times_threshold_for_hold_for() -> None:
    alert = Alert("utilization", threshold=0.5, hold_for=5.0, clear_ratio=0.8)
    assert alert.update(1.0, 0.0) is None
    assert alert.update(1.0, 5.0) is True
    # Below the threshold but not below 0.8 x 0.5 = 0.4: still firing, however long.
    assert _feed(alert, [(t, v) for t, v in ((6.0, 0.45), (60.0, 0.41), (600.0, 0.4))]) == []
    assert alert.firing
    # Below the clear level: it must stay there for hold_for.
    assert alert.update(0.39, 601.0) is None
    assert alert.update(0.0, 605.999) is None
    assert alert.firing
    assert alert.update(0.1, 606.0) is False
    assert not alert.firing
    # Cleared: staying low raises nothing more.
    assert _feed(alert, [(t, 0.0) for t in (607.0, 700.0)]) == []


def test_a_rise_above_the_clear_level_resets_the_clear_timer() -> None:
    alert = Alert("wait_time", threshold=1.0, hold_for=2.0, clear_ratio=0.5)
    assert alert.update(1.0, 0.0) is None
    assert alert.update(1.0, 2.0) is True
    assert alert.update(0.1, 3.0) is None  # clear timer starts
    assert alert.update(0.5, 4.0) is None  # not below 0.5: reset
    assert alert.update(0.1, 4.5) is None  # clear timer starts again
    assert alert.update(0.1, 6.0) is None  # 3 s after the first low reading, 1.5 s after the new
    assert alert.firing
    assert alert.update(0.1, 6.5) is False


def test_hold_for_zero_changes_on_the_first_reading() -> None:
    alert = Alert("utilization", threshold=0.5, hold_for=0.0)
    assert alert.update(0.5, 100.0) is True
    assert alert.update(0.39, 100.0) is False
    assert alert.update(0.5, 100.0) is True


def test_flapping_around_the_threshold_raises_no_events() -> None:
    # Crossing the threshold every second, with hold_for 5 s: never fires.
    alert = Alert("utilization", threshold=0.5, hold_for=5.0)
    readings = [(float(t), 0.45 if t % 2 else 0.55) for t in range(200)]  # ends low
    assert _feed(alert, readings) == []
    assert not alert.firing
    # Once firing, the same flapping (never under 0.8 x threshold) never clears it.
    assert _feed(alert, [(200.0 + t, 0.9) for t in range(6)]) == [(205.0, True)]
    readings = [(300.0 + t, 0.55 if t % 2 else 0.45) for t in range(200)]
    assert _feed(alert, readings) == []
    assert alert.firing
    # Flapping across the clear level with hold_for 5 s: still no clear.
    readings = [(600.0 + t, 0.39 if t % 2 else 0.41) for t in range(200)]
    assert _feed(alert, readings) == []
    assert alert.firing


_readings = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=3.0),  # seconds since the previous reading
        st.floats(min_value=0.0, max_value=2.0),  # value
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(
    threshold=st.floats(min_value=0.05, max_value=1.5),
    hold_for=st.floats(min_value=0.0, max_value=5.0),
    clear_ratio=st.floats(min_value=0.1, max_value=1.0),
    steps=_readings,
)
def test_events_strictly_alternate_fire_and_clear(
    threshold: float, hold_for: float, clear_ratio: float, steps: list[tuple[float, float]]
) -> None:
    alert = Alert("x", threshold, hold_for, clear_ratio)
    now = 0.0
    events: list[bool] = []
    run_start: float | None = None  # when the readings began to point the other way
    for dt, value in steps:
        now += dt
        flipping = value < threshold * clear_ratio if alert.firing else value >= threshold
        run_start = (now if run_start is None else run_start) if flipping else None
        changed = alert.update(value, now)
        if changed is None:
            continue
        # A change only after the condition held, unbroken, for hold_for.
        assert flipping
        assert run_start is not None
        assert now - run_start >= hold_for
        run_start = None
        events.append(changed)
        assert alert.firing is changed
    assert events[:1] in ([], [True])  # the first event is a fire
    assert all(a != b for a, b in itertools.pairwise(events))  # never the same twice in a row
    assert alert.firing is (bool(events) and events[-1])


# -- through the guard ----------------------------------------------------------------------




def _manual_scans(engine: Engine) -> Guard:
    """The engine's guard, with the periodic scan off: only the test's scan() calls run."""
    guard = poolguard.get_guard(engine)
    guard.scanner.next_scan = math.inf
    return guard


def _named(events: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == event]


def test_utilization_alert_fires_once_and_clears_with_callbacks(
    sqlite_url: str, make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="poolguard")  # the callbacks' failures
    engine = make_engine(sqlite_url, 2, name="alerts", alert_utilization=0.5, alert_for=0,
                         alert_wait_time=None)
    guard = _manual_scans(engine)
    received: list[AlertEvent] = []

    def boom(event: AlertEvent) -> None:
        raise RuntimeError("a broken alert callback")

    guard.on_alert(boom)  # registered first: must not keep the next one from running
    assert guard.on_alert(received.append) == received.append  # usable as a decorator

    t0 = perf_counter()
    with capture_events() as events:
        first, second = engine.connect(), engine.connect()
        try:
            for i in range(5):
                guard.scan(t0 + i)
            assert guard.gate.in_use == 2
        finally:
            first.close()
            second.close()
        for i in range(5, 10):
            guard.scan(t0 + i)

    alerts = _named(events, "alert.utilization")
    assert [(e["level"], e["state"]) for e in alerts] == [
        ("warning", "firing"),
        ("info", "cleared"),
    ]
    fired, cleared = alerts
    assert fired["pool"] == "alerts"
    assert (fired["value"], fired["threshold"], fired["in_use"], fired["capacity"]) == (
        1.0, 0.5, 2, 2
    )
    assert (cleared["value"], cleared["in_use"]) == (0.0, 0)
    assert received == [
        AlertEvent(pool="alerts", name="utilization", firing=True, value=1.0, threshold=0.5,
                   since=t0),
        AlertEvent(pool="alerts", name="utilization", firing=False, value=0.0, threshold=0.5,
                   since=t0 + 5),
    ]
    # The broken callback was logged, once per change, and ran on.
    failures = [r for r in caplog.records if r.getMessage().startswith("alert callback")]
    assert len(failures) == 2
    assert all(r.levelno == logging.ERROR and r.exc_info for r in failures)
    assert all("boom" in r.getMessage() for r in failures)
    # Firing utilisation also logs the holders report.
    (exhausted,) = _named(events, "pool.exhausted")
    assert exhausted["reason"] == "utilization"
    assert exhausted["top_holders"][0]["count"] == 2


def test_utilization_alert_waits_alert_for_through_the_guard(
    sqlite_url: str, make_engine: EngineFactory
) -> None:
    engine = make_engine(sqlite_url, 2, alert_utilization=0.5, alert_for=3,
                         alert_wait_time=None)
    guard = _manual_scans(engine)
    received: list[AlertEvent] = []
    guard.on_alert(received.append)
    t0 = perf_counter()
    with capture_events() as events:
        conn = engine.connect()  # 1 of 2: at the threshold
        try:
            guard.scan(t0)
            guard.scan(t0 + 2.9)
            assert received == []
            guard.scan(t0 + 3.0)
            assert [e.firing for e in received] == [True]
        finally:
            conn.close()
        guard.scan(t0 + 4.0)
        guard.scan(t0 + 6.9)
        assert [e.firing for e in received] == [True]
        guard.scan(t0 + 7.0)
    assert [(e.firing, e.since) for e in received] == [(True, t0 + 3.0), (False, t0 + 7.0)]
    assert len(_named(events, "alert.utilization")) == 2


@pytest.mark.timing
def test_wait_time_alert_fires_from_a_wait_measured_by_the_gate(
    sqlite_url: str, make_engine: EngineFactory
) -> None:
    engine = make_engine(sqlite_url, 1, alert_wait_time=0.05, alert_for=0,
                         alert_utilization=None, acquire_timeout=30)
    guard = _manual_scans(engine)
    received: list[AlertEvent] = []
    guard.on_alert(received.append)
    t0 = perf_counter()

    # A checkout that did not wait: nothing to report.
    engine.connect().close()
    guard.scan(t0)
    assert received == []

    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            engine.connect().close()
        except BaseException as exc:
            errors.append(exc)

    holder = engine.connect()
    thread = threading.Thread(target=waiter, daemon=True)
    try:
        thread.start()
        wait_until(lambda: guard.gate.waiting == 1, "the second checkout to wait at the gate")
        time.sleep(0.1)  # the wait lasts at least this long
    finally:
        holder.close()
        thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive()
    assert errors == []
    assert guard.stats().waits == 1
    assert received == []  # nothing evaluates the alert until a scan

    with capture_events() as events:
        guard.scan(t0 + 1)
        (fired,) = received
        assert (fired.name, fired.firing, fired.threshold) == ("wait_time", True, 0.05)
        assert fired.value >= 0.1  # the wait the gate measured
        guard.scan(t0 + 2)  # no wait since the last scan: cleared
    assert [e.firing for e in received] == [True, False]
    assert received[1].value == 0.0
    records = _named(events, "alert.wait_time")
    assert [(e["level"], e["state"]) for e in records] == [
        ("warning", "firing"),
        ("info", "cleared"),
    ]


@pytest.mark.timing
def test_wait_time_alert_counts_a_wait_that_timed_out(
    sqlite_url: str, make_engine: EngineFactory
) -> None:
    engine = make_engine(sqlite_url, 1, alert_wait_time=0.05, alert_for=0,
                         alert_utilization=None, acquire_timeout=0.1)
    guard = _manual_scans(engine)
    received: list[AlertEvent] = []
    guard.on_alert(received.append)
    with engine.connect():
        with pytest.raises(poolguard.PoolTimeout):
            engine.connect()
    guard.scan(perf_counter())
    assert [(e.name, e.firing) for e in received] == [("wait_time", True)]
    assert received[0].value >= 0.1
