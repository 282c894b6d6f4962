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
