"""Contention benchmark: plain SQLAlchemy against poolguard with many callers, one run.

    python benchmarks/bench_contention.py [--quick] [--rounds 30] [--duration 0.1]
        [--fair-duration 2.0] [--aa] [--gate] [--url URL] [--json]
        [--callers 1,4,16,64,256] [--modes threads,asyncio]

Every caller (a thread on an Engine, or an asyncio task on an AsyncEngine
with aiosqlite) runs connect + SELECT 1 + close in a closed loop against a
SQLite file, pool_size=8, max_overflow=0; with no policy and with a policy
on (bounded queues). Each side's callers are started once per case and
parked between runs. Plain and guarded take turns in slices of --duration
seconds, --rounds pairs of them in ABBA order (the order flips every pair):
the ratio is the median (and p25-p75) of the per-pair ratios of time per
operation; CPU per operation and throughput are medians over the slices too.
The p99 and longest checkout wait and the spread of waits (coefficient of
variation, the fairness measure) come from one continuous run of
--fair-duration seconds per side: short slices would hide starvation.
--aa adds the A/A self-check (guarded side replaced by a second plain
engine): the instrument's own bias, a ratio that should read 1.00. --gate
adds rows whose guarded side has its statement timer taken off (no policy):
the gate and the pool alone, so that one run shows how much of a ratio is
the gate and how much the timing of each statement. --url runs against a
database of your own (its driver must serve create_async_engine too for the
tasks, as postgresql+psycopg does): SQLite's statements release the GIL for
about a microsecond, so its threads rows show the most a few microseconds
of Python can cost; a server's round trip shows what they cost in service.
"""

from __future__ import annotations

import argparse
import sys

from poolguard.cli import _hotpath as hotpath


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: two caller counts, 3 pairs of 0.02 s slices, "
                        "0.05 s continuous runs")
    plan = hotpath.CONTENTION_PLAN
    parser.add_argument("--rounds", type=int, default=plan.pairs,
                        help=f"ABBA pairs of slices per case (default {plan.pairs})")
    parser.add_argument("--duration", type=float, default=plan.slice_s,
                        help=f"seconds per slice (default {plan.slice_s:g})")
    parser.add_argument("--fair-duration", type=float, default=plan.fair_s,
                        help="seconds of the continuous run per side that gives the waits "
                        f"(default {plan.fair_s:g})")
    parser.add_argument("--aa", action="store_true",
                        help="add the A/A self-check: the guarded side a second plain engine")
    parser.add_argument("--gate", action="store_true",
                        help="add rows with the guarded side's statement timer off: the gate "
                        "and the pool alone")
    parser.add_argument("--url", default=None,
                        help="database URL (default: a SQLite file; aiosqlite for the tasks)")
    parser.add_argument("--callers", default=",".join(map(str, hotpath.CONTENTION_CALLERS)))
    parser.add_argument("--modes", default="threads,asyncio")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return hotpath.contention_main(
        as_json=args.json,
        quick=args.quick,
        rounds=args.rounds,
        duration=args.duration,
        fair_duration=args.fair_duration,
        aa=args.aa,
        gate=args.gate,
        url=args.url,
        callers=tuple(int(c) for c in args.callers.split(",")),
        modes=tuple(args.modes.split(",")),
    )


if __name__ == "__main__":
    sys.exit(main())
