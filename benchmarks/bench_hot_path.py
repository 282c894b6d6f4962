"""Hot-path benchmark: plain SQLAlchemy against poolguard, side by side in one run.

    python benchmarks/bench_hot_path.py [--processes 3] [--rounds 20] [--iterations 2000] [--json]

Cases: engine.connect()/close(), pool.connect()/close(), and connect +
SELECT 1 + close, on a SQLite file. The two sides alternate round by round
and the reported ratio is the median of the per-round ratios guarded/plain
(poolguard.cli._hotpath explains why that is robust on a noisy machine), pooled
over several fresh processes.

Why not pyperf or pytest-benchmark: both time one benchmark after the other,
so a slow minute on a shared two-core machine lands on one side only, and a
1.10x budget drowns in that noise. Alternating rounds in one process puts
the noise on both sides; the spread (p25-p75 of the per-round ratios) is
printed so a reader can see how much to trust the median.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys

import sqlalchemy

from poolguard.cli import _hotpath as hotpath


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds per process")
    parser.add_argument("--iterations", type=int, default=2000, help="cycles per round")
    parser.add_argument("--processes", type=int, default=3, help="fresh interpreters")
    parser.add_argument("--case", action="append", choices=list(hotpath.CASES))
    parser.add_argument("--url", help="database URL (default: a temporary SQLite file)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--otel",
        action="store_true",
        help="guarded side reports to an OpenTelemetry SDK MeterProvider, collected every round",
    )
    args = parser.parse_args(argv)
    results = hotpath.run(
        rounds=args.rounds,
        iterations=args.iterations,
        processes=args.processes,
        cases=args.case,
        url=args.url,
        otel=args.otel,
    )
    meta = {
        "python": platform.python_version(),
        "sqlalchemy": sqlalchemy.__version__,
        "machine": platform.machine(),
        "otel": args.otel,
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": [dataclasses.asdict(r) for r in results]},
                         indent=2))
    else:
        print(f"python {meta['python']}, sqlalchemy {meta['sqlalchemy']}: "
              f"{args.processes} processes x {args.rounds} rounds x {args.iterations} cycles"
              f"{', OpenTelemetry SDK on' if args.otel else ''}")
        print(hotpath.format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
