"""Real faults between the pool and PostgreSQL.

(a) A TCP proxy of the tests' own (``tests/_proxy.py``) sits between a
    guarded engine and PostgreSQL and delays, resets, refuses, or accepts and
    never answers. Under ``poolguard.request(timeout=...)`` each mode ends
    within the deadline (plus the watchdog's grace) with the documented error:

    ========== ==================================================================
    pass       works
    delay      works when the delay fits; else ``StatementTimeout`` (the server
               cancelled) or ``DeadlineExceeded`` (the client-side watchdog cut it)
    reset      ``sqlalchemy.exc.OperationalError`` with ``connection_invalidated``
    refuse     the connect error (``OperationalError``), then ``CircuitOpen``
               once the breaker opens
    blackhole  ``DeadlineExceeded`` from the watchdog; the connection is discarded
    ========== ==================================================================

    A blackholed *connect* is not bounded by the request's deadline: the
    driver is inside its own connect call, with no socket poolguard can cut.
    Only the driver's ``connect_timeout`` (psycopg: at least 2 s, as libpq)
    bounds it: always set one.

(b) ``pg_terminate_backend`` on pooled connections: at most one error per
    killed connection, none with ``pool_pre_ping``, and counted.

(c) A throwaway PostgreSQL cluster (``initdb`` in a temp dir, its own port),
    stopped under load with the breaker on, and restarted. Never the shared
    cluster on 5432.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import poolguard
from _proxy import Proxy, bounded
from _support import PROXY_CONNECT_TIMEOUT, SAFETY_TIMEOUT, EngineFactory, through_proxy, wait_until
from poolguard._timeouts import KILL_GRACE
from poolguard.breaker import CLOSED, HALF_OPEN, OPEN

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine

#: libpq (and psycopg) raise a connect_timeout below 2 s to 2 s.
CONNECT_TIMEOUT = PROXY_CONNECT_TIMEOUT
#: Slack on top of a deadline for "ended within the deadline": scheduling, the
#: driver noticing the cut socket. Loose on purpose.
SLACK = 1.5

pytestmark = pytest.mark.postgresql


def _no_leaks(engine: Engine) -> None:
    assert poolguard.get_guard(engine).stats().permits == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def _count_dials(engine: Engine) -> list[float]:
    """Times of every DBAPI connect attempt of ``engine`` (appended as they start)."""
    dials: list[float] = []

    @event.listens_for(engine, "do_connect")
    def _dial(*args: Any) -> None:
        dials.append(time.monotonic())

    return dials


def _select(engine: Engine, sql: str = "SELECT 1") -> Any:
    with engine.connect() as conn:
        return conn.exec_driver_sql(sql).scalar_one()


def _outcome(engine: Engine) -> Any:
    """``SELECT 1``'s value, or the SQLAlchemy (or poolguard) error it raised."""
    try:
        return _select(engine)
    except sa.exc.SQLAlchemyError as error:
        return error


# -- (a) the proxy --------------------------------------------------------------------------


@pytest.fixture
def proxied(
    proxy: Proxy, postgresql_url: str, make_engine: EngineFactory
) -> Iterator[EngineFactory]:
    """``proxied(pool=..., **wrap_options)``: a guarded engine through the proxy."""
    yield through_proxy(make_engine, postgresql_url, proxy, pool_size=2)
    proxy.set_mode("pass")
    make_engine.dispose_all()  # through the proxy while it still runs


@pytest.mark.timing
def test_proxy_modes_at_the_socket_level(proxy: Proxy) -> None:
    # The test tool itself: what a raw client sees in each mode. The timeouts
    # that expect an answer are generous (the proxy's threads may wait for a
    # loaded machine's scheduler); the blackhole's only has to run out.
    with socket.create_connection((proxy.host, proxy.port), timeout=SAFETY_TIMEOUT) as sock:
        proxy.set_mode("reset")
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    proxy.set_mode("refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=SAFETY_TIMEOUT)
    proxy.set_mode("blackhole")
    with socket.create_connection((proxy.host, proxy.port), timeout=SAFETY_TIMEOUT) as sock:
        sock.settimeout(0.5)
        sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # PostgreSQL's SSLRequest
        with pytest.raises(TimeoutError):
            sock.recv(1)
    proxy.set_mode("pass")
    with socket.create_connection((proxy.host, proxy.port), timeout=SAFETY_TIMEOUT) as sock:
        sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
        assert sock.recv(1) in (b"S", b"N")  # the server answers through the proxy


def _ask_for_ssl(sock: socket.socket) -> bytes:
    """Send PostgreSQL's SSLRequest; its one-byte answer."""
    sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
    return sock.recv(1)


def test_proxy_resets_a_connection_it_was_setting_up_during_a_reset(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy is dialling the server for a new client when the mode goes to
    # reset and straight back to pass: that connection is reset all the same
    # (it was open, from the client's side, when the reset came).
    dialling, release = threading.Event(), threading.Event()
    dial = socket.create_connection

    def held_dial(*args: Any, **kwargs: Any) -> socket.socket:
        dialling.set()
        release.wait(SAFETY_TIMEOUT)
        return dial(*args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", held_dial)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(SAFETY_TIMEOUT)
        try:
            sock.connect((proxy.host, proxy.port))
            wait_until(dialling.is_set, "the proxy dialling the server")
            proxy.set_mode("reset")
            proxy.set_mode("pass")
        finally:
            release.set()
        # Reset: the send or the read after it fails (whichever meets the RST).
        with pytest.raises(ConnectionResetError):
            _ask_for_ssl(sock)


def test_pass_works(proxied: EngineFactory, proxy: Proxy) -> None:
    engine = proxied()
    with poolguard.request(timeout=5):
        assert _select(engine) == 1
    assert proxy.accepted == 1
    _no_leaks(engine)


def test_delay_that_fits_the_budget_works(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied(statement_timeout=5.0)
    assert _select(engine) == 1
    proxy.set_mode("delay", delay=0.05)
    with poolguard.request(timeout=10), engine.connect() as conn:
        for i in range(3):
            assert conn.exec_driver_sql(f"SELECT {i}").scalar_one() == i
    _no_leaks(engine)


@pytest.mark.timing
def test_delay_past_the_statement_limit_is_cancelled_by_the_server(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied(statement_timeout=0.3)
    assert _select(engine) == 1
    proxy.set_mode("delay", delay=0.2)
    started = time.monotonic()
    with bounded(proxy), poolguard.request(timeout=10), engine.connect() as conn:
        with pytest.raises(poolguard.StatementTimeout):
            conn.exec_driver_sql("SELECT pg_sleep(3)")
        conn.rollback()
    assert time.monotonic() - started < 3.0
    # The server cancelled: the connection stayed usable, nothing was cut.
    assert poolguard.get_guard(engine).stats().connections_invalidated == 0
    _no_leaks(engine)


@pytest.mark.timing
def test_delay_past_the_deadline_is_cut_by_the_watchdog(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied()
    assert _select(engine) == 1
    proxy.set_mode("delay", delay=3.0)
    started = time.monotonic()
    with bounded(proxy), poolguard.request(timeout=0.5):
        with pytest.raises(poolguard.DeadlineExceeded):
            _select(engine)
    assert time.monotonic() - started < 0.5 + KILL_GRACE + SLACK
    assert poolguard.get_guard(engine).stats().connections_invalidated == 1
    proxy.set_mode("pass")
    assert _select(engine) == 1
    _no_leaks(engine)


@pytest.mark.timing
def test_blackhole_on_a_pooled_connection_ends_at_the_deadline(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied()
    guard = poolguard.get_guard(engine)
    assert _select(engine) == 1
    proxy.set_mode("blackhole")
    started = time.monotonic()
    with bounded(proxy), poolguard.request(timeout=0.5):
        with pytest.raises(poolguard.DeadlineExceeded) as info:
            _select(engine)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5 + KILL_GRACE + SLACK
    assert isinstance(info.value, sa.exc.TimeoutError)
    assert "cut" in str(info.value)
    # The connection was discarded (invalidated), not put back for reuse.
    assert guard.stats().connections_invalidated == 1
    proxy.set_mode("pass")
    assert _select(engine) == 1  # on a fresh connection
    assert guard.stats().connections_opened == 2
    _no_leaks(engine)


@pytest.mark.timing
def test_blackhole_with_pre_ping_ends_at_the_deadline(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    # pool_pre_ping runs its ping inside the checkout: the deadline must bound
    # it too, or a blackholed server holds the caller forever.
    engine = proxied(pool={"pool_pre_ping": True})
    guard = poolguard.get_guard(engine)
    assert _select(engine) == 1
    proxy.set_mode("blackhole")
    started = time.monotonic()
    with bounded(proxy, 8.0), poolguard.request(timeout=0.5):
        with pytest.raises(poolguard.DeadlineExceeded):
            _select(engine)
    assert time.monotonic() - started < 0.5 + KILL_GRACE + SLACK
    assert guard.stats().connections_invalidated == 1
    proxy.set_mode("pass")
    assert _select(engine) == 1
    _no_leaks(engine)
    assert "do_ping" in engine.dialect.__dict__
    poolguard.unwrap(engine)  # the dialect's own ping is back
    assert "do_ping" not in engine.dialect.__dict__


@pytest.mark.timing
def test_blackhole_on_connect_is_bounded_by_connect_timeout_only(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    import psycopg

    engine = proxied()
    dials = _count_dials(engine)
    proxy.set_mode("blackhole")
    started = time.monotonic()
    with bounded(proxy), poolguard.request(timeout=0.5):
        with pytest.raises(sa.exc.OperationalError) as info:
            _select(engine)
        elapsed = time.monotonic() - started
        # The driver's connect_timeout ended it, past the request's deadline.
        assert isinstance(info.value.orig, psycopg.errors.ConnectionTimeout)
        assert elapsed < CONNECT_TIMEOUT + SLACK
        # The request is over: the next checkout fails at once, without a dial.
        n = len(dials)
        with pytest.raises(poolguard.DeadlineExceeded):
            engine.connect()
        assert len(dials) == n
    _no_leaks(engine)


@pytest.mark.timing
def test_reset_is_a_disconnect_and_the_pool_recovers(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied()
    guard = poolguard.get_guard(engine)
    with engine.connect() as a, engine.connect() as b:  # two pooled connections
        a.exec_driver_sql("SELECT 1")
        b.exec_driver_sql("SELECT 1")
    proxy.set_mode("reset")
    started = time.monotonic()
    with poolguard.request(timeout=2.0):
        with pytest.raises(sa.exc.OperationalError) as info:
            _select(engine)
    assert time.monotonic() - started < 2.0 + SLACK
    assert not isinstance(info.value, poolguard.PoolguardError)
    assert info.value.connection_invalidated is True
    # New connections are reset too: the connect error.
    with poolguard.request(timeout=2.0), pytest.raises(sa.exc.OperationalError):
        _select(engine)
    proxy.set_mode("pass")
    assert _select(engine) == 1
    assert guard.stats().connections_invalidated >= 1
    _no_leaks(engine)


@pytest.mark.timing
def test_refuse_fails_with_the_connect_error_then_the_breaker_opens(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    # wait_in_open is long enough that the breaker stays open through the ten
    # checkouts below however slowly a loaded machine runs them (0.3 s was not).
    engine = proxied(
        breaker=True, breaker_window_size=4, breaker_minimum_calls=4,
        breaker_wait_in_open=3.0, breaker_half_open_calls=1,
    )
    guard = poolguard.get_guard(engine)
    dials = _count_dials(engine)
    proxy.set_mode("refuse")
    started = time.monotonic()
    with poolguard.request(timeout=2.0):
        errors = [_outcome(engine) for _ in range(10)]
    assert time.monotonic() - started < 2.0 + SLACK
    assert len(errors) == 10
    kinds = [type(e) for e in errors]
    assert kinds[:4] == [sa.exc.OperationalError] * 4  # connection refused
    assert set(kinds[4:]) == {poolguard.CircuitOpen}
    assert len(dials) == 4  # nothing dialed once open
    assert guard.breaker is not None
    assert guard.breaker.state == OPEN

    proxy.set_mode("pass")
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            assert _select(engine) == 1
            break
        except poolguard.CircuitOpen as error:
            time.sleep(min(error.retry_after, 0.1))
    assert guard.breaker.state == CLOSED
    assert _select(engine) == 1
    _no_leaks(engine)


@pytest.mark.timing
def test_refuse_with_retries_ends_within_the_deadline(
    proxied: EngineFactory, proxy: Proxy,
) -> None:
    engine = proxied(connect_retries=5, retry_budget=1.0)
    dials = _count_dials(engine)
    proxy.set_mode("refuse")
    started = time.monotonic()
    with poolguard.request(timeout=0.4) as request:
        with pytest.raises(sa.exc.OperationalError):
            _select(engine)
    assert time.monotonic() - started < 0.4 + SLACK
    assert request.deadline is not None
    assert 0 < len(dials) <= 6
    assert all(t < request.deadline for t in dials)
    _no_leaks(engine)


# -- (b) pg_terminate_backend ---------------------------------------------------------------


def _terminate(admin: Engine, application_name: str) -> int:
    with admin.connect() as conn:
        killed = conn.execute(sa.text(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = :app) AS t"
        ), {"app": application_name}).scalar_one()
        conn.rollback()
        deadline = time.monotonic() + 10
        left = -1
        while time.monotonic() < deadline:  # until the backends are gone
            left = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app"
            ), {"app": application_name}).scalar_one()
            conn.rollback()  # a fresh statistics snapshot next time
            if left == 0:
                break
            time.sleep(0.02)
        assert left == 0, "the terminated backends did not go away"
    return int(killed)


@pytest.mark.parametrize("pre_ping", [False, True], ids=["no-pre-ping", "pre-ping"])
def test_terminated_backends_cost_at_most_one_error_each(
    postgresql_url: str, pre_ping: bool,
) -> None:
    app = f"poolguard-kill-{uuid.uuid4().hex[:8]}"
    engine = poolguard.wrap(
        sa.create_engine(
            postgresql_url, pool_size=3, max_overflow=0, pool_pre_ping=pre_ping,
            connect_args={"application_name": app, "connect_timeout": CONNECT_TIMEOUT},
        ),
        connect_retries=0,
    )
    admin = sa.create_engine(postgresql_url, poolclass=NullPool)
    guard = poolguard.get_guard(engine)
    try:
        with engine.connect() as a, engine.connect() as b, engine.connect() as c:
            for conn in (a, b, c):
                conn.exec_driver_sql("SELECT 1")
        assert guard.stats().idle == 3
        killed = _terminate(admin, app)
        assert killed == 3
        results = [_outcome(engine) for _ in range(9)]
        errors = [r for r in results if r != 1]
        assert all(isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated
                   for e in errors)
        if pre_ping:
            assert errors == []
        else:
            assert 0 < len(errors) <= killed
        stats = guard.stats()
        assert stats.connections_invalidated >= max(1, len(errors))
        assert stats.connections_opened >= 3 + 1
        _no_leaks(engine)
    finally:
        engine.dispose()
        admin.dispose()


# -- (c) a throwaway cluster ----------------------------------------------------------------


def _require(reason: str) -> None:
    if os.environ.get("POOLGUARD_REQUIRE_DATABASES", "").strip().lower() in {
        "1", "true", "yes", "on"
    }:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _pg_bindir() -> str | None:
    candidates = [os.environ.get("POOLGUARD_PG_BINDIR", "")]
    found = shutil.which("initdb")
    if found:
        candidates.append(os.path.dirname(os.path.realpath(found)))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for bindir in candidates:
        if bindir and all(os.access(os.path.join(bindir, tool), os.X_OK)
                          for tool in ("initdb", "pg_ctl")):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Cluster:
    """A PostgreSQL cluster of the tests' own, in a temp dir, on its own port."""

    bindir: str
    datadir: str
    port: int
    runas: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        options = (f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=30")
        subprocess.run(  # noqa: S603 - our own binaries and arguments
            [*self.runas, os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
             "-o", options, "-l", os.path.join(self.datadir, "server.log"),
             "-w", "-t", "30", *args],
            check=True, capture_output=True, timeout=60,
        )

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "stop")

    def restart(self) -> None:
        self._pg_ctl("-m", "fast", "restart")

    def running(self) -> bool:
        return os.path.exists(os.path.join(self.datadir, "postmaster.pid"))


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    bindir = _pg_bindir()
    if bindir is None:
        _require("initdb/pg_ctl not found (set POOLGUARD_PG_BINDIR): "
                 "no throwaway PostgreSQL cluster for the stop/restart tests")
    assert bindir is not None
    runas: list[str] = []
    owner: tuple[int, int] | None = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as postgres
        import pwd

        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            _require("running as root and there is no 'postgres' user to run initdb as")
        runas = ["runuser", "-u", "postgres", "--"]
        owner = (entry.pw_uid, entry.pw_gid)
    datadir = tempfile.mkdtemp(prefix="poolguard-pg-")
    if owner is not None:
        os.chown(datadir, *owner)
    made = Cluster(bindir, datadir, _free_port(), runas)
    try:
        try:
            subprocess.run(  # noqa: S603 - our own binaries and arguments
                [*runas, os.path.join(bindir, "initdb"), "-D", datadir, "--auth=trust",
                 "-U", "postgres", "--no-sync"],
                check=True, capture_output=True, timeout=120,
            )
            made.start()
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            _require(f"cannot run a throwaway PostgreSQL cluster: {error} "
                     f"{detail.decode(errors='replace')[-300:]}")
        yield made
    finally:
        if made.running():
            with contextlib.suppress(Exception):
                made.stop("immediate")
        shutil.rmtree(datadir, ignore_errors=True)


@pytest.fixture
def running_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """The throwaway cluster, started if a previous test left it stopped."""
    if not cluster.running():
        cluster.start()
    yield cluster
    if not cluster.running():
        cluster.start()


def _answers(url: str) -> bool:
    import psycopg

    parsed = make_url(url)
    try:
        with psycopg.connect(host=parsed.host, port=parsed.port, user="postgres",
                             dbname="postgres", connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


@dataclasses.dataclass
class Outcome:
    at: float
    kind: str  # "ok", or the exception's class name
    seconds: float


class Load:
    """Worker threads doing short requests in a loop until stopped (bounded)."""

    def __init__(self, engine: Engine, workers: int, timeout: float) -> None:
        self.engine = engine
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, daemon=True)
                         for _ in range(workers)]

    def _work(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with poolguard.request(timeout=self.timeout), self.engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1").scalar_one()
                kind = "ok"
            except Exception as error:
                kind = type(error).__name__
            with self._lock:
                self.outcomes.append(Outcome(started, kind, time.monotonic() - started))
            self._stop.wait(0.005 if kind == "ok" else 0.02)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        assert not any(t.is_alive() for t in self._threads)

    def between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.at < end]


@pytest.mark.timing
def test_postgresql_stopped_under_load_opens_the_breaker_which_closes_when_it_is_back(
    running_cluster: Cluster, events: list[dict[str, Any]],
) -> None:
    cluster = running_cluster
    wait_in_open, half_open_calls, window = 0.5, 2, 10
    engine = poolguard.wrap(
        sa.create_engine(cluster.url, pool_size=4, max_overflow=0,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT}),
        breaker=True, breaker_window="count", breaker_window_size=window,
        breaker_minimum_calls=5, breaker_failure_rate=0.5,
        breaker_wait_in_open=wait_in_open, breaker_half_open_calls=half_open_calls,
        connect_retries=0, acquire_timeout=2.0,
    )
    guard = poolguard.get_guard(engine)
    breaker = guard.breaker
    assert breaker is not None
    dials = _count_dials(engine)
    workers = 4
    try:
        with Load(engine, workers=workers, timeout=3.0) as load:
            wait_until(lambda: sum(o.kind == "ok" for o in load.outcomes) >= 20, "20 served")
            stopped_at = time.monotonic()
            cluster.stop()
            wait_until(lambda: breaker.state == OPEN, "the breaker to open")
            opened_at = time.monotonic()
            dials_at_open = len(dials)
            half_opens_at_open = breaker.transitions[HALF_OPEN]
            time.sleep(1.5)  # the database stays down: callers fail fast
            down_until = time.monotonic()
            dials_while_open = len(dials) - dials_at_open
            probes_windows = breaker.transitions[HALF_OPEN] - half_opens_at_open

            # The cluster comes back; a probe of our own marks when it answers.
            answered: list[float] = []

            def probe() -> None:
                end = time.monotonic() + 30
                while time.monotonic() < end:
                    if _answers(cluster.url):
                        answered.append(time.monotonic())
                        return
                    time.sleep(0.01)

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            cluster.start()
            prober.join(35)
            assert answered, "the restarted cluster never answered"
            wait_until(lambda: breaker.state == CLOSED, "the breaker to close")
            closed_at = time.monotonic()
            recovery = closed_at - answered[0]
            print(f"\nbreaker recovery: PostgreSQL answering again -> breaker closed "
                  f"in {recovery:.3f}s (wait_in_open={wait_in_open}s, "
                  f"{half_open_calls} probes, {workers} workers)")
            time.sleep(0.5)  # normal service, no manual step
            after = time.monotonic()
            time.sleep(0.3)
        served = load.between(after, time.monotonic())
        down = load.between(opened_at, down_until)
    finally:
        if not cluster.running():
            cluster.start()
        engine.dispose()

    # While down and open: fast CircuitOpen, and (almost) no dials: only the
    # half-open probes, plus checkouts that were already dialing when it opened.
    circuit_open = [o for o in down if o.kind == "CircuitOpen"]
    assert len(circuit_open) > 10
    assert statistics.median(o.seconds for o in circuit_open) < 0.05
    assert dials_while_open <= (probes_windows + 1) * half_open_calls + workers
    assert len(circuit_open) > 5 * max(1, dials_while_open)
    # Dials before it opened are bounded by the window, not by the load.
    assert dials_at_open - len([o for o in load.outcomes if o.at < stopped_at]) <= window + workers
    # Back to normal, with no manual step.
    assert served
    assert all(o.kind == "ok" for o in served)
    assert breaker.state == CLOSED
    assert breaker.transitions[OPEN] >= 1
    assert breaker.transitions[HALF_OPEN] >= 1
    assert breaker.transitions[CLOSED] >= 1
    assert recovery < wait_in_open + 5.0
    names = [e["event"] for e in events if e["pool"] == guard.name]
    assert names.count("breaker.open") == breaker.transitions[OPEN]
    assert names.count("breaker.half_open") == breaker.transitions[HALF_OPEN]
    assert names.count("breaker.closed") == breaker.transitions[CLOSED]
    assert guard.stats().permits == 0


@pytest.mark.timing
def test_postgresql_restart_fails_in_flight_work_once_then_recovers(
    running_cluster: Cluster,
) -> None:
    cluster = running_cluster
    app = f"poolguard-restart-{uuid.uuid4().hex[:8]}"
    engine = poolguard.wrap(
        sa.create_engine(cluster.url, pool_size=4, max_overflow=0,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT,
                                       "application_name": app}),
        breaker=True, breaker_minimum_calls=5, breaker_wait_in_open=0.5, connect_retries=0,
    )
    guard = poolguard.get_guard(engine)
    admin = sa.create_engine(cluster.url, poolclass=NullPool)
    in_flight: list[BaseException] = []

    def long_statement() -> None:
        try:
            with poolguard.request(timeout=20), engine.connect() as conn:
                conn.exec_driver_sql("SELECT pg_sleep(15)")
        except Exception as error:
            in_flight.append(error)

    try:
        with engine.connect() as a, engine.connect() as b, engine.connect() as c:
            for conn in (a, b, c):
                conn.exec_driver_sql("SELECT 1")  # three idle connections in the pool
        worker = threading.Thread(target=long_statement, daemon=True)
        worker.start()

        def sleeping() -> bool:
            with admin.connect() as conn:
                return bool(conn.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app "
                    "AND query LIKE '%pg_sleep(15)%' AND state = 'active'"
                ), {"app": app}).scalar_one())

        wait_until(sleeping, "the long statement to run")
        admin.dispose()
        cluster.restart()
        worker.join(20)
        assert not worker.is_alive()
        (error,) = in_flight  # the in-flight statement failed, once, as a disconnect
        assert isinstance(error, sa.exc.OperationalError)
        assert error.connection_invalidated is True

        results = [_outcome(engine) for _ in range(10)]
        assert results == [1] * 10  # recovered: the stale idle connections were replaced
        assert guard.breaker is not None
        assert guard.breaker.state == CLOSED
        assert guard.stats().connections_invalidated >= 1
        _no_leaks(engine)
    finally:
        engine.dispose()
        admin.dispose()
