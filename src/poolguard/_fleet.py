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
a lower bound of the replica count to check the told one against. When the
fair share needs the fleet's server connections and nobody said them, the
Fleet reads PgBouncer's pool size itself, once, on a thread of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._hold import REQUEST
from ._pgbouncer import AdminReader, AdminTarget, PgBouncerStats, admin_target, read_once, why_not

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import Config
    from ._parts import GuardParts

__all__ = ["Budget", "FairCaps", "FairShare", "Fleet", "divide", "fleet_limits"]

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


#: A tag whose checkouts lately were this short on average (seconds) uses a
#: sliver of a server connection: the fair share never caps it.
FAST = 0.1
#: Checkouts a tag must have completed before it can be known fast.
KNOWN_AFTER = 5
#: Seconds a tag counts as using the pooler after its last checkin.
ACTIVE_FOR = 10.0
#: Weight of a new hold time in a tag's moving mean.
ALPHA = 0.2


class FairCaps(dict[str, int]):
    """The gate's tag caps while the fair share is on: the stated ones (the
    dict's items: ``tag_limits``, fleet budgets), and for every other tag not
    known fast, its fair share of the replica's server connections.

    A tag using the pooler now (``active``) gets ``share / len(active)``; a
    tag new to it ``share / (len(active) + 1)``, rounded down, at least one;
    no cap while no other tag uses it. Fixed between two samples: the gate
    counts a tag's connections from when it is capped (:meth:`Gate.set_tag_caps`).
    """

    __slots__ = ("active", "exempt", "fair_in", "fair_new")

    def __init__(
        self, stated: dict[str, int], share: float, active: frozenset[str],
        exempt: frozenset[str],
    ) -> None:
        super().__init__(stated)
        self.active = active
        self.exempt = exempt
        n = len(active)
        self.fair_in = max(1, math.floor(share / n)) if n >= 2 else None
        self.fair_new = max(1, math.floor(share / (n + 1))) if n >= 1 else None

    def __contains__(self, tag: object) -> bool:
        return dict.__contains__(self, tag) or (
            isinstance(tag, str) and tag not in self.exempt)

    def get(self, tag: str, default: Any = None) -> Any:
        if dict.__contains__(self, tag):
            return dict.__getitem__(self, tag)
        if not isinstance(tag, str) or tag in self.exempt:
            return default
        return self.fair_in if tag in self.active else self.fair_new

    def __bool__(self) -> bool:
        return True

    def cap(self, tag: str) -> int | None:
        """The cap of ``tag`` (None: none)."""
        return self.get(tag) if tag in self else None


class _Seen:
    __slots__ = ("at", "mean", "n")

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.at = 0.0


class FairShare:
    """The fleet's fair share of server connections, per request tag.

    On when a pooler that pools by transaction is in front, ``replicas`` is
    set, the fleet's server connections are known (``server_connections``,
    or PgBouncer's pool size from its admin console) and fewer than
    ``replicas`` x the pool. Then this replica's share of them is
    ``server_connections / replicas``, and while another tag uses the pooler
    too, a tag not known fast may hold at most its fair part of that share
    (at least one connection); past it, checkouts are shed (``fair_share``).
    Known fast: its last checkouts held a connection :data:`FAST` seconds or
    less on average (a sliver of a server connection each). Holding more
    than the replica's share is taking server connections from the other
    replicas, whose requests then wait in the pooler's queue, which this
    replica cannot see: by the time it could, the server connections are
    held for as long as the slow statements run. Sampled with the culprit
    samples (off the request path); the gate learns hold times at checkin.
    """

    def __init__(self, parts: GuardParts) -> None:
        self._log = parts.log
        self._gate = parts.gate
        self._config = parts.config
        self._seen: dict[str, _Seen] = {}
        #: The caps installed (None: off).
        self.caps: FairCaps | None = None
        self._logged: tuple[Any, ...] | None = None

    def checked_in(self, tag: str | None, held: float) -> None:
        """A connection of ``tag`` came back after ``held`` seconds (from the gate, unlocked)."""
        if tag is None:
            return
        seen = self._seen.get(tag)
        if seen is None:
            if len(self._seen) >= 256:
                return
            seen = self._seen[tag] = _Seen()
        seen.n += 1
        seen.mean += (held - seen.mean) * max(ALPHA, 1.0 / seen.n)
        seen.at = perf_counter()

    def share(self, behind: Any, pool_size: int | None) -> float | None:
        """This replica's share of the server connections (None: the fair share is off)."""
        cfg = self._config()
        capacity = self._gate().capacity
        servers = cfg.server_connections or pool_size
        if (cfg.replicas is None or servers is None or not capacity or behind is None
                or not behind.may_pool_transactions or servers >= cfg.replicas * capacity):
            return None
        return servers / cfg.replicas

    def sample(self, now: float, behind: Any, pool_size: int | None) -> None:
        """Recompute the caps (from the scan's samples)."""
        gate = self._gate()
        share = self.share(behind, pool_size)
        admission = gate.admission
        if share is None or admission is None:
            if self.caps is not None:
                self.caps = None
                gate.checkin_seen = None
                if admission is not None and isinstance(admission.tag_limits, FairCaps):
                    gate.set_tag_caps(dict(admission.tag_limits))
            return
        stated = admission.tag_limits
        stated = dict(stated.items()) if isinstance(stated, FairCaps) else dict(stated)
        active = {tag for tag, seen in list(self._seen.items()) if seen.at >= now - ACTIVE_FOR}
        for hold in list(gate.out.values()):
            request = hold[REQUEST]
            if request is not None and request.tag is not None:
                active.add(request.tag)
        exempt = frozenset(
            tag for tag, seen in list(self._seen.items())
            if seen.n >= KNOWN_AFTER and seen.mean <= FAST
        )
        caps = FairCaps(stated, share, frozenset(active), exempt)
        old = self.caps
        if (old is not None and admission.tag_limits is old and dict(old) == stated
                and (old.active, old.exempt, old.fair_in, old.fair_new)
                == (caps.active, caps.exempt, caps.fair_in, caps.fair_new)):
            return
        gate.checkin_seen = self.checked_in
        if gate.set_tag_caps(caps):
            self.caps = caps
            key = (round(share, 3), caps.fair_in, caps.fair_new, tuple(sorted(exempt)))
            if key != self._logged:
                self._logged = key
                self._log.emit(
                    logging.INFO, "fleet.fair_share", share=round(share, 3),
                    active=sorted(active), known_fast=sorted(exempt),
                    cap=caps.fair_in, cap_new_tag=caps.fair_new,
                )


class Fleet:
    """One guard's view of its fleet: the budgets' division, and PgBouncer's numbers."""

    def __init__(self, parts: GuardParts, *, guard: Any) -> None:
        self._log = parts.log
        self._gate = parts.gate
        self._config = parts.config
        # The engine's URL (None: not attached).
        self._url: Callable[[], Any] = lambda: guard._engine.url if guard._engine else None
        #: The guard's pooler detection (``PoolerErrors``; None before it has one).
        self.pooler: Callable[[], Any] = lambda: getattr(guard, "pooler", None)
        #: The fair share of server connections per tag.
        self.fair = FairShare(parts)
        self._lock = threading.Lock()
        self._reader: AdminReader | None = None
        self._reader_key: tuple[Any, ...] | None = None
        self._logged: tuple[Any, ...] | None = None
        #: The told replica count is below what PgBouncer shows (warned once per count).
        self._warned_replicas: int | None = None
        self._replicas: int | None = None
        #: PgBouncer's pool size and mode as the guard read them by itself, for
        #: the engine's pool: (its address, database and user; size; mode).
        #: Read once per pool; (key, None, None) while reading or after a failure.
        self._found: tuple[tuple[Any, ...], int | None, str | None] | None = None

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

    def sample(self, now: float) -> None:
        """With the scan's samples: the fair share's caps."""
        stats = self.pgbouncer()
        pooler = self.pooler()
        if stats is not None:
            mode, pool_size = stats.pool_mode, stats.pool_size
        else:
            pool_size, mode = self._discovered(pooler.behind)
        if mode is not None:
            pooler.admin_mode(mode)
        self.fair.sample(now, pooler.behind, pool_size)

    def _discovered(self, behind: Any) -> tuple[int | None, str | None]:
        """PgBouncer's pool size and mode, read once by the guard itself (else Nones).

        Read when the fair share needs them and nobody said: behind a pooler
        that may pool by transaction, with ``replicas`` set and neither
        ``server_connections`` nor ``pgbouncer_admin_url``. On a thread of its
        own, from the admin console at the engine's address with the engine's
        credentials (``pgbouncer_admin_url="auto"``, once).
        """
        cfg = self._config()
        url = self._url()
        if (cfg.server_connections is not None or cfg.replicas is None or behind is None
                or not behind.may_pool_transactions or url is None
                or url.get_backend_name() != "postgresql"):
            return None, None
        key = (url.host, url.port, url.database, url.username)
        found = self._found
        if found is not None and found[0] == key:
            return found[1], found[2]
        with self._lock:
            if self._found is not None and self._found[0] == key:
                return None, None
            self._found = (key, None, None)
        target = admin_target("auto", url)
        threading.Thread(
            target=self._discover, args=(key, target), daemon=True,
            name=f"poolguard-pgbouncer-probe-{self._log.pool_name}",
        ).start()
        return None, None

    def _discover(self, key: tuple[Any, ...], target: AdminTarget) -> None:
        """The discovery's thread: one read, one event."""
        error_type: str | None = None
        try:
            size, mode = read_once(target)
        except Exception as error:  # noqa: BLE001 - whatever fails, requests must not notice
            size, mode, error_type = None, None, type(error).__name__
            reason = why_not(error)
        else:
            reason = "PgBouncer showed no pool size"
        if size:
            with self._lock:
                if self._found is not None and self._found[0] == key:
                    self._found = (key, size, mode)
            self._log.emit(logging.INFO, "fleet.server_connections", server_connections=size,
                           pool_mode=mode, found_by="admin console", pgbouncer=target.address)
            return
        user = target.user or "the engine's user"
        self._log.emit(
            logging.WARNING, "fleet.server_connections", server_connections=None,
            pool_mode=None, found_by=None, pgbouncer=target.address, error_type=error_type,
            reason=reason,
            message=(
                f"could not read the fleet's server connections from PgBouncer's admin console "
                f"at {target.address} as {user} ({reason}): no fair share of server connections "
                f"per tag. State server_connections=N (PgBouncer's pool_size for "
                f"{target.database}, else its default_pool_size, at most its max_db_connections), "
                f"or pgbouncer_admin_url= "
                f"a stats user's URL (postgresql://USER:PASSWORD@{target.address}/pgbouncer), "
                f"or add {user} to PgBouncer's stats_users"
            ),
        )

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
