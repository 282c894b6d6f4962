"""The postmortem, replayed on PostgreSQL: plain SQLAlchemy against a guarded pool.

A service with a 10-connection pool serves a steady mix of traffic:

* ``login``: fast ``critical`` requests (``SELECT 1``), tag ``login``;
* ``api``: ``normal`` requests running a 10 ms query, tag ``api``;
* ``batch``: ``background`` jobs running a 50 ms query, tag ``batch``.

After a quiet phase, a storm of an unoptimized query (a slow scan, tag
``report``, priority ``normal``) arrives from a few dozen threads that retry
as soon as they can (after ``Retry-After`` when they are shed). The same
traffic runs twice in one process: against plain SQLAlchemy (a ``QueuePool``
with its defaults: waiters queue for up to 30 s), then against the same pool
behind ``poolguard.wrap(engine, **GUARDED_OPTIONS)``: the recommended setting
(``poolguard.recommended.options()``) plus a tag limit on ``report``, the one
option that names the culprit in advance (``scenario.named_in_advance``).

Per side and per phase (pre-storm, storm) it measures for each kind of work:
requests served, failed (timeouts, errors) and shed (by reason), p50/p99
latency of the served ones, throughput, logins served in each second of the
storm, and the most report queries that ran at once. A request counts in the
phase in which it started; both sides run the same schedule.

The scenario itself is ``poolguard.cli.scenario``, which ``poolguard demo``
also runs (both sides at once, on SQLite by default).

Run: ``python benchmarks/postmortem.py [--url URL] [--pre 8] [--storm 12] [--json]``
(default URL from ``POOLGUARD_TEST_POSTGRESQL_URL``, else
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). The test suite runs a
shorter version of the same scenario (``tests/test_postmortem_shedding.py``).
"""

from __future__ import annotations

import argparse
import os
import sys

from poolguard.cli.scenario import (
    GUARDED_OPTIONS,
    KINDS,
    POOL_SIZE,
    PhaseStats,
    Sample,
    SideResult,
    Traffic,
    as_json,
    format_report,
    run,
    run_side,
)

__all__ = [
    "DEFAULT_URL",
    "GUARDED_OPTIONS",
    "KINDS",
    "POOL_SIZE",
    "PhaseStats",
    "Sample",
    "SideResult",
    "Traffic",
    "format_report",
    "run",
    "run_side",
]

DEFAULT_URL = (
    os.environ.get("POOLGUARD_TEST_POSTGRESQL_URL")
    or "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--pre", type=float, default=Traffic.pre, help="seconds before the storm")
    parser.add_argument("--storm", type=float, default=Traffic.storm, help="seconds of storm")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    traffic = Traffic(pre=args.pre, storm=args.storm)
    results = run(args.url, traffic)
    print(as_json(results) if args.json else format_report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
