"""PgBouncer in front of ``poolguard bench``'s database: found, and its settings read.

:func:`detect_pgbouncer` is the one place that decides whether a PostgreSQL
URL leads to PgBouncer. It first asks PgBouncer's admin console (the
``pgbouncer`` database on the same host and port, or ``--pgbouncer-admin-url``):
``SHOW VERSION`` names PgBouncer, ``SHOW CONFIG`` and ``SHOW DATABASES`` give
``max_client_conn``, the pool mode and the server connections of the URL's
database (its ``pool_size``, else ``default_pool_size``, capped by
``max_db_connections``), read as the guard's own admin reader reads them
(``poolguard._pgbouncer``). When the console
cannot be read, it asks the database which port it listens on
(``inet_server_port()``): another port than the URL's means a pooler or a proxy
in between, whose settings the command then says it could not read, and what
to pass. PostgreSQL itself has no ``pgbouncer`` database, and MariaDB or
SQLite URLs are never probed.

The console is read with the URL's own DBAPI driver (psycopg or psycopg2) in
autocommit: it takes no transaction and none of the queries SQLAlchemy sends
when it opens a connection.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .._pgbouncer import pool_settings, to_int
from .._pgbouncer import rows as console_rows
from ._db import CONNECT_TIMEOUT, CliError, create_engine, describe_error, shown

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

__all__ = ["AdminConsole", "PgBouncerInfo", "admin_url_for", "detect_pgbouncer"]

#: Drivers whose ``connect()`` takes libpq keywords (host, port, dbname...).
_LIBPQ_DRIVERS = ("psycopg", "psycopg2")
#: The server connections PgBouncer counts per pool (``SHOW POOLS``).
_SERVER_COLUMNS = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")


@dataclasses.dataclass(frozen=True)
class PgBouncerInfo:
    """What the command knows of the PgBouncer in front of the database."""

    #: How it was found: "admin console at ..." or the port mismatch.
    found_by: str
    version: str | None = None
    pool_mode: str | None = None
    max_client_conn: int | None = None
    #: Server connections for the URL's database: the database's ``pool_size``
    #: in PgBouncer's [databases], else ``default_pool_size``, at most its
    #: ``max_db_connections`` (``poolguard._pgbouncer.pool_settings``).
    pool_size: int | None = None
    default_pool_size: int | None = None
    reserve_pool_size: int | None = None
    query_wait_timeout: float | None = None
    #: The admin console's URL (password hidden), when it could be read.
    admin_url: str | None = None
    #: Why its settings are unknown, and what to pass (None: they were read).
    problem: str | None = None

    @property
    def settings_known(self) -> bool:
        return self.problem is None and self.pool_size is not None


def admin_url_for(url: URL) -> URL:
    """The admin console on ``url``'s host and port, as ``url``'s user."""
    return url.set(database="pgbouncer", query={})


class AdminConsole:
    """A connection to PgBouncer's admin console (``SHOW ...`` commands)."""

    def __init__(self, url: URL) -> None:
        driver = url.get_driver_name()
        if driver not in _LIBPQ_DRIVERS:
            raise CliError(
                f"reading PgBouncer's admin console needs psycopg or psycopg2, not {driver}"
            )
        dbapi: Any = url.get_dialect().import_dbapi()
        params = {
            "host": url.host or "localhost",
            "port": url.port or 5432,
            "user": url.username,
            "password": url.password,
            "dbname": url.database or "pgbouncer",
            "connect_timeout": CONNECT_TIMEOUT,
        }
        if driver == "psycopg":
            # The console speaks the simple protocol only: no prepared statements
            # (psycopg prepares a query it has run 5 times).
            params["prepare_threshold"] = None
        self.url = url
        self.conn = dbapi.connect(
            **{k: v for k, v in params.items() if v is not None or k == "prepare_threshold"}
        )
        self.conn.autocommit = True

    def rows(self, command: str) -> list[dict[str, Any]]:
        """The rows of ``command`` (``SHOW ...``), as column -> value dicts."""
        return console_rows(self.conn, command)

    def server_connections(self, database: str | None, user: str | None) -> int | None:
        """Server connections of the pool of ``database`` x ``user`` (``SHOW POOLS``)."""
        for row in self.rows("SHOW POOLS"):
            if row.get("database") == database and row.get("user") == user:
                return sum(int(row.get(c) or 0) for c in _SERVER_COLUMNS)
        return 0

    def close(self) -> None:
        self.conn.close()


def _read(console: AdminConsole, database: str | None) -> PgBouncerInfo | None:
    """PgBouncer's settings from its console; None if it is no PgBouncer."""
    version = next(iter(console.rows("SHOW VERSION")[0].values()), "")
    if "pgbouncer" not in str(version).lower():
        return None
    config = {str(r["key"]): r["value"] for r in console.rows("SHOW CONFIG")}
    # The guard's own reading of the settings: the same server connections
    # (max_db_connections caps them) and pool mode as the guard finds.
    pool_size, pool_mode = pool_settings(config, console.rows("SHOW DATABASES"), database)
    wait = config.get("query_wait_timeout")
    return PgBouncerInfo(
        found_by=f"admin console at {shown(console.url)}",
        version=str(version),
        pool_mode=pool_mode,
        max_client_conn=to_int(config.get("max_client_conn")),
        pool_size=pool_size,
        default_pool_size=to_int(config.get("default_pool_size")),
        reserve_pool_size=to_int(config.get("reserve_pool_size")),
        query_wait_timeout=float(wait) if wait not in (None, "") else None,
        admin_url=shown(console.url),
    )


def _server_port(url: URL, connect_args: dict[str, Any]) -> int | None:
    """The port the database behind ``url`` listens on (None over a Unix socket)."""
    engine = create_engine(url, poolclass=sa.NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            port = conn.exec_driver_sql("SELECT inet_server_port()").scalar()
    except Exception:  # noqa: BLE001 - a pooler that refuses it tells nothing
        return None
    finally:
        engine.dispose()
    return int(port) if port is not None else None


def detect_pgbouncer(
    url: URL, admin_url: URL | None = None, connect_args: dict[str, Any] | None = None
) -> PgBouncerInfo | None:
    """The PgBouncer in front of ``url``'s database, or None if none was found.

    ``admin_url`` (``--pgbouncer-admin-url``) must work: a failure to read it
    is a :class:`CliError`. Without it the console on ``url``'s own host and
    port is tried, and a failure there falls back to the port check.
    """
    if url.get_backend_name() != "postgresql":
        return None
    given = admin_url is not None
    console_url = admin_url if admin_url is not None else admin_url_for(url)
    try:
        console = AdminConsole(console_url)
    except CliError:
        if given:
            raise
        console, error = None, "its admin console needs psycopg or psycopg2"
    except Exception as exc:  # noqa: BLE001 - reported in one line, whatever it is
        if given:
            raise CliError(
                f"cannot read PgBouncer's admin console at {shown(console_url)}: "
                f"{describe_error(exc, url=console_url)}"
            ) from None
        console, error = None, describe_error(exc, url=console_url)
    if console is not None:
        try:
            info = _read(console, url.database)
        except Exception as exc:  # noqa: BLE001 - not a console: a database named pgbouncer
            info, error = None, describe_error(exc, url=console_url)
        finally:
            console.close()
        if info is not None:
            return info
        if given:
            raise CliError(
                f"{shown(console_url)} is no PgBouncer admin console "
                "(SHOW VERSION does not name PgBouncer)"
            )
    listens = _server_port(url, connect_args or {})
    expected = url.port or 5432
    if listens is None or listens == expected:
        return None
    return PgBouncerInfo(
        found_by=(
            f"the database listens on port {listens}, the URL connects to {expected}: "
            "a pooler or proxy is in between"
        ),
        problem=(
            f"its settings could not be read ({error}); pass --pgbouncer-admin-url "
            f"postgresql://USER@{url.host or 'localhost'}:{expected}/pgbouncer with a "
            "user listed in PgBouncer's admin_users or stats_users"
        ),
    )
