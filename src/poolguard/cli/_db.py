"""Database helpers of the command line: engines, URLs shown without passwords,
errors in one line, and slow statements on every backend.

SQLite has no ``sleep()``: every engine made here gets a Python one (registered
on each new connection), so a statement can be slow the same way on SQLite,
PostgreSQL (``pg_sleep``) and MariaDB/MySQL (``SLEEP``).
"""

from __future__ import annotations

import re
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

__all__ = [
    "DISTRIBUTION",
    "CliError",
    "UsageError",
    "create_engine",
    "describe_error",
    "install_hint",
    "parse_url",
    "ping",
    "url_secrets",
    "shown",
    "sleep_sql",
]

#: Seconds a connection attempt may take before the command gives up on the server.
CONNECT_TIMEOUT = 5

# Driver -> connect_args that bound a connection attempt (not the statements).
_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    "psycopg": {"connect_timeout": CONNECT_TIMEOUT},
    "psycopg2": {"connect_timeout": CONNECT_TIMEOUT},
    "pymysql": {"connect_timeout": CONNECT_TIMEOUT},
    "mysqldb": {"connect_timeout": CONNECT_TIMEOUT},
}
#: The name the package is published under (its import name is ``poolguard``).
DISTRIBUTION = "sqlalchemy-poolguard"
# Driver -> the extra of the package that installs it.
_EXTRAS = {"psycopg": "postgresql", "pymysql": "mysql"}
# Default drivers no extra installs -> (the driver's own package, the URL an extra serves).
_OTHER_DRIVERS = {
    "psycopg2": ("psycopg2-binary", "postgresql+psycopg", "postgresql"),
    "mysqldb": ("mysqlclient", "mysql+pymysql", "mysql"),
}
_MAX_ERROR_CHARS = 300


class CliError(Exception):
    """An error the command line reports in one line on stderr (exit status 1)."""


class UsageError(CliError):
    """A bad argument found after parsing (exit status 2, like argparse's)."""


def parse_url(url: str) -> URL:
    """The URL, or :class:`CliError` if it is not one (never echoing a password)."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - any parse failure is "not a URL"
        raise UsageError(
            "invalid database URL (expected e.g. "
            "postgresql+psycopg://user:password@host:5432/dbname)"
        ) from None
    return parsed


# Query parameters whose value is a secret (password=, sslpassword=, passwd=,
# pwd=, secret=, token=, api_key=, ...): matched as substrings of the name, so a
# driver's own spelling is covered too. Hiding a harmless one costs nothing.
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|credential|auth", re.I)


def _secret_query(url: URL) -> list[str]:
    """Names of ``url``'s query parameters that carry secrets."""
    return [name for name in url.query if _SECRET_PARAM.search(name)]


def shown(url: str | URL) -> str:
    """The URL as it may be printed: password and secret query parameters as ``***``."""
    parsed = url if isinstance(url, URL) else parse_url(url)
    # render_as_string(hide_password=True) hides only the password of the
    # userinfo, not ?password=... (which libpq and PyMySQL both accept).
    hidden = _secret_query(parsed)
    if not hidden:
        return parsed.render_as_string(hide_password=True)
    parsed = parsed.update_query_dict(dict.fromkeys(hidden, "***"))
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def url_secrets(url: str | URL) -> list[str]:
    """The secret values in ``url``: its password and secret query parameters."""
    try:
        parsed = url if isinstance(url, URL) else make_url(url)
    except Exception:  # noqa: BLE001 - an invalid URL has no secret to hide
        return []
    found = [parsed.password] if parsed.password else []
    for name in _secret_query(parsed):
        value = parsed.query[name]
        found += [value] if isinstance(value, str) else list(value)
    return [str(v) for v in found if v]


def describe_error(
    exc: BaseException, password: str | None = None, *, url: str | URL | None = None
) -> str:
    """One line for ``exc``: the driver's error unwrapped, no password in it.

    ``password``, and the secrets of ``url`` (see :func:`url_secrets`), are
    replaced by ``***`` wherever the message quotes them.
    """
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else None
    err: BaseException = orig if isinstance(orig, BaseException) else exc
    text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    hidden = ([password] if password else []) + (url_secrets(url) if url is not None else [])
    for secret in sorted(hidden, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return text


def _sql_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def create_engine(url: str | URL, **kwargs: Any) -> sa.Engine:
    """``sqlalchemy.create_engine`` with a bounded connect, and ``sleep()`` on SQLite.

    Raises :class:`CliError` for an invalid URL, an asyncio driver or a driver
    that is not installed.
    """
    parsed = url if isinstance(url, URL) else parse_url(url)
    try:
        dialect_cls = parsed.get_dialect()
    except Exception:  # noqa: BLE001 - NoSuchModuleError and friends
        raise UsageError(
            f"unknown database dialect {parsed.drivername!r} in {shown(parsed)}"
        ) from None
    if getattr(dialect_cls, "is_async", False):
        raise UsageError(
            f"{parsed.drivername} is an asyncio driver; use a synchronous one "
            "(postgresql+psycopg://, mysql+pymysql://, sqlite:///)"
        )
    connect_args = {
        **_CONNECT_ARGS.get(parsed.get_driver_name(), {}),
        **kwargs.pop("connect_args", {}),
    }
    try:
        engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
    except ImportError as exc:
        raise CliError(
            f"the driver of {parsed.drivername} is not installed ({exc.name or exc})"
            f"{_driver_hint(parsed)}"
        ) from None
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _add_sleep(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.create_function("sleep", 1, _sql_sleep)

    return engine


def install_hint(extra: str) -> str:
    """The pip command that installs the package with ``extra``."""
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def _driver_hint(url: URL) -> str:
    driver = url.get_driver_name()
    if driver in _EXTRAS:
        return f"; install it with: {install_hint(_EXTRAS[driver])}"
    if driver in _OTHER_DRIVERS:
        package, instead, extra = _OTHER_DRIVERS[driver]
        # "mysql://" means MySQLdb to SQLAlchemy: the extra's PyMySQL would not help.
        return (f"; {url.drivername}:// uses {driver}, which no extra of {DISTRIBUTION} "
                f"installs: pip install {package}, or write the URL as {instead}:// "
                f"with {install_hint(extra)}")
    return f"; install the DBAPI driver {driver!r} (see SQLAlchemy's dialect documentation)"


def ping(url: str | URL, connect_args: dict[str, Any] | None = None) -> str:
    """Connect once and run ``SELECT 1``; return the server's version string.

    Raises :class:`CliError` with a one-line reason when the server cannot be
    reached (the password never appears in it).
    """
    parsed = url if isinstance(url, URL) else parse_url(url)
    engine = create_engine(parsed, poolclass=NullPool, connect_args=connect_args or {})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).scalar_one()
            info = conn.dialect.server_version_info
    except Exception as exc:  # noqa: BLE001 - reported in one line, whatever it is
        raise CliError(
            f"cannot connect to {shown(parsed)}: {describe_error(exc, url=parsed)}"
        ) from None
    finally:
        engine.dispose()
    version = ".".join(str(part) for part in info) if info else ""
    return f"{engine.dialect.name} {version}".strip()


def sleep_sql(dialect_name: str, seconds: float) -> str:
    """A SQL expression that takes ``seconds`` on this backend (true once evaluated)."""
    if dialect_name == "postgresql":
        return f"pg_sleep({seconds:.4f}) IS NOT NULL"
    if dialect_name in {"mysql", "mariadb"}:
        return f"SLEEP({seconds:.4f}) = 0"
    return f"sleep({seconds:.4f}) >= 0"
