"""Real-database test bed for the poolguard test suite.

The tests run against real servers, never mocks:

* SQLite (``sqlite``, ``aiosqlite``): a file in the test's ``tmp_path``, always available.
* PostgreSQL through psycopg 3 (``postgresql``) and asyncpg (``asyncpg``).
* MariaDB through PyMySQL (``mariadb``).

Server URLs come from environment variables, with defaults that match the local
development/CI machine (trust / passwordless auth on loopback):

* ``POOLGUARD_TEST_POSTGRESQL_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``)
* ``POOLGUARD_TEST_ASYNCPG_URL`` (default ``postgresql+asyncpg://postgres@127.0.0.1:5432/test``)
* ``POOLGUARD_TEST_MARIADB_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/test``)

Each server is probed once per session (a real connect and ``SELECT 1`` with a short
connect timeout). An unreachable server skips the tests that need it, unless
``POOLGUARD_REQUIRE_DATABASES=1`` is set (CI sets it), in which case they fail.

This module must not import poolguard: it is the test bed, not a test of the library.
The fixtures that need poolguard (``make_engine``, ``make_async_engine``) import
``tests/_support.py`` when a test asks for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from _support import AsyncEngineFactory, EngineFactory

REQUIRE_DATABASES_ENV = "POOLGUARD_REQUIRE_DATABASES"
"""Set to ``1`` to turn "database unreachable" skips into failures."""

CONNECT_TIMEOUT_S = 3
"""Connect timeout of the reachability probe, in seconds."""

_TRUTHY = frozenset({"1", "true", "yes", "on"})
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class Server:
    """A database server the tests may need."""

    label: str
    """Human-readable name used in skip/fail reasons."""
    env_var: str
    """Environment variable that overrides the URL."""
    default_url: str
    default_port: int

    def url(self) -> str:
        """The URL to test against: the environment override, else the default."""
        return os.environ.get(self.env_var) or self.default_url


POSTGRESQL = Server(
    label="PostgreSQL",
    env_var="POOLGUARD_TEST_POSTGRESQL_URL",
    default_url="postgresql+psycopg://postgres@127.0.0.1:5432/test",
    default_port=5432,
)
ASYNCPG = Server(
    label="PostgreSQL (asyncpg)",
    env_var="POOLGUARD_TEST_ASYNCPG_URL",
    default_url="postgresql+asyncpg://postgres@127.0.0.1:5432/test",
    default_port=5432,
)
MARIADB = Server(
    label="MariaDB",
    env_var="POOLGUARD_TEST_MARIADB_URL",
    default_url="mysql+pymysql://root@127.0.0.1:3306/test",
    default_port=3306,
)

# Driver name -> connect_args that bound the time a connection attempt may take.
_TIMEOUT_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    "psycopg": {"connect_timeout": CONNECT_TIMEOUT_S},
    "psycopg2": {"connect_timeout": CONNECT_TIMEOUT_S},
    # PyMySQL's connect_timeout only covers the TCP connect, not the server handshake.
    "pymysql": {
        "connect_timeout": CONNECT_TIMEOUT_S,
        "read_timeout": CONNECT_TIMEOUT_S,
        "write_timeout": CONNECT_TIMEOUT_S,
    },
    "mysqldb": {"connect_timeout": CONNECT_TIMEOUT_S},
    "asyncpg": {"timeout": CONNECT_TIMEOUT_S},
    "aiomysql": {"connect_timeout": CONNECT_TIMEOUT_S},
    "asyncmy": {"connect_timeout": CONNECT_TIMEOUT_S},
}


def requires_databases() -> bool:
    """Whether an unreachable database must fail the run instead of skipping."""
    return os.environ.get(REQUIRE_DATABASES_ENV, "").strip().lower() in _TRUTHY


def _unavailable(reason: str) -> NoReturn:
    """Skip the current test, or fail it when ``POOLGUARD_REQUIRE_DATABASES=1``."""
    if requires_databases():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _describe_error(exc: BaseException, password: str | None) -> str:
    """One line describing ``exc``, with the DBAPI error unwrapped and no password in it."""
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else None
    err: BaseException = orig if isinstance(orig, BaseException) else exc
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if password:
        text = text.replace(password, "***")
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text


def _timeout_connect_args(url: URL) -> dict[str, Any]:
    try:
        driver = url.get_driver_name()
    except Exception:  # unknown dialect: let create_engine report it
        return {}
    return dict(_TIMEOUT_CONNECT_ARGS.get(driver, {}))


def _select_one_sync(url: URL) -> None:
    engine = sa.create_engine(url, poolclass=NullPool, connect_args=_timeout_connect_args(url))
    try:
        with engine.connect() as conn:
            value = conn.execute(sa.text("SELECT 1")).scalar_one()
    finally:
        engine.dispose()
    if value != 1:
        raise RuntimeError(f"SELECT 1 returned {value!r}")


async def _select_one_async(url: URL) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, poolclass=NullPool, connect_args=_timeout_connect_args(url))
    try:
        async with engine.connect() as conn:
            value = (await conn.execute(sa.text("SELECT 1"))).scalar_one()
    finally:
        await engine.dispose()
    if value != 1:
        raise RuntimeError(f"SELECT 1 returned {value!r}")


def _select_one_async_in_thread(url: URL) -> None:
    # A private event loop in a worker thread: works whether or not the caller
    # (a fixture of an async test) already has an event loop in this thread.
    async def bounded() -> None:
        await asyncio.wait_for(_select_one_async(url), timeout=CONNECT_TIMEOUT_S * 2)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, bounded()).result()


def probe(url: str) -> str | None:
    """Connect to ``url`` and run ``SELECT 1``.

    Returns ``None`` when the server answered, otherwise a one-line description of the
    error that never contains the URL's password.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:
        return f"invalid database URL ({type(exc).__name__})"
    try:
        if parsed.get_dialect().is_async:
            _select_one_async_in_thread(parsed)
        else:
            _select_one_sync(parsed)
    except Exception as exc:
        return _describe_error(exc, parsed.password)
    return None


def unreachable_reason(server: Server, url: str, error: str) -> str:
    """The skip/fail reason for ``server`` at ``url`` failing with ``error``."""
    try:
        parsed = make_url(url)
    except Exception:
        where, shown = "?", "<invalid URL>"
    else:
        where = f"{parsed.host or 'localhost'}:{parsed.port or server.default_port}"
        shown = parsed.render_as_string(hide_password=True)
    return (
        f"{server.label} at {where} unreachable: {error} (url {shown}); "
        f"set {server.env_var} or start it"
    )


def require_server(server: Server) -> str:
    """Return the URL of ``server`` if it answers ``SELECT 1``, else skip or fail."""
    url = server.url()
    error = probe(url)
    if error is not None:
        _unavailable(unreachable_reason(server, url, error))
    return url


# --- Session-scoped probes: one real connection attempt per server and session. ---
# pytest caches a session fixture's result, including a skip/fail it raised, so an
# unreachable server costs one connect timeout per session, not one per test.


@pytest.fixture(scope="session")
def _postgresql_server() -> str:
    return require_server(POSTGRESQL)


@pytest.fixture(scope="session")
def _asyncpg_server() -> str:
    return require_server(ASYNCPG)


@pytest.fixture(scope="session")
def _mariadb_server() -> str:
    return require_server(MARIADB)


# --- Per-backend URL fixtures. ---


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file private to the test (pysqlite driver)."""
    return f"sqlite:///{tmp_path / 'poolguard.sqlite3'}"


@pytest.fixture
def aiosqlite_url(tmp_path: Path) -> str:
    """A SQLite database file private to the test (aiosqlite driver)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'poolguard-async.sqlite3'}"


@pytest.fixture
def postgresql_url(_postgresql_server: str) -> str:
    """URL of the PostgreSQL test server (psycopg 3); skips/fails if unreachable."""
    return _postgresql_server


@pytest.fixture
def asyncpg_url(_asyncpg_server: str) -> str:
    """URL of the PostgreSQL test server (asyncpg); skips/fails if unreachable."""
    return _asyncpg_server


@pytest.fixture
def mariadb_url(_mariadb_server: str) -> str:
    """URL of the MariaDB test server (PyMySQL); skips/fails if unreachable."""
    return _mariadb_server


# --- Parametrized fixtures: one test case per backend, marked by server. ---


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """A synchronous database URL, once per backend: SQLite, PostgreSQL, MariaDB."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture(
    params=[
        pytest.param("aiosqlite", id="aiosqlite"),
        pytest.param("asyncpg", id="asyncpg", marks=pytest.mark.postgresql),
    ]
)
def async_db_url(request: pytest.FixtureRequest) -> str:
    """An asyncio database URL, once per backend: aiosqlite, asyncpg."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def structlog_unconfigured() -> Iterator[None]:
    """structlog not configured, so poolguard's events go to the stdlib logger
    ``poolguard`` (caplog sees them); the previous set-up is restored after."""
    import structlog

    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    saved["processors"] = list(saved["processors"])
    structlog.reset_defaults()
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


# --- Engines made by a test, disposed when it ends (tests/_support.py). ---


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    """``make_engine(url, pool_size, *, max_overflow, pool, **wrap_options)``: a guarded
    engine (one connection by default); ``make_engine.using(...)`` changes the defaults,
    ``make_engine.plain(...)`` skips the guard. All are disposed at teardown."""
    from _support import EngineFactory

    factory = EngineFactory()
    yield factory
    factory.dispose_all()


@pytest.fixture
async def make_async_engine() -> AsyncIterator[AsyncEngineFactory]:
    """``make_async_engine(url, **create_args)``: an unguarded ``AsyncEngine``,
    disposed at teardown."""
    from _support import AsyncEngineFactory

    factory = AsyncEngineFactory()
    yield factory
    await factory.dispose_all()


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """poolguard's INFO-and-up events during the test, as dicts
    (``poolguard.testing.capture_events(logging.INFO)``)."""
    import logging

    from poolguard.testing import capture_events

    with capture_events(logging.INFO) as captured:
        yield captured


@pytest.fixture
def debug_events() -> Iterator[list[dict[str, Any]]]:
    """poolguard's events during the test, DEBUG ones too (which turns them on)."""
    from poolguard.testing import capture_events

    with capture_events() as captured:
        yield captured


# --- PgBouncer: the suite's own instance, transaction mode, free loopback port. ---


@pytest.fixture(scope="session")
def pgbouncer_url(_postgresql_server: str) -> Iterator[str]:
    """A psycopg URL through PgBouncer (transaction mode) to the PostgreSQL test database.

    ``POOLGUARD_TEST_PGBOUNCER_URL`` points at an existing one; otherwise the
    suite starts its own (``tests/_pgbouncer.py``). Skips, or fails under
    ``POOLGUARD_REQUIRE_DATABASES=1``, when neither is possible.
    """
    from _pgbouncer import PGBOUNCER_ENV, PgBouncer, find_binary

    given = os.environ.get(PGBOUNCER_ENV)
    if given:
        error = probe(given)
        if error is not None:
            _unavailable(f"PgBouncer at {given} unreachable: {error}")
        yield given
        return
    if find_binary() is None:
        _unavailable("pgbouncer not found (apt-get install pgbouncer), or set " + PGBOUNCER_ENV)
    upstream = make_url(_postgresql_server)
    bouncer = PgBouncer(
        upstream_host=upstream.host or "127.0.0.1",
        upstream_port=upstream.port or 5432,
        user=upstream.username or "postgres",
    )
    try:
        bouncer.start()
    except RuntimeError as error:
        _unavailable(f"could not start PgBouncer: {error}")
    try:
        yield bouncer.url(upstream.database or "test")
    finally:
        bouncer.stop()


# --- A fault-injecting TCP proxy in front of the PostgreSQL test server. ---


@pytest.fixture
def proxy(postgresql_url: str) -> Iterator[Any]:
    """A :class:`_proxy.Proxy` in front of the PostgreSQL test server (``set_mode``)."""
    from _proxy import Proxy

    url = make_url(postgresql_url)
    with Proxy(url.host or "127.0.0.1", url.port or 5432) as running:
        yield running


# --- OpenTelemetry: an SDK provider with an in-memory reader. ---


@pytest.fixture
def reader() -> Any:
    """An ``InMemoryMetricReader`` (collect with ``reader.get_metrics_data()``)."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    return InMemoryMetricReader()


@pytest.fixture
def provider(reader: Any) -> Iterator[Any]:
    """An SDK ``MeterProvider`` reporting to ``reader``; shut down after the test."""
    from opentelemetry.sdk.metrics import MeterProvider

    meter_provider = MeterProvider(metric_readers=[reader])
    yield meter_provider
    meter_provider.shutdown()
