"""PgBouncer's own numbers, read from its admin console on a thread of the guard's.

With ``pgbouncer_admin_url`` set, an :class:`AdminReader` connects to
PgBouncer's admin console (database ``pgbouncer``) with psycopg (or
psycopg2) and, every ``pgbouncer_poll_interval`` seconds, runs ``SHOW POOLS``
and ``SHOW STATS`` (``SHOW CONFIG`` and ``SHOW DATABASES`` once a minute),
keeps the rows of the engine's database and user, and publishes one
immutable :class:`PgBouncerStats`. Requests never wait for it: they read the
last snapshot, a plain attribute. The admin console speaks only the simple
query protocol, so the connection is in autocommit and never prepares.

A failure (PgBouncer down, wrong credentials, the user not in
``stats_users``/``admin_users``) never reaches a request: the reader logs
``pgbouncer.unavailable`` (once per run of failures, then every 5 minutes),
keeps the last numbers marked ``stale``, and retries with a growing delay (up
to a minute). The password is never logged: events carry ``host:port`` and
the error's type only.

:func:`read_once` reads the pool size and mode once, on a connection closed
after: the fleet's server connections when nobody stated them (``_fleet``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._log import EventLog

__all__ = ["AdminReader", "AdminTarget", "PgBouncerStats", "admin_target", "read_once", "why_not"]

#: Seconds between two reads of SHOW CONFIG / SHOW DATABASES.
CONFIG_EVERY = 60.0
#: Longest delay between two attempts while the admin console fails.
RETRY_MAX = 60.0
#: A run of failures logs again after this many seconds.
RELOG_EVERY = 300.0
CONNECT_TIMEOUT = 5
#: Numbers older than this many intervals (plus 10 s) are stale however they were read.
STALE_AFTER = 3

OK = "ok"
STALE = "stale"
UNAVAILABLE = "unavailable"


@dataclasses.dataclass(frozen=True, slots=True)
class AdminTarget:
    """Where the admin console is, and which pool of PgBouncer is the engine's."""

    host: str
    port: int
    user: str | None
    password: str | None = dataclasses.field(repr=False)
    #: The engine's database and user: the rows of SHOW POOLS/STATS kept.
    database: str | None
    pool_user: str | None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def admin_target(option: str | None, engine_url: Any) -> AdminTarget | None:
    """The admin console ``option`` names for an engine at ``engine_url`` (None: off).

    ``"auto"``: the engine's host, port, user and password, database ``pgbouncer``.
    """
    if option is None:
        return None
    from sqlalchemy.engine import make_url

    if option == "auto" and engine_url.get_backend_name() != "postgresql":
        raise ValueError(
            f"pgbouncer_admin_url='auto' needs a PostgreSQL engine, not "
            f"{engine_url.get_backend_name()!r}"
        )
    url = engine_url if option == "auto" else make_url(option)
    return AdminTarget(
        host=url.host or "localhost",
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database=engine_url.database,
        pool_user=engine_url.username,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class PgBouncerStats:
    """PgBouncer's numbers for the engine's pool (its database and user), as last read.

    ``state``: ``ok`` (the last read worked), ``stale`` (it failed; the numbers
    are older, see ``age``) or ``unavailable`` (never read: the numbers are
    None). Times are in seconds; ``avg_*`` are PgBouncer's averages over its
    ``stats_period`` for the database.
    """

    address: str
    database: str | None
    user: str | None
    state: str
    #: Seconds since the numbers were read (None: never).
    age: float | None
    #: Type of the last error of the admin connection (None after a good read).
    error: str | None
    clients_active: int | None = None
    clients_waiting: int | None = None
    servers_active: int | None = None
    servers_idle: int | None = None
    servers_used: int | None = None
    #: How long the oldest waiting client has waited.
    max_wait: float | None = None
    pool_mode: str | None = None
    #: Server connections of this database's pools together (see :func:`pool_settings`).
    pool_size: int | None = None
    default_pool_size: int | None = None
    max_client_conn: int | None = None
    query_wait_timeout: float | None = None
    avg_query_time: float | None = None
    avg_xact_time: float | None = None
    avg_wait_time: float | None = None

    @property
    def clients_total(self) -> int | None:
        """Client connections of the pool, every replica's (active + waiting)."""
        if self.clients_active is None or self.clients_waiting is None:
            return None
        return self.clients_active + self.clients_waiting

    def summary(self) -> dict[str, Any]:
        """The numbers a ``pool.exhausted`` event carries."""
        return {
            "address": self.address,
            "state": self.state,
            "age_s": None if self.age is None else round(self.age, 1),
            "clients_waiting": self.clients_waiting,
            "clients_active": self.clients_active,
            "max_wait_s": None if self.max_wait is None else round(self.max_wait, 3),
            "servers_active": self.servers_active,
            "pool_size": self.pool_size,
        }

    def describe(self) -> str:
        """``PgBouncer 10.0.0.5:6432: 50 clients waiting, longest 5.0 s, ...``."""
        head = f"PgBouncer {self.address}"
        if self.clients_waiting is None:
            return f"{head}: no numbers (admin console {self.state}: {self.error})"
        size = "?" if self.pool_size is None else self.pool_size
        clients = "client" if self.clients_waiting == 1 else "clients"
        text = (
            f"{head}: {self.clients_waiting} {clients} waiting, longest "
            f"{self.max_wait or 0.0:.1f} s; {self.servers_active} of {size} "
            "server connections active"
        )
        if self.state != OK and self.age is not None:
            text += f" (read {self.age:.0f} s ago)"
        return text


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def to_int(value: Any) -> int | None:
    """A console value as an int (None: empty or not a number)."""
    number = _number(value)
    return None if number is None else int(number)


def _sum(rows: list[dict[str, Any]], column: str) -> int:
    return sum(to_int(row.get(column)) or 0 for row in rows)


def _micros(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else number / 1e6


def read_numbers(
    target: AdminTarget,
    pools: list[dict[str, Any]],
    stats: list[dict[str, Any]],
    config: dict[str, str],
    databases: list[dict[str, Any]],
) -> dict[str, Any]:
    """The fields of :class:`PgBouncerStats` from the admin console's rows."""
    mine = [
        row
        for row in pools
        if row.get("database") == target.database
        and (target.pool_user is None or row.get("user") == target.pool_user)
    ]
    numbers: dict[str, Any] = {}
    if mine:
        numbers.update(
            clients_active=_sum(mine, "cl_active"),
            clients_waiting=_sum(mine, "cl_waiting"),
            servers_active=_sum(mine, "sv_active"),
            servers_idle=_sum(mine, "sv_idle"),
            servers_used=_sum(mine, "sv_used"),
            max_wait=max(
                (to_int(r.get("maxwait")) or 0) + (to_int(r.get("maxwait_us")) or 0) / 1e6
                for r in mine
            ),
            pool_mode=mine[0].get("pool_mode"),
        )
    else:  # no client of the engine's pool connected yet
        numbers.update(
            clients_active=0,
            clients_waiting=0,
            servers_active=0,
            servers_idle=0,
            servers_used=0,
            max_wait=0.0,
        )
    for row in stats:
        if row.get("database") == target.database:
            numbers.update(
                avg_query_time=_micros(row.get("avg_query_time")),
                avg_xact_time=_micros(row.get("avg_xact_time")),
                avg_wait_time=_micros(row.get("avg_wait_time")),
            )
    size, mode = pool_settings(config, databases, target.database)
    numbers.update(
        default_pool_size=to_int(config.get("default_pool_size")),
        max_client_conn=to_int(config.get("max_client_conn")),
        query_wait_timeout=_number(config.get("query_wait_timeout")),
        pool_size=size,
    )
    # SHOW POOLS' mode first: it is the one in force for the engine's pool.
    numbers["pool_mode"] = numbers.get("pool_mode") or mode
    return numbers


def pool_settings(
    config: dict[str, Any], databases: list[dict[str, Any]], database: str | None
) -> tuple[int | None, str | None]:
    """``(pool_size, pool_mode)`` of ``database`` from ``SHOW CONFIG`` (as a
    key -> value dict) and ``SHOW DATABASES``: the server connections its
    pools may open together, and its pool mode."""
    default_size = to_int(config.get("default_pool_size"))
    size, mode = default_size, config.get("pool_mode")
    # max_db_connections caps every pool of the database together (0: no
    # cap). The database's row shows its own, else the global one. A database
    # made on demand from PgBouncer's "*" entry has no row until a client asks
    # for it: until then the global settings stand in, which is wrong only if
    # the "*" entry sets its own (the row, once there, has them; the admin
    # reader reads it again, and bench connects before it reads).
    most = to_int(config.get("max_db_connections"))
    for row in databases:
        if row.get("name") == database:
            size = to_int(row.get("pool_size")) or default_size
            # A PgBouncer without the column: the global cap still holds.
            most = to_int(row.get("max_connections", most))
            mode = row.get("pool_mode") or mode
    if size is not None and most:
        size = min(size, most)
    return size, (str(mode) if mode else None)


def _driver() -> Any:
    """psycopg (3), else psycopg2."""
    try:
        return importlib.import_module("psycopg")
    except ImportError:
        return importlib.import_module("psycopg2")


def rows(conn: Any, command: str) -> list[dict[str, Any]]:
    """The rows of an admin console command, as column -> value dicts."""
    cur = conn.cursor()
    try:
        cur.execute(command)
        if cur.description is None:
            return []
        names = [column[0] for column in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        cur.close()


def connect(target: AdminTarget) -> Any:
    """A connection to the admin console of ``target`` (autocommit, never prepares)."""
    options: dict[str, Any] = {
        "host": target.host,
        "port": target.port,
        "dbname": "pgbouncer",
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": "poolguard",
        # A PgBouncer gone silent is noticed within seconds, not TCP's hours.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 2,
    }
    if target.user is not None:
        options["user"] = target.user
    if target.password is not None:
        options["password"] = target.password
    conn = _driver().connect(**options)
    try:
        conn.autocommit = True  # the admin console refuses transactions
        if hasattr(conn, "prepare_threshold"):
            # psycopg 3 prepares a statement run 5 times: the admin console
            # speaks only the simple query protocol.
            conn.prepare_threshold = None
    except Exception:
        conn.close()
        raise
    return conn


def read_once(target: AdminTarget) -> tuple[int | None, str | None]:
    """``(pool_size, pool_mode)`` of the engine's pool, read once (``SHOW CONFIG``,
    ``SHOW DATABASES``) on a connection closed after; raises what connecting raised."""
    conn = connect(target)
    try:
        config = {str(r["key"]): str(r["value"]) for r in rows(conn, "SHOW CONFIG")}
        databases = rows(conn, "SHOW DATABASES")
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    numbers = read_numbers(target, [], [], config, databases)
    return numbers["pool_size"], numbers["pool_mode"]


#: Lower-case message markers of a failed admin login -> what they mean.
_REFUSALS: tuple[tuple[str, str], ...] = (
    ("not allowed", "the user is not in PgBouncer's stats_users or admin_users"),
    ("password authentication failed", "PgBouncer refused the password"),
    ("no such user", "the user is not in PgBouncer's auth_file"),
    ("no password supplied", "the engine's URL has no password to log in with"),
    ("does not exist", "no admin console there (a pooler other than PgBouncer?)"),
    ("unsupported startup parameter", "no admin console there (a pooler other than PgBouncer?)"),
    ("connection refused", "nothing listens there"),
    ("timeout expired", "no answer in time"),
)


def why_not(error: BaseException) -> str:
    """What an admin console's error means, in words (never its text: no secrets)."""
    if isinstance(error, ImportError):
        return "neither psycopg nor psycopg2 is installed"
    text = str(error).lower()
    for marker, meaning in _REFUSALS:
        if marker in text:
            return meaning
    return "the admin console could not be read"


def _run(ref: weakref.ReferenceType[AdminReader], stop: threading.Event) -> None:
    """The reader's thread: poll until stopped or the reader is gone."""
    delay = 0.0
    while not stop.wait(delay):
        reader = ref()
        if reader is None:
            return
        delay = reader.poll()
        del reader
    reader = ref()
    if reader is not None:
        reader.close()


class AdminReader:
    """Reads one PgBouncer admin console every ``interval`` seconds on a daemon thread."""

    def __init__(
        self,
        target: AdminTarget,
        interval: float,
        log: EventLog,
        *,
        on_read: Callable[[PgBouncerStats], None] | None = None,
    ) -> None:
        self.target = target
        self.interval = interval
        self._log = log
        self._on_read = on_read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._config: dict[str, str] = {}
        self._databases: list[dict[str, Any]] = []
        self._config_at = -CONFIG_EVERY
        self._failures = 0
        #: Good reads so far.
        self.reads = 0
        self._logged_at = -RELOG_EVERY
        #: (numbers, monotonic time read, state, error): replaced whole, read unlocked.
        self._last: tuple[dict[str, Any], float | None, str, str | None] = (
            {},
            None,
            UNAVAILABLE,
            None,
        )

    def start(self) -> None:
        thread = threading.Thread(
            target=_run,
            args=(weakref.ref(self), self._stop),
            daemon=True,
            name=f"poolguard-pgbouncer-{self._log.pool_name}",
        )
        self._thread = thread
        thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop polling; the thread closes its connection as it leaves."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stats(self) -> PgBouncerStats:
        """The last numbers, with their age now.

        Numbers older than :data:`STALE_AFTER` read intervals are ``stale``
        even if their read worked: the reader is stuck (a silent network).
        """
        numbers, read_at, state, error = self._last
        target = self.target
        age = None if read_at is None else time.monotonic() - read_at
        if state == OK and age is not None and age > STALE_AFTER * self.interval + 10:
            state = STALE
        return PgBouncerStats(
            address=target.address,
            database=target.database,
            user=target.pool_user,
            state=state,
            age=age,
            error=error,
            **numbers,
        )

    # -- the thread -------------------------------------------------------------

    def poll(self) -> float:
        """Read the admin console once; the seconds until the next read."""
        try:
            numbers = self._read()
        except Exception as error:  # noqa: BLE001 - whatever fails, requests must not notice
            self.close()
            return self._failed(error)
        self._last = (numbers, time.monotonic(), OK, None)
        self.reads += 1
        if self._failures:
            self._failures = 0
            self._log.emit(logging.INFO, "pgbouncer.available", pgbouncer=self.target.address)
        if self._on_read is not None:
            try:
                self._on_read(self.stats())
            except Exception:
                logging.getLogger("poolguard").exception("PgBouncer reading callback failed")
        return self.interval

    def _read(self) -> dict[str, Any]:
        conn = self._conn
        if conn is None:
            conn = self._conn = connect(self.target)
        now = time.monotonic()
        if now - self._config_at >= CONFIG_EVERY:
            self._config = {str(r["key"]): str(r["value"]) for r in rows(conn, "SHOW CONFIG")}
            self._databases = rows(conn, "SHOW DATABASES")
            self._config_at = now
        pools = rows(conn, "SHOW POOLS")
        stats = rows(conn, "SHOW STATS")
        return read_numbers(self.target, pools, stats, self._config, self._databases)

    def _failed(self, error: BaseException) -> float:
        numbers, read_at, _, _ = self._last
        state = UNAVAILABLE if read_at is None else STALE
        self._last = (numbers, read_at, state, type(error).__name__)
        self._failures += 1
        delay = min(RETRY_MAX, self.interval * 2.0 ** min(self._failures - 1, 10))
        now = time.monotonic()
        if self._failures == 1 or now - self._logged_at >= RELOG_EVERY:
            self._logged_at = now
            self._log.emit(
                logging.WARNING,
                "pgbouncer.unavailable",
                pgbouncer=self.target.address,
                error_type=type(error).__name__,
                failures=self._failures,
                retry_in_s=round(delay, 1),
            )
        return delay

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
