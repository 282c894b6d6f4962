"""The immutable stats snapshot returned by :meth:`poolguard.Guard.stats`."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["PoolStats"]


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    """One consistent reading of a guarded pool. Gauges are read at snapshot
    time; counters count since the guard was created. The README documents
    every field."""

    name: str
    pool_class: str
    pool_size: int | None
    max_overflow: int | None
    capacity: int | None
    in_use: int
    idle: int
    waiting: int
    permits: int
    acquisitions: int
    waits: int
    wait_time_total: float
    wait_time_max: float
    timeouts: int
    connections_opened: int
    connections_closed: int
    connections_invalidated: int

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a plain ``dict`` (for logs and JSON)."""
        return dataclasses.asdict(self)
