"""The per-checkout hold: one list, its layout defined here once, read by index.

A checkout builds it with a single list display (no ``__init__`` call: a
``__slots__`` object measured 0.35-0.8 us slower per checkout). ``_pool.py``
spells :func:`new_hold` out inline on the hot path; tests/test_hold.py pins
that both writers produce this layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from ._context import RequestContext

__all__ = [
    "FIELDS",
    "REQUEST",
    "RUNNING_SINCE",
    "SITE",
    "STATEMENT",
    "T0",
    "TASK",
    "THREAD",
    "TOP_STAT",
    "TOP_TIME",
    "WAIT",
    "WARNED",
    "WIRE",
    "Hold",
    "new_hold",
]

#: perf_counter() at checkout.
T0 = 0
#: Seconds the checkout waited for a permit.
WAIT = 1
#: threading.get_ident() of the thread that checked it out.
THREAD = 2
#: The RequestContext it was taken under, or None.
REQUEST = 3
#: The statement running now or last run (raw; normalise before showing).
STATEMENT = 4
#: perf_counter() when the running statement started; 0.0 when none runs.
RUNNING_SINCE = 5
#: Stats row (QueryTotals) of the longest statement so far, and its duration.
TOP_STAT = 6
TOP_TIME = 7
#: asyncio.Task that checked it out (asyncio pools only).
TASK = 8
#: Where it was checked out (capture_call_sites only).
SITE = 9
#: The held-too-long warning was logged.
WARNED = 10
#: The guard's own round trip in flight for it (its ``SET LOCAL`` behind a
#: pooler), as the holders report shows it; None when there is none.
WIRE = 11

Hold: TypeAlias = "list[Any]"  # [T0, WAIT, THREAD, REQUEST, STATEMENT, ...]


def new_hold(t0: float, wait: float, thread: int, request: RequestContext | None) -> Hold:
    """A hold as the checkout builds it (_pool.py spells the same list out inline)."""
    return [t0, wait, thread, request, None, 0.0, None, -1.0, None, None, False, None]


#: The field names in index order (for tests and debugging output).
FIELDS = ("T0", "WAIT", "THREAD", "REQUEST", "STATEMENT", "RUNNING_SINCE", "TOP_STAT",
          "TOP_TIME", "TASK", "SITE", "WARNED", "WIRE")
