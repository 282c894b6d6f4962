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

from .._engine import E, get_guard, wrap

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
# runs connect + SELECT 1 + close in a closed loop, on threads (Engine) or
# asyncio tasks (AsyncEngine). Each side keeps its callers for the whole case,
# parked between runs; plain and guarded take turns in short slices, in ABBA
# pairs, so that the machine's drift (other processes, a second's worth of
# noise) falls on both alike. The waits come from one continuous run per side.

#: Caller counts of the full run (``--quick``: the first two).
CONTENTION_CALLERS = (1, 4, 16, 64, 256)
#: A policy that puts every checkout through the policy path of the gate
#: (the queue cap is never reached, so nothing is shed).
CONTENTION_POLICY: dict[str, Any] = {"max_waiting_normal": 100_000}
#: How long a run waits for its callers to park once it has stopped them:
#: far beyond any drain (each caller finishes one operation, its checkout
#: bounded by the acquire timeout), it turns a hang into an error.
_PARK_TIMEOUT = 120.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContentionResult(Comparison):
    """One case: ``mode`` (threads/asyncio), callers, policy on or off (or ``aa``).

    From the slices (medians over them): ``*_us`` per operation (wall time of
    a slice, release to every caller parked again, divided by the operations
    completed in it), ``*_cpu_us`` the process CPU per operation, ``*_ops_s``
    the throughput; ``ratio`` the median over ``rounds`` pairs of slices of
    guarded/plain time per operation.

    From one continuous run per side: ``*_p99_wait_ms`` the 99th percentile
    of the checkout time (connect() returning), ``*_max_wait_ms`` the longest
    one, ``*_wait_cv`` the coefficient of variation of checkout times (the
    spread: 0 when every caller waits alike).

    ``aa``: the A/A self-check, the guarded side a second plain engine (the
    instrument's own bias: the ratio should be 1). ``gate``: the guarded side
    with its statement timer taken off, no policy: the gate and the pool
    alone, what the guard costs before it times a statement.
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
    #: Pairs of slices.
    rounds: int
    aa: bool = False
    gate: bool = False


@dataclasses.dataclass
class _Round:
    """One run of one side: operations completed, wall and CPU seconds, and
    (continuous runs only) every checkout wait in seconds."""

    ops: int
    wall: float
    cpu: float
    waits: list[float]


class _ThreadCallers:
    """``callers`` threads on one engine, started once, parked between runs.

    A run sets ``_go``; every thread loops until ``_running`` goes false,
    finishes the operation in progress and parks at ``_parked`` (a barrier
    whose action clears ``_go`` once all have arrived, so that no thread can
    miss a run or run twice).
    """

    def __init__(self, engine: Engine, callers: int) -> None:
        import threading

        self._n = callers
        self._go = threading.Event()
        self._parked = threading.Barrier(callers + 1, action=self._go.clear)
        self._running = False
        self._record = False
        self._quit = False
        self._end = math.inf
        self._ops = [0] * callers
        self._waits: list[list[float]] = [[] for _ in range(callers)]
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._caller, args=(engine, i), daemon=True,
                             name=f"poolguard-bench-caller-{i}")
            for i in range(callers)
        ]
        for thread in self._threads:
            thread.start()

    def _caller(self, engine: Engine, i: int) -> None:
        import threading

        stmt = sa.text("SELECT 1")
        connect = engine.connect
        clock = time.perf_counter
        try:
            while True:
                self._go.wait()
                if self._quit:
                    return
                n = 0
                if self._record:
                    add = self._waits[i].append
                    while self._running:
                        t0 = clock()
                        conn = connect()
                        t1, end = clock(), self._end
                        # A wait still running when the run ended counts as
                        # long as it had lasted then (not the drain after it);
                        # one begun after the end is the drain's.
                        if t0 < end:
                            add(min(t1, end) - t0)
                        try:
                            conn.execute(stmt).scalar()
                        finally:
                            conn.close()
                        n += 1
                else:
                    while self._running:
                        conn = connect()
                        try:
                            conn.execute(stmt).scalar()
                        finally:
                            conn.close()
                        n += 1
                self._ops[i] = n
                self._parked.wait()
        except threading.BrokenBarrierError:
            return
        except Exception as exc:
            self._error = exc
            self._parked.abort()
            raise

    def run(self, seconds: float, *, record: bool = False) -> _Round:
        """Release the callers for ``seconds``; return once all are parked again."""
        import threading

        if record:
            for waits in self._waits:
                waits.clear()
        self._record, self._end, self._running = record, math.inf, True
        wall0, cpu0 = time.perf_counter(), time.process_time()
        self._go.set()
        time.sleep(seconds)
        self._end = time.perf_counter()
        self._running = False
        try:
            self._parked.wait(_PARK_TIMEOUT)
        except threading.BrokenBarrierError:
            raise self._error or RuntimeError(
                f"the callers did not park within {_PARK_TIMEOUT:g} s") from self._error
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        waits = [x for w in self._waits for x in w] if record else []
        return _Round(sum(self._ops), wall, cpu, waits)

    def close(self) -> None:
        """Let every thread exit (from a run in progress, too) and join them."""
        self._running = False
        self._quit = True
        self._parked.abort()
        self._go.set()
        for thread in self._threads:
            thread.join()


class _TaskCallers:
    """``callers`` asyncio tasks on one AsyncEngine, started once, parked between runs.

    Each run has an ``asyncio.Event`` of its own: a run puts the next run's
    event in place before it sets its own, so that a task woken late still
    waits for the next one; the last task to park resolves ``_done``.
    """

    def __init__(self, engine: Any, callers: int) -> None:
        import asyncio

        self._n = callers
        self._go = asyncio.Event()
        self._running = False
        self._record = False
        self._quit = False
        self._end = math.inf
        self._parked = 0
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ops = [0] * callers
        self._waits: list[list[float]] = [[] for _ in range(callers)]
        self._tasks = [asyncio.ensure_future(self._caller(engine, i, self._go))
                       for i in range(callers)]

    async def _caller(self, engine: Any, i: int, go: Any) -> None:
        stmt = sa.text("SELECT 1")
        clock = time.perf_counter
        try:
            while True:
                await go.wait()
                if self._quit:
                    return
                go = self._go  # the next run's (in place before this one was set)
                n = 0
                if self._record:
                    add = self._waits[i].append
                    while self._running:
                        t0 = clock()
                        conn = await engine.connect()
                        t1, end = clock(), self._end
                        if t0 < end:  # as in _ThreadCallers
                            add(min(t1, end) - t0)
                        try:
                            await conn.execute(stmt)
                        finally:
                            await conn.close()
                        n += 1
                else:
                    while self._running:
                        conn = await engine.connect()
                        try:
                            await conn.execute(stmt)
                        finally:
                            await conn.close()
                        n += 1
                self._ops[i] = n
                self._parked += 1
                if self._parked == self._n and not self._done.done():
                    self._done.set_result(None)
        except Exception as exc:
            if not self._done.done():
                self._done.set_exception(exc)
            raise

    async def run(self, seconds: float, *, record: bool = False) -> _Round:
        """Release the tasks for ``seconds``; return once all are parked again."""
        import asyncio

        if record:
            for waits in self._waits:
                waits.clear()
        self._record, self._end, self._running = record, math.inf, True
        self._parked = 0
        self._done = asyncio.get_running_loop().create_future()
        go, self._go = self._go, asyncio.Event()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        go.set()
        await asyncio.sleep(seconds)
        self._end = time.perf_counter()
        self._running = False
        await asyncio.wait_for(self._done, _PARK_TIMEOUT)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        waits = [x for w in self._waits for x in w] if record else []
        return _Round(sum(self._ops), wall, cpu, waits)

    async def close(self) -> None:
        """Let every task exit (from a run in progress, too) and gather them."""
        import asyncio

        self._running = False
        self._quit = True
        self._go.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What one case runs on each side: a warm-up slice, ``pairs`` ABBA pairs
    of ``slice_s`` slices, then one continuous run of ``fair_s`` seconds."""

    pairs: int
    slice_s: float
    fair_s: float

    def slices(self) -> Iterator[str]:
        """The sides of the measured slices in order: AB BA AB ..."""
        for i in range(self.pairs):
            yield from _SIDES if i % 2 == 0 else _SIDES[::-1]


#: The default plan: 30 pairs of 0.1 s slices, 2 s continuous runs.
CONTENTION_PLAN = _Plan(pairs=30, slice_s=0.1, fair_s=2.0)
#: ``--quick``: a smoke run, not a measurement.
_QUICK_PLAN = _Plan(pairs=3, slice_s=0.02, fair_s=0.05)


@dataclasses.dataclass
class _CaseRuns:
    pairs: list[tuple[_Round, _Round]]
    #: The continuous run of each side (plain, guarded).
    fair: tuple[_Round, _Round]


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
    runs: _CaseRuns, mode: str, callers: int, policy: bool, kind: str = "guard"
) -> ContentionResult:
    pairs = runs.pairs
    per_op = [(p.wall / max(p.ops, 1), g.wall / max(g.ops, 1)) for p, g in pairs]
    ratios = [g / p for p, g in per_op]

    def med(side: int, fn: Callable[[_Round], float]) -> float:
        return statistics.median(fn(r[side]) for r in pairs)

    plain_fair, guarded_fair = runs.fair
    return ContentionResult(
        mode=mode, callers=callers, policy=policy, aa=kind == "aa", gate=kind == "gate",
        plain_us=statistics.median(p for p, _ in per_op) * 1e6,
        guarded_us=statistics.median(g for _, g in per_op) * 1e6,
        **_ratio_stats(ratios),
        plain_cpu_us=med(0, lambda r: r.cpu / max(r.ops, 1)) * 1e6,
        guarded_cpu_us=med(1, lambda r: r.cpu / max(r.ops, 1)) * 1e6,
        plain_ops_s=med(0, lambda r: r.ops / r.wall),
        guarded_ops_s=med(1, lambda r: r.ops / r.wall),
        plain_p99_wait_ms=_quantile(plain_fair.waits, 0.99) * 1e3,
        guarded_p99_wait_ms=_quantile(guarded_fair.waits, 0.99) * 1e3,
        plain_max_wait_ms=max(plain_fair.waits, default=0.0) * 1e3,
        guarded_max_wait_ms=max(guarded_fair.waits, default=0.0) * 1e3,
        plain_wait_cv=_spread(plain_fair.waits),
        guarded_wait_cv=_spread(guarded_fair.waits),
        rounds=len(pairs),
    )


def run_contention(
    *,
    callers: tuple[int, ...] = CONTENTION_CALLERS,
    modes: tuple[str, ...] = ("threads", "asyncio"),
    policies: tuple[bool, ...] = (False, True),
    rounds: int = CONTENTION_PLAN.pairs,
    duration: float = CONTENTION_PLAN.slice_s,
    fair_duration: float = CONTENTION_PLAN.fair_s,
    pool_size: int = 8,
    acquire_timeout: float = 30.0,
    quick: bool = False,
    aa: bool = False,
    gate: bool = False,
    url: str | None = None,
) -> list[ContentionResult]:
    """Plain against guarded with ``callers`` sharing a ``pool_size`` pool.

    One process, one database: a SQLite file (aiosqlite for the tasks), or
    ``url``'s (the same URL for both modes: its driver must also work with
    ``create_async_engine`` for the tasks, as psycopg's does). Per case,
    each side's callers (threads or tasks) are started once and parked
    between runs; after a warm-up slice per side, ``rounds`` pairs of slices
    of ``duration`` seconds alternate ABBA (the order flips every pair): the
    time per operation, CPU and throughput, and the ratio (median and
    quartiles over the pairs), come from these. Then one continuous run of
    ``fair_duration`` seconds per side gives the waits (p99, longest,
    spread): short slices would hide a starving caller, since every waiter
    is served in the drain at a slice's end. ``aa`` adds the A/A self-check
    per mode and caller count: the guarded side replaced by a second plain
    engine. ``gate`` adds rows whose guarded side has its statement timer
    taken off (no policy): the gate and the pool alone. ``quick``: two
    caller counts, 3 pairs of 0.02 s slices, 0.05 s continuous runs (a smoke
    run, not a measurement).
    """
    if quick:
        callers = callers[:2]
    plan = _QUICK_PLAN if quick else _Plan(rounds, duration, fair_duration)
    variants: list[tuple[bool, str]] = [(policy, "guard") for policy in policies]
    if gate:
        variants.append((False, "gate"))
    if aa:
        variants.append((False, "aa"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        target = url or f"sqlite:///{os.path.join(tmp, 'contention.db')}"
        for mode in modes:
            for policy, kind in variants:
                options = None if kind == "aa" else dict(CONTENTION_POLICY) if policy else {}
                if options is not None:
                    options["acquire_timeout"] = acquire_timeout
                for n in callers:
                    runs = _contention_rounds(mode, target, n, pool_size, plan, options,
                                              timer_off=kind == "gate")
                    results.append(_contention_case(runs, mode, n, policy, kind))
    return results


def _contention_rounds(
    mode: str, url: str, callers: int, pool_size: int, plan: _Plan,
    options: dict[str, Any] | None, *, timer_off: bool = False,
) -> _CaseRuns:
    """Run one case (``options`` None: the A/A check, two plain engines;
    ``timer_off``: the guarded side's statement timer taken off) and leave
    nothing behind: callers exited, engines disposed, their threads joined."""
    import threading

    before = set(threading.enumerate())
    try:
        if mode == "threads":
            return _thread_case(url, callers, pool_size, plan, options, timer_off)
        if mode == "asyncio":
            import asyncio

            return asyncio.run(_task_case(url, callers, pool_size, plan, options, timer_off))
        raise ValueError(f"unknown mode {mode!r}: threads or asyncio")
    finally:
        # aiosqlite's connection threads end just after their close returns.
        for thread in set(threading.enumerate()) - before:
            thread.join(10.0)


def without_statement_timer(guarded: E) -> E:
    """``guarded`` with its statement timer taken off, its gate and pool kept:
    what the guard costs before it times a statement (a measuring device for
    the benchmarks, not a supported setting)."""
    timer = get_guard(guarded)._queries
    if timer is None:
        raise RuntimeError("the guard has no statement timer to take off")
    timer.remove()
    return guarded


def _guarded(engine: Any, options: dict[str, Any] | None, timer_off: bool) -> Any:
    """The case's guarded side (``options`` None: left plain, the A/A check)."""
    if options is None:
        return engine
    guarded = wrap(engine, **options)
    return without_statement_timer(guarded) if timer_off else guarded


def _thread_case(
    url: str, callers: int, pool_size: int, plan: _Plan, options: dict[str, Any] | None,
    timer_off: bool = False,
) -> _CaseRuns:
    plain = sa.create_engine(url, pool_size=pool_size, max_overflow=0)
    other = sa.create_engine(url, pool_size=pool_size, max_overflow=0)
    guarded = _guarded(other, options, timer_off)
    sides: dict[str, _ThreadCallers] = {}
    try:
        for side, engine in zip(_SIDES, (plain, guarded), strict=True):
            sides[side] = _ThreadCallers(engine, callers)
        for side in _SIDES:  # warm up: connections made, code paths hot
            sides[side].run(plan.slice_s)
        gc.collect()
        got: dict[str, list[_Round]] = {side: [] for side in _SIDES}
        for side in plan.slices():
            got[side].append(sides[side].run(plan.slice_s))
        fair = [sides[side].run(plan.fair_s, record=True) for side in _SIDES]
    finally:
        for callers_of_side in sides.values():
            callers_of_side.close()
        plain.dispose()
        guarded.dispose()
    return _CaseRuns(list(zip(got["plain"], got["guarded"], strict=True)), (fair[0], fair[1]))


async def _task_case(
    url: str, callers: int, pool_size: int, plan: _Plan, options: dict[str, Any] | None,
    timer_off: bool = False,
) -> _CaseRuns:
    from sqlalchemy.ext.asyncio import create_async_engine

    aurl = (url.replace("sqlite://", "sqlite+aiosqlite://", 1) if url.startswith("sqlite://")
            else url)
    plain = create_async_engine(aurl, pool_size=pool_size, max_overflow=0)
    other = create_async_engine(aurl, pool_size=pool_size, max_overflow=0)
    guarded = _guarded(other, options, timer_off)
    sides: dict[str, _TaskCallers] = {}
    try:
        for side, engine in zip(_SIDES, (plain, guarded), strict=True):
            sides[side] = _TaskCallers(engine, callers)
        for side in _SIDES:
            await sides[side].run(plan.slice_s)
        gc.collect()
        got: dict[str, list[_Round]] = {side: [] for side in _SIDES}
        for side in plan.slices():
            got[side].append(await sides[side].run(plan.slice_s))
        fair = [await sides[side].run(plan.fair_s, record=True) for side in _SIDES]
    finally:
        for callers_of_side in sides.values():
            await callers_of_side.close()
        await plain.dispose()
        await guarded.dispose()
    return _CaseRuns(list(zip(got["plain"], got["guarded"], strict=True)), (fair[0], fair[1]))


def _variant(result: ContentionResult) -> str:
    if result.aa:
        return "aa"
    if result.gate:
        return "gate"
    return "on" if result.policy else "off"


def format_contention(results: list[ContentionResult]) -> str:
    """The contention results as an aligned text table (policy ``aa``: the A/A
    check; ``gate``: the statement timer off)."""
    head = (
        f"{'mode':<8} {'callers':>7} {'policy':>6} {'plain us':>9} {'guarded us':>10} "
        f"{'ratio':>6} {'(p25-p75)':>13} {'cpu p/g us':>13} {'ops/s p/g':>13} "
        f"{'p99 wait ms p/g':>16} {'max wait ms p/g':>16} {'wait cv p/g':>12}"
    )
    rows = [
        f"{r.mode:<8} {r.callers:>7} {_variant(r):>6} "
        f"{r.plain_us:>9.1f} {r.guarded_us:>10.1f} {r.ratio:>6.3f} "
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
    """``poolguard bench --hot-path --contention``: run and print (table or JSON).

    ``options`` go to :func:`run_contention` (``rounds``: pairs of slices,
    ``duration``: seconds per slice, ``fair_duration``: seconds of the
    continuous run per side, ``aa``: add the A/A check, ``gate``: add the
    rows with the statement timer off, ``url``: a database of its own).
    """
    results = run_contention(quick=quick, **options)
    plan = _QUICK_PLAN if quick else _Plan(
        options.get("rounds", CONTENTION_PLAN.pairs),
        options.get("duration", CONTENTION_PLAN.slice_s),
        options.get("fair_duration", CONTENTION_PLAN.fair_s),
    )
    meta = {
        "python": sys.version.split()[0],
        "sqlalchemy": sa.__version__,
        "quick": quick,
        "database": (sa.make_url(options["url"]).render_as_string(hide_password=True)
                     if options.get("url") else "SQLite, a file in a temporary folder"),
        "pool_size": options.get("pool_size", 8),
        "pairs": plan.pairs,
        "slice_s": plan.slice_s,
        "fair_s": plan.fair_s,
    }
    if as_json:
        payload = {"command": "bench --hot-path --contention", "meta": meta,
                   "results": [dataclasses.asdict(r) for r in results]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return 0
    aa_note = ("\npolicy aa: the A/A self-check, the guarded side a second plain engine (the "
               "instrument's own bias;\nits ratio should be 1.00)."
               if any(r.aa for r in results) else "")
    gate_note = ("\npolicy gate: the guarded side with its statement timer taken off, no policy: "
                 "the gate and the\npool alone (the rows above with policy off add the timer)."
                 if any(r.gate for r in results) else "")
    sys.stdout.write(
        f"poolguard bench --hot-path --contention: python {meta['python']}, sqlalchemy "
        f"{meta['sqlalchemy']}, pool of {meta['pool_size']}, {meta['database']}"
        f"{' (quick)' if quick else ''}\n\n"
        f"{format_contention(results)}\n\n"
        "Each caller: connect + SELECT 1 + close in a loop; each side's callers persist for the "
        "case, parked\nbetween runs. ratio = guarded / plain time per operation, median (and "
        f"p25-p75) over {plan.pairs} ABBA pairs\nof {plan.slice_s:g} s slices; us, cpu and "
        "ops/s: medians over the slices. p99 wait, max wait and cv come\nfrom one continuous "
        f"{plan.fair_s:g} s run per side (short slices hide starvation): wait = the time "
        f"connect()\ntook; cv = its spread (stdev / mean).{gate_note}{aa_note}\n"
    )
    return 0
