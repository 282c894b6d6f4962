"""Hot-path microbenchmark: plain SQLAlchemy against guarded, in one process.

Both engines point at the same SQLite file. The two sides run in alternating
rounds (the order flips every round), so that machine noise (another process,
CPU frequency, a GC pause) falls on both alike; the result per case is the
median over rounds of the per-round ratio guarded/plain.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .engine import wrap

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Engine

__all__ = ["CASES", "CaseResult", "run"]


def _engine_connect(engine: Engine) -> Callable[[], None]:
    connect = engine.connect

    def cycle() -> None:
        connect().close()

    return cycle


def _pool_connect(engine: Engine) -> Callable[[], None]:
    pool = engine.pool

    def cycle() -> None:
        pool.connect().close()

    return cycle


def _select_one(engine: Engine) -> Callable[[], None]:
    connect = engine.connect
    stmt = sa.text("SELECT 1")

    def cycle() -> None:
        with connect() as conn:
            conn.execute(stmt).scalar()

    return cycle


CASES: dict[str, Callable[[Engine], Callable[[], None]]] = {
    "engine.connect/close": _engine_connect,
    "pool.connect/close": _pool_connect,
    "connect+SELECT 1+close": _select_one,
}


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """Result of one case: per-cycle times in microseconds and the ratio."""

    case: str
    plain_us: float
    guarded_us: float
    ratio: float
    ratio_p25: float
    ratio_p75: float
    plain_cpu_us: float
    guarded_cpu_us: float
    rounds: int
    iterations: int


def _time(cycle: Callable[[], None], iterations: int) -> tuple[float, float]:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(iterations):
        cycle()
    return time.perf_counter() - wall0, time.process_time() - cpu0


@contextmanager
def _engines(url: str | None, **wrap_options: Any) -> Iterator[tuple[Engine, Engine]]:
    with tempfile.TemporaryDirectory() as tmp:
        target = url or f"sqlite:///{os.path.join(tmp, 'bench.db')}"
        plain = sa.create_engine(target, pool_size=5, max_overflow=0)
        guarded = wrap(sa.create_engine(target, pool_size=5, max_overflow=0), **wrap_options)
        try:
            yield plain, guarded
        finally:
            plain.dispose()
            guarded.dispose()


def run(
    *,
    rounds: int = 30,
    iterations: int = 2000,
    cases: list[str] | None = None,
    url: str | None = None,
    **wrap_options: Any,
) -> list[CaseResult]:
    """Run the cases and return one :class:`CaseResult` each."""
    results = []
    with _engines(url, **wrap_options) as (plain, guarded):
        for name in cases or list(CASES):
            make = CASES[name]
            sides = {"plain": make(plain), "guarded": make(guarded)}
            for cycle in sides.values():  # warm up: connections made, code paths hot
                _time(cycle, iterations // 4 + 1)
            wall: dict[str, list[float]] = {"plain": [], "guarded": []}
            cpu: dict[str, list[float]] = {"plain": [], "guarded": []}
            ratios = []
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                for i in range(rounds):
                    order = ("plain", "guarded") if i % 2 == 0 else ("guarded", "plain")
                    for side in order:
                        w, c = _time(sides[side], iterations)
                        wall[side].append(w)
                        cpu[side].append(c)
                    ratios.append(wall["guarded"][-1] / wall["plain"][-1])
                    gc.collect()
            finally:
                if gc_was_enabled:
                    gc.enable()
            quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            per_us = 1e6 / iterations
            results.append(
                CaseResult(
                    case=name,
                    plain_us=statistics.median(wall["plain"]) * per_us,
                    guarded_us=statistics.median(wall["guarded"]) * per_us,
                    ratio=statistics.median(ratios),
                    ratio_p25=quart[0],
                    ratio_p75=quart[2],
                    plain_cpu_us=statistics.median(cpu["plain"]) * per_us,
                    guarded_cpu_us=statistics.median(cpu["guarded"]) * per_us,
                    rounds=rounds,
                    iterations=iterations,
                )
            )
    return results


def format_table(results: list[CaseResult]) -> str:
    """The results as an aligned text table."""
    head = (
        f"{'case':<24} {'plain us':>9} {'guarded us':>11} {'ratio':>6} "
        f"{'(p25-p75)':>13} {'cpu plain':>10} {'cpu guarded':>12}"
    )
    rows = [
        f"{r.case:<24} {r.plain_us:>9.2f} {r.guarded_us:>11.2f} {r.ratio:>6.3f} "
        f"{f'{r.ratio_p25:.3f}-{r.ratio_p75:.3f}':>13} {r.plain_cpu_us:>10.2f} "
        f"{r.guarded_cpu_us:>12.2f}"
        for r in results
    ]
    return "\n".join([head, "-" * len(head), *rows])
