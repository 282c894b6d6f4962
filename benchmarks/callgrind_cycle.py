"""A fixed workload for instruction counts: N cycles of connect + SELECT 1 + close.

    N=3000 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/callgrind_cycle.py {plain|guarded} [default|recommended]

Run it with N=0 and N=3000 and divide the difference of the two ``I refs``
totals by 3000: the instructions one cycle costs, start-up left out. Set
``PYTHONHASHSEED=0`` so that two runs of the same code count the same.
Instruction counts do not depend on what else the machine is doing, unlike
wall-clock ratios on a shared machine.
"""

from __future__ import annotations

import os
import sys
import tempfile

import sqlalchemy as sa

import poolguard
from poolguard import recommended


def main() -> int:
    side = sys.argv[1] if len(sys.argv) > 1 else "guarded"
    options = sys.argv[2] if len(sys.argv) > 2 else "default"
    if side not in ("plain", "guarded") or options not in ("default", "recommended"):
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{os.path.join(tmp, 'c.db')}", pool_size=5,
                                  max_overflow=0)
        if side == "guarded":
            engine = poolguard.wrap(
                engine, **(recommended.options() if options == "recommended" else {})
            )
        select = sa.text("SELECT 1")

        def cycle() -> None:
            with engine.connect() as conn:
                conn.execute(select)

        for _ in range(200):  # warm: caches, the pool's connections
            cycle()
        for _ in range(int(os.environ.get("N", "3000"))):
            cycle()
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
