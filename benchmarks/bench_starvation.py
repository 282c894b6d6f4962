"""Does any caller starve? Many threads on a small pool, with a short acquire timeout.

    python benchmarks/bench_starvation.py [--threads 256] [--duration 10] [--timeout 2]
        [--sides plain,guarded,policy]

Each side in turn (its own SQLite file engine, pool_size=8, max_overflow=0):
``--threads`` threads run connect + SELECT 1 + close in a closed loop for
``--duration`` seconds, with ``--timeout`` as the checkout timeout
(``pool_timeout`` for plain SQLAlchemy, ``acquire_timeout`` for the guard;
``policy`` adds a bounded queue, the policy path of the gate). A checkout
that times out is counted and the thread goes on. Reported: throughput, the
fewest/median/most operations any one thread completed, p50/p99/longest
checkout wait, and the timeouts. A fair pool has no timeouts here (the
longest wait stays far below the timeout) and no thread far behind the
median; a pool that lets running threads barge without bound starves some.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

import sqlalchemy as sa

import poolguard


def run_side(side: str, url: str, threads: int, duration: float, timeout: float) -> str:
    """One side's run, as a line of the report."""
    engine = sa.create_engine(url, pool_size=8, max_overflow=0, pool_timeout=timeout)
    if side != "plain":
        options = {"max_waiting_normal": 100_000} if side == "policy" else {}
        engine = poolguard.wrap(engine, acquire_timeout=timeout, **options)
    stmt = sa.text("SELECT 1")
    stop = threading.Event()
    start = threading.Barrier(threads + 1)
    waits: list[list[float]] = [[] for _ in range(threads)]
    ops = [0] * threads
    timeouts = [0] * threads

    def caller(i: int) -> None:
        mine = waits[i]
        start.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                conn = engine.connect()
            except sa.exc.TimeoutError:
                mine.append(time.perf_counter() - t0)
                timeouts[i] += 1
                continue
            mine.append(time.perf_counter() - t0)
            try:
                conn.execute(stmt).scalar()
            finally:
                conn.close()
            ops[i] += 1

    workers = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    wall0 = time.perf_counter()
    time.sleep(duration)
    stop.set()
    for worker in workers:
        worker.join()
    wall = time.perf_counter() - wall0
    engine.dispose()
    flat = sorted(w for mine in waits for w in mine)
    done = sum(ops)

    def at(q: float) -> float:
        return flat[min(len(flat) - 1, int(q * len(flat)))] * 1e3 if flat else 0.0

    return (
        f"{side:<8} {done / wall:>8.0f} {min(ops):>6} {statistics.median(ops):>7.0f} "
        f"{max(ops):>6} {at(0.5):>8.1f} {at(0.99):>8.1f} {at(1.0):>8.1f} {sum(timeouts):>8}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=256)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per side")
    parser.add_argument("--timeout", type=float, default=2.0, help="checkout timeout, seconds")
    parser.add_argument("--sides", default="plain,guarded,policy")
    args = parser.parse_args(argv)
    print(f"{args.threads} threads, pool of 8, {args.duration:g} s per side, checkout timeout "
          f"{args.timeout:g} s (python {sys.version.split()[0]}, sqlalchemy {sa.__version__})\n")
    print(f"{'side':<8} {'ops/s':>8} {'fewest':>6} {'median':>7} {'most':>6} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'timeouts':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, side in enumerate(args.sides.split(",")):
            url = f"sqlite:///{os.path.join(tmp, f'starvation{i}.db')}"
            print(run_side(side, url, args.threads, args.duration, args.timeout), flush=True)
    print("\nfewest/median/most: operations completed by one thread; a timeout is a checkout "
          "that gave up.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
