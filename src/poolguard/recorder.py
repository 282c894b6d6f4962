"""Poolguard's own cheap store of what happens: the source every reader uses.

Stats snapshots, the OpenTelemetry exporter, logs and diagnostics all read
from here; the hot path only writes plain numbers into it. Nothing in this
module calls OpenTelemetry or a logger.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, TypeAlias

from .fingerprint import Fingerprint
from .histogram import Histogram

if TYPE_CHECKING:
    from .context import RequestContext

__all__ = ["Hold", "QueryStat", "Recorder", "new_hold"]

#: Samples kept for the OpenTelemetry exporter between two collections.
EXPORT_BUFFER_MAX = 65536

#: Where statements go once ``top_queries`` shapes are tracked.
OTHER = Fingerprint(id="other", text="(other)", operation="", collection="")


# One checked-out connection, as a list: the checkout builds it with a single
# list display (no __init__ call), and fields are read by these indexes.
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
#: Stats row (QueryStat) of the longest statement so far, and its duration.
TOP_STAT = 6
TOP_TIME = 7
#: asyncio.Task that checked it out (asyncio pools only).
TASK = 8
#: Where it was checked out (capture_call_sites only).
SITE = 9
#: The held-too-long warning was logged.
WARNED = 10

Hold: TypeAlias = "list[Any]"  # [T0, WAIT, THREAD, REQUEST, STATEMENT, ...]


def new_hold(t0: float, wait: float, thread: int, request: RequestContext | None) -> Hold:
    """A hold as the checkout builds it (pool.py spells the same list out inline)."""
    return [t0, wait, thread, request, None, 0.0, None, -1.0, None, None, False]


class QueryStat:
    """Running totals of one statement shape (like a ``pg_stat_statements`` row)."""

    __slots__ = ("errors", "fp", "held", "hist", "rows")

    def __init__(self, fp: Fingerprint) -> None:
        self.fp = fp
        self.hist = Histogram()
        self.rows = 0
        self.errors = 0
        self.held = 0.0


class Recorder:
    """Histograms and per-statement stats of one guard.

    ``export_*`` lists are ``None`` until an exporter asks for samples; then
    the hot path appends raw values (one ``list.append``) and the exporter
    drains them at collection time, off the request path.
    """

    def __init__(self) -> None:
        self.wait = Histogram()
        self.use = Histogram()
        self.create = Histogram()
        self.queries: dict[str, QueryStat] = {}
        self._queries_lock = threading.Lock()
        self.export_use: list[float] | None = None
        self.export_wait: list[float] | None = None
        self.export_create: list[float] | None = None
        #: (duration, fingerprint, error type or None)
        self.export_ops: list[tuple[float, Fingerprint, str | None]] | None = None

    def query(self, fp: Fingerprint, limit: int) -> QueryStat:
        """The stats row of ``fp``, created on first use; past ``limit`` rows, ``(other)``."""
        stat = self.queries.get(fp.id)
        if stat is None:
            with self._queries_lock:
                stat = self.queries.get(fp.id)
                if stat is None:
                    if len(self.queries) >= limit:
                        fp = OTHER
                    stat = self.queries.setdefault(fp.id, QueryStat(fp))
        return stat

    def start_export(self) -> None:
        """Begin keeping raw samples for an exporter."""
        self.export_use = []
        self.export_wait = []
        self.export_create = []
        self.export_ops = []

    def trim(self) -> int:
        """Bound the export buffers when no exporter collects (oldest samples go).

        Returns how many samples were dropped.
        """
        dropped = 0
        for name in ("export_use", "export_wait", "export_create", "export_ops"):
            buf = getattr(self, name)
            if buf is not None and len(buf) > EXPORT_BUFFER_MAX:
                excess = len(buf) - EXPORT_BUFFER_MAX
                del buf[:excess]
                dropped += excess
        return dropped

    def drain(
        self,
    ) -> tuple[list[float], list[float], list[float], list[tuple[float, Fingerprint, str | None]]]:
        """Hand over the samples kept since the last call (swap, never copy)."""
        use, self.export_use = self.export_use or [], []
        wait, self.export_wait = self.export_wait or [], []
        create, self.export_create = self.export_create or [], []
        ops, self.export_ops = self.export_ops or [], []
        return use, wait, create, ops
