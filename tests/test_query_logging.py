"""Per-statement events and query stats on real databases.

Where events go (the stdlib logger ``poolguard`` unless the application
configured structlog, and never stdout/stderr uninvited), what ``query.slow``,
``query`` and ``query.error`` carry, sampling, ``Guard.top_queries()`` and
``explain_slow_queries``.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
import structlog

import poolguard
from _support import named
from poolguard._fingerprint import fingerprint

#: Events go to the stdlib logger: structlog not configured (see conftest).
pytestmark = pytest.mark.usefixtures("structlog_unconfigured")

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from _support import EngineFactory
    from poolguard import Guard


# -- fixtures and helpers ----------------------------------------------------------------




# make_engine (conftest): one connection, so that temporary tables stay visible to
# every checkout.


def _run(engine: Engine, sql: str, params: dict[str, Any] | list[dict[str, Any]] | None = None
         ) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def _records(caplog: pytest.LogCaptureFixture, event: str | None = None) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records
        if r.name == "poolguard" and (event is None or r.poolguard["event"] == event)
    ]


def _capture_structlog(level: int = logging.DEBUG) -> list[dict[str, Any]]:
    """Configure structlog to keep every event dict (with its level) in the returned list."""
    captured: list[dict[str, Any]] = []

    def keep(logger: Any, method: str, event_dict: Any) -> Any:
        captured.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(
        processors=[structlog.processors.add_log_level, keep],
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )
    return captured


def _here() -> tuple[str, str, int]:
    """(path as poolguard shows it, function name, line) of the caller's next line."""
    frame = inspect.currentframe()
    assert frame is not None
    assert frame.f_back is not None
    caller = frame.f_back
    return os.path.relpath(caller.f_code.co_filename), caller.f_code.co_name, caller.f_lineno + 1


# -- (a) structlog not configured: the stdlib logger, and silence by default ---------------


def test_unconfigured_structlog_sends_events_to_stdlib_logger(
    sqlite_url: str, make_engine: EngineFactory, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard")
    engine = make_engine(sqlite_url, slow_query_threshold=0, name="stdlib-pool")
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1 AS one")).all()

    (record,) = [r for r in _records(caplog, "query.slow") if r.poolguard["statement"] ==
                 "SELECT ? AS one"]
    assert record.levelno == logging.WARNING
    event = record.poolguard
    assert isinstance(event, dict)
    assert event["event"] == "query.slow"
    assert event["pool"] == "stdlib-pool"
    assert event["fingerprint"] == fingerprint("SELECT 1 AS one").id
    # The message is the same event, rendered as "event key=value ...".
    message = record.getMessage()
    assert message.startswith("query.slow pool=stdlib-pool fingerprint=" + event["fingerprint"])
    assert "statement='SELECT ? AS one'" in message
    assert capsys.readouterr() == ("", "")


def test_nothing_is_printed_when_the_application_configured_no_logging(
    sqlite_url: str, make_engine: EngineFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    pg_logger = logging.getLogger("poolguard")
    seen: list[logging.LogRecord] = []

    def spy(record: logging.LogRecord) -> bool:  # a filter, not a handler
        seen.append(record)
        return True

    root.handlers.clear()  # as in a program that never configured logging
    pg_logger.addFilter(spy)
    try:
        # Control: in this state a WARNING from a logger without handlers of its
        # own reaches stderr through logging.lastResort, and capsys sees it.
        logging.getLogger("poolguard_test_control").warning("control line")
        control = capsys.readouterr()
        assert "control line" in control.err

        engine = make_engine(sqlite_url, slow_query_threshold=0, leak_threshold=0,
                             acquire_timeout=0)
        guard = poolguard.get_guard(engine)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).all()
            with pytest.raises(sa.exc.OperationalError):
                conn.execute(sa.text("SELECT * FROM no_such_table"))
            guard.scan()  # connection.held_too_long
            with pytest.raises(poolguard.PoolTimeout):
                engine.connect()  # pool.exhausted
    finally:
        pg_logger.removeFilter(spy)
        root.handlers[:] = saved_handlers

    # The WARNING events were emitted (query.error is INFO: below the default level).
    events = {r.poolguard["event"] for r in seen}
    assert {"query.slow", "connection.held_too_long", "pool.exhausted"} <= events
    assert capsys.readouterr() == ("", "")


# -- (b) structlog configured: events go through it, with the pool bound -------------------


def test_configured_structlog_receives_events_and_stdlib_gets_none(
    sqlite_url: str, make_engine: EngineFactory, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG, logger="poolguard")
    engine = make_engine(sqlite_url, slow_query_threshold=None, name="slog-pool",
                         query_log_sample_rate=1.0)
    guard = poolguard.get_guard(engine)

    captured = _capture_structlog(logging.DEBUG)
    guard.log.refresh()
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 2 AS two")).all()
    poolguard.wrap(engine, slow_query_threshold=0, name="slog-pool")  # now all are slow
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 3 AS three")).all()

    queries = [e for e in captured if e["event"] == "query" and e["statement"] == "SELECT ? AS two"]
    slow = [e for e in captured
            if e["event"] == "query.slow" and e["statement"] == "SELECT ? AS three"]
    assert len(queries) == 1
    assert len(slow) == 1
    assert queries[0]["level"] == "debug"
    assert slow[0]["level"] == "warning"
    for event in (queries[0], slow[0]):
        assert event["pool"] == "slog-pool"
        assert {"fingerprint", "statement", "summary", "duration_ms", "rows", "wait_ms",
                "tag"} <= set(event)
    assert _records(caplog) == []
    assert capsys.readouterr() == ("", "")


def test_refresh_follows_the_logging_set_up(
    sqlite_url: str, make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolguard")
    engine = make_engine(sqlite_url, slow_query_threshold=0)
    guard = poolguard.get_guard(engine)

    def run(tag: str) -> None:
        with engine.connect() as conn:
            conn.execute(sa.text(f"SELECT 1 AS {tag}")).all()

    run("first")  # structlog not configured: stdlib
    captured = _capture_structlog()
    guard.log.refresh()
    run("second")  # structlog
    structlog.reset_defaults()
    guard.log.refresh()
    run("third")  # stdlib again

    stdlib = {r.poolguard["statement"] for r in _records(caplog, "query.slow")}
    via_structlog = {e["statement"] for e in captured if e["event"] == "query.slow"}
    assert {"SELECT ? AS first", "SELECT ? AS third"} <= stdlib
    assert "SELECT ? AS second" not in stdlib
    assert via_structlog == {"SELECT ? AS second"}


def test_structlog_filtering_above_debug_turns_query_events_off(
    sqlite_url: str, make_engine: EngineFactory
) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=None, query_log_sample_rate=1.0)
    guard = poolguard.get_guard(engine)
    captured = _capture_structlog(logging.INFO)
    guard.log.refresh()
    assert guard.log.debug is False
    with engine.connect() as conn:
        for _ in range(5):
            conn.execute(sa.text("SELECT 1")).all()
        guard.log_top_queries()  # an INFO event gets through
    assert [e["event"] for e in captured] == ["queries.top"]


def test_structlog_without_a_level_filter_gets_no_query_events_by_default(
    db_url: str, make_engine: EngineFactory
) -> None:
    # The regression: structlog configured the usual way (no level filter)
    # got a DEBUG query event for every statement the application ran.
    engine = make_engine(db_url, slow_query_threshold=0.5)
    guard = poolguard.get_guard(engine)
    captured: list[dict[str, Any]] = []

    def keep(logger: Any, method: str, event_dict: Any) -> Any:
        captured.append(dict(event_dict))
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.processors.add_log_level, keep])
    guard.log.refresh()
    assert guard.log.debug is True  # DEBUG passes: only the option keeps query events off
    with engine.connect() as conn:
        for _ in range(20):
            conn.execute(sa.text("SELECT 1 AS everyday")).all()
        with pytest.raises(sa.exc.DBAPIError):
            conn.execute(sa.text("SELECT * FROM no_such_table_here"))
    poolguard.wrap(engine, slow_query_threshold=0)  # every statement is slow now
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 2 AS slow")).all()
    events = [e["event"] for e in captured]
    assert "query" not in events
    assert events.count("query.error") == 1  # slow and failing statements still log
    assert [e["statement"] for e in captured if e["event"] == "query.slow"] == ["SELECT ? AS slow"]
    # Stats count every statement whatever the logging.
    (everyday,) = [q for q in guard.top_queries(100) if q.statement == "SELECT ? AS everyday"]
    assert everyday.calls == 20

    # Turned on, every statement logs query at DEBUG.
    poolguard.wrap(engine, slow_query_threshold=None, query_log_sample_rate=1.0)
    with engine.connect() as conn:
        for _ in range(3):
            conn.execute(sa.text("SELECT 3 AS wanted")).all()
    wanted = [e for e in captured
              if e["event"] == "query" and e["statement"] == "SELECT ? AS wanted"]
    assert len(wanted) == 3
    assert {e["level"] for e in wanted} == {"debug"}


# -- (c) slow statements -------------------------------------------------------------------


def test_slow_query_event_carries_every_field(
    db_url: str, make_engine: EngineFactory, events: list[dict[str, Any]]
) -> None:
    backend = sa.make_url(db_url).get_backend_name()
    if backend == "sqlite":  # no sleep function: a threshold of 0 makes every statement slow
        threshold, sql, shape = 0.0, "SELECT v FROM slow_t WHERE id = :id", (
            "SELECT v FROM slow_t WHERE id = ?")
    elif backend == "postgresql":
        threshold, sql, shape = 0.1, "SELECT v, pg_sleep(:s) FROM slow_t WHERE id = :id", (
            "SELECT v, pg_sleep(?) FROM slow_t WHERE id = ?")
    else:
        threshold, sql, shape = 0.1, "SELECT v, SLEEP(:s) FROM slow_t WHERE id = :id", (
            "SELECT v, SLEEP(?) FROM slow_t WHERE id = ?")
    engine = make_engine(db_url, slow_query_threshold=threshold, name="slow-pool")
    _run(engine, "CREATE TEMPORARY TABLE slow_t (id INTEGER PRIMARY KEY, v VARCHAR(20))")
    _run(engine, "INSERT INTO slow_t (id, v) VALUES (:id, :v)", {"id": 1, "v": "a"})

    with poolguard.request(tag="login"), engine.connect() as conn:
        path, function, line = _here()
        conn.execute(sa.text(sql), {"id": 1, "s": 0.2}).all()

    records = [e for e in named(events, "query.slow") if e["statement"] == shape]
    assert len(records) == 1
    event = records[0]
    assert event["level"] == "warning"
    assert event["pool"] == "slow-pool"
    assert event["fingerprint"] == fingerprint(shape).id
    assert event["summary"] == "SELECT slow_t"
    assert event["threshold_ms"] == pytest.approx(threshold * 1000)
    assert event["duration_ms"] >= event["threshold_ms"]
    assert event["rows"] == (None if backend == "sqlite" else 1)  # sqlite3: rowcount -1
    assert event["wait_ms"] == 0.0
    assert event["tag"] == "login"
    assert event["site"] == f"{path}:{line} in {function}"
    assert "parameters" not in event


def test_slow_query_threshold_none_is_accepted() -> None:
    # Documented as the way to turn query.slow off, in code and environment.
    assert poolguard.Config(slow_query_threshold=None).slow_query_threshold is None
    env = poolguard.Config.from_env({"POOLGUARD_SLOW_QUERY_THRESHOLD": "none"})
    assert env.slow_query_threshold is None
    with pytest.raises(ValueError, match="slow_query_threshold"):
        poolguard.Config(slow_query_threshold=-1)


def test_no_slow_events_without_a_threshold(
    postgresql_url: str, make_engine: EngineFactory, events: list[dict[str, Any]]
) -> None:
    engine = make_engine(postgresql_url, slow_query_threshold=None)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_sleep(0.2)")).all()
    assert named(events, "query.slow") == []
    (top,) = [q for q in poolguard.get_guard(engine).top_queries()
              if q.statement == "SELECT pg_sleep(?)"]
    assert top.calls == 1  # timed all the same
    assert top.max_time > 0


# -- (d) the other statements: DEBUG, sampled --------------------------------------------------


def test_query_events_only_when_debug_is_enabled(
    sqlite_url: str, make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=None, query_log_sample_rate=1.0)
    guard = poolguard.get_guard(engine)

    caplog.set_level(logging.INFO, logger="poolguard")
    guard.log.refresh()
    assert guard.log.debug is False
    with engine.connect() as conn:
        for _ in range(5):
            conn.execute(sa.text("SELECT 1 AS quiet")).all()
    assert _records(caplog, "query") == []

    caplog.set_level(logging.DEBUG, logger="poolguard")
    guard.log.refresh()
    assert guard.log.debug is True
    with poolguard.request(tag="report"), engine.connect() as conn:
        for _ in range(5):
            conn.execute(sa.text("SELECT 1 AS loud")).all()
    records = [r for r in _records(caplog, "query")
               if r.poolguard["statement"] == "SELECT ? AS loud"]
    assert len(records) == 5
    for record in records:
        assert record.levelno == logging.DEBUG
        event = record.poolguard
        assert event["fingerprint"] == fingerprint("SELECT 1 AS loud").id
        assert event["summary"] == "SELECT"
        assert event["duration_ms"] >= 0
        assert event["wait_ms"] == 0.0
        assert event["tag"] == "report"
        assert "parameters" not in event
        assert "site" not in event  # only slow statements pay for a stack walk


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_query_log_sample_rate(
    rate: float, sqlite_url: str, make_engine: EngineFactory,
    debug_events: list[dict[str, Any]],
) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=None, query_log_sample_rate=rate)
    poolguard.get_guard(engine).log.refresh()
    n = 200
    random.seed(20240611)
    with engine.connect() as conn:
        for i in range(n):
            conn.execute(sa.text("SELECT :i AS sampled"), {"i": i}).all()
    queries = named(debug_events, "query")
    logged = len([e for e in queries if e["statement"] == "SELECT ? AS sampled"])
    if rate == 0.0:
        assert logged == 0
    elif rate == 1.0:
        assert logged == n
    else:
        assert 0 < logged < n
    # Sampling thins the log, never the stats.
    (stats,) = [q for q in poolguard.get_guard(engine).top_queries()
                if q.statement == "SELECT ? AS sampled"]
    assert stats.calls == n


def test_slow_statements_are_never_sampled_away(
    sqlite_url: str, make_engine: EngineFactory, events: list[dict[str, Any]]
) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=0, query_log_sample_rate=0.0)
    with engine.connect() as conn:
        for _ in range(20):
            conn.execute(sa.text("SELECT 1 AS always")).all()
    slow = [e for e in named(events, "query.slow") if e["statement"] == "SELECT ? AS always"]
    assert len(slow) == 20


# -- (e) errors -------------------------------------------------------------------------------


def test_failing_statement_logs_error_type_without_message(
    db_url: str, make_engine: EngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="poolguard")
    engine = make_engine(db_url, slow_query_threshold=None)
    poolguard.get_guard(engine).log.refresh()
    _run(engine, "CREATE TEMPORARY TABLE err_t (id INTEGER PRIMARY KEY, email VARCHAR(100) UNIQUE)")
    insert = "INSERT INTO err_t (id, email) VALUES (:id, :email)"
    value = "dup-5b1e@example.com"
    _run(engine, insert, {"id": 1, "email": value})
    with pytest.raises(sa.exc.IntegrityError) as raised:
        _run(engine, insert, {"id": 2, "email": value})
    orig = raised.value.orig
    assert orig is not None
    if engine.dialect.name != "sqlite":  # the database's message quotes the value
        assert value in str(orig)

    records = _records(caplog, "query.error")
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.INFO
    event = record.poolguard
    assert event["error_type"] == type(orig).__qualname__
    assert event["statement"] == "INSERT INTO err_t (id, email) VALUES (?...)"
    assert event["fingerprint"] == fingerprint(event["statement"]).id
    assert event["timed_out"] is False
    assert set(event) == {"event", "pool", "fingerprint", "statement", "error_type", "timed_out",
                          "duration_ms", "site"}
    assert event["site"] is not None
    assert event["site"].endswith("in _run")
    everything = f"{record.getMessage()} {record.__dict__!r}"
    assert value not in everything
    assert str(orig) not in everything
    assert "5b1e" not in everything


# -- (f) top_queries ------------------------------------------------------------------------------


def _workload(engine: Engine) -> None:
    _run(engine, "CREATE TEMPORARY TABLE qt (id INTEGER PRIMARY KEY, v INTEGER)")
    for i in range(10):
        _run(engine, "INSERT INTO qt (id, v) VALUES (:id, :v)", {"id": i, "v": 0})
    for i in (3, 7):  # duplicates: two errors of the INSERT shape
        with pytest.raises(sa.exc.IntegrityError):
            _run(engine, "INSERT INTO qt (id, v) VALUES (:id, :v)", {"id": i, "v": 0})
    for _ in range(4):
        _run(engine, "UPDATE qt SET v = v + 1 WHERE id < :n", {"n": 3})
    with engine.connect() as conn:  # the only statement of a checkout held 0.05 s longer
        conn.execute(sa.text("SELECT v FROM qt WHERE id = :id"), {"id": 1}).all()
        time.sleep(0.05)


def _by_statement(guard: Guard) -> dict[str, poolguard.QueryStats]:
    return {q.statement: q for q in guard.top_queries(1000)}


INSERT_SHAPE = "INSERT INTO qt (id, v) VALUES (?...)"
UPDATE_SHAPE = "UPDATE qt SET v = v + ? WHERE id < ?"
SELECT_SHAPE = "SELECT v FROM qt WHERE id = ?"


def test_top_queries_after_a_known_workload(db_url: str, make_engine: EngineFactory
                                            ) -> None:
    engine = make_engine(db_url, slow_query_threshold=None)
    guard = poolguard.get_guard(engine)
    _workload(engine)
    stats = _by_statement(guard)

    insert, update, select = stats[INSERT_SHAPE], stats[UPDATE_SHAPE], stats[SELECT_SHAPE]
    assert (insert.calls, insert.errors, insert.rows) == (12, 2, 10)
    assert (update.calls, update.errors, update.rows) == (4, 0, 12)
    assert (select.calls, select.errors) == (1, 0)
    assert insert.fingerprint == fingerprint(INSERT_SHAPE).id
    assert insert.summary == "INSERT qt"
    assert update.summary == "UPDATE qt"
    for q in stats.values():
        assert q.calls >= 1
        assert q.total_time > 0
        assert q.mean_time * q.calls == pytest.approx(q.total_time)
        assert 0 < q.p95_time <= q.p99_time <= q.max_time <= q.total_time
    assert select.held_time >= 0.05  # it slept that long while holding the connection
    assert select.held_time > select.total_time


def test_top_queries_sorting_and_limit(sqlite_url: str, make_engine: EngineFactory
                                       ) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=None)
    guard = poolguard.get_guard(engine)
    _workload(engine)
    for by in ("total_time", "calls", "errors", "rows", "mean_time", "max_time", "p95_time",
               "p99_time", "held_time"):
        top = guard.top_queries(100, by=by)
        values = [getattr(q, by) for q in top]
        assert values == sorted(values, reverse=True), by
    assert guard.top_queries(100, by="calls")[0].statement == INSERT_SHAPE
    assert guard.top_queries(100, by="errors")[0].statement == INSERT_SHAPE
    assert guard.top_queries(100, by="rows")[0].statement == UPDATE_SHAPE
    assert guard.top_queries(100, by="held_time")[0].statement == SELECT_SHAPE
    assert len(guard.top_queries(2)) == 2
    assert guard.top_queries(2, by="calls") == guard.top_queries(100, by="calls")[:2]


def test_top_queries_rejects_an_unknown_field(sqlite_url: str, make_engine: EngineFactory
                                              ) -> None:
    engine = make_engine(sqlite_url)
    guard = poolguard.get_guard(engine)
    # Before any statement ran too: the argument is wrong whatever the data.
    with pytest.raises(ValueError, match="'bogus'"):
        guard.top_queries(by="bogus")
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1")).all()
    with pytest.raises(ValueError, match="'bogus'"):
        guard.top_queries(by="bogus")
    with pytest.raises(ValueError, match="'__class__'"):
        guard.top_queries(by="__class__")  # an attribute, not a field
    with pytest.raises(ValueError, match="'calls_total'"):
        guard.log_top_queries(by="calls_total")


def test_log_top_queries_emits_queries_top(
    sqlite_url: str, make_engine: EngineFactory, events: list[dict[str, Any]]
) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=None, name="top-pool")
    guard = poolguard.get_guard(engine)
    _workload(engine)
    returned = guard.log_top_queries(3, by="calls")
    assert returned == guard.top_queries(3, by="calls")
    records = named(events, "queries.top")
    assert len(records) == 1
    event = records[0]
    assert event["level"] == "info"
    assert event["pool"] == "top-pool"
    assert event["by"] == "calls"
    assert len(event["queries"]) == 3
    first = event["queries"][0]
    assert first["statement"] == INSERT_SHAPE
    assert (first["calls"], first["errors"], first["rows"]) == (12, 2, 10)


# -- (g) explain_slow_queries -------------------------------------------------------------


def test_explain_slow_queries_once_per_shape(
    db_url: str, make_engine: EngineFactory, debug_events: list[dict[str, Any]]
) -> None:
    engine = make_engine(db_url, slow_query_threshold=0, explain_slow_queries=True)
    _run(engine, "CREATE TEMPORARY TABLE ex_t (id INTEGER, v VARCHAR(50))")
    _run(engine, "INSERT INTO ex_t (id, v) VALUES (:id, :v)",
         [{"id": i, "v": f"value-{i}"} for i in range(50)])
    select = "SELECT id FROM ex_t WHERE v = :v"
    shape = "SELECT id FROM ex_t WHERE v = ?"
    with engine.connect() as conn:
        assert conn.execute(sa.text(select), {"v": "value-7"}).scalar_one() == 7
        assert conn.execute(sa.text(select), {"v": "value-8-plan-probe"}).all() == []

    fp = fingerprint(shape).id
    slow = [e for e in named(debug_events, "query.slow") if e["fingerprint"] == fp]
    explains = [e for e in named(debug_events, "query.explain") if e["fingerprint"] == fp]
    assert len(slow) == 2
    assert len(explains) == 1
    event = explains[0]
    assert event["statement"] == shape
    assert event["full_scans"] == ["ex_t"]
    assert isinstance(event["plan"], str)
    assert "ex_t" in event["plan"]
    assert "value-" not in event["plan"]  # plans quote values: normalised like statements
    assert named(debug_events, "query.explain_failed") == []


def test_no_explain_unless_asked(
    sqlite_url: str, make_engine: EngineFactory, debug_events: list[dict[str, Any]]
) -> None:
    engine = make_engine(sqlite_url, slow_query_threshold=0)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1")).all()
    assert named(debug_events, "query.slow") != []
    assert named(debug_events, "query.explain") == []


def test_the_statement_timer_hands_the_dialect_the_context_it_was_given(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: a context whose connection the timer could not look up
    # (here: none behind it) reached the dialect as None.
    import types

    engine = sa.create_engine(sqlite_url)
    seen: list[object] = []
    monkeypatch.setattr(type(engine.dialect), "do_execute",
                        lambda self, cursor, statement, parameters, context=None:
                        seen.append(context))
    engine = poolguard.wrap(engine)
    context = types.SimpleNamespace(root_connection=types.SimpleNamespace(_dbapi_connection=None))
    raw = engine.raw_connection()
    try:
        engine.dialect.do_execute(raw.cursor(), "SELECT 1", (), context)
    finally:
        raw.close()
    assert seen == [context]
