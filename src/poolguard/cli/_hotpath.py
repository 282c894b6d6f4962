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
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .._engine import wrap

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Engine

__all__ = ["CASES", "CONTENTION_CALLERS", "CaseResult", "ContentionResult", "run",
           "run_contention"]


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
class Comparison:
    """Plain against guarded: times in microseconds, guarded/plain ratio over rounds."""

    plain_us: float
    guarded_us: float
    #: Median, first and third quartile of the rounds' ratios.
    ratio: float
    ratio_p25: float
    ratio_p75: float
    plain_cpu_us: float
    guarded_cpu_us: float


def _ratio_stats(ratios: list[float]) -> dict[str, float]:
    quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"ratio": statistics.median(ratios), "ratio_p25": quart[0], "ratio_p75": quart[2]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaseResult(Comparison):
    """Result of one case: per-cycle times and the ratio."""

    case: str
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
        results.append(
            CaseResult(
                case=name,
                plain_us=statistics.median(merged["plain_wall"]) * 1e6,
                guarded_us=statistics.median(merged["guarded_wall"]) * 1e6,
                **_ratio_stats(ratios),
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
    args = [sys.executable, "-m", "poolguard.cli._hotpath", "--rounds", str(rounds),
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


# -- under contention -----------------------------------------------------------
#
# The same comparison with many callers sharing a small pool: every caller
# runs connect + SELECT 1 + close in a closed loop for a fixed time, on
# threads (Engine) or asyncio tasks (AsyncEngine). Plain and guarded run in
# alternating rounds, each round with a fresh set of callers; the ratio per
# case is the median of the per-round ratios of per-operation time.

#: Caller counts of the full run (``--quick``: the first two).
CONTENTION_CALLERS = (1, 4, 16, 64, 256)
#: A policy that puts every checkout through the policy path of the gate
#: (the queue cap is never reached, so nothing is shed).
CONTENTION_POLICY: dict[str, Any] = {"max_waiting_normal": 100_000}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContentionResult(Comparison):
    """One case: ``mode`` (threads/asyncio), callers, policy on or off.

    Times are medians over rounds: ``*_us`` per operation (wall time of the
    round divided by the operations all callers completed), ``*_cpu_us`` the
    process CPU per operation, ``*_p99_wait_ms`` the 99th percentile of the
    checkout time (connect() returning), ``*_max_wait_ms`` the longest one,
    ``*_wait_cv`` the coefficient of variation of checkout times (the spread:
    0 when every caller waits alike), ``*_ops_s`` the throughput.
    """

    mode: str
    callers: int
    policy: bool
    plain_ops_s: float
    guarded_ops_s: float
    plain_p99_wait_ms: float
    guarded_p99_wait_ms: float
    plain_max_wait_ms: float
    guarded_max_wait_ms: float
    plain_wait_cv: float
    guarded_wait_cv: float
    rounds: int


@dataclasses.dataclass
class _Round:
    ops: int
    wall: float
    cpu: float
    waits: list[float]


def _thread_round(engine: Engine, callers: int, duration: float) -> _Round:
    import threading

    stmt = sa.text("SELECT 1")
    connect = engine.connect
    stop = threading.Event()
    start = threading.Barrier(callers + 1)
    waits: list[list[float]] = [[] for _ in range(callers)]
    clock = time.perf_counter
    end = [math.inf]  # when the round ended (perf_counter), once it has

    def caller(mine: list[float]) -> None:
        start.wait()
        add = mine.append
        while not stop.is_set():
            t0 = clock()
            conn = connect()
            # A wait still running when the round ended counts as long as it
            # had lasted then (not the drain after it).
            add(min(clock(), end[0]) - t0)
            try:
                conn.execute(stmt).scalar()
            finally:
                conn.close()

    threads = [threading.Thread(target=caller, args=(w,), daemon=True) for w in waits]
    for thread in threads:
        thread.start()
    start.wait()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    time.sleep(duration)
    end[0] = clock()
    stop.set()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    flat = [x for w in waits for x in w]
    return _Round(len(flat), wall, cpu, flat)


async def _task_round(engine: Any, callers: int, duration: float) -> _Round:
    import asyncio

    stmt = sa.text("SELECT 1")
    stopped = False
    waits: list[list[float]] = [[] for _ in range(callers)]
    clock = time.perf_counter
    end = math.inf  # when the round ended, once it has (as in _thread_round)

    async def caller(mine: list[float]) -> None:
        add = mine.append
        while not stopped:
            t0 = clock()
            conn = await engine.connect()
            add(min(clock(), end) - t0)
            try:
                await conn.execute(stmt)
            finally:
                await conn.close()

    wall0, cpu0 = time.perf_counter(), time.process_time()
    tasks = [asyncio.ensure_future(caller(w)) for w in waits]
    await asyncio.sleep(duration)
    end = clock()
    stopped = True
    await asyncio.gather(*tasks)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    flat = [x for w in waits for x in w]
    return _Round(len(flat), wall, cpu, flat)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _spread(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    return statistics.pstdev(values) / mean if mean > 0 else 0.0


def _contention_case(
    rounds: list[tuple[_Round, _Round]], mode: str, callers: int, policy: bool
) -> ContentionResult:
    per_op = [(p.wall / max(p.ops, 1), g.wall / max(g.ops, 1)) for p, g in rounds]
    ratios = [g / p for p, g in per_op]

    def med(side: int, fn: Callable[[_Round], float]) -> float:
        return statistics.median(fn(r[side]) for r in rounds)

    return ContentionResult(
        mode=mode, callers=callers, policy=policy,
        plain_us=statistics.median(p for p, _ in per_op) * 1e6,
        guarded_us=statistics.median(g for _, g in per_op) * 1e6,
        **_ratio_stats(ratios),
        plain_cpu_us=med(0, lambda r: r.cpu / max(r.ops, 1)) * 1e6,
        guarded_cpu_us=med(1, lambda r: r.cpu / max(r.ops, 1)) * 1e6,
        plain_ops_s=med(0, lambda r: r.ops / r.wall),
        guarded_ops_s=med(1, lambda r: r.ops / r.wall),
        plain_p99_wait_ms=med(0, lambda r: _quantile(r.waits, 0.99)) * 1e3,
        guarded_p99_wait_ms=med(1, lambda r: _quantile(r.waits, 0.99)) * 1e3,
        plain_max_wait_ms=max(max(r[0].waits, default=0.0) for r in rounds) * 1e3,
        guarded_max_wait_ms=max(max(r[1].waits, default=0.0) for r in rounds) * 1e3,
        plain_wait_cv=med(0, lambda r: _spread(r.waits)),
        guarded_wait_cv=med(1, lambda r: _spread(r.waits)),
        rounds=len(rounds),
    )


def run_contention(
    *,
    callers: tuple[int, ...] = CONTENTION_CALLERS,
    modes: tuple[str, ...] = ("threads", "asyncio"),
    policies: tuple[bool, ...] = (False, True),
    rounds: int = 5,
    duration: float = 0.5,
    pool_size: int = 8,
    acquire_timeout: float = 30.0,
    quick: bool = False,
) -> list[ContentionResult]:
    """Plain against guarded with ``callers`` sharing a ``pool_size`` pool.

    One process, a SQLite file per engine pair; per case, ``rounds``
    alternating rounds of ``duration`` seconds each side. ``quick``: two
    caller counts, one short round (a smoke run, not a measurement).
    """
    if quick:
        callers, rounds, duration = callers[:2], 1, 0.05
    results = []
    gc_was_enabled = gc.isenabled()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{os.path.join(tmp, 'contention.db')}"
        try:
            for mode in modes:
                for policy in policies:
                    options = dict(CONTENTION_POLICY) if policy else {}
                    options["acquire_timeout"] = acquire_timeout
                    for n in callers:
                        pairs = _contention_rounds(mode, url, n, pool_size, rounds, duration,
                                                   options)
                        results.append(_contention_case(pairs, mode, n, policy))
        finally:
            if gc_was_enabled:
                gc.enable()
    return results


def _contention_rounds(
    mode: str, url: str, callers: int, pool_size: int, rounds: int, duration: float,
    options: dict[str, Any],
) -> list[tuple[_Round, _Round]]:
    pairs: list[tuple[_Round, _Round]] = []
    if mode == "threads":
        plain = sa.create_engine(url, pool_size=pool_size, max_overflow=0)
        guarded = wrap(sa.create_engine(url, pool_size=pool_size, max_overflow=0), **options)
        try:
            _thread_round(plain, min(callers, 4), 0.02)  # warm up
            _thread_round(guarded, min(callers, 4), 0.02)
            for i in range(rounds):
                got: dict[str, _Round] = {}
                for side in _SIDES if i % 2 == 0 else _SIDES[::-1]:
                    gc.collect()
                    got[side] = _thread_round(plain if side == "plain" else guarded, callers,
                                              duration)
                pairs.append((got["plain"], got["guarded"]))
        finally:
            plain.dispose()
            guarded.dispose()
        return pairs
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> None:
        aurl = url.replace("sqlite://", "sqlite+aiosqlite://", 1)
        plain = create_async_engine(aurl, pool_size=pool_size, max_overflow=0)
        guarded = wrap(create_async_engine(aurl, pool_size=pool_size, max_overflow=0), **options)
        try:
            await _task_round(plain, min(callers, 4), 0.02)
            await _task_round(guarded, min(callers, 4), 0.02)
            for i in range(rounds):
                got: dict[str, _Round] = {}
                for side in _SIDES if i % 2 == 0 else _SIDES[::-1]:
                    gc.collect()
                    got[side] = await _task_round(plain if side == "plain" else guarded,
                                                  callers, duration)
                pairs.append((got["plain"], got["guarded"]))
        finally:
            await plain.dispose()
            await guarded.dispose()

    asyncio.run(main())
    return pairs


def format_contention(results: list[ContentionResult]) -> str:
    """The contention results as an aligned text table."""
    head = (
        f"{'mode':<8} {'callers':>7} {'policy':>6} {'plain us':>9} {'guarded us':>10} "
        f"{'ratio':>6} {'(p25-p75)':>13} {'cpu p/g us':>13} {'ops/s p/g':>13} "
        f"{'p99 wait ms p/g':>16} {'max wait ms p/g':>16} {'wait cv p/g':>12}"
    )
    rows = [
        f"{r.mode:<8} {r.callers:>7} {'on' if r.policy else 'off':>6} {r.plain_us:>9.1f} "
        f"{r.guarded_us:>10.1f} {r.ratio:>6.3f} "
        f"{f'{r.ratio_p25:.3f}-{r.ratio_p75:.3f}':>13} "
        f"{f'{r.plain_cpu_us:.0f}/{r.guarded_cpu_us:.0f}':>13} "
        f"{f'{r.plain_ops_s:.0f}/{r.guarded_ops_s:.0f}':>13} "
        f"{f'{r.plain_p99_wait_ms:.2f}/{r.guarded_p99_wait_ms:.2f}':>16} "
        f"{f'{r.plain_max_wait_ms:.1f}/{r.guarded_max_wait_ms:.1f}':>16} "
        f"{f'{r.plain_wait_cv:.2f}/{r.guarded_wait_cv:.2f}':>12}"
        for r in results
    ]
    return "\n".join([head, "-" * len(head), *rows])


def contention_main(*, as_json: bool = False, quick: bool = False, **options: Any) -> int:
    """``poolguard bench --hot-path --contention``: run and print (table or JSON)."""
    results = run_contention(quick=quick, **options)
    meta = {
        "python": sys.version.split()[0],
        "sqlalchemy": sa.__version__,
        "quick": quick,
        "database": "SQLite, a file in a temporary folder",
        "pool_size": options.get("pool_size", 8),
    }
    if as_json:
        payload = {"command": "bench --hot-path --contention", "meta": meta,
                   "results": [dataclasses.asdict(r) for r in results]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return 0
    sys.stdout.write(
        f"poolguard bench --hot-path --contention: python {meta['python']}, sqlalchemy "
        f"{meta['sqlalchemy']}, pool of {meta['pool_size']}{' (quick)' if quick else ''}\n\n"
        f"{format_contention(results)}\n\n"
        "Each caller: connect + SELECT 1 + close in a loop. ratio = guarded / plain time per "
        "operation\n(median of alternating rounds); wait = the time connect() took; cv = its "
        "spread (stdev / mean).\n"
    )
    return 0
