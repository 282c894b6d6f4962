"""Where one caller's overhead goes: the gate and pool path, and the statement timer.

    python benchmarks/bench_cycle_parts.py [--pairs 300] [--ops 500] [--url URL]

One thread, no contention. Three engines on the same database (default: a
SQLite file; ``pool_size=5``): ``plain`` SQLAlchemy; ``no timer``, a guarded
engine whose statement timer is taken off (through the guard's private
``_queries``: a measuring device, not a supported set-up); and ``guarded``,
``poolguard.wrap()`` with its defaults. Two cycles: connect + close, and
connect + ``SELECT 1`` + close. Each engine runs ``--ops`` cycles in turn;
the order rotates and reverses from one round to the next so that drift in
the machine's speed falls on every engine alike. Reported per cycle: the
median time per operation, and the median ratio to plain over the rounds
with its p25-p75.

``guarded / no timer`` on the SELECT row is the statement timer's share;
``no timer / plain`` on the connect + close row is the gate's and the
guarded pool's. Wall-clock ratios move by a few percent from run to run on a
shared machine; ``callgrind_cycle.py`` counts instructions instead.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import sqlalchemy as sa

import poolguard

if TYPE_CHECKING:
    from collections.abc import Callable

_STMT = sa.text("SELECT 1")


def _cycle(engine: sa.Engine, select: bool) -> Callable[[int], float]:
    connect = engine.connect

    def run(n: int) -> float:
        start = time.perf_counter()
        if select:
            for _ in range(n):
                with connect() as conn:
                    conn.execute(_STMT)
        else:
            for _ in range(n):
                with connect():
                    pass
        return (time.perf_counter() - start) / n

    return run


def _engines(url: str) -> dict[str, sa.Engine]:
    def make() -> sa.Engine:
        return sa.create_engine(url, pool_size=5, max_overflow=0)

    no_timer = poolguard.wrap(make())
    timer = poolguard.get_guard(no_timer)._queries  # private: a measuring device
    if timer is None:
        raise RuntimeError("the guard has no statement timer to take off")
    timer.remove()
    return {"plain": make(), "no timer": no_timer, "guarded": poolguard.wrap(make())}


def measure(url: str, pairs: int, ops: int) -> list[str]:
    """The report's lines."""
    engines = _engines(url)
    lines = [f"{'cycle':<24} {'engine':<9} {'us/op':>8} {'ratio to plain':>15} {'(p25-p75)':>13}"]
    try:
        for label, select in (("connect+close", False), ("connect+SELECT 1+close", True)):
            runs = {name: _cycle(engine, select) for name, engine in engines.items()}
            for run in runs.values():  # warm: connections made, code paths hot
                run(ops)
            gc.collect()
            times: dict[str, list[float]] = {name: [] for name in runs}
            names = list(runs)
            for i in range(pairs * 2):
                order = names[i % len(names):] + names[:i % len(names)]
                for name in order if i % 2 == 0 else reversed(order):
                    times[name].append(runs[name](ops))
            for name in names:
                ratios = [t / p for t, p in zip(times[name], times["plain"], strict=True)]
                q = statistics.quantiles(ratios, n=4)
                lines.append(
                    f"{label:<24} {name:<9} {statistics.median(times[name]) * 1e6:>8.2f} "
                    f"{statistics.median(ratios):>15.3f} {f'{q[0]:.3f}-{q[2]:.3f}':>13}"
                )
    finally:
        for engine in engines.values():
            engine.dispose()
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pairs", type=int, default=300, help="rounds, two per pair")
    parser.add_argument("--ops", type=int, default=500, help="cycles per engine per round")
    parser.add_argument("--url", default=None, help="database URL (default: a SQLite file)")
    args = parser.parse_args()
    if args.pairs < 2 or args.ops < 1:
        parser.error(f"--pairs must be >= 2 and --ops >= 1 (got {args.pairs}, {args.ops})")
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{os.path.join(tmp, 'parts.db')}"
        print(f"python {sys.version.split()[0]}, sqlalchemy {sa.__version__}, "
              f"{sa.make_url(url).get_backend_name()}, one thread")
        for line in measure(url, args.pairs, args.ops):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
