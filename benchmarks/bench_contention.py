"""Contention benchmark: plain SQLAlchemy against poolguard with many callers, one run.

    python benchmarks/bench_contention.py [--quick] [--rounds 5] [--duration 0.5] [--json]
        [--callers 1,4,16,64,256] [--modes threads,asyncio]

Every caller (a thread on an Engine, or an asyncio task on an AsyncEngine
with aiosqlite) runs connect + SELECT 1 + close in a closed loop against a
SQLite file, pool_size=8, max_overflow=0; with no policy and with a policy
on (bounded queues). Plain and guarded alternate round by round; the ratio is
the median of the per-round ratios of time per operation. Also reported:
CPU per operation, throughput, p99 and longest checkout wait, and the spread
of waits (coefficient of variation) as the fairness measure.
"""

from __future__ import annotations

import argparse
import sys

from poolguard import hotpath


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=0.5, help="seconds per round and side")
    parser.add_argument("--callers", default=",".join(map(str, hotpath.CONTENTION_CALLERS)))
    parser.add_argument("--modes", default="threads,asyncio")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    return hotpath.contention_main(
        as_json=args.json,
        quick=args.quick,
        rounds=args.rounds,
        duration=args.duration,
        callers=tuple(int(c) for c in args.callers.split(",")),
        modes=tuple(args.modes.split(",")),
    )


if __name__ == "__main__":
    sys.exit(main())
