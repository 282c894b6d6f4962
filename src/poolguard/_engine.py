"""``wrap``, ``unwrap`` and ``get_guard``: guard an existing engine in place."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import Engine

from ._compat import use_gated_queue
from ._config import Config
from ._guard import Guard
from ._pool import GuardedPoolMixin, guarded_class

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.pool import Pool

__all__ = ["get_guard", "unwrap", "wrap"]

# String bounds: importing sqlalchemy.ext.asyncio needs greenlet, which
# SQLAlchemy 2.1 installs only with its asyncio extra.
E = TypeVar("E", "Engine", "AsyncEngine")


def _sync(engine: Engine | AsyncEngine) -> Engine:
    if isinstance(engine, Engine):
        return engine
    sync_engine = getattr(engine, "sync_engine", None)  # an AsyncEngine
    if isinstance(sync_engine, Engine):
        return sync_engine
    raise TypeError(
        f"poolguard expects a sqlalchemy Engine or AsyncEngine, got {type(engine).__name__}"
    )


def _default_name(engine: Engine) -> str:
    # Backend and database only: a URL may carry credentials.
    url = engine.url
    database = os.path.basename(url.database) if url.database else "default"
    return f"{url.get_backend_name()}:{database or 'memory'}"


def wrap(engine: E, config: Config | None = None, **options: Any) -> E:
    """Guard ``engine`` in place and return it.

    Options are those of :class:`poolguard.Config`; given ones win over
    ``POOLGUARD_*`` environment variables, which win over defaults (or over
    ``config`` when one is passed). Calling ``wrap`` again reconfigures the
    same guard: its permits and counters carry on and nothing is counted twice.
    """
    sync_engine = _sync(engine)
    cfg = Config.from_options(config, **options)
    pool = sync_engine.pool
    if isinstance(pool, GuardedPoolMixin):
        guard = pool._poolguard
        if guard is not None:
            guard.configure(cfg)
            guard._attach_engine(sync_engine)
            return engine
    guard = Guard(cfg, default_name=_default_name(sync_engine))
    while True:
        # The guard first, the class next: a checkout in between waits for
        # the attach instead of building a guard of its own, and a dispose()
        # in between attaches its new pool to this guard.
        pool._poolguard = guard  # type: ignore[attr-defined]
        pool.__dict__.pop("_poolguard_gate", None)  # a closed one, left by unwrap()
        # Swap the class in place: idle connections, overflow counts, listeners
        # and everything already checked out stay exactly where they are.
        pool.__class__ = guarded_class(type(pool))
        use_gated_queue(pool)
        guard._attach(pool)
        current = sync_engine.pool
        if current is pool or getattr(current, "_poolguard", None) is guard:
            break
        # dispose() recreated the pool before its class changed: the new one
        # is plain; guard it too (it shares the gate).
        pool = current
    guard._attach_engine(sync_engine)
    return engine


def get_guard(engine: Engine | AsyncEngine) -> Guard:
    """The :class:`Guard` of a guarded engine; :class:`LookupError` if there is none."""
    pool = _sync(engine).pool
    if isinstance(pool, GuardedPoolMixin):
        return pool._poolguard or pool._poolguard_default()
    raise LookupError(f"engine {engine!r} is not guarded: call poolguard.wrap(engine) first")


def unwrap(engine: E) -> E:
    """Remove the guard from ``engine``, restoring plain SQLAlchemy behaviour.

    Callers waiting at the gate are let through to the pool's own queue.
    Does nothing for an engine that is not guarded.
    """
    pool = _sync(engine).pool
    if isinstance(pool, GuardedPoolMixin):
        guard = pool._poolguard
        plain: type[Pool] = pool._poolguard_plain
        pool.__class__ = plain  # type: ignore[assignment]  # back to the plain class
        if guard is not None:
            guard._detach()
        pool.__dict__.pop("_poolguard", None)
    return engine
