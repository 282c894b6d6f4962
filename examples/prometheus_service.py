"""A small service whose guarded engine exports poolguard's metrics to Prometheus.

It wires the pieces a real service needs: a SQLAlchemy engine guarded by
``poolguard.wrap()``, an OpenTelemetry ``MeterProvider`` with the
``PrometheusMetricReader`` (``pip install "sqlalchemy-poolguard[prometheus]"``), a
``service.name`` resource attribute, and ``/metrics`` served on loopback::

    python examples/prometheus_service.py --port 9464                 # idle service
    python examples/prometheus_service.py --workload --duration 120   # a pool in trouble
    python examples/prometheus_service.py --workload \
        --url postgresql+psycopg://postgres@127.0.0.1:5432/test

``--workload`` reproduces the outage poolguard was written for, in miniature:
a few threads hold every connection with slow statements, a request path
queues behind them and some of it times out (``PoolTimeout``), one code path
keeps a connection idle in a transaction past ``leak_threshold``, and now and
then a statement fails. Everything is bounded by ``--duration``; the threads
mostly sleep, so the load on the machine is small.

Point ``alerts/poolguard-rules.yml`` and ``dashboards/poolguard.json`` at it
(see docs/monitoring.md).
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import poolguard

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from opentelemetry.sdk.metrics import MeterProvider

log = logging.getLogger("poolguard_example")

metadata = sa.MetaData()
items = sa.Table(
    "poolguard_example_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50), nullable=False),
    sa.Column("qty", sa.Integer, nullable=False),
)


# -- set-up -------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="database URL (default: a SQLite file in a temp dir)")
    parser.add_argument("--port", type=int, default=9464,
                        help="port of /metrics on 127.0.0.1; 0 picks a free one (default 9464)")
    parser.add_argument("--service-name", default="poolguard-example",
                        help="OpenTelemetry service.name resource attribute")
    parser.add_argument("--pool-name", default="example-db", help="poolguard's pool name")
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--max-overflow", type=int, default=0)
    parser.add_argument("--acquire-timeout", type=float, default=1.0,
                        help="longest wait for a connection, seconds (default 1.0)")
    parser.add_argument("--leak-threshold", type=float, default=1.0,
                        help="held longer than this (s) logs connection.held_too_long")
    parser.add_argument("--slow-query-threshold", type=float, default=0.3,
                        help="statements at least this slow (s) log query.slow")
    parser.add_argument("--workload", action="store_true",
                        help="run a workload that fills the pool")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds to run before exiting (default 60)")
    return parser.parse_args(argv)


def make_meter_provider(service_name: str) -> MeterProvider:
    """A ``MeterProvider`` whose metrics the Prometheus exporter serves."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    reader = PrometheusMetricReader()
    return MeterProvider(
        metric_readers=[reader], resource=Resource.create({SERVICE_NAME: service_name})
    )


def serve_metrics(port: int) -> int:
    """Serve the default Prometheus registry on 127.0.0.1; returns the port."""
    from prometheus_client import start_http_server

    started: Any = start_http_server(port, addr="127.0.0.1")
    if isinstance(started, tuple):  # prometheus_client >= 0.20 returns (server, thread)
        port = int(started[0].server_port)
    return port


def prime_exporter() -> None:
    """Collect once now, so the samples of the first connections are exported too.

    poolguard keeps histogram samples only once a collection has happened
    (see docs/observability.md, "Metrics"); this does the first one before any work.
    """
    from prometheus_client import REGISTRY, generate_latest

    generate_latest(REGISTRY)


def make_engine(url: str, args: argparse.Namespace, provider: MeterProvider) -> sa.Engine:
    """The guarded engine, with its table and a ``sleep(seconds)`` SQL function."""
    engine = sa.create_engine(
        url,
        pool_size=args.pool_size,
        max_overflow=args.max_overflow,
        poolclass=sa.QueuePool,
    )
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _add_sleep(dbapi_conn: Any, record: Any) -> None:
            # SQLite has no sleep(): a Python one makes "slow statements" real ones.
            dbapi_conn.create_function("sleep", 1, _sql_sleep)

    metadata.create_all(engine)
    with engine.begin() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(items)).scalar_one() == 0:
            conn.execute(items.insert(), [
                {"name": f"item-{i}", "qty": i % 17} for i in range(200)
            ])
    engine.dispose()  # the set-up connection is not part of the workload
    return poolguard.wrap(
        engine,
        name=args.pool_name,
        acquire_timeout=args.acquire_timeout,
        leak_threshold=args.leak_threshold,
        slow_query_threshold=args.slow_query_threshold,
        meter_provider=provider,
        # Background work never queues behind a full pool: it is shed at once
        # (poolguard_rejections_total{poolguard_reason="queue_full"}).
        max_waiting_background=0,
        # A breaker that opens only if every call in a window of 50 fails.
        breaker=True,
        breaker_minimum_calls=50,
        breaker_failure_rate=1.0,
    )


def _sql_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def sleep_statement(engine: sa.Engine, seconds: float) -> sa.TextClause:
    """A statement that takes ``seconds`` on the engine's database."""
    name = engine.dialect.name
    if name == "postgresql":
        return sa.text("SELECT pg_sleep(:s)").bindparams(s=seconds)
    if name in {"mysql", "mariadb"}:
        return sa.text("SELECT SLEEP(:s)").bindparams(s=seconds)
    return sa.text("SELECT sleep(:s)").bindparams(s=seconds)


# -- the workload -------------------------------------------------------------


class Workload:
    """Threads that keep the pool full, queue behind it and misbehave a little."""

    def __init__(self, engine: sa.Engine, stop: threading.Event) -> None:
        self.engine = engine
        self.stop = stop
        self.timeouts = 0
        self.errors = 0
        self.shed = 0
        self._lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self, pool_size: int) -> None:
        """Start the threads: ``pool_size - 1`` slow holders, one leaker, six
        requests and one background job."""
        roles: list[tuple[str, Callable[[int], None]]] = [
            *(("report", self.slow_report) for _ in range(max(1, pool_size - 1))),
            ("session", self.leaky_session),
            *(("request", self.request) for _ in range(6)),
            ("export", self.background_export),
        ]
        for i, (role, target) in enumerate(roles):
            thread = threading.Thread(target=self._run, args=(target, i),
                                      name=f"{role}-{i}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the threads (each finishes its current step, bounded)."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self, target: Callable[[int], None], i: int) -> None:
        rng = random.Random(i)
        while not self.stop.is_set():
            try:
                target(i)
            except poolguard.PoolTimeout:
                with self._lock:
                    self.timeouts += 1
            except poolguard.Rejected:
                with self._lock:
                    self.shed += 1
            except sa.exc.DBAPIError:
                with self._lock:
                    self.errors += 1
            self.stop.wait(rng.uniform(0.0, 0.05))

    def slow_report(self, i: int) -> None:
        """The unoptimised query: holds a connection for several slow statements."""
        with poolguard.request(tag="GET /report"), self.engine.connect() as conn:
            for _ in range(4):
                if self.stop.is_set():
                    break
                conn.execute(sleep_statement(self.engine, 0.4 + 0.05 * (i % 3)))

    def leaky_session(self, i: int) -> None:
        """Reads, then keeps the connection idle in a transaction past leak_threshold."""
        with poolguard.request(tag="POST /checkout"), self.engine.connect() as conn:
            conn.execute(sa.select(items.c.id).where(items.c.qty == 3)).all()
            self.stop.wait(1.6)  # "calls a payment API" with the transaction open

    def background_export(self, i: int) -> None:
        """Low-priority work: shed at once while the pool is busy."""
        with poolguard.request(priority="background", tag="export"), self.engine.connect() as conn:
            conn.execute(sa.select(sa.func.count()).select_from(items)).scalar_one()

    def request(self, i: int) -> None:
        """A quick request: queues behind the holders, sometimes times out or fails."""
        with poolguard.request(tag="GET /items"), self.engine.connect() as conn:
            conn.execute(sa.select(items).where(items.c.qty > i).limit(20)).all()
            conn.execute(sleep_statement(self.engine, 0.02))
            if random.random() < 0.1:
                # A broken code path: the table does not exist (error.type in metrics).
                conn.execute(sa.text("SELECT * FROM poolguard_example_missing"))


# -- main ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service until ``--duration`` has passed or a signal arrives."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("poolguard").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="poolguard-example-") as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'example.db'}"
        return run(url, args)


def run(url: str, args: argparse.Namespace) -> int:
    """Serve metrics (and run the workload) for ``args.duration`` seconds."""
    provider = make_meter_provider(args.service_name)
    engine = make_engine(url, args, provider)
    port = serve_metrics(args.port)
    prime_exporter()
    print(f"serving metrics on http://127.0.0.1:{port}/metrics", flush=True)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    workload = None
    if args.workload:
        workload = Workload(engine, stop)
        workload.start(args.pool_size)
        log.info("workload started: %d threads", len(workload.threads))
    stop.wait(args.duration)
    stop.set()
    if workload is not None:
        workload.join(timeout=5.0)
        log.info("workload done: %d timeouts, %d statement errors", workload.timeouts,
                 workload.errors)
    log.info("stats: %s", poolguard.get_guard(engine).stats().as_dict())
    engine.dispose()
    provider.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
