"""The gate's admission policy built from the options: the policies decide, the gate enforces.

:func:`admission` turns a guard's options into the one :class:`Admission`
object the gate consults (None when no policy is on, which keeps the gate
on its lock-free fast path). Fleet budgets (``fleet_tag_limits``,
``fleet_reserved_critical``) are divided by the replica count here and win
over the per-replica options they overlap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._fleet import fleet_limits
from ._policies import (
    BACKGROUND,
    CRITICAL,
    NORMAL,
    Admission,
    Codel,
    Gradient2,
    reserve_size,
    tag_limit,
)

if TYPE_CHECKING:
    from ._config import Config

__all__ = ["admission"]


def admission(cfg: Config, capacity: int | None) -> Admission | None:
    """The admission policy for ``cfg`` (None: all off)."""
    if not cfg.policies_on or capacity is None:
        return None
    fleet_tags, fleet_reserve = fleet_limits(cfg)
    reserved = cfg.reserved_critical if fleet_reserve is None else fleet_reserve
    tags = {tag: tag_limit(limit, capacity) for tag, limit in (cfg.tag_limits or {}).items()}
    # A per-replica count above the pool means the whole pool, like tag_limits.
    tags.update(fleet_tags)
    return Admission(
        reserved=reserve_size(reserved, capacity),
        max_waiting={
            CRITICAL: cfg.max_waiting_critical,
            NORMAL: cfg.max_waiting_normal,
            BACKGROUND: cfg.max_waiting_background,
        },
        codel=Codel(cfg.codel_target, cfg.codel_interval) if cfg.codel else None,
        tag_limits=tags,
        adaptive=Gradient2(capacity) if cfg.adaptive_limit else None,
    )
