"""poolguard.testing.capture_events: every event as a dict, whatever the logging set-up."""

from __future__ import annotations

import doctest
import logging
import threading
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
import structlog

import poolguard.testing
from poolguard._log import EventLog
from poolguard.testing import capture_events

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

    from _support import EngineFactory


def _select(engine: Engine, sql: str = "SELECT 1") -> None:
    with engine.connect() as conn:
        conn.execute(sa.text(sql))


@pytest.fixture
def structlog_to_list() -> Iterator[list[dict[str, Any]]]:
    """structlog configured by the "application": its processors collect into a list."""
    seen: list[dict[str, Any]] = []

    def keep(_logger: Any, _method: str, event_dict: dict[str, Any]) -> str:
        seen.append(dict(event_dict))
        raise structlog.DropEvent

    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    saved["processors"] = list(saved["processors"])
    structlog.configure(
        processors=[structlog.processors.add_log_level, keep],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )
    yield seen
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


@pytest.mark.usefixtures("structlog_unconfigured")
def test_stdlib_set_up_events_are_captured_whatever_the_logger_level_and_not_emitted(
    sqlite_url: str, make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="poolguard")  # the app wants errors only
    engine = make_engine(sqlite_url, slow_query_threshold=0)
    guard = poolguard.get_guard(engine)
    with capture_events() as events:
        _select(engine, "SELECT 7")
        guard.log_top_queries(1)
    slow = [e for e in events if e["event"] == "query.slow"]
    assert [(e["level"], e["statement"], e["pool"]) for e in slow] == [
        ("warning", "SELECT ?", guard.name)
    ]
    (top,) = [e for e in events if e["event"] == "queries.top"]
    assert top["level"] == "info"
    assert top["by"] == "total_time"
    assert caplog.records == []  # captured, not passed on
    # Restored on exit: the application's set-up sees the next event again.
    caplog.set_level(logging.WARNING, logger="poolguard")
    _select(engine, "SELECT 8")
    assert [r.poolguard["event"] for r in caplog.records] == ["query.slow"]  # type: ignore[attr-defined]


def test_structlog_set_up_events_are_captured_and_not_emitted(
    sqlite_url: str, make_engine: EngineFactory, structlog_to_list: list[dict[str, Any]]
) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=0)
    guard = poolguard.get_guard(engine)
    with capture_events(level=logging.INFO) as events:
        _select(engine)
        guard.log_top_queries(1)  # INFO: below the application's WARNING filter
    assert [e["event"] for e in events] == ["query.slow", "queries.top"]
    assert structlog_to_list == []
    # Restored on exit: the application's structlog gets the next event.
    _select(engine, "SELECT 2")
    assert [(e["event"], e["level"], e["pool"]) for e in structlog_to_list] == [
        ("query.slow", "warning", guard.name)
    ]


@pytest.mark.usefixtures("structlog_unconfigured")
def test_level_filters_the_capture(sqlite_url: str, make_engine: EngineFactory) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=0)
    with capture_events(level=logging.WARNING) as warnings:
        _select(engine)
        poolguard.get_guard(engine).log_top_queries(1)
    assert [e["event"] for e in warnings] == ["query.slow"]


@pytest.mark.usefixtures("structlog_unconfigured")
def test_debug_capture_turns_on_debug_events_of_an_existing_guard_at_once(
    sqlite_url: str, make_engine: EngineFactory
) -> None:
    engine = make_engine(sqlite_url, query_log_sample_rate=1.0)
    guard = poolguard.get_guard(engine)
    _select(engine)
    assert guard.log.debug is False  # DEBUG is off in this set-up
    with capture_events(level=logging.INFO) as info:
        _select(engine)
    assert info == []  # INFO and up: no per-statement events, debug stays off
    with capture_events() as events:
        assert guard.log.debug is True  # no waiting for the once-a-second refresh
        _select(engine, "SELECT 2")
    assert [(e["event"], e["level"], e["statement"]) for e in events] == [
        ("query", "debug", "SELECT ?")
    ]
    assert guard.log.debug is False
    assert "debug" not in EventLog.__dict__


@pytest.mark.usefixtures("structlog_unconfigured")
def test_nested_captures_and_other_threads(sqlite_url: str, make_engine: EngineFactory) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=0)
    original = EventLog.__dict__["emit"]
    with capture_events() as outer:
        _select(engine, "SELECT 1")
        with capture_events() as inner:
            worker = threading.Thread(target=_select, args=(engine, "SELECT 2"))
            worker.start()
            worker.join()
        _select(engine, "SELECT 3")
        assert EventLog.__dict__["emit"] is not original
    assert EventLog.__dict__["emit"] is original
    slow_outer = [e["statement"] for e in outer if e["event"] == "query.slow"]
    slow_inner = [e["statement"] for e in inner if e["event"] == "query.slow"]
    assert len(slow_outer) == 3
    assert len(slow_inner) == 1
    # Each capture has its own dicts: changing one does not change the other.
    inner[0]["event"] = "changed"
    assert all(e["event"] != "changed" for e in outer)


def test_capture_is_restored_when_the_block_raises() -> None:
    original = EventLog.__dict__["emit"]
    with pytest.raises(RuntimeError, match="boom"), capture_events():
        raise RuntimeError("boom")
    assert EventLog.__dict__["emit"] is original
    assert "debug" not in EventLog.__dict__


def test_docstring_example_runs() -> None:
    result = doctest.testmod(poolguard.testing, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
