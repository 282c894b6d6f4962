"""wrap() of a busy process: time to adopt checked-out connections.

Keeps N live (GC-tracked) objects and 3 checked-out connections, then times
``poolguard.wrap(engine)`` (fresh engine per round) and the adoption lookup
alone. Usage: ``python benchmarks/bench_wrap_busy.py [objects] [rounds]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

import poolguard
from poolguard import _compat as compat_module


def main() -> None:
    objects = int(sys.argv[1]) if len(sys.argv) > 1 else 5_000_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    heap = [[] for _ in range(objects)]  # lists: tracked by the GC, as app objects are
    wrap_ms, lookup_ms = [], []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        for _ in range(rounds):
            engine = sa.create_engine(url, pool_size=5, max_overflow=0)
            held = [engine.connect() for _ in range(3)]
            start = time.perf_counter()
            records = compat_module.checked_out_records(engine.pool)
            lookup_ms.append((time.perf_counter() - start) * 1000)
            assert len(records) == 3
            start = time.perf_counter()
            poolguard.wrap(engine, metrics=False)
            wrap_ms.append((time.perf_counter() - start) * 1000)
            assert poolguard.get_guard(engine).gate.in_use == 3
            for conn in held:
                conn.close()
            engine.dispose()
    print(f"sqlalchemy {sa.__version__}, {len(heap):,} live objects, {rounds} rounds")
    print(f"  adoption lookup: median {statistics.median(lookup_ms):.3f} ms "
          f"(min {min(lookup_ms):.3f}, max {max(lookup_ms):.3f})")
    print(f"  wrap():          median {statistics.median(wrap_ms):.3f} ms "
          f"(min {min(wrap_ms):.3f}, max {max(wrap_ms):.3f})")


if __name__ == "__main__":
    main()
