"""``poolguard bench`` for a fleet: PgBouncer found and sized against, replicas as
processes, runs with failed requests invalid, driver options passed through.

The command runs in a subprocess (``python -m poolguard.cli``) against a real
PgBouncer of the test's own (transaction mode, settings chosen per test) in
front of the PostgreSQL test database, in short runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

from _pgbouncer import PgBouncer
from poolguard.cli._args import connect_arg, connect_value
from poolguard.cli._bouncer import PgBouncerInfo, detect_pgbouncer
from poolguard.cli._db import CliError
from poolguard.cli._recommend import recommend
from poolguard.cli._runner import Result

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Upper bound of one command (a hang fails the test instead of the suite).
RUN_TIMEOUT = 240
#: What the command said before it knew of PgBouncer (issue 14).
POOLER_ADVICE = "put a connection pooler"
SHORT = ("--duration", "0.5s", "--repeat", "1", "--json", "-q")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "poolguard.cli", "bench", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
        env=env,
    )


def _report(done: subprocess.CompletedProcess[str], status: int = 0) -> dict[str, Any]:
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _texts(report: dict[str, Any]) -> str:
    rec = report["recommendation"]
    return " ".join(rec["reasoning"] + rec["warnings"])


@pytest.fixture
def bouncer(request: pytest.FixtureRequest, postgresql_url: str) -> Iterator[tuple[str, PgBouncer]]:
    """An own PgBouncer with the settings of ``@pytest.mark.parametrize("bouncer", [...])``."""
    settings: dict[str, Any] = getattr(request, "param", {})
    upstream = sa.engine.make_url(postgresql_url)
    with PgBouncer(upstream_port=upstream.port or 5432, **settings) as pgb:
        yield pgb.url(upstream.database or "test"), pgb


# -- through PgBouncer ----------------------------------------------------------------------


@pytest.mark.postgresql
@pytest.mark.parametrize(
    "bouncer", [{"default_pool_size": 4, "max_client_conn": 12}], indirect=True
)
def test_bench_through_pgbouncer_sizes_against_its_settings(
    bouncer: tuple[str, PgBouncer],
) -> None:
    url, pgb = bouncer
    report = _report(
        _run(
            "--url",
            url,
            "--pool-sizes",
            "2,8",
            "--concurrency",
            "2",
            "--replicas",
            "2",
            "--connect-arg",
            "prepare_threshold=None",
            *SHORT,
        )
    )
    found = report["pgbouncer"]
    assert found["pool_mode"] == "transaction"
    assert found["pool_size"] == 4
    assert found["max_client_conn"] == 12
    assert found["admin_url"].endswith(f":{pgb.port}/pgbouncer")
    rec = report["recommendation"]
    assert rec["valid"] is True
    assert rec["recommended_pool_size"] in (2, 8)
    text = _texts(report)
    assert POOLER_ADVICE not in text
    assert "max_client_conn 12" in text
    # 2 replicas x pool 8 = 16 client connections: more than max_client_conn.
    assert any("max_client_conn 12" in w and "8" in w for w in rec["warnings"])
    assert "The database sees at most 4 connections" in text
    # The server column counts PgBouncer's server connections, never more than its pool.
    for cell in report["results"]:
        assert cell["server_connections"] is not None
        assert 0 < cell["server_connections"] <= 4
        assert cell["errors"] == 0


@pytest.mark.postgresql
@pytest.mark.parametrize("bouncer", [{"default_pool_size": 2}], indirect=True)
def test_bench_with_failed_requests_is_invalid_and_recommends_nothing(
    bouncer: tuple[str, PgBouncer],
) -> None:
    # psycopg prepares a statement after 5 runs; through transaction pooling the
    # next transaction often lands on another server connection that lacks it.
    url, _ = bouncer
    done = _run(
        "--url",
        url,
        "--pool-sizes",
        "4",
        "--concurrency",
        "4",
        "--duration",
        "1s",
        "--repeat",
        "1",
        "--json",
        "-q",
    )
    report = _report(done, status=3)
    rec = report["recommendation"]
    assert rec["valid"] is False
    assert rec["recommended_pool_size"] is None
    assert any("requests failed" in line for line in rec["invalid_because"])
    assert any("--connect-arg prepare_threshold=None" in line for line in rec["reasoning"])
    assert report["runs"][0]["errors"] > 0
    # The text report says so too, with the same status.
    text = subprocess.run(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-m",
            "poolguard.cli",
            "bench",
            "--url",
            url,
            "--pool-sizes",
            "4",
            "--concurrency",
            "4",
            "--duration",
            "1s",
            "--repeat",
            "1",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert text.returncode == 3, text.stderr
    assert "INVALID RUN" in text.stdout
    assert "Recommendation: pool_size" not in text.stdout


@pytest.mark.postgresql
def test_detection_reads_the_console_and_leaves_postgresql_alone(
    bouncer: tuple[str, PgBouncer],
    postgresql_url: str,
) -> None:
    url, _ = bouncer
    found = detect_pgbouncer(sa.engine.make_url(url))
    assert found is not None
    assert found.settings_known
    assert found.version is not None
    assert found.version.startswith("PgBouncer")
    assert found.query_wait_timeout == 5.0
    assert detect_pgbouncer(sa.engine.make_url(postgresql_url)) is None
    assert detect_pgbouncer(sa.engine.make_url("sqlite://")) is None
    # An admin URL given by hand must work: no silent fallback.
    wrong = sa.engine.make_url(postgresql_url).set(database="pgbouncer")
    with pytest.raises(CliError, match="admin console"):
        detect_pgbouncer(sa.engine.make_url(url), wrong)


@pytest.mark.postgresql
@pytest.mark.parametrize(
    "bouncer", [{"default_pool_size": 5, "max_db_connections": 2}], indirect=True
)
def test_detection_counts_the_server_connections_max_db_connections_allows(
    bouncer: tuple[str, PgBouncer],
) -> None:
    # max_db_connections caps every pool of the database together: the
    # command must size against 2 server connections, not the pool's 5. Read
    # twice: before any client asked for the database (PgBouncer makes it on
    # demand from its "*" entry: no SHOW DATABASES row yet), and after one did,
    # as in `bench`, which connects before it reads (the row's max_connections).
    url, _ = bouncer
    before = detect_pgbouncer(sa.engine.make_url(url))
    engine = sa.create_engine(url, poolclass=sa.NullPool,
                              connect_args={"prepare_threshold": None})
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select 1").scalar() == 1
    finally:
        engine.dispose()
    after = detect_pgbouncer(sa.engine.make_url(url))
    for found in (before, after):
        assert found is not None
        assert found.settings_known
        assert found.default_pool_size == 5
        assert found.pool_size == 2


# -- replicas as processes --------------------------------------------------------------------


@pytest.mark.postgresql
def test_replicas_are_processes_with_pools_of_their_own(postgresql_url: str) -> None:
    report = _report(
        _run(
            "--url",
            postgresql_url,
            "--pool-sizes",
            "2",
            "--concurrency",
            "2",
            "--replicas",
            "3",
            *SHORT,
        )
    )
    run = report["runs"][0]
    # One process could never hold more than its pool of 2.
    assert run["server_connections"] > 2
    assert run["server_connections"] <= 6
    assert 2 < run["peak_in_use"] <= 6
    assert run["served"] > 0
    assert run["requests"] == run["served"] + run["timeouts"] + run["rejections"] + run["errors"]
    assert report["pgbouncer"] is None
    assert "3 replica(s) x pool 2 = 6 connections" in _texts(report)


def test_too_many_replicas_is_a_usage_error() -> None:
    done = _run("--replicas", "1000", "--duration", "0.5s")
    assert done.returncode == 2
    assert "--replicas 1000" in done.stderr
    assert "Traceback" not in done.stderr


# -- pure parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("None", None),
        ("null", None),
        ("true", True),
        ("False", False),
        ("5", 5),
        ("-3", -3),
        ("1.5", 1.5),
        ("'5'", "5"),
        ('"None"', "None"),
        ("disable", "disable"),
        ("nan", "nan"),
        ("", ""),
    ],
)
def test_connect_values_read_as_python(raw: str, value: object) -> None:
    assert connect_value(raw) == value
    assert type(connect_value(raw)) is type(value)


def test_connect_arg_needs_a_name() -> None:
    assert connect_arg("prepare_threshold=None") == ("prepare_threshold", None)
    assert connect_arg(" sslmode = require") == ("sslmode", "require")
    for bad in ("prepare_threshold", "=5", "a b=1"):
        with pytest.raises(argparse.ArgumentTypeError, match="NAME=VALUE"):
            connect_arg(bad)


def _result(pool: int, throughput: float, *, errors: int = 0, timeouts: int = 0) -> Result:
    served = int(throughput)
    return Result(
        pool_size=pool,
        concurrency=8,
        throughput=throughput,
        p50_ms=1.0,
        p95_ms=2.0,
        p99_ms=3.0,
        wait_p50_ms=0.0,
        wait_p99_ms=1.0,
        timeouts=timeouts,
        rejections=0,
        errors=errors,
        server_connections=None,
        peak_in_use=pool,
        mean_hold_ms=4.0,
        busy_connections=throughput * 4.0 / 1000,
        duration_s=1.0,
        requests=served + errors + timeouts,
        served=served,
        error_types={"error:InvalidSqlStatementName": errors} if errors else {},
    )


def test_one_failed_request_makes_the_sweep_invalid() -> None:
    rec = recommend([_result(2, 900.0), _result(4, 1000.0, errors=1)], replicas=2)
    assert rec["valid"] is False
    assert rec["recommended_pool_size"] is None
    assert rec["invalid_because"] == [
        "pool 4 x 8 workers: 1 of 1001 requests failed (0.1%: 1 InvalidSqlStatementName)."
    ]
    rec = recommend([_result(2, 900.0), _result(4, 1000.0, timeouts=3)])
    assert rec["valid"] is False
    assert "3 timed out" in rec["invalid_because"][0]
    assert recommend([_result(2, 900.0), _result(4, 1000.0)])["valid"] is True


def test_a_pooler_whose_settings_are_unknown_is_said_so() -> None:
    pooler = PgBouncerInfo(
        found_by="the database listens on port 5432, the URL connects to 6432",
        problem="its settings could not be read (x); pass --pgbouncer-admin-url",
    )
    server = {"max_connections": 10, "reserved": 3}
    rec = recommend(
        [_result(4, 1000.0), _result(8, 1010.0)], replicas=6, server_limit=server, pooler=pooler
    )
    text = " ".join(rec["reasoning"] + rec["warnings"])
    assert "--pgbouncer-admin-url" in text
    assert POOLER_ADVICE not in text
    # Without the pooler, the same figures send the user to a pooler.
    rec = recommend([_result(4, 1000.0), _result(8, 1010.0)], replicas=6, server_limit=server)
    assert POOLER_ADVICE in " ".join(rec["warnings"])
