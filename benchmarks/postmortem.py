"""The postmortem, replayed on PostgreSQL: plain SQLAlchemy against the recommended setting.

A small web service (a 10-connection pool, 24 worker threads behind a bounded
accept queue) serves logins (critical), API calls (normal) and batch jobs
(background) that arrive at a fixed rate, each with a 1 s deadline: a request
that found no worker in time, failed, was shed or was answered late counts as
not served. After a quiet phase a storm starts, in one of four variants that
nobody told the guard about (``poolguard.cli.scenario.VARIANTS``):

* ``tagged``: a normal-priority request with its own tag turns into 3 s queries;
* ``untagged``: the same query from code that opens no ``poolguard.request``;
* ``critical``: the login flow's own query goes bad for a share of the logins
  (the protected traffic is then the API calls);
* ``uniform``: the control: every statement gets slower, there is no culprit.

Each variant runs twice in one process, plain SQLAlchemy (a ``QueuePool`` with
its defaults) then the same pool behind
``poolguard.wrap(engine, **poolguard.recommended.options())``: exactly the
recommended setting, which names no tag. Per variant and side it prints the
protected traffic's goodput before and during the storm (served/s and the
share kept), its p99 before/during and their ratio, what was shed by reason,
the guard's ``culprit.isolated`` events and how many of them were false (any
in the control; one that names neither the culprit's shape nor its tag), and
a verdict against issue 13's bar: at least 90% of the goodput kept with a p99
at most 3x (the control: nothing isolated).

Run (about 2.5 minutes with the defaults)::

    python benchmarks/postmortem.py [--url URL] [--variant all] [--pre 4] [--storm 10] [--json]

The default URL is ``POOLGUARD_TEST_POSTGRESQL_URL``, else
``postgresql+psycopg://postgres@127.0.0.1:5432/test``. The scenario itself is
``poolguard.cli.scenario``, which ``poolguard demo`` also runs (both sides at
once, on SQLite by default); the test suite runs a shorter version of it
(``tests/test_postmortem_shedding.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from poolguard.cli.scenario import (
    KINDS,
    POOL_SIZE,
    VARIANTS,
    PhaseStats,
    Sample,
    SideResult,
    Traffic,
    as_json,
    assess,
    format_report,
    guarded_options,
    run,
    run_side,
    verdict_line,
)

__all__ = [
    "DEFAULT_URL",
    "KINDS",
    "POOL_SIZE",
    "VARIANTS",
    "PhaseStats",
    "Sample",
    "SideResult",
    "Traffic",
    "format_report",
    "guarded_options",
    "main",
    "run",
    "run_side",
    "run_variants",
]

DEFAULT_URL = (
    os.environ.get("POOLGUARD_TEST_POSTGRESQL_URL")
    or "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def run_variants(
    url: str, variants: list[str], *, pre: float, storm: float
) -> dict[str, dict[str, SideResult]]:
    """Each variant, plain then guarded, with the same schedule."""
    return {name: run(url, Traffic(variant=name, pre=pre, storm=storm)) for name in variants}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument(
        "--variant", choices=[*VARIANTS, "all"], default="all", help="which storm (default all)"
    )
    parser.add_argument("--pre", type=float, default=4.0, help="seconds before the storm")
    parser.add_argument("--storm", type=float, default=10.0, help="seconds of storm")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    began = time.monotonic()
    results = run_variants(args.url, variants, pre=args.pre, storm=args.storm)
    if args.json:
        print(as_json(results))
        return 0
    for name, sides in results.items():
        print(f"== {name}: {VARIANTS[name].title}")
        print(format_report(sides))
        print()
    print(f"guarded side: poolguard.wrap(engine, **{guarded_options()!r})")
    print(
        f"verdicts (issue 13: >= 90% goodput kept, p99 <= 3x; control: no isolation), "
        f"{time.monotonic() - began:.0f} s in all:"
    )
    for sides in results.values():
        for result in sides.values():
            print("  " + verdict_line(assess(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
