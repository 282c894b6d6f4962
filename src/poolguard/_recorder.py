"""Poolguard's own cheap store of what happens: the source every reader uses.

Stats snapshots, the OpenTelemetry exporter, logs and diagnostics all read
from here; the hot path only writes plain numbers into it. Nothing in this
module calls OpenTelemetry or a logger.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from ._fingerprint import Fingerprint
from ._histogram import Histogram, HistogramSnapshot

__all__ = ["GRANTED", "SHED", "TIMED_OUT", "QueryTotals", "Recorder"]

#: Samples kept for the OpenTelemetry exporter between two collections.
EXPORT_BUFFER_MAX = 65536

#: Outcomes of a wait at the gate (Recorder.add_wait).
GRANTED, TIMED_OUT, SHED = "granted", "timed_out", "shed"

#: Where statements go once ``top_queries`` shapes are tracked.
OTHER = Fingerprint(id="other", text="(other)", operation="", collection="")


class QueryTotals:
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

    ``export_*`` buffers are ``None`` until an exporter with an SDK behind it
    asks for samples; then the hot path appends raw values (one
    ``deque.append``, a single C call) and the exporter drains them at
    collection time, off the request path. Each buffer is a ``deque`` with
    ``maxlen``: bounded whatever happens to the collections, at no cost per
    append; when full, the oldest samples go, and the exporter counts them
    from the histograms' totals.
    """

    def __init__(self) -> None:
        #: Waits that got a permit (``track_min``: every value goes through add()).
        self.wait = Histogram(track_min=True)
        #: Waits that ended without one: timed out (PoolTimeout), or shed
        #: after waiting (queue_delay). Apart from ``wait`` so the checkouts
        #: that did not wait stay ``use + out - wait``.
        self.wait_failed = Histogram(track_min=True)
        #: PoolTimeouts raised (a queue_delay shed is a rejection, not one of these).
        self.timeouts = 0
        #: PoolerSaturated raised (PgBouncer's queue timed out or was full).
        self.pooler_saturations = 0
        self.use = Histogram()
        self.create = Histogram(track_min=True)
        self.queries: dict[str, QueryTotals] = {}
        self._queries_lock = threading.Lock()
        self.export_use: deque[float] | None = None
        self.export_wait: deque[float] | None = None
        self.export_create: deque[float] | None = None
        #: (duration, fingerprint, error type or None)
        self.export_ops: deque[tuple[float, Fingerprint, str | None]] | None = None

    def add_wait(self, waited: float, outcome: str = GRANTED) -> None:
        """Count one wait at the gate, whatever its ``outcome``: :data:`GRANTED`,
        :data:`TIMED_OUT` (a PoolTimeout) or :data:`SHED` (queue_delay)."""
        if outcome == GRANTED:
            self.wait.add(waited)
        else:
            self.wait_failed.add(waited)
            if outcome == TIMED_OUT:
                self.timeouts += 1
        buf = self.export_wait
        if buf is not None:
            buf.append(waited)

    def wait_snapshot(self, not_waited: int) -> HistogramSnapshot:
        """Every acquire wait, granted or not, plus ``not_waited`` checkouts as 0 s."""
        return self.wait.merged((self.wait_failed,), not_waited)

    def wait_count(self) -> int:
        """Waits counted so far, granted or not (what ``export_wait`` was given)."""
        return self.wait.count + self.wait_failed.count

    def operation_count(self) -> int:
        """Statements counted so far (what ``export_ops`` was given)."""
        return sum(stat.hist.count for stat in list(self.queries.values()))

    def query(self, fp: Fingerprint, limit: int) -> QueryTotals:
        """The stats row of ``fp``, created on first use; past ``limit`` rows, ``(other)``."""
        stat = self.queries.get(fp.id)
        if stat is None:
            with self._queries_lock:
                stat = self.queries.get(fp.id)
                if stat is None:
                    if len(self.queries) >= limit:
                        fp = OTHER
                    stat = self.queries.setdefault(fp.id, QueryTotals(fp))
        return stat

    def start_export(self) -> None:
        """Begin keeping raw samples for an exporter (each buffer bounded)."""
        if self.export_use is None:
            self.export_use = deque(maxlen=EXPORT_BUFFER_MAX)
            self.export_wait = deque(maxlen=EXPORT_BUFFER_MAX)
            self.export_create = deque(maxlen=EXPORT_BUFFER_MAX)
            self.export_ops = deque(maxlen=EXPORT_BUFFER_MAX)

    def stop_export(self) -> None:
        """Keep no samples (the exporter closed)."""
        self.export_use = self.export_wait = self.export_create = None
        self.export_ops = None

    @staticmethod
    def take(buf: deque[Any] | None) -> list[Any]:
        """The samples in ``buf`` now, removed from it.

        Pops exactly as many as were there: a sample appended meanwhile (the
        hot path never stops) stays for the next collection instead of being
        lost with a swapped-out buffer.
        """
        if buf is None:
            return []
        pop = buf.popleft
        return [pop() for _ in range(len(buf))]
