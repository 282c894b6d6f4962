"""poolguard: keep a SQLAlchemy service alive when its connection pool is in trouble.

``poolguard.wrap(engine)`` puts an admission gate in front of the engine's
pool: bounded waits with honest errors, stats and OpenTelemetry metrics of
what the pool is doing, per-statement timing, and a report of who holds the
connections when the pool runs dry.
"""

from __future__ import annotations

from ._alerts import AlertEvent
from ._config import Config
from ._context import RequestContext, current_request, request
from ._engine import get_guard, unwrap, wrap
from ._fallback import fallback
from ._guard import Guard
from ._histogram import HistogramSnapshot
from ._holders import Holder, HolderGroup
from ._pgbouncer import PgBouncerStats
from ._pool import (
    GuardedAsyncAdaptedQueuePool,
    GuardedNullPool,
    GuardedPoolMixin,
    GuardedQueuePool,
    GuardedSingletonThreadPool,
    GuardedStaticPool,
    guarded_class,
)
from ._stats import PoolStats, QueryStats
from ._version import __version__ as __version__
from .errors import (
    CircuitOpen,
    DeadlineExceeded,
    LoadShed,
    PoolerSaturated,
    PoolguardError,
    PoolTimeout,
    Rejected,
    StatementTimeout,
)

__all__ = [
    # set-up
    "wrap",
    "unwrap",
    "get_guard",
    "Config",
    "Guard",
    # requests
    "request",
    "fallback",
    "current_request",
    "RequestContext",
    # reading
    "PoolStats",
    "QueryStats",
    "HistogramSnapshot",
    "PgBouncerStats",
    "Holder",
    "HolderGroup",
    "AlertEvent",
    # errors
    "PoolguardError",
    "PoolTimeout",
    "PoolerSaturated",
    "Rejected",
    "LoadShed",
    "CircuitOpen",
    "StatementTimeout",
    "DeadlineExceeded",
    # pool classes
    "GuardedPoolMixin",
    "GuardedQueuePool",
    "GuardedAsyncAdaptedQueuePool",
    "GuardedNullPool",
    "GuardedStaticPool",
    "GuardedSingletonThreadPool",
    "guarded_class",
]
