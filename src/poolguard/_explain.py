"""``explain_slow_queries``: the plan of a statement shape the first time it is slow.

The plan comes from ``EXPLAIN`` (PostgreSQL, MariaDB/MySQL) or ``EXPLAIN
QUERY PLAN`` (SQLite), never ``EXPLAIN ANALYZE``, on a second cursor of the
same connection, with the same parameters. It must never run anything the
application did not ask for, nor touch the application's transaction:

* Only a single plain read is explained: it starts with SELECT or WITH, holds
  no statement separator (``;``, anywhere but at the very end) and none of
  INTO, INSERT, UPDATE, DELETE, MERGE, LOCK, SHARE or ``:=`` anywhere in its
  text (literals and comments included: no lexer has to be right about where
  a literal ends for this to hold). Anything else is logged as
  ``query.explain_skipped`` at DEBUG with the reason.
* On PostgreSQL and MariaDB/MySQL, inside the application's transaction the
  EXPLAIN runs in a SAVEPOINT that is always rolled back and released, so a
  failed EXPLAIN leaves the transaction as it was. Outside a transaction,
  MariaDB/MySQL gets a READ ONLY transaction of its own, rolled back
  (its optimiser may evaluate constant subqueries and stored functions);
  PostgreSQL in autocommit runs the EXPLAIN alone (planning never writes
  there). When the driver cannot tell the transaction state, nothing runs.
* SQLite: ``EXPLAIN QUERY PLAN`` only compiles the statement, and a
  ROLLBACK would abort the application's SELECT, whose rows are still being
  stepped through when this runs: no transaction control there.
* No second connection: a full pool must not be asked for one.

Plans can quote values (``Filter: (email = 'a@b.c')``), so the logged plan
goes through the same normalisation as fingerprints. Any failure is logged at
DEBUG and swallowed: a diagnostic must never break the request that triggered it.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from ._fingerprint import normalize

if TYPE_CHECKING:
    from ._fingerprint import Fingerprint
    from ._log import EventLog

__all__ = ["explain", "full_scans", "refusal"]

_PREFIX = {
    "postgresql": "EXPLAIN ",
    "mysql": "EXPLAIN ",
    "mariadb": "EXPLAIN ",
    "sqlite": "EXPLAIN QUERY PLAN ",
}
_READS = {"SELECT", "WITH"}
# Searched in the raw text, so a word inside a literal or a comment also
# refuses: a lost plan is cheap, running a write is not.
_WRITES = re.compile(r"\b(INTO|INSERT|UPDATE|DELETE|MERGE|LOCK|SHARE)\b|:=", re.I)
_SEPARATOR = re.compile(r";(?!\s*\Z)")
_SAVEPOINT = "poolguard_explain"
_PG_SEQ = re.compile(r"Seq Scan on (\S+)")
_SQLITE_SCAN = re.compile(r"^SCAN (?:TABLE )?(\S+)(?!.*USING)", re.M)
# libpq's PQtransactionStatus values (psycopg 3 and psycopg2 alike).
_PG_IDLE, _PG_INTRANS = 0, 2


def full_scans(db_system: str, rows: list[tuple[Any, ...]], columns: list[str]) -> list[str]:
    """Tables the plan reads in full."""
    if db_system == "postgresql":
        return [m for row in rows for m in _PG_SEQ.findall(str(row[0]))]
    if db_system == "sqlite":
        detail = "\n".join(str(row[-1]) for row in rows)
        return _SQLITE_SCAN.findall(detail)
    # MySQL/MariaDB: one row per table, access type ALL is a full scan.
    lowered = [c.lower() for c in columns]
    if "type" in lowered and "table" in lowered:
        t, name = lowered.index("type"), lowered.index("table")
        return [str(row[name]) for row in rows if str(row[t]).upper() == "ALL"]
    return []


def refusal(statement: str, operation: str, parameters: Any) -> str | None:
    """Why ``statement`` must not be explained, or ``None`` for a single plain read."""
    if isinstance(parameters, list):
        return "executemany"
    if operation not in _READS:
        return "not a SELECT"
    if _SEPARATOR.search(statement):
        return "more than one statement"
    if _WRITES.search(statement):
        return "may write or lock"
    return None


def explain(
    log: EventLog, db_system: str, used_cursor: Any, fp: Fingerprint, statement: str,
    parameters: Any,
) -> None:
    """Log ``query.explain`` for ``statement``, just run on ``used_cursor`` (never raises).

    ``db_system`` is the database's ``db.system.name``; the events go to ``log``.
    """
    prefix = _PREFIX.get(db_system)
    if prefix is None:
        return
    reason = refusal(statement, fp.operation, parameters)
    connection: Any = getattr(used_cursor, "connection", None)  # PEP 249 extension
    if reason is None and connection is None:
        reason = "no DBAPI connection"
    if reason is None and any(c.__name__.startswith("SS") for c in type(used_cursor).__mro__):
        # PyMySQL/mysqlclient unbuffered cursor: another query on the
        # connection would read (and drop) the rows the application is reading.
        reason = "unbuffered cursor"
    if reason is not None:
        log.emit(logging.DEBUG, "query.explain_skipped", fingerprint=fp.id, reason=reason)
        return
    sql = prefix + statement
    try:
        cursor = connection.cursor()
        try:
            if db_system == "sqlite":
                rows, columns = _run(cursor, sql, parameters)
            else:
                wrap = _wrapping(db_system, connection, cursor)
                if wrap is None:
                    log.emit(logging.DEBUG, "query.explain_skipped", fingerprint=fp.id,
                                   reason="transaction state unknown")
                    return
                begin, end = wrap
                if begin:
                    cursor.execute(begin)
                try:
                    rows, columns = _run(cursor, sql, parameters)
                finally:
                    for step in end:
                        cursor.execute(step)
        finally:
            cursor.close()
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not break the request
        log.emit(logging.DEBUG, "query.explain_failed", fingerprint=fp.id,
                       error_type=type(exc).__qualname__)
        return
    plan = "\n".join(" | ".join(str(v) for v in row) for row in rows)
    log.emit(
        logging.WARNING,
        "query.explain",
        fingerprint=fp.id,
        statement=fp.text,
        plan=normalize(plan, db_system)[:4000] if db_system != "postgresql" else _pg_plan(plan),
        full_scans=full_scans(db_system, rows, columns),
    )


def _run(cursor: Any, sql: str, parameters: Any) -> tuple[list[tuple[Any, ...]], list[str]]:
    # No parameters: none passed, or the driver would read % in the text as
    # a placeholder (PyMySQL, psycopg).
    if parameters is None:
        cursor.execute(sql)
    else:
        cursor.execute(sql, parameters)
    rows = [tuple(r) for r in cursor.fetchall()]
    return rows, [d[0] for d in (cursor.description or [])]


def _wrapping(db_system: str, connection: Any, cursor: Any) -> tuple[str, tuple[str, ...]] | None:
    """What to run before and after the EXPLAIN, or ``None`` to run nothing."""
    savepoint = (f"SAVEPOINT {_SAVEPOINT}",
                 (f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}", f"RELEASE SAVEPOINT {_SAVEPOINT}"))
    if db_system == "postgresql":
        info = getattr(connection, "info", None)  # psycopg 3
        status = getattr(info, "transaction_status", None)
        if status is None and hasattr(connection, "get_transaction_status"):  # psycopg2
            status = connection.get_transaction_status()
        if status == _PG_INTRANS:
            return savepoint
        if status == _PG_IDLE and getattr(connection, "autocommit", False) is True:
            return "", ()
        # Failed or unknown transaction, or one the driver would open implicitly.
        return None
    # MariaDB/MySQL: the server knows (in_transaction: MySQL 5.7+, MariaDB 10.3+).
    cursor.execute("SELECT @@in_transaction")
    row = cursor.fetchone()
    if row is None:
        return None
    if int(row[0]):
        return savepoint
    return "START TRANSACTION READ ONLY", ("ROLLBACK",)


def _pg_plan(plan: str) -> str:
    # Keep the plan's lines (normalize() would fold them into one).
    return "\n".join(normalize(line, "postgresql") for line in plan.splitlines())[:4000]
