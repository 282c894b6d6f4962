"""What culprit isolation's sampling costs: one sample, and its share of a core.

    python benchmarks/bench_culprit_sampling.py [--shapes 200] [--held 8] [--samples 2000]

With ``isolate_culprits`` on, the guard samples the holds every 0.2 s (on the
checkout that finds the sample due): it reads each checked-out connection's
hold and, when a connection has been held 0.1 s or more (or once a second),
the query stats. This times ``guard.culprits.sample()`` on a SQLite pool of
10 with ``--shapes`` distinct statements recorded and ``--held`` connections
out, and prints the cost per sample and at five samples a second. Nothing is
added per checkout or per statement: the per-statement check is one
attribute read while no shape is capped or isolated.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import sqlalchemy as sa

import poolguard
from poolguard import recommended


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=int, default=200)
    parser.add_argument("--held", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = poolguard.wrap(
            sa.create_engine(f"sqlite:///{os.path.join(tmp, 'b.db')}", pool_size=10,
                             max_overflow=0, poolclass=sa.pool.QueuePool),
            **recommended.options(),
        )
        guard = poolguard.get_guard(engine)
        with engine.connect() as conn:
            for i in range(args.shapes):
                conn.execute(sa.text(f"SELECT {i} AS c{i}"))
        conns = [engine.connect() for _ in range(args.held)]
        for conn in conns:
            conn.execute(sa.text("SELECT 1"))
        for fresh in (True, False):
            if not fresh:
                time.sleep(0.15)  # held 0.1 s or more: the query stats are read too
            start = time.perf_counter()
            for _ in range(args.samples):
                guard.culprits.sample(time.perf_counter())
            each = (time.perf_counter() - start) / args.samples
            what = "connections just taken" if fresh else "connections held >= 0.1 s"
            print(f"{what:28} one sample {each * 1e6:7.1f} us; at 5/s {each * 5 * 100:.3f}% "
                  f"of one core ({args.shapes} shapes, {args.held} held)")
        for conn in conns:
            conn.close()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
