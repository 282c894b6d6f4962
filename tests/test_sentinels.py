"""No secrets leak: sentinel parameter values and a sentinel password appear in
no log, error, stat, report or metric that poolguard produces.

The workload binds sentinel values into statements of every kind poolguard
sees (fast and slow, ``executemany``, ``literal_execute`` values SQLAlchemy
inlines into the SQL, MySQL's double-quoted strings and ``#`` comments, an
expanding ``IN``, a unique violation whose database
message quotes the value, ``EXPLAIN`` plans that quote it), then runs the pool
dry while a connection that ran such a statement is held (PoolTimeout with a
holders report, ``pool.exhausted``, ``connection.held_too_long``, a utilization
alert). Everything poolguard hands out is captured and searched. A positive
control with ``log_parameters=True`` proves the capture does see the values
when they are there.
"""

from __future__ import annotations

import logging
import pickle
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
import structlog
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import poolguard

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

PASSWORD = "S3ntinel-Pa55"  # noqa: S105 - the sentinel password, on purpose
TEXT = "sentinel-param-8d41"
# Ten digits, so that no float in a stats dump contains it by chance.
NUMBER = 4242424242
SENTINELS = (PASSWORD, TEXT, str(NUMBER))

MARIADB_USER = "poolguard_sentinel"


# -- set-up ------------------------------------------------------------------------------


@pytest.fixture
def secret_url(db_url: str) -> Iterator[str]:
    """``db_url`` with the sentinel password in it (where the backend takes one).

    PostgreSQL trusts loopback, so the password is carried and ignored; MariaDB
    gets a throwaway user that really logs in with it; SQLite has no password.
    """
    url = sa.make_url(db_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        yield db_url
        return
    if backend == "postgresql":
        yield url.set(password=PASSWORD).render_as_string(hide_password=False)
        return
    admin = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{MARIADB_USER}'@'%'"))
            conn.execute(sa.text(f"CREATE USER '{MARIADB_USER}'@'%' IDENTIFIED BY '{PASSWORD}'"))
            conn.execute(sa.text(f"GRANT ALL ON `{url.database}`.* TO '{MARIADB_USER}'@'%'"))
        yield url.set(username=MARIADB_USER, password=PASSWORD).render_as_string(
            hide_password=False
        )
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP USER IF EXISTS '{MARIADB_USER}'@'%'"))
        admin.dispose()


@pytest.fixture
def structlog_restored() -> Iterator[None]:
    """structlog starts unconfigured; its set-up is restored after the test."""
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    saved["processors"] = list(saved["processors"])
    structlog.reset_defaults()
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


class Capture:
    """Everything poolguard produced during a run, as text to search."""

    def __init__(self) -> None:
        self.pieces: list[tuple[str, str]] = []
        self.events: list[dict[str, Any]] = []

    def add(self, label: str, value: object) -> None:
        self.pieces.append((label, f"{value!s}\n{value!r}"))

    def holding(self, needle: str) -> list[str]:
        return [label for label, text in self.pieces if needle in text]


def _options(reader: InMemoryMetricReader, **extra: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": "sentinel-pool",
        "acquire_timeout": 0,
        "explain_slow_queries": True,
        "leak_threshold": 0,
        "alert_utilization": 0.5,
        "alert_for": 0,
        "query_log_sample_rate": 1.0,  # per-statement query events are off by default
        "meter_provider": MeterProvider(metric_readers=[reader]),
    }
    options.update(extra)
    return options


def _statements(engine: Engine, backend: str) -> None:
    """Statements with the sentinels bound, including one that fails."""
    params = {"secret": TEXT, "n": NUMBER}
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO sentinel_t (id, secret, n) VALUES (:id, :secret, :n)"),
            {"id": 1, **params},
        )
        conn.execute(  # executemany
            sa.text("INSERT INTO sentinel_t (id, secret, n) VALUES (:id, :secret, :n)"),
            [{"id": 2, "secret": TEXT + "-2", "n": NUMBER + 1},
             {"id": 3, "secret": TEXT + "-3", "n": NUMBER + 2}],
        )
    with engine.connect() as conn:
        assert conn.execute(
            sa.text("SELECT id FROM sentinel_t WHERE secret = :secret AND n = :n"), params
        ).scalar_one() == 1
        in_list = sa.text("SELECT id FROM sentinel_t WHERE n IN :ns").bindparams(
            sa.bindparam("ns", [NUMBER, NUMBER + 1], expanding=True)
        )
        assert sorted(conn.execute(in_list).scalars()) == [1, 2]
        # literal_execute: SQLAlchemy renders the values into the SQL text itself.
        inlined = sa.text("SELECT id FROM sentinel_t WHERE secret = :s AND n = :n").bindparams(
            sa.bindparam("s", TEXT, type_=sa.String, literal_execute=True),
            sa.bindparam("n", NUMBER, type_=sa.BigInteger, literal_execute=True),
        )
        assert conn.execute(inlined).scalar_one() == 1
        if backend == "mysql":
            # Hand-written MySQL: "..." is a string there, # starts a comment.
            assert conn.execute(sa.text(
                f'SELECT id FROM sentinel_t WHERE secret = "{TEXT}" # n = {NUMBER}\nAND n > 0'
            )).scalar_one() == 1
    with pytest.raises(sa.exc.IntegrityError) as raised:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO sentinel_t (id, secret, n) VALUES (:id, :secret, :n)"),
                {"id": 9, **params},
            )
    if backend != "sqlite":  # control: the database's own message does quote the value
        assert TEXT in str(raised.value.orig)


def _workload(engine: Engine, reader: InMemoryMetricReader, capture: Capture,
              options: dict[str, Any]) -> None:
    guard = poolguard.get_guard(engine)
    backend = engine.dialect.name
    guard.on_alert(lambda alert: capture.add("alert callback", alert))
    capture.add("metrics before", reader.get_metrics_data().to_json())

    with engine.begin() as conn:  # temporary: one connection (pool_size=1) sees it throughout
        conn.execute(sa.text(
            "CREATE TEMPORARY TABLE sentinel_t "
            "(id BIGINT PRIMARY KEY, secret VARCHAR(100) UNIQUE, n BIGINT)"
        ))
    # Fast statements first (per-statement DEBUG events), then all of them slow
    # (query.slow, query.explain with plans that quote the values).
    _statements(engine, backend)
    poolguard.wrap(engine, **{**options, "slow_query_threshold": 0})
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM sentinel_t"))
    _statements(engine, backend)

    # Run the pool dry while a connection that ran a sentinel statement is held.
    with poolguard.request(tag="sentinel-holder"):
        held = engine.connect()
    try:
        # Its last statement has the values inlined (literal_execute): the
        # holders report shows that statement.
        if backend == "mysql":  # a double-quoted literal, the MySQL way
            held.execute(sa.text(f'SELECT n FROM sentinel_t WHERE secret = "{TEXT}"')).all()
        else:
            held.execute(
                sa.text("SELECT n FROM sentinel_t WHERE secret = :s").bindparams(
                    sa.bindparam("s", TEXT, type_=sa.String, literal_execute=True)
                )
            ).all()
        guard.scan()  # connection.held_too_long, alert.utilization, pool.exhausted
        # The report is reused for a second (timeout storms build it once): one
        # built at the holder's checkout, before its statement ran, is replaced.
        capture.add("holders report", guard.holders_report(fresh=True))
        with pytest.raises(poolguard.PoolTimeout) as timeout:
            engine.connect()
        error = timeout.value
        # The holders report is in the message, naming the held statement.
        assert "held by: 1x 'SELECT n FROM sentinel_t WHERE secret = ?'" in str(error)
        capture.add("PoolTimeout", error)
        capture.add("PoolTimeout args", error.args)
        capture.add("PoolTimeout attributes", vars(error))
        capture.add("PoolTimeout unpickled", pickle.loads(pickle.dumps(error)))
        capture.add("holders", guard.holders())
        capture.add("stats while held", guard.stats().as_dict())
    finally:
        held.close()

    capture.add("stats", guard.stats().as_dict())
    capture.add("top queries", guard.top_queries(1000))
    capture.add("top queries logged", guard.log_top_queries(1000, by="calls"))
    capture.add("guard", guard)
    capture.add("guard name", guard.name)
    capture.add("config", guard.config)
    capture.add("metrics after", reader.get_metrics_data().to_json())


def _run(
    secret_url: str,
    mode: str,
    caplog: pytest.LogCaptureFixture,
    **extra: Any,
) -> Capture:
    """Run the workload with logs going to ``mode`` (stdlib or structlog); capture all."""
    capture = Capture()
    caplog.set_level(logging.DEBUG, logger="poolguard")
    if mode == "structlog":

        def keep(logger: Any, method: str, event_dict: Any) -> Any:
            capture.events.append(dict(event_dict))
            raise structlog.DropEvent

        structlog.configure(
            processors=[structlog.processors.add_log_level, keep],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        )
    reader = InMemoryMetricReader()
    options = _options(reader, slow_query_threshold=None, **extra)
    engine = poolguard.wrap(sa.create_engine(secret_url, pool_size=1, max_overflow=0), **options)
    try:
        assert engine.url.password == (None if engine.dialect.name == "sqlite" else PASSWORD)
        poolguard.get_guard(engine).log.refresh()
        _workload(engine, reader, capture, options)
    finally:
        engine.dispose()
        options["meter_provider"].shutdown()

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in caplog.records:
        if record.name.startswith("poolguard"):
            event = getattr(record, "poolguard", {}).get("event")
            capture.add(f"log {event}", formatter.format(record))
            capture.add(f"log {event}", vars(record))
            if event is not None:
                capture.events.append(record.poolguard)
    for event in capture.events:
        capture.add(f"event {event.get('event')}", event)
    return capture


_EXPECTED_EVENTS = {
    "query", "query.slow", "query.explain", "query.error", "connection.held_too_long",
    "pool.exhausted", "alert.utilization", "queries.top",
}


# -- the tests -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("structlog_restored")
@pytest.mark.parametrize("mode", ["stdlib", "structlog"])
def test_no_sentinel_anywhere(secret_url: str, mode: str, caplog: pytest.LogCaptureFixture
                              ) -> None:
    capture = _run(secret_url, mode, caplog)

    # The run produced what it was meant to, through the chosen channel.
    names = {e.get("event") for e in capture.events}
    assert names >= _EXPECTED_EVENTS, _EXPECTED_EVENTS - names
    stdlib_records = [r for r in caplog.records if r.name == "poolguard"]
    assert bool(stdlib_records) == (mode == "stdlib")
    explains = [e for e in capture.events if e.get("event") == "query.explain"]
    assert any("sentinel_t" in e["plan"] for e in explains)
    metrics = " ".join(text for label, text in capture.pieces if label.startswith("metrics"))
    assert "db.client.operation.duration" in metrics
    assert "sentinel_t" in metrics  # db.collection.name: the capture does see the metrics

    for sentinel in SENTINELS:
        assert capture.holding(sentinel) == [], f"{sentinel!r} leaked"


@pytest.mark.usefixtures("structlog_restored")
@pytest.mark.parametrize("mode", ["stdlib", "structlog"])
def test_log_parameters_puts_values_in_query_events(
    secret_url: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    capture = _run(secret_url, mode, caplog, log_parameters=True)

    with_values = [
        e for e in capture.events
        if e.get("event") in {"query", "query.slow"} and TEXT in e.get("parameters", "")
    ]
    assert with_values, "the capture must see parameter values once they are logged"
    assert any(str(NUMBER) in e["parameters"] for e in with_values)
    assert {e["event"] for e in with_values} == {"query", "query.slow"}
    # Opting in to parameters in logs still keeps them out of everything else...
    allowed = {f"{kind} {event}" for kind in ("log", "event") for event in ("query", "query.slow")}
    assert set(capture.holding(TEXT)) - allowed == set()
    # ...and the password out of everything.
    assert capture.holding(PASSWORD) == []
