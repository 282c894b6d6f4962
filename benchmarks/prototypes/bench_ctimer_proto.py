"""What a compiled statement timer would save: a prototype, measured against poolguard's own.

    python benchmarks/prototypes/bench_ctimer_proto.py [--threads 4] [--pairs 80] [--ops 300]

A measuring device, not part of poolguard. It compiles ``ctimer_proto.c``
(next to this file) with the interpreter's C compiler into a temporary
folder, then runs connect + ``SELECT 1`` + close on a SQLite file with four
engines in rotating order (``bench_cycle_parts.py``'s method): ``plain``
SQLAlchemy, ``no timer`` (a guard with its statement timer taken off),
``guarded`` (the guard as shipped) and ``compiled`` (a guard whose
``do_execute`` is the prototype). The prototype covers only the timer's
common path (hold, timing, the shape's histogram and rows, the hold's top
statement), so the script refuses to run when a guard has a time limit,
breakers, culprit caps or an exporter on; it skips the slow-query check,
two comparisons. It reaches private parts of the guard (``_queries``, the
gate's ``out``), as a measuring device may.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

import poolguard
from poolguard import _hold
from poolguard._histogram import BOUNDS
from poolguard.cli._hotpath import without_statement_timer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import bench_cycle_parts as parts  # type: ignore[import-not-found]  # noqa: E402 - put on the path above

if TYPE_CHECKING:
    from types import ModuleType


def build(folder: str) -> ModuleType:
    """Compile the prototype into ``folder`` and import it."""
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    target = os.path.join(folder, "ctimer_proto" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(  # noqa: S603 - the interpreter's own compiler, our own source
        [*compiler, "-O2", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
         str(HERE / "ctimer_proto.c"), "-o", target],
        check=True,
    )
    spec = importlib.util.spec_from_file_location("ctimer_proto", target)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {target}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.configure(BOUNDS, _hold.STATEMENT, _hold.RUNNING_SINCE, _hold.TOP_STAT,
                     _hold.TOP_TIME)
    return module


def compiled_engine(proto: ModuleType, engine: sa.Engine) -> sa.Engine:
    """``engine``, guarded, its ``do_execute`` timed by the prototype."""
    guarded = poolguard.wrap(engine)
    guard = poolguard.get_guard(guarded)
    timer = guard._queries
    if timer is None:
        raise RuntimeError("the guard has no statement timer")
    if (guard.limits_on or guard.breakers_on or guard.culprits.shapes is not None
            or guard.recorder.export_ops is not None):
        raise RuntimeError("the prototype covers the common path only: a time limit, "
                           "breakers, culprit caps or an exporter is on")
    dialect = guarded.dialect
    inner = type(dialect).do_execute.__get__(dialect)
    dialect.do_execute = proto.make(  # type: ignore[method-assign]
        inner, guard.gate.out, timer._stats, timer._stat)
    return guarded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=4, help="callers that never wait")
    parser.add_argument("--pairs", type=int, default=80, help="rounds, two per pair")
    parser.add_argument("--ops", type=int, default=300, help="cycles per caller per round")
    args = parser.parse_args()
    if args.pairs < 2 or args.ops < 1 or args.threads < 1:
        parser.error(f"--pairs must be >= 2, --ops >= 1 and --threads >= 1 "
                     f"(got {args.pairs}, {args.ops}, {args.threads})")
    with tempfile.TemporaryDirectory() as tmp:
        proto = build(tmp)
        url = f"sqlite:///{os.path.join(tmp, 'proto.db')}"

        def make() -> sa.Engine:
            return sa.create_engine(url, pool_size=max(5, args.threads), max_overflow=0)

        no_timer = without_statement_timer(poolguard.wrap(make()))
        engines = {"plain": make(), "no timer": no_timer, "guarded": poolguard.wrap(make()),
                   "compiled": compiled_engine(proto, make())}
        try:
            print(f"python {sys.version.split()[0]}, sqlalchemy {sa.__version__}, sqlite, "
                  f"{args.threads} thread{'s' if args.threads > 1 else ''}")
            for line in parts.compare(engines, args.pairs, args.ops, args.threads,
                                      (("connect+SELECT 1+close", True),)):
                print(line)
        finally:
            for engine in engines.values():
                engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
