"""Where one caller's overhead goes: the gate and pool path, and the statement timer.

    python benchmarks/bench_cycle_parts.py [--pairs 300] [--ops 500] [--url URL]
        [--threads 1]

No contention: one thread by default, or ``--threads N`` callers that never
wait (the pool has room for all of them). Three engines on the same database
(default: a SQLite file; ``pool_size=max(5, N)``): ``plain`` SQLAlchemy;
``no timer``, a guarded engine whose statement timer is taken off (through
the guard's private ``_queries``: a measuring device, not a supported
set-up); and ``guarded``, ``poolguard.wrap()`` with its defaults. Two cycles: connect + close, and
connect + ``SELECT 1`` + close. Each engine runs ``--ops`` cycles in turn;
the order rotates and reverses from one round to the next so that drift in
the machine's speed falls on every engine alike. Reported per cycle: the
median time per operation, and the median ratio to plain over the rounds
with its p25-p75.

``guarded / no timer`` on the SELECT row is the statement timer's share;
``no timer / plain`` on the connect + close row is the gate's and the
guarded pool's. Wall-clock ratios move by a few percent from run to run on a
shared machine; ``callgrind_cycle.py`` counts instructions instead.

With ``--threads`` above 1 the callers share the GIL: each caller's
statement lets another run, and taking the GIL back is a context switch.
The ``cs/op`` column counts them (the process's voluntary context switches
per cycle, where ``resource`` has them): the Python a cycle runs between two
statements sets how often a caller finds the GIL taken.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING

import sqlalchemy as sa

import poolguard
from poolguard.cli._hotpath import without_statement_timer

if TYPE_CHECKING:
    from collections.abc import Callable

_STMT = sa.text("SELECT 1")


def _switches() -> int:
    """Voluntary context switches of the process so far (0 where unknown)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def _cycle(engine: sa.Engine, select: bool, threads: int) -> Callable[[int], tuple[float, float]]:
    connect = engine.connect

    def loop(n: int) -> None:
        if select:
            for _ in range(n):
                with connect() as conn:
                    conn.execute(_STMT)
        else:
            for _ in range(n):
                with connect():
                    pass

    def run(n: int) -> tuple[float, float]:
        """Seconds and voluntary context switches per cycle."""
        if threads == 1:
            switched, start = _switches(), time.perf_counter()
            loop(n)
            return (time.perf_counter() - start) / n, (_switches() - switched) / n
        ready = threading.Barrier(threads + 1)

        def caller() -> None:
            ready.wait()
            loop(n)

        workers = [threading.Thread(target=caller) for _ in range(threads)]
        for worker in workers:
            worker.start()
        switched = _switches()
        ready.wait()
        start = time.perf_counter()
        for worker in workers:
            worker.join()
        ops = n * threads
        return (time.perf_counter() - start) / ops, (_switches() - switched) / ops

    return run


def _engines(url: str, threads: int) -> dict[str, sa.Engine]:
    def make() -> sa.Engine:
        return sa.create_engine(url, pool_size=max(5, threads), max_overflow=0)

    return {"plain": make(), "no timer": without_statement_timer(poolguard.wrap(make())),
            "guarded": poolguard.wrap(make())}


def measure(url: str, pairs: int, ops: int, threads: int = 1) -> list[str]:
    """The report's lines."""
    engines = _engines(url, threads)
    try:
        return compare(engines, pairs, ops, threads)
    finally:
        for engine in engines.values():
            engine.dispose()


def compare(
    engines: dict[str, sa.Engine], pairs: int, ops: int, threads: int = 1,
    cycles: tuple[tuple[str, bool], ...] = (("connect+close", False),
                                            ("connect+SELECT 1+close", True)),
) -> list[str]:
    """Run ``cycles`` on ``engines`` (the first one is the baseline) in rotating
    order; the report's lines."""
    base = next(iter(engines))
    lines = [f"{'cycle':<24} {'engine':<9} {'us/op':>8} {'ratio to plain':>15} {'(p25-p75)':>13}"
             f" {'cs/op':>6}"]
    for label, select in cycles:
        runs = {name: _cycle(engine, select, threads) for name, engine in engines.items()}
        for run in runs.values():  # warm: connections made, code paths hot
            run(ops)
        gc.collect()
        times: dict[str, list[float]] = {name: [] for name in runs}
        switches: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for i in range(pairs * 2):
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order if i % 2 == 0 else reversed(order):
                seconds, switched = runs[name](ops)
                times[name].append(seconds)
                switches[name].append(switched)
        for name in names:
            ratios = [t / p for t, p in zip(times[name], times[base], strict=True)]
            q = statistics.quantiles(ratios, n=4)
            lines.append(
                f"{label:<24} {name:<9} {statistics.median(times[name]) * 1e6:>8.2f} "
                f"{statistics.median(ratios):>15.3f} {f'{q[0]:.3f}-{q[2]:.3f}':>13}"
                f" {statistics.median(switches[name]):>6.2f}"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pairs", type=int, default=300, help="rounds, two per pair")
    parser.add_argument("--ops", type=int, default=500, help="cycles per engine per round")
    parser.add_argument("--url", default=None, help="database URL (default: a SQLite file)")
    parser.add_argument("--threads", type=int, default=1,
                        help="callers per round, each running --ops cycles (default 1)")
    args = parser.parse_args()
    if args.pairs < 2 or args.ops < 1 or args.threads < 1:
        parser.error(f"--pairs must be >= 2, --ops >= 1 and --threads >= 1 "
                     f"(got {args.pairs}, {args.ops}, {args.threads})")
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{os.path.join(tmp, 'parts.db')}"
        print(f"python {sys.version.split()[0]}, sqlalchemy {sa.__version__}, "
              f"{sa.make_url(url).get_backend_name()}, "
              f"{'one thread' if args.threads == 1 else f'{args.threads} threads'}")
        for line in measure(url, args.pairs, args.ops, args.threads):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
