"""``poolguard bench``'s runs, in process: what one run measures must agree with itself.

Little's law ties the figures the table shows: connections busy on average =
throughput x mean hold time, which can never exceed the pool size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import make_url

from poolguard.cli import _runner, _workload

if TYPE_CHECKING:
    from pathlib import Path


def test_bench_counts_throughput_over_the_time_the_requests_took(tmp_path: Path) -> None:
    # Requests still running when the run's time is up finish and are counted:
    # the throughput must be taken over the time they took, or Little's law
    # (busy = req/s x hold) shows more connections busy than the pool has.
    url = make_url(f"sqlite:///{tmp_path / 'b.db'}")
    (statement,) = _workload.parse_workload("1 | SELECT sleep(0.25)")
    monitor = _runner.ServerConnections(url, "sqlite")
    result = _runner.run_one(url, pool_size=2, concurrency=2, duration=0.3,
                             workload=[statement], options={}, monitor=monitor)
    assert result.served >= 4  # two rounds of two: the second ends after 0.3 s
    assert result.duration_s >= 0.45
    assert result.throughput == pytest.approx(result.served / result.duration_s, rel=0.01)
    assert 0 < result.busy_connections <= 2 + 0.01


def _run(throughput: float, mean_hold_ms: float, pool_size: int = 4) -> _runner.Result:
    return _runner.Result(
        pool_size=pool_size, concurrency=8, throughput=throughput, p50_ms=1.0, p95_ms=2.0,
        p99_ms=3.0, wait_p50_ms=0.0, wait_p99_ms=0.0, timeouts=0, rejections=0, errors=0,
        server_connections=None, peak_in_use=pool_size, mean_hold_ms=mean_hold_ms,
        busy_connections=round(throughput * mean_hold_ms / 1000, 2), duration_s=1.0,
        requests=int(throughput), served=int(throughput), error_types={},
    )


@pytest.mark.parametrize("repeat", [2, 3, 4])
def test_a_cell_keeps_littles_law_over_runs_that_trade_throughput_for_hold(repeat: int) -> None:
    # Each run keeps its 4 connections busy; the faster the run, the shorter the
    # hold. Medians of throughput and of hold taken apart made 4.4 "busy" on a
    # pool of 4 (seen in a full suite run); the cell reports its median run.
    runs = [_run(100.0 * (k + 1), 40.0 / (k + 1)) for k in range(repeat)]
    (cell,) = _runner.cells(runs)
    assert cell.busy_connections <= cell.pool_size
    assert cell.busy_connections == pytest.approx(
        cell.throughput * cell.mean_hold_ms / 1000, abs=0.006)
    assert cell.throughput in [r.throughput for r in runs]
    assert cell.throughput_min == 100.0
    assert cell.throughput_max == 100.0 * repeat
