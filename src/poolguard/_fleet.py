"""Fleet-wide budgets: a bulkhead or reserve stated for all replicas, divided per replica.

``fleet_tag_limits={"report": 5}`` means 5 server connections for the tag in
the whole fleet; with ``replicas=3`` each replica may hold
``max(1, floor(5 / 3)) = 1``. Limits round down, so the fleet never holds
more than its budget, except that a replica always gets at least one (with
more replicas than connections the fleet can hold one per replica, and the
``fleet.budget`` event warns). ``fleet_reserved_critical`` rounds up
(``ceil``): a reserve protects critical work, so the fleet reserves at least
what was asked. :func:`divide` is the arithmetic the gate's admission policy
uses; :class:`Fleet` logs what was decided (once per configuration) and owns
the PgBouncer admin reader (:mod:`poolguard._pgbouncer`), whose numbers give
a lower bound of the replica count to check the told one against.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from typing import TYPE_CHECKING, Any

from ._pgbouncer import AdminReader, PgBouncerStats, admin_target

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import Config
    from ._parts import GuardParts

__all__ = ["Budget", "Fleet", "divide", "fleet_limits"]

#: A division whose fleet total is off the budget by more than this share warns.
OFF_BY = 0.25
REPLICAS_ENV = "POOLGUARD_REPLICAS"


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """One fleet budget divided: ``per_replica`` each, ``fleet_total`` in all.

    ``tag`` None: the critical reserve; else the bulkhead of that tag.
    """

    tag: str | None
    budget: int
    replicas: int
    per_replica: int

    @property
    def name(self) -> str:
        return "reserved_critical" if self.tag is None else f"tag_limits[{self.tag}]"

    @property
    def fleet_total(self) -> int:
        return self.per_replica * self.replicas

    @property
    def off(self) -> bool:
        """The fleet total exceeds a limit, or misses the budget by more than :data:`OFF_BY`."""
        total, budget = self.fleet_total, self.budget
        if self.tag is not None and total > budget:
            return True
        return abs(total - budget) > OFF_BY * budget


def divide(budget: int, replicas: int, *, reserve: bool = False) -> int:
    """One replica's share of a fleet ``budget``: a limit rounds down (at least 1),
    a reserve rounds up (0 stays 0)."""
    if reserve:
        return math.ceil(budget / replicas) if budget > 0 else 0
    return max(1, budget // replicas)


def budgets(cfg: Config) -> list[Budget]:
    """Every fleet budget of ``cfg``, divided by ``cfg.replicas``."""
    replicas = cfg.replicas
    if replicas is None:  # Config.check_fleet refuses fleet budgets without it
        return []
    found = [
        Budget(tag, n, replicas, divide(n, replicas))
        for tag, n in (cfg.fleet_tag_limits or {}).items()
    ]
    reserve = cfg.fleet_reserved_critical
    if reserve:
        found.append(Budget(None, reserve, replicas, divide(reserve, replicas, reserve=True)))
    return found


def fleet_limits(cfg: Config) -> tuple[dict[str, int], int | None]:
    """Per-replica tag limits and critical reserve from ``cfg``'s fleet budgets.

    The reserve is None when no fleet reserve is set (``reserved_critical`` applies).
    """
    limits: dict[str, int] = {}
    reserve = None
    for budget in budgets(cfg):
        if budget.tag is None:
            reserve = budget.per_replica
        else:
            limits[budget.tag] = budget.per_replica
    return limits, reserve


class Fleet:
    """One guard's view of its fleet: the budgets' division, and PgBouncer's numbers."""

    def __init__(self, parts: GuardParts, *, url: Callable[[], Any]) -> None:
        self._log = parts.log
        self._gate = parts.gate
        self._url = url  # the engine's URL (None: not attached)
        self._lock = threading.Lock()
        self._reader: AdminReader | None = None
        self._reader_key: tuple[Any, ...] | None = None
        self._logged: tuple[Any, ...] | None = None
        #: The told replica count is below what PgBouncer shows (warned once per count).
        self._warned_replicas: int | None = None
        self._replicas: int | None = None

    def configure(self, cfg: Config) -> None:
        """Log the budgets' division (once per setting); start or stop the admin reader."""
        self._replicas = cfg.replicas
        divided = budgets(cfg)
        key = (cfg.replicas, tuple(divided))
        if divided and key != self._logged:
            self._logged = key
            told = os.environ.get(REPLICAS_ENV, "").strip() == str(cfg.replicas)
            off = [b for b in divided if b.off]
            self._log.emit(
                logging.WARNING if off else logging.INFO,
                "fleet.budget",
                replicas=cfg.replicas,
                replicas_from="environment" if told else "option",
                budgets={
                    b.name: {
                        "fleet": b.budget,
                        "per_replica": b.per_replica,
                        "fleet_total": b.fleet_total,
                    }
                    for b in divided
                },
                off=[b.name for b in off],
            )
        self._configure_reader(cfg)

    def _configure_reader(self, cfg: Config) -> None:
        url = self._url()
        try:
            target = admin_target(cfg.pgbouncer_admin_url, url) if url is not None else None
        except ValueError as error:
            self._log.emit(
                logging.WARNING,
                "pgbouncer.unavailable",
                pgbouncer="?",
                error_type="ValueError",
                reason=str(error),
            )
            target = None
        key = (target, cfg.pgbouncer_poll_interval) if target is not None else None
        with self._lock:
            if key == self._reader_key:
                return
            old, self._reader, self._reader_key = self._reader, None, key
            if target is not None:
                self._reader = AdminReader(
                    target, cfg.pgbouncer_poll_interval, self._log, on_read=self._check_replicas
                )
        if old is not None:
            old.stop()
        if self._reader is not None:
            self._reader.start()

    def stop(self) -> None:
        """Stop reading PgBouncer (the guard was removed)."""
        with self._lock:
            reader, self._reader, self._reader_key = self._reader, None, None
        if reader is not None:
            reader.stop()

    def pgbouncer(self) -> PgBouncerStats | None:
        """PgBouncer's numbers as last read (None: no ``pgbouncer_admin_url``)."""
        reader = self._reader
        return reader.stats() if reader is not None else None

    def describe(self) -> str | None:
        """ "PgBouncer: 50 clients waiting, longest 5.0 s" (None: nothing read)."""
        stats = self.pgbouncer()
        return stats.describe() if stats is not None else None

    def _check_replicas(self, stats: PgBouncerStats) -> None:
        """Warn when PgBouncer shows more clients than ``replicas`` x capacity can open."""
        replicas, capacity = self._replicas, self._gate().capacity
        if replicas is None or not capacity or stats.clients_total is None:
            return
        seen = math.ceil(stats.clients_total / capacity)
        if seen > replicas and seen != self._warned_replicas:
            self._warned_replicas = seen
            self._log.emit(
                logging.WARNING,
                "fleet.replicas_low",
                replicas=replicas,
                replicas_seen_min=seen,
                clients=stats.clients_total,
                capacity=capacity,
            )
