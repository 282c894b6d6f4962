"""The workload of ``poolguard bench``: its file format, the built-in mix, and a trial run.

A workload file holds one statement a line, ``weight [priority [tag]] | SQL``
(see ``poolguard bench --help``); :func:`parse_workload` reads it,
:func:`format_workload` writes it, :func:`default_workload` is the built-in
mix, and :func:`check_workload` runs each statement once, so that a typo fails
before the benchmark starts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from poolguard.policies import NORMAL, PRIORITIES

from ._db import UsageError, describe_error, sleep_sql

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import sqlalchemy as sa

__all__ = [
    "Statement",
    "check_workload",
    "default_workload",
    "format_workload",
    "parse_workload",
    "read_workload",
]


@dataclasses.dataclass(frozen=True)
class Statement:
    """One statement of the workload."""

    weight: float
    priority: str
    tag: str | None
    sql: str


def parse_workload(text: str, source: str = "workload") -> list[Statement]:
    """Parse the workload file format; :class:`UsageError` names the line."""
    statements = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{source}:{number}"
        head, sep, sql = stripped.partition("|")
        if not sep or not sql.strip():
            raise UsageError(f"{where}: expected 'weight [priority [tag]] | SQL'")
        words = head.split()
        if not words or len(words) > 3:
            raise UsageError(f"{where}: expected 'weight [priority [tag]]' before '|'")
        try:
            weight = float(words[0])
        except ValueError:
            weight = -1.0
        if not math.isfinite(weight) or weight <= 0:
            raise UsageError(f"{where}: weight {words[0]!r} is not a number > 0")
        priority = words[1] if len(words) > 1 else NORMAL
        if priority not in PRIORITIES:
            raise UsageError(
                f"{where}: priority {priority!r} is not one of {', '.join(PRIORITIES)}"
            )
        tag = words[2] if len(words) > 2 and words[2] != "-" else None
        statements.append(Statement(weight, priority, tag, sql.strip()))
    if not statements:
        raise UsageError(f"{source}: no statements (expected 'weight [priority [tag]] | SQL')")
    return statements


def default_workload(dialect_name: str) -> list[Statement]:
    """A mix of fast reads and a few slower statements, for this backend."""
    count = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {}) "
        "SELECT count(*) FROM n"
    )
    return [
        Statement(60, NORMAL, "point-read", "SELECT 1"),
        Statement(25, NORMAL, "small-scan", count.format(200)),
        Statement(10, NORMAL, "scan", count.format(5000)),
        Statement(4, NORMAL, "io-wait", f"SELECT {sleep_sql(dialect_name, 0.005)}"),
        # Rarer than 1 in 100, so that p99 shows queueing rather than this statement.
        Statement(0.5, "background", "report", f"SELECT {sleep_sql(dialect_name, 0.05)}"),
    ]


def format_workload(statements: Sequence[Statement]) -> str:
    """The workload in its file format."""
    lines = ["# weight priority tag | SQL"]
    lines += [f"{s.weight:g} {s.priority} {s.tag or '-'} | {s.sql}" for s in statements]
    return "\n".join(lines) + "\n"


def read_workload(path: Path | None) -> str | None:
    """The text of the ``--workload`` file (None without one); :class:`UsageError` if unreadable."""
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UsageError(f"--workload {path}: {reason}") from None


def check_workload(engine: sa.Engine, statements: Sequence[Statement], source: str) -> None:
    """Run each statement once (rolled back), so a typo fails before the benchmark."""
    for i, s in enumerate(statements, 1):
        error = _try(engine, s.sql)
        if error is not None:
            raise UsageError(f"{source}: statement {i} ({s.sql[:60]!r}) failed: {error}")


def _try(engine: sa.Engine, sql: str) -> str | None:
    """Run ``sql`` once and roll back; the error in one line, or None."""
    try:
        with engine.connect() as conn:
            result = conn.exec_driver_sql(sql)
            if result.returns_rows:
                result.fetchall()
            conn.rollback()
    except Exception as exc:  # noqa: BLE001 - reported in one line
        return describe_error(exc)
    return None

