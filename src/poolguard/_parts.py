"""What a guard's components share of it: the event log and readers of its current state.

The guard hands one :class:`GuardParts` to its diagnostics, breakers, scanner
and slow checkout instead of the whole guard: each reads the options, gate
and database of now (a reconfigure swaps them) through these callables.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._config import Config
    from ._gate import Gate
    from ._log import EventLog

__all__ = ["GuardParts"]


@dataclasses.dataclass(frozen=True, slots=True)
class GuardParts:
    """The guard's event log, and callables that read its current state."""

    log: EventLog
    config: Callable[[], Config]
    gate: Callable[[], Gate]
    #: The database system name (``postgresql``, ``mysql``...).
    db_system: Callable[[], str]
    #: Seconds a checkout may wait (the option, or the pool's own timeout).
    acquire_timeout: Callable[[], float | None]
    #: Count a checkout refused before waiting: ``reject(reason, priority)``.
    reject: Callable[[str, str], None]
