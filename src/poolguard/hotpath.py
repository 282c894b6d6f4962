"""Hot-path microbenchmark: plain SQLAlchemy against guarded, in one process.

Both engines point at the same SQLite file. The two sides run in alternating
rounds (the order flips every round), so that machine noise (another process,
CPU frequency, a GC pause) falls on both alike; the result per case is the
median over rounds of the per-round ratio guarded/plain, pooled over several
fresh processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
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
    #: CPU of OpenTelemetry collection (``--otel``) per guarded cycle, in us:
    #: the export work the request path does not pay.
    export_cpu_us: float = 0.0


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


def _collector(otel: bool) -> tuple[Callable[[], float], dict[str, Any]]:
    """A function that runs one OpenTelemetry collection and returns its CPU seconds."""
    if not otel:
        return (lambda: 0.0), {}
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def collect() -> float:
        cpu0 = time.process_time()
        reader.get_metrics_data()
        return time.process_time() - cpu0

    return collect, {"meter_provider": provider}


Samples = dict[str, dict[str, list[float]]]
_SIDES = ("plain", "guarded")
_SERIES = ("plain_wall", "guarded_wall", "plain_cpu", "guarded_cpu", "export_cpu")


def sample(
    *,
    rounds: int,
    iterations: int,
    cases: list[str] | None = None,
    url: str | None = None,
    otel: bool = False,
) -> Samples:
    """Run alternating rounds in this process; per case, per-round seconds of each side.

    With ``otel``, the guarded engine reports to an OpenTelemetry SDK
    ``MeterProvider`` whose reader collects after every round, outside the
    timed part; the CPU of each collection is kept as ``export_cpu``.
    """
    samples: Samples = {}
    collect, wrap_options = _collector(otel)
    with _engines(url, **wrap_options) as (plain, guarded):
        for name in cases or list(CASES):
            make = CASES[name]
            sides = {"plain": make(plain), "guarded": make(guarded)}
            for cycle in sides.values():  # warm up: connections made, code paths hot
                _time(cycle, iterations // 4 + 1)
            collect()  # the first collection switches sample keeping on
            series: dict[str, list[float]] = {key: [] for key in _SERIES}
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                for i in range(rounds):
                    for side in _SIDES if i % 2 == 0 else _SIDES[::-1]:
                        wall, cpu = _time(sides[side], iterations)
                        series[f"{side}_wall"].append(wall / iterations)
                        series[f"{side}_cpu"].append(cpu / iterations)
                    series["export_cpu"].append(collect() / iterations)
                    gc.collect()
            finally:
                if gc_was_enabled:
                    gc.enable()
            samples[name] = series
    return samples


def summarize(samples: list[Samples], iterations: int) -> list[CaseResult]:
    """Merge the samples of one or more processes into one result per case."""
    results = []
    for name in samples[0]:
        merged = {key: [x for s in samples for x in s[name][key]] for key in _SERIES}
        ratios = [g / p for g, p in zip(merged["guarded_wall"], merged["plain_wall"], strict=True)]
        quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        results.append(
            CaseResult(
                case=name,
                plain_us=statistics.median(merged["plain_wall"]) * 1e6,
                guarded_us=statistics.median(merged["guarded_wall"]) * 1e6,
                ratio=statistics.median(ratios),
                ratio_p25=quart[0],
                ratio_p75=quart[2],
                plain_cpu_us=statistics.median(merged["plain_cpu"]) * 1e6,
                guarded_cpu_us=statistics.median(merged["guarded_cpu"]) * 1e6,
                rounds=len(ratios),
                iterations=iterations,
                export_cpu_us=statistics.median(merged["export_cpu"]) * 1e6,
            )
        )
    return results


def run(
    *,
    rounds: int = 20,
    iterations: int = 2000,
    processes: int = 3,
    cases: list[str] | None = None,
    url: str | None = None,
    otel: bool = False,
) -> list[CaseResult]:
    """Run the cases in ``processes`` fresh interpreters, one after another.

    One process can favour one side for its whole life (memory layout, which
    engine got the warmer cache lines); several fresh processes average that
    out, as pyperf's worker processes do.
    """
    if processes <= 1:
        return summarize(
            [sample(rounds=rounds, iterations=iterations, cases=cases, url=url, otel=otel)],
            iterations,
        )
    args = [sys.executable, "-m", "poolguard.hotpath", "--rounds", str(rounds),
            "--iterations", str(iterations)]
    for case in cases or []:
        args += ["--case", case]
    if url:
        args += ["--url", url]
    if otel:
        args.append("--otel")
    collected = []
    for _ in range(processes):
        done = subprocess.run(args, capture_output=True, text=True, check=True)  # noqa: S603
        collected.append(json.loads(done.stdout))
    return summarize(collected, iterations)


def format_table(results: list[CaseResult]) -> str:
    """The results as an aligned text table."""
    head = (
        f"{'case':<24} {'plain us':>9} {'guarded us':>11} {'ratio':>6} "
        f"{'(p25-p75)':>13} {'cpu plain':>10} {'cpu guarded':>12} {'+export':>8}"
    )
    rows = [
        f"{r.case:<24} {r.plain_us:>9.2f} {r.guarded_us:>11.2f} {r.ratio:>6.3f} "
        f"{f'{r.ratio_p25:.3f}-{r.ratio_p75:.3f}':>13} {r.plain_cpu_us:>10.2f} "
        f"{r.guarded_cpu_us:>12.2f} {r.export_cpu_us:>8.2f}"
        for r in results
    ]
    return "\n".join([head, "-" * len(head), *rows])


def _worker(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--case", action="append")
    parser.add_argument("--url")
    parser.add_argument("--otel", action="store_true")
    args = parser.parse_args(argv)
    samples = sample(rounds=args.rounds, iterations=args.iterations, cases=args.case,
                     url=args.url, otel=args.otel)
    sys.stdout.write(json.dumps(samples))


if __name__ == "__main__":
    _worker()
