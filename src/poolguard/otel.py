"""OpenTelemetry metrics over the guard's own stats, with nothing on the hot path.

Counts and gauges are observable instruments read at collection time.
Histograms (``create_time``, ``wait_time``, ``use_time``,
``db.client.operation.duration``) are synchronous instruments, but the
request path never calls them: it appends raw values to the recorder, and the
first callback of each collection drains those lists into the histograms.
One SDK ``record()`` costs as much as a whole checkout, so it is paid at
collection time, on the reader's thread, instead of by a request.

Samples are kept only once a collection has happened (an SDK is installed
and reading); with the API's no-op provider nothing is kept at all.

Names, instrument types and units follow the OpenTelemetry database client
semantic conventions (``db.client.connection.*``, ``db.client.operation.duration``);
``metrics_legacy_names`` adds the older ``db.client.connections.*`` set.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .guard import Guard

__all__ = ["DURATION_BUCKETS", "Exporter"]

#: Bucket boundaries the conventions advise for database client durations (s).
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_LEGACY_MS_BUCKETS = tuple(b * 1000 for b in DURATION_BUCKETS)

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("poolguard")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


class Exporter:
    """Registers one guard's instruments; :meth:`close` stops reporting."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        provider = guard.config.meter_provider or metrics.get_meter_provider()
        meter = provider.get_meter("poolguard", _version())
        self._closed = False
        self._lock = threading.Lock()
        self._seen_acquisitions = 0
        self._seen_slow = 0
        legacy = guard.config.metrics_legacy_names

        def gauge(name: str, unit: str, desc: str, fn: Callable[[], Iterable[Observation]]) -> None:
            meter.create_observable_up_down_counter(
                name, callbacks=[self._guarded(fn)], unit=unit, description=desc
            )

        # Pool state (db.client.connection.*). The count callback also drains
        # the histogram samples, once per collection.
        meter.create_observable_up_down_counter(
            "db.client.connection.count",
            callbacks=[self._guarded(self._count, drain=True)],
            unit="{connection}",
            description="Connections in the state named by db.client.connection.state.",
        )
        gauge("db.client.connection.idle.max", "{connection}",
              "Most idle connections the pool keeps.", self._idle_max)
        gauge("db.client.connection.idle.min", "{connection}",
              "Fewest idle connections the pool keeps.", self._idle_min)
        gauge("db.client.connection.max", "{connection}",
              "Most connections the pool can have open.", self._max)
        gauge("db.client.connection.pending_requests", "{request}",
              "Checkouts waiting for a connection.", self._pending)
        meter.create_observable_counter(
            "db.client.connection.timeouts",
            callbacks=[self._guarded(self._timeouts)],
            unit="{timeout}",
            description="Checkouts that timed out waiting for a connection.",
        )
        self.create_time = meter.create_histogram(
            "db.client.connection.create_time", unit="s",
            description="Time to open a new connection.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time", unit="s",
            description="Time a checkout waited for a connection.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time", unit="s",
            description="Time from checkout to checkin of a connection.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.operation = meter.create_histogram(
            "db.client.operation.duration", unit="s",
            description="Duration of database client operations.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )

        # poolguard's own.
        meter.create_observable_counter(
            "poolguard.rejections", callbacks=[self._guarded(self._rejections)],
            unit="{request}",
            description="Checkouts refused before waiting, by reason and priority.",
        )
        meter.create_observable_up_down_counter(
            "poolguard.circuit_breaker.state", callbacks=[self._guarded(self._breaker_state)],
            unit="{state}",
            description="1 for the breaker's current state (closed, open, half_open), else 0.",
        )
        meter.create_observable_counter(
            "poolguard.circuit_breaker.transitions",
            callbacks=[self._guarded(self._breaker_transitions)], unit="{transition}",
            description="Circuit breaker state changes, by the state entered.",
        )
        meter.create_observable_counter(
            "poolguard.connection.leak_warnings", callbacks=[self._guarded(self._leaks)],
            unit="{warning}",
            description="Connections held longer than leak_threshold.",
        )
        meter.create_observable_counter(
            "poolguard.pool.exhausted", callbacks=[self._guarded(self._exhausted)],
            unit="{event}",
            description="Times the pool ran dry (timeout or sustained utilization alert).",
        )
        meter.create_observable_counter(
            "poolguard.query.time", callbacks=[self._guarded(self._query_time)], unit="s",
            description="Total statement time by statement shape (top_queries shapes at most).",
        )
        meter.create_observable_counter(
            "poolguard.query.calls", callbacks=[self._guarded(self._query_calls)],
            unit="{call}", description="Statements executed by statement shape.",
        )

        self._legacy: dict[str, Any] = {}
        if legacy:
            self._register_legacy(meter)

    # -- plumbing -------------------------------------------------------------

    def close(self) -> None:
        """Report nothing from now on (instruments cannot be unregistered)."""
        self._closed = True

    def _guarded(
        self, fn: Callable[[], Iterable[Observation]], drain: bool = False
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            if self._closed:
                return []
            if drain:
                self._drain()
            return list(fn())

        return callback

    def _base(self) -> dict[str, str]:
        return {POOL: self.guard.name}

    def _drain(self) -> None:
        guard = self.guard
        recorder = guard.recorder
        with self._lock:
            if recorder.export_use is None:
                # First collection: from now on the hot path keeps samples.
                recorder.start_export()
                self._seen_acquisitions = guard.gate.acquired
                self._seen_slow = recorder.wait.count
                return
            use, wait, create, ops = recorder.drain()
            acquisitions = guard.gate.acquired
            slow = recorder.wait.count
            # Checkouts that found a free permit waited 0 s: not buffered one
            # by one, but counted here from the totals.
            zeros = max(0, (acquisitions - self._seen_acquisitions) - (slow - self._seen_slow))
            self._seen_acquisitions, self._seen_slow = acquisitions, slow
        base = self._base()
        system = guard.db_system
        for value in use:
            self.use_time.record(value, base)
        for value in wait:
            self.wait_time.record(value, base)
        for _ in range(zeros):
            self.wait_time.record(0.0, base)
        for value in create:
            self.create_time.record(value, base)
        for duration, fp, error in ops:
            attrs = {"db.system.name": system, POOL: guard.name}
            if fp.operation:
                attrs["db.operation.name"] = fp.operation
            if fp.collection:
                attrs["db.collection.name"] = fp.collection
            if error is not None:
                attrs["error.type"] = error
            self.operation.record(duration, attrs)
        if self._legacy:
            self._record_legacy(use, wait, zeros, create)

    def _record_legacy(
        self, use: list[float], wait: list[float], zeros: int, create: list[float]
    ) -> None:
        base = {"pool.name": self.guard.name}
        for name, values, extra_zeros in (
            ("use_time", use, 0), ("wait_time", wait, zeros), ("create_time", create, 0)
        ):
            instrument = self._legacy[name]
            for value in values:
                instrument.record(value * 1000, base)
            for _ in range(extra_zeros):
                instrument.record(0.0, base)

    # -- readings -------------------------------------------------------------

    def _pool_numbers(self) -> tuple[int, int, int | None, int, int]:
        """(used, idle, max, idle_max, idle_min)."""
        stats = self.guard.stats()
        # SQLAlchemy keeps up to pool_size idle connections and no minimum:
        # connections are opened on demand.
        return stats.in_use, stats.idle, stats.capacity, stats.pool_size or 0, 0

    def _count(self) -> Iterable[Observation]:
        used, idle, _, _, _ = self._pool_numbers()
        base = self._base()
        yield Observation(used, {**base, STATE: "used"})
        yield Observation(idle, {**base, STATE: "idle"})

    def _idle_max(self) -> Iterable[Observation]:
        yield Observation(self._pool_numbers()[3], self._base())

    def _idle_min(self) -> Iterable[Observation]:
        yield Observation(self._pool_numbers()[4], self._base())

    def _max(self) -> Iterable[Observation]:
        capacity = self._pool_numbers()[2]
        if capacity is not None:  # no limit: nothing to report
            yield Observation(capacity, self._base())

    def _pending(self) -> Iterable[Observation]:
        yield Observation(self.guard.gate.waiting, self._base())

    def _timeouts(self) -> Iterable[Observation]:
        yield Observation(self.guard.gate.timeouts, self._base())

    def _rejections(self) -> Iterable[Observation]:
        base = self._base()
        for (reason, priority), n in sorted(self.guard.rejections.items()):
            yield Observation(n, {**base, "poolguard.reason": reason,
                                  "poolguard.priority": priority})

    def _breaker_state(self) -> Iterable[Observation]:
        breaker = getattr(self.guard, "breaker", None)
        if breaker is None:
            return
        base = self._base()
        for state in ("closed", "open", "half_open"):
            yield Observation(int(breaker.state == state), {**base, "poolguard.state": state})

    def _breaker_transitions(self) -> Iterable[Observation]:
        breaker = getattr(self.guard, "breaker", None)
        if breaker is None:
            return
        base = self._base()
        for state, n in sorted(breaker.transitions.items()):
            yield Observation(n, {**base, "poolguard.state": state})

    def _leaks(self) -> Iterable[Observation]:
        yield Observation(self.guard.leak_warnings, self._base())

    def _exhausted(self) -> Iterable[Observation]:
        yield Observation(self.guard.exhaustion_events, self._base())

    def _query_attrs(self, stat: Any) -> dict[str, str]:
        return {**self._base(), "db.query.summary": stat.fp.summary,
                "poolguard.query.fingerprint": stat.fp.id}

    def _query_time(self) -> Iterable[Observation]:
        for stat in list(self.guard.recorder.queries.values()):
            yield Observation(stat.hist.sum, self._query_attrs(stat))

    def _query_calls(self) -> Iterable[Observation]:
        for stat in list(self.guard.recorder.queries.values()):
            yield Observation(stat.hist.count, self._query_attrs(stat))

    # -- older names ----------------------------------------------------------

    def _register_legacy(self, meter: metrics.Meter) -> None:
        def legacy_base() -> dict[str, str]:
            return {"pool.name": self.guard.name}

        def usage(options: CallbackOptions) -> Iterable[Observation]:
            if self._closed:
                return []
            used, idle, _, _, _ = self._pool_numbers()
            return [Observation(used, {**legacy_base(), "state": "used"}),
                    Observation(idle, {**legacy_base(), "state": "idle"})]

        def one(pick: Callable[[], int | None]) -> Callable[[CallbackOptions], list[Observation]]:
            def callback(options: CallbackOptions) -> list[Observation]:
                value = None if self._closed else pick()
                return [] if value is None else [Observation(value, legacy_base())]

            return callback

        meter.create_observable_up_down_counter(
            "db.client.connections.usage", callbacks=[usage], unit="{connection}",
            description="Deprecated name of db.client.connection.count.")
        meter.create_observable_up_down_counter(
            "db.client.connections.idle.max", callbacks=[one(lambda: self._pool_numbers()[3])],
            unit="{connection}", description="Deprecated name of db.client.connection.idle.max.")
        meter.create_observable_up_down_counter(
            "db.client.connections.idle.min", callbacks=[one(lambda: self._pool_numbers()[4])],
            unit="{connection}", description="Deprecated name of db.client.connection.idle.min.")
        meter.create_observable_up_down_counter(
            "db.client.connections.max", callbacks=[one(lambda: self._pool_numbers()[2])],
            unit="{connection}", description="Deprecated name of db.client.connection.max.")
        meter.create_observable_up_down_counter(
            "db.client.connections.pending_requests",
            callbacks=[one(lambda: self.guard.gate.waiting)], unit="{request}",
            description="Deprecated name of db.client.connection.pending_requests.")
        meter.create_observable_counter(
            "db.client.connections.timeouts", callbacks=[one(lambda: self.guard.gate.timeouts)],
            unit="{timeout}", description="Deprecated name of db.client.connection.timeouts.")
        for name in ("create_time", "wait_time", "use_time"):
            self._legacy[name] = meter.create_histogram(
                f"db.client.connections.{name}", unit="ms",
                description=f"Deprecated name of db.client.connection.{name} (in ms).",
                explicit_bucket_boundaries_advisory=_LEGACY_MS_BUCKETS,
            )
