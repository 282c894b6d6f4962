"""``explain_slow_queries``: the plan of a statement shape the first time it is slow.

The plan comes from ``EXPLAIN`` (PostgreSQL, MariaDB/MySQL) or ``EXPLAIN
QUERY PLAN`` (SQLite) on a second cursor of the same connection, with the
same parameters; the statement itself is not run again. Plans can quote
values (``Filter: (email = 'a@b.c')``), so the logged plan goes through the
same normalisation as fingerprints. Any failure is logged at DEBUG and
swallowed: a diagnostic must never break the request that triggered it.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from .fingerprint import normalize

if TYPE_CHECKING:
    from .fingerprint import Fingerprint
    from .guard import Guard

__all__ = ["explain", "full_scans"]

_PREFIX = {
    "postgresql": "EXPLAIN ",
    "mysql": "EXPLAIN ",
    "mariadb": "EXPLAIN ",
    "sqlite": "EXPLAIN QUERY PLAN ",
}
_EXPLAINABLE = {"SELECT", "UPDATE", "DELETE", "INSERT", "WITH"}
_PG_SEQ = re.compile(r"Seq Scan on (\S+)")
_SQLITE_SCAN = re.compile(r"^SCAN (?:TABLE )?(\S+)(?!.*USING)", re.M)


def full_scans(dialect: str, rows: list[tuple[Any, ...]], columns: list[str]) -> list[str]:
    """Tables the plan reads in full."""
    if dialect == "postgresql":
        return [m for row in rows for m in _PG_SEQ.findall(str(row[0]))]
    if dialect == "sqlite":
        detail = "\n".join(str(row[-1]) for row in rows)
        return _SQLITE_SCAN.findall(detail)
    # MySQL/MariaDB: one row per table, access type ALL is a full scan.
    lowered = [c.lower() for c in columns]
    if "type" in lowered and "table" in lowered:
        t, name = lowered.index("type"), lowered.index("table")
        return [str(row[name]) for row in rows if str(row[t]).upper() == "ALL"]
    return []


def explain(
    guard: Guard, used_cursor: Any, fp: Fingerprint, statement: str, parameters: Any
) -> None:
    """Log ``query.explain`` for ``statement``, just run on ``used_cursor`` (never raises)."""
    dialect = guard.db_system
    prefix = _PREFIX.get(dialect)
    connection = getattr(used_cursor, "connection", None)  # PEP 249 extension
    if prefix is None or connection is None or fp.operation not in _EXPLAINABLE:
        return
    if isinstance(parameters, list):  # executemany: no single plan
        return
    try:
        cursor = connection.cursor()
        try:
            cursor.execute(prefix + statement, parameters or ())
            rows = [tuple(r) for r in cursor.fetchall()]
            columns = [d[0] for d in (cursor.description or [])]
        finally:
            cursor.close()
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not break the request
        guard.log.emit(logging.DEBUG, "query.explain_failed", fingerprint=fp.id,
                       error_type=type(exc).__qualname__)
        return
    plan = "\n".join(" | ".join(str(v) for v in row) for row in rows)
    guard.log.emit(
        logging.WARNING,
        "query.explain",
        fingerprint=fp.id,
        statement=fp.text,
        plan=normalize(plan)[:4000] if dialect != "postgresql" else _pg_plan(plan),
        full_scans=full_scans(dialect, rows, columns),
    )


def _pg_plan(plan: str) -> str:
    # Keep the plan's lines (normalize() would fold them into one).
    return "\n".join(normalize(line) for line in plan.splitlines())[:4000]
