"""OpenTelemetry metrics over the guard's own stats, with nothing on the hot path.

Counts and gauges are observable instruments read at collection time.
Histograms (``create_time``, ``wait_time``, ``use_time``,
``db.client.operation.duration``) are synchronous instruments, but the
request path never calls them: it appends raw values to the recorder, and the
first callback of each collection drains those buffers into the histograms.
One SDK ``record()`` costs as much as a whole checkout, so it is paid at
collection time, on the reader's thread, instead of by a request.

Samples are kept from the moment an SDK is behind the provider, so the
first collection reports what happened since ``wrap()`` (or since the SDK
was installed); the buffers are bounded (``EXPORT_BUFFER_MAX`` samples each)
whether or not anyone collects. With the API's no-op provider nothing is
kept at all.

Names, instrument types and units follow the OpenTelemetry database client
semantic conventions (``db.client.connection.*``, ``db.client.operation.duration``);
``metrics_legacy_names`` adds the older ``db.client.connections.*`` set.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation

try:  # the global provider until an SDK is installed
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    _NO_SDK: tuple[type, ...] = (NoOpMeterProvider, _ProxyMeterProvider)
except ImportError:  # pragma: no cover - another API layout
    _NO_SDK = (NoOpMeterProvider,)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ._config import Config
    from ._fleet import Fleet
    from ._gate import Gate
    from ._log import EventLog
    from ._recorder import Recorder
    from ._stats import PoolStats

__all__ = ["DURATION_BUCKETS", "Exporter", "refresh_exporter"]

#: Bucket boundaries the conventions advise for database client durations (s).
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_LEGACY_MS_BUCKETS = tuple(b * 1000 for b in DURATION_BUCKETS)

POOL = "db.client.connection.pool.name"
STATE = "db.client.connection.state"


class MetricsSource(Protocol):
    """What the exporter reads of its guard (:class:`poolguard.Guard` is one)."""

    name: str
    config: Config
    gate: Gate
    recorder: Recorder
    log: EventLog
    rejections: dict[tuple[str, str], int]
    exporter: Any
    fleet: Fleet

    @property
    def leak_warnings(self) -> int: ...

    @property
    def exhaustion_events(self) -> int: ...

    @property
    def db_system(self) -> str: ...

    def stats(self) -> PoolStats: ...


def _version() -> str:
    # Not importlib.metadata: the distribution is named sqlalchemy-poolguard, and
    # an unrelated distribution named "poolguard" may be installed beside it.
    from ._version import __version__

    return __version__


_logger = logging.getLogger("poolguard")


def _observe(
    meter: metrics.Meter,
    name: str,
    unit: str,
    description: str,
    callback: Callable[[CallbackOptions], Iterable[Observation]],
    *,
    monotonic: bool | None = False,
) -> None:
    # monotonic None: a gauge (a value that is not a sum, such as a longest wait).
    create: Callable[..., Any]
    if monotonic is None:
        create = meter.create_observable_gauge
    elif monotonic:
        create = meter.create_observable_counter
    else:
        create = meter.create_observable_up_down_counter
    create(name, callbacks=[callback], unit=unit, description=description)


_Read = TypeVar("_Read", bound="Callable[[Exporter], Iterable[Observation]]")

#: The observable instruments, in registration order: name, unit,
#: description, monotonic (a counter; False an up-down counter; None a gauge), the reader.
_OBSERVED: list[
    tuple[str, str, str, bool | None, Callable[[Exporter], Iterable[Observation]]]
] = []


def _observed(
    name: str, unit: str, description: str, *, monotonic: bool | None = False
) -> Callable[[_Read], _Read]:
    """Declare the :class:`Exporter` reader below as the instrument ``name``."""

    def declare(read: _Read) -> _Read:
        _OBSERVED.append((name, unit, description, monotonic, read))
        return read

    return declare


class _Instruments:
    """poolguard's instruments on one meter, shared by every guard that reports there.

    A meter keeps the first instrument registered under a name and returns it
    for later registrations, dropping their callbacks: a second guard (another
    engine, or the same engine wrapped again) registering its own would report
    nothing. So each name is registered once, and its callback reads every
    live :class:`Exporter`.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        self.meter = meter
        #: Live exporters (replaced, never mutated: callbacks iterate it unlocked).
        self.exporters: tuple[Exporter, ...] = ()
        self.legacy: dict[str, Any] = {}
        self._lock = threading.Lock()

        def hist(name: str, description: str) -> Any:
            return meter.create_histogram(
                name, unit="s", description=description,
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )

        # Pool state (db.client.connection.*) and poolguard's own, declared on
        # the Exporter's readers. The count's callback (the first) also drains
        # the histogram samples, once per collection.
        for name, unit, description, monotonic, read in _OBSERVED:
            drain = read is Exporter._count
            _observe(meter, name, unit, description, self._each(read, drain=drain),
                     monotonic=monotonic)
        self.create_time = hist("db.client.connection.create_time",
                                "Time to open a new connection, retries included; "
                                "failed attempts too.")
        self.wait_time = hist("db.client.connection.wait_time",
                              "Time a checkout waited for a connection, whether it got one, "
                              "timed out or was shed (queue_delay); 0 when one was free.")
        self.use_time = hist("db.client.connection.use_time",
                             "Time from checkout to checkin of a connection.")
        self.operation = hist("db.client.operation.duration",
                              "Duration of database client operations.")

    def _each(
        self,
        read: Callable[[Exporter], Iterable[Observation]],
        *,
        drain: bool = False,
        legacy: bool = False,
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            observations: list[Observation] = []
            for exporter in self.exporters:
                if legacy and not exporter.legacy:
                    continue
                try:
                    if drain:
                        exporter._drain()
                    observations.extend(read(exporter))
                except Exception:  # one failing guard must not hide the others
                    _logger.exception("metrics of pool %r failed", exporter.guard.name)
            return observations

        return callback

    def add(self, exporter: Exporter) -> None:
        with self._lock:
            if exporter.legacy and not self.legacy:
                self._register_legacy()
            self.exporters = (*self.exporters, exporter)

    def remove(self, exporter: Exporter) -> None:
        with self._lock:
            self.exporters = tuple(e for e in self.exporters if e is not exporter)

    def _register_legacy(self) -> None:
        meter, each = self.meter, self._each

        def one(pick: Callable[[Exporter], int | None]) -> Callable[[Exporter], list[Observation]]:
            def read(exporter: Exporter) -> list[Observation]:
                value = pick(exporter)
                return [] if value is None else [Observation(value, exporter._legacy_base())]

            return read

        _observe(meter, "db.client.connections.usage", "{connection}",
                 "Deprecated name of db.client.connection.count.",
                 each(lambda e: e._legacy_usage(), legacy=True))
        # The older name's suffix, unit, monotonic, and the one value to report.
        singles: tuple[tuple[str, str, bool, Callable[[Exporter], int | None]], ...] = (
            ("idle.max", "{connection}", False, lambda e: e._pool_numbers()[3]),
            ("idle.min", "{connection}", False, lambda e: e._pool_numbers()[4]),
            ("max", "{connection}", False, lambda e: e._pool_numbers()[2]),
            ("pending_requests", "{request}", False, lambda e: e.guard.gate.waiting),
            ("timeouts", "{timeout}", True, lambda e: e.guard.recorder.timeouts),
        )
        for suffix, unit, monotonic, pick in singles:
            _observe(meter, f"db.client.connections.{suffix}", unit,
                     f"Deprecated name of db.client.connection.{suffix}.",
                     each(one(pick), legacy=True), monotonic=monotonic)
        for name in ("create_time", "wait_time", "use_time"):
            self.legacy[name] = meter.create_histogram(
                f"db.client.connections.{name}", unit="ms",
                description=f"Deprecated name of db.client.connection.{name} (in ms).",
                explicit_bucket_boundaries_advisory=_LEGACY_MS_BUCKETS,
            )


#: Instruments by the MeterProvider given to wrap(); the global provider's apart.
_BY_PROVIDER: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_GLOBAL: list[_Instruments] = []
_REGISTRY_LOCK = threading.Lock()


def _instruments(provider: Any) -> _Instruments:
    """The shared instruments of ``provider`` (``None``: the API's global provider)."""
    if provider is metrics.get_meter_provider():
        provider = None
    with _REGISTRY_LOCK:
        if provider is None:
            found = _GLOBAL[0] if _GLOBAL else None
        else:
            found = _BY_PROVIDER.get(provider)
        if found is None:
            source = metrics.get_meter_provider() if provider is None else provider
            found = _Instruments(source.get_meter("poolguard", _version()))
            if provider is None:
                # Built on the API's proxy if no SDK is set yet: the proxy
                # hands these same instruments over once one is.
                _GLOBAL.append(found)
            else:
                _BY_PROVIDER[provider] = found
        return found


def _has_sdk(provider: Any) -> bool:
    """Whether ``provider`` (``None``: the global one) can ever read anything.

    The API's no-op provider never does; its global proxy does only once an
    application installs an SDK (``set_meter_provider``).
    """
    if provider is None:
        provider = metrics.get_meter_provider()
    return not isinstance(provider, _NO_SDK)


class Exporter:
    """Reports one guard's stats through the shared instruments; :meth:`close` stops it.

    Histogram samples are kept from the moment an SDK is behind the provider
    (at once for an SDK ``meter_provider``; for the global provider, from the
    first scan after the application installs one), so the first collection
    reports what happened since, within the buffers' bound.
    """

    def __init__(self, guard: MetricsSource) -> None:
        self.guard = guard
        self.legacy = guard.config.metrics_legacy_names
        self._provider = guard.config.meter_provider
        self._lock = threading.Lock()
        #: Checkouts without a wait already reported (as 0.0 wait_time values).
        self._fast_seen = 0
        #: Samples handed to each buffer so far, by the histograms' totals at
        #: the last drain: what a full buffer lost is the difference.
        self._given: dict[str, int] = {}
        self._closed = False
        self.instruments = _instruments(guard.config.meter_provider)
        self.instruments.add(self)
        self.poll()

    # -- plumbing -------------------------------------------------------------

    def close(self) -> None:
        """Report nothing from now on (and keep no samples)."""
        self.instruments.remove(self)
        with self._lock:  # a collection running now must not start keeping again
            self._closed = True
            if self.guard.exporter in (self, None):
                self.guard.recorder.stop_export()

    def poll(self) -> None:
        """Start keeping samples once an SDK is behind the provider (cheap; the scan calls it)."""
        if self.guard.recorder.export_use is None and _has_sdk(self._provider):
            with self._lock:
                self._start()

    def _start(self) -> None:
        # Under self._lock. Samples from now on; 0 s waits counted from now on.
        recorder = self.guard.recorder
        if recorder.export_use is not None or self._closed:
            return
        self._fast_seen = self._fast_checkouts()
        self._given = self._totals()
        recorder.start_export()

    def _totals(self) -> dict[str, int]:
        recorder = self.guard.recorder
        return {
            "use": recorder.use.count,
            "wait": recorder.wait_count(),
            "create": recorder.create.count,
            "ops": recorder.operation_count(),
        }

    def _base(self) -> dict[str, str]:
        return {POOL: self.guard.name}

    def _drain(self) -> None:
        guard = self.guard
        recorder = guard.recorder
        take = recorder.take
        with self._lock:
            if recorder.export_use is None:
                # An SDK appeared and no scan noticed yet: from now on.
                self._start()
                return
            totals = self._totals()  # before taking: in-flight samples stay for next time
            buffers = {
                "use": recorder.export_use, "wait": recorder.export_wait,
                "create": recorder.export_create, "ops": recorder.export_ops,
            }
            full = {name: buf is not None and len(buf) == buf.maxlen
                    for name, buf in buffers.items()}
            use = take(recorder.export_use)
            wait = take(recorder.export_wait)
            create = take(recorder.export_create)
            ops = take(recorder.export_ops)
            taken = {"use": len(use), "wait": len(wait), "create": len(create), "ops": len(ops)}
            # A buffer that lost samples is full; the loss is what the
            # histograms counted since the last drain and the buffer lacks
            # (to within the samples in flight).
            dropped = sum(
                max(0, totals[name] - self._given.get(name, 0) - taken[name])
                for name in buffers if full[name]
            )
            self._given = totals
            # Checkouts that found a free permit waited 0 s: not buffered one
            # by one, but counted here from the totals.
            fast = self._fast_checkouts()
            zeros = max(0, fast - self._fast_seen)
            self._fast_seen += zeros
        if dropped:
            # Collections stopped for a while (or are too far apart): say so.
            guard.log.emit(logging.WARNING, "metrics.samples_dropped", samples=dropped)
        base = self._base()
        system = guard.db_system
        instruments = self.instruments
        for value in use:
            instruments.use_time.record(value, base)
        for value in wait:
            instruments.wait_time.record(value, base)
        for _ in range(zeros):
            instruments.wait_time.record(0.0, base)
        for value in create:
            instruments.create_time.record(value, base)
        for duration, fp, error in ops:
            attrs = {"db.system.name": system, POOL: guard.name}
            if fp.operation:
                attrs["db.operation.name"] = fp.operation
            if fp.collection:
                attrs["db.collection.name"] = fp.collection
            if error is not None:
                attrs["error.type"] = error
            instruments.operation.record(duration, attrs)
        if self.legacy:
            self._record_legacy(use, wait, zeros, create)

    def _fast_checkouts(self) -> int:
        """Successful checkouts so far that did not wait, or fewer while some are in flight.

        Checkouts = checkins + connections out now; minus those that waited.
        Read in this order, a checkout or checkin in flight can only make it
        low (caught up at the next collection), never high: a checkin leaves
        ``gate.out`` before ``use`` counts it, a waited checkout is counted
        in ``wait`` before it enters ``gate.out``, and a checkout granted a
        permit but not yet recorded is in neither. (Permits granted would
        count that last one as a checkout that did not wait.)
        """
        recorder = self.guard.recorder
        done = recorder.use.count
        out = len(self.guard.gate.out)
        return done + out - recorder.wait.count

    def _record_legacy(
        self, use: list[float], wait: list[float], zeros: int, create: list[float]
    ) -> None:
        base = self._legacy_base()
        for name, values, extra_zeros in (
            ("use_time", use, 0), ("wait_time", wait, zeros), ("create_time", create, 0)
        ):
            instrument = self.instruments.legacy[name]
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

    @_observed("db.client.connection.count", "{connection}",
               "Connections in the state named by db.client.connection.state.")
    def _count(self) -> Iterable[Observation]:
        used, idle, _, _, _ = self._pool_numbers()
        base = self._base()
        yield Observation(used, {**base, STATE: "used"})
        yield Observation(idle, {**base, STATE: "idle"})

    @_observed("db.client.connection.idle.max", "{connection}",
               "Most idle connections the pool keeps.")
    def _idle_max(self) -> Iterable[Observation]:
        yield Observation(self._pool_numbers()[3], self._base())

    @_observed("db.client.connection.idle.min", "{connection}",
               "Fewest idle connections the pool keeps.")
    def _idle_min(self) -> Iterable[Observation]:
        yield Observation(self._pool_numbers()[4], self._base())

    @_observed("db.client.connection.max", "{connection}",
               "Most connections the pool can have open.")
    def _max(self) -> Iterable[Observation]:
        capacity = self._pool_numbers()[2]
        if capacity is not None:  # no limit: nothing to report
            yield Observation(capacity, self._base())

    @_observed("db.client.connection.pending_requests", "{request}",
               "Checkouts waiting for a connection.")
    def _pending(self) -> Iterable[Observation]:
        yield Observation(self.guard.gate.waiting, self._base())

    @_observed("db.client.connection.timeouts", "{timeout}",
               "Checkouts that got no connection within their timeout (PoolTimeout).",
               monotonic=True)
    def _timeouts(self) -> Iterable[Observation]:
        yield Observation(self.guard.recorder.timeouts, self._base())

    @_observed("poolguard.rejections", "{request}",
               "Checkouts refused (LoadShed, CircuitOpen) by reason and priority; "
               "queue_delay ones waited first.", monotonic=True)
    def _rejections(self) -> Iterable[Observation]:
        base = self._base()
        for (reason, priority), n in sorted(self.guard.rejections.items()):
            yield Observation(n, {**base, "poolguard.reason": reason,
                                  "poolguard.priority": priority})

    def _breakers(self) -> Iterable[tuple[Any, dict[str, Any]]]:
        """The guard-wide breaker (no tag attribute) and those of tags, with attributes."""
        base = self._base()
        breaker = getattr(self.guard, "breaker", None)
        if breaker is not None:
            yield breaker, base
        for tag, tag_breaker in sorted(dict(getattr(self.guard, "tag_breakers", {})).items()):
            yield tag_breaker, {**base, "poolguard.tag": tag}

    @_observed("poolguard.circuit_breaker.state", "{state}",
               "1 for the breaker's current state (closed, open, half_open), else 0; "
               "a tag's breaker (breaker_per_tag) has poolguard.tag.")
    def _breaker_state(self) -> Iterable[Observation]:
        for breaker, attrs in self._breakers():
            for state in ("closed", "open", "half_open"):
                yield Observation(int(breaker.state == state), {**attrs, "poolguard.state": state})

    @_observed("poolguard.circuit_breaker.transitions", "{transition}",
               "Circuit breaker state changes, by the state entered (and poolguard.tag).",
               monotonic=True)
    def _breaker_transitions(self) -> Iterable[Observation]:
        for breaker, attrs in self._breakers():
            for state, n in sorted(breaker.transitions.items()):
                yield Observation(n, {**attrs, "poolguard.state": state})

    def _culprits(self, read: Callable[[Any], dict[str, int]]) -> Iterable[Observation]:
        """One observation per kind (shape, tag), with isolate_culprits on."""
        culprits = getattr(self.guard, "culprits", None)
        if culprits is None or not self.guard.config.isolate_culprits:
            return
        base = self._base()
        for kind, n in sorted(read(culprits).items()):
            yield Observation(n, {**base, "poolguard.culprit.kind": kind})

    @_observed("poolguard.culprit.isolations", "{isolation}",
               "Culprits isolated (isolate_culprits), by poolguard.culprit.kind (shape or tag); "
               "a relapse while being lifted counts again.", monotonic=True)
    def _culprit_isolations(self) -> Iterable[Observation]:
        yield from self._culprits(lambda c: dict(c.detector.isolations))

    @_observed("poolguard.culprit.isolated", "{isolation}",
               "Shapes and tags isolated now, being lifted included, by poolguard.culprit.kind.")
    def _culprit_isolated(self) -> Iterable[Observation]:
        yield from self._culprits(lambda c: c.isolated_by_kind())

    @_observed("poolguard.connection.leak_warnings", "{warning}",
               "Connections held longer than leak_threshold.", monotonic=True)
    def _leaks(self) -> Iterable[Observation]:
        yield Observation(self.guard.leak_warnings, self._base())

    @_observed("poolguard.pool.exhausted", "{event}",
               "pool.exhausted events logged: the pool ran dry (a PoolTimeout or the "
               "utilization alert firing), at most one per pool every 10 s.", monotonic=True)
    def _exhausted(self) -> Iterable[Observation]:
        yield Observation(self.guard.exhaustion_events, self._base())

    def _query_totals(self, total: str) -> Iterable[Observation]:
        """Each statement shape's histogram ``total`` (``sum`` or ``count``)."""
        base = self._base()
        for stat in list(self.guard.recorder.queries.values()):
            yield Observation(getattr(stat.hist, total), {
                **base, "db.query.summary": stat.fp.summary,
                "poolguard.query.fingerprint": stat.fp.id})

    @_observed("poolguard.query.time", "s",
               "Total statement time by statement shape, failed statements included "
               "(top_queries shapes, the rest as (other)).", monotonic=True)
    def _query_time(self) -> Iterable[Observation]:
        return self._query_totals("sum")

    @_observed("poolguard.query.calls", "{call}",
               "Statements executed by statement shape, failed ones included "
               "(top_queries shapes, the rest as (other)).", monotonic=True)
    def _query_calls(self) -> Iterable[Observation]:
        return self._query_totals("count")

    # -- PgBouncer's own numbers (pgbouncer_admin_url) ---------------------------

    def _pgbouncer(self, field: str) -> Iterable[Observation]:
        """A number of the last good read of PgBouncer (nothing while stale or off)."""
        stats = self.guard.fleet.pgbouncer()
        if stats is not None and stats.state == "ok":
            value = getattr(stats, field)
            if value is not None:
                yield Observation(value, self._base())

    @_observed("poolguard.pgbouncer.up", "{state}",
               "1 while PgBouncer's admin console answers (pgbouncer_admin_url), else 0.",
               monotonic=None)
    def _pgbouncer_up(self) -> Iterable[Observation]:
        stats = self.guard.fleet.pgbouncer()
        if stats is not None:
            yield Observation(int(stats.state == "ok"), self._base())

    # -- older names ----------------------------------------------------------

    def _legacy_base(self) -> dict[str, str]:
        return {"pool.name": self.guard.name}

    def _legacy_usage(self) -> Iterable[Observation]:
        used, idle, _, _, _ = self._pool_numbers()
        base = self._legacy_base()
        yield Observation(used, {**base, "state": "used"})
        yield Observation(idle, {**base, "state": "idle"})


#: PgBouncer's numbers as gauges: name, unit, the PgBouncerStats field, description.
_PGBOUNCER_GAUGES = (
    ("poolguard.pgbouncer.clients.waiting", "{client}", "clients_waiting",
     "Clients of the pool's database and user waiting in PgBouncer's queue (every replica's)."),
    ("poolguard.pgbouncer.clients.active", "{client}", "clients_active",
     "Clients of the pool's database and user PgBouncer serves or holds idle."),
    ("poolguard.pgbouncer.servers.active", "{connection}", "servers_active",
     "PgBouncer's server connections linked to a client."),
    ("poolguard.pgbouncer.servers.idle", "{connection}", "servers_idle",
     "PgBouncer's server connections idle, ready for a client."),
    ("poolguard.pgbouncer.pool_size", "{connection}", "pool_size",
     "Server connections PgBouncer's pool of the database may open."),
    ("poolguard.pgbouncer.wait.max", "s", "max_wait",
     "How long the oldest client in PgBouncer's queue has waited."),
)
for _name, _unit, _field, _description in _PGBOUNCER_GAUGES:
    _observed(_name, _unit, _description, monotonic=None)(
        lambda exporter, field=_field: exporter._pgbouncer(field))


def refresh_exporter(
    source: MetricsSource, exporter: Exporter | None, settings: tuple[Any, ...]
) -> tuple[Exporter | None, tuple[Any, ...]]:
    """The exporter ``source``'s options ask for, and the settings it was made with.

    A second wrap() may change metrics, metrics_legacy_names or
    meter_provider: the old exporter closes and a new one starts.
    """
    cfg = source.config
    wanted = (cfg.metrics, cfg.metrics_legacy_names, cfg.meter_provider)
    if exporter is not None and settings != wanted:
        exporter.close()
        exporter = None
    if cfg.metrics and exporter is None:
        exporter = Exporter(source)
    return exporter, wanted
