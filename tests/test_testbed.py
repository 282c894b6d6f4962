"""Tests of the test bed itself (tests/conftest.py): real servers answer, skips are honest."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from conftest import (
    ASYNCPG,
    MARIADB,
    POSTGRESQL,
    REQUIRE_DATABASES_ENV,
    Server,
    _unavailable,
    probe,
    require_server,
)

if TYPE_CHECKING:
    from pathlib import Path

# The password is a marker that must never show up in a reason.
# Nothing listens on port 1 of the loopback interface: connections are refused at once.
_MARKER = "not-a-real-pw-7f3a"
_UNREACHABLE_URLS = {
    "psycopg": f"postgresql+psycopg://someone:{_MARKER}@127.0.0.1:1/test",
    "asyncpg": f"postgresql+asyncpg://someone:{_MARKER}@127.0.0.1:1/test",
    "pymysql": f"mysql+pymysql://someone:{_MARKER}@127.0.0.1:1/test",
}


def test_sync_backend_answers_select_1(db_url: str) -> None:
    engine = sa.create_engine(db_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


async def test_async_backend_answers_select_1(async_db_url: str) -> None:
    engine = create_async_engine(async_db_url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


def test_backend_fixtures_use_the_expected_drivers(
    sqlite_url: str, aiosqlite_url: str, postgresql_url: str, asyncpg_url: str, mariadb_url: str
) -> None:
    assert sa.make_url(sqlite_url).drivername == "sqlite"
    assert sa.make_url(aiosqlite_url).drivername == "sqlite+aiosqlite"
    assert sa.make_url(postgresql_url).get_backend_name() == "postgresql"
    assert sa.make_url(asyncpg_url).drivername == "postgresql+asyncpg"
    assert sa.make_url(mariadb_url).get_backend_name() in {"mysql", "mariadb"}


def test_sqlite_urls_are_private_to_the_test(sqlite_url: str, tmp_path: Path) -> None:
    database = sa.make_url(sqlite_url).database
    assert database is not None
    assert database.startswith(str(tmp_path))


@pytest.mark.parametrize("value", ["", "0", "no"])
def test_unavailable_skips_unless_databases_are_required(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(REQUIRE_DATABASES_ENV, value)
    with pytest.raises(pytest.skip.Exception, match=r"^db down$"):
        _unavailable("db down")


def test_unavailable_skips_when_env_var_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_DATABASES_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^db down$"):
        _unavailable("db down")


def test_unavailable_fails_when_databases_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REQUIRE_DATABASES_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=r"^db down$"):
        _unavailable("db down")


@pytest.mark.parametrize("driver", sorted(_UNREACHABLE_URLS))
def test_probe_reports_unreachable_server_without_password(driver: str) -> None:
    error = probe(_UNREACHABLE_URLS[driver])
    assert error is not None
    assert _MARKER not in error
    assert "\n" not in error


def test_probe_accepts_a_reachable_sqlite_database(sqlite_url: str) -> None:
    assert probe(sqlite_url) is None


@pytest.mark.parametrize(
    ("server", "driver"),
    [(POSTGRESQL, "psycopg"), (ASYNCPG, "asyncpg"), (MARIADB, "pymysql")],
    ids=["postgresql", "asyncpg", "mariadb"],
)
@pytest.mark.parametrize("required", [False, True], ids=["optional", "required"])
def test_unreachable_server_is_skipped_or_failed_with_a_clean_reason(
    monkeypatch: pytest.MonkeyPatch, server: Server, driver: str, required: bool
) -> None:
    monkeypatch.setenv(server.env_var, _UNREACHABLE_URLS[driver])
    if required:
        monkeypatch.setenv(REQUIRE_DATABASES_ENV, "1")
    else:
        monkeypatch.delenv(REQUIRE_DATABASES_ENV, raising=False)
    expected = pytest.fail.Exception if required else pytest.skip.Exception

    with pytest.raises(expected) as excinfo:
        require_server(server)

    reason = str(excinfo.value)
    assert _MARKER not in reason
    assert reason.startswith(f"{server.label} at 127.0.0.1:1 unreachable: ")
    assert reason.endswith(f"; set {server.env_var} or start it")
    assert "someone:***@127.0.0.1:1" in reason
