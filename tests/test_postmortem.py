"""The May 10 outage (``shared/seed/postmortem.md``), reproduced on PostgreSQL.

An unoptimized query in the authentication service held every connection of the pool;
logins timed out and on-call spent 75 minutes and two wrong guesses finding out why.
With poolguard the first timed-out login says it: its ``PoolTimeout`` message and one
``pool.exhausted`` event name the statement shape and the function that holds the
connections. The same report comes from the utilisation alert, before any timeout.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import poolguard
from _support import named, wait_until
from poolguard._fingerprint import fingerprint

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.engine import Engine

    from _support import EngineFactory
    from poolguard import Guard

pytestmark = pytest.mark.postgresql

POOL_SIZE = 4
ACQUIRE_TIMEOUT = 0.5
JOIN_TIMEOUT = 15.0
# Long enough that both logins time out (2 x ACQUIRE_TIMEOUT) while every
# connection is still held, however late a loaded machine runs the test thread.
UNOPTIMIZED_SQL = "SELECT pg_sleep(4)"


def verify_session_token_unoptimized(engine: Engine) -> None:
    """The authentication service's unoptimized query: 4 s on a pooled connection."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_sleep(4)"))  # the unoptimized query


def login(engine: Engine) -> None:
    with poolguard.request(tag="login"), engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))


def _culprit_site() -> str:
    """The site poolguard must name: the unoptimized query's line in this file."""
    lines, start = inspect.getsourcelines(verify_session_token_unoptimized)
    (offset,) = [i for i, line in enumerate(lines) if "# the unoptimized query" in line]
    return f"{os.path.relpath(__file__)}:{start + offset} in verify_session_token_unoptimized"




@pytest.fixture
def auth_engine(postgresql_url: str, make_engine: EngineFactory) -> Callable[..., Engine]:
    """``auth_engine(**wrap_options)``: the service's engine (4 connections), disposed after."""
    auth = make_engine.using(name="auth", acquire_timeout=ACQUIRE_TIMEOUT)
    return functools.partial(auth, postgresql_url, POOL_SIZE)


class Storm:
    """Threads running the unoptimized query, joined (bounded) at the end."""

    def __init__(self, engine: Engine) -> None:
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(engine,), daemon=True)
            for _ in range(POOL_SIZE)
        ]

    def _run(self, engine: Engine) -> None:
        try:
            verify_session_token_unoptimized(engine)
        except BaseException as exc:
            self.errors.append(exc)

    def start(self, guard: Guard) -> None:
        for thread in self.threads:
            thread.start()
        wait_until(
            lambda: guard.gate.in_use == POOL_SIZE
            and sum(h.running for h in guard.holders()) == POOL_SIZE,
            "every connection out and its statement running",
        )

    def join(self) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert [t for t in self.threads if t.is_alive()] == []
        assert self.errors == []


def _assert_names_the_culprit(top: dict[str, Any]) -> None:
    """A ``top_holders`` entry: the unoptimized query, 4x, all running, at its site."""
    assert top["count"] == POOL_SIZE
    assert top["fingerprint"] == fingerprint(UNOPTIMIZED_SQL).id
    assert top["statement"] == "SELECT pg_sleep(?)"
    assert top["site"] == _culprit_site()
    assert "test_postmortem.py" in top["site"]
    assert top["site"].endswith(" in verify_session_token_unoptimized")
    assert top["running"] == POOL_SIZE
    assert top["idle_in_transaction"] == 0


@pytest.mark.timing
def test_login_timeout_names_the_unoptimized_query_and_its_call_site(
    auth_engine: Callable[..., Engine], events: list[dict[str, Any]]
) -> None:
    engine = auth_engine()
    guard = poolguard.get_guard(engine)
    storm = Storm(engine)
    try:
        storm.start(guard)
        assert guard.stats().in_use == POOL_SIZE

        with pytest.raises(poolguard.PoolTimeout) as first:
            login(engine)
        # The second login, seconds later: the pool is still held by the same query.
        assert sum(h.running for h in guard.holders()) == POOL_SIZE
        with pytest.raises(poolguard.PoolTimeout) as second:
            login(engine)
    finally:
        storm.join()

    held_by = (
        f"held by: {POOL_SIZE}x 'SELECT pg_sleep(?)' at {_culprit_site()} (held "
    )
    for error in (first.value, second.value):
        assert isinstance(error, sa.exc.TimeoutError)  # plain SQLAlchemy handlers catch it
        message = str(error)
        assert message.startswith(
            f"pool 'auth': no connection within {ACQUIRE_TIMEOUT:.3f}s "
            f"(limited by acquire_timeout); {POOL_SIZE}/{POOL_SIZE} in use"
        )
        assert held_by in message
        assert message.endswith(f"; {POOL_SIZE} running)")
        assert (error.in_use, error.capacity) == (POOL_SIZE, POOL_SIZE)

    # One pool.exhausted event: the second timeout, within 10 s, is rate limited.
    (event,) = named(events, "pool.exhausted")
    assert event["level"] == "warning"
    assert event["pool"] == "auth"
    assert event["reason"] == "timeout"
    assert (event["in_use"], event["capacity"]) == (POOL_SIZE, POOL_SIZE)
    _assert_names_the_culprit(event["top_holders"][0])
    assert len(event["top_holders"]) == 1
    assert held_by.removeprefix("held by: ") in event["summary"]

    # Every permit came back; both logins counted as timeouts, and the query as slow.
    assert guard.gate.in_use == 0
    stats = guard.stats()
    assert (stats.in_use, stats.permits, stats.timeouts) == (0, 0, 2)
    slow = named(events, "query.slow")
    assert len(slow) == POOL_SIZE
    assert {(e["statement"], e["site"]) for e in slow} == {
        ("SELECT pg_sleep(?)", _culprit_site())
    }


def test_utilization_alert_names_the_unoptimized_query_before_any_timeout(
    auth_engine: Callable[..., Engine], events: list[dict[str, Any]]
) -> None:
    engine = auth_engine(alert_utilization=1.0, alert_for=0, alert_wait_time=None)
    guard = poolguard.get_guard(engine)
    guard.scanner.next_scan = math.inf  # the periodic scan off: the one below sees it
    alerts: list[poolguard.AlertEvent] = []
    guard.on_alert(alerts.append)
    storm = Storm(engine)
    try:
        storm.start(guard)
        assert named(events, "pool.exhausted") == []
        guard.scan()
    finally:
        storm.join()
    guard.scan()

    assert [(a.name, a.firing, a.value) for a in alerts] == [
        ("utilization", True, 1.0),
        ("utilization", False, 0.0),
    ]
    states = [(e["level"], e["state"]) for e in named(events, "alert.utilization")]
    assert states == [("warning", "firing"), ("info", "cleared")]
    (event,) = named(events, "pool.exhausted")
    assert event["level"] == "warning"
    assert event["reason"] == "utilization"
    assert (event["in_use"], event["capacity"]) == (POOL_SIZE, POOL_SIZE)
    _assert_names_the_culprit(event["top_holders"][0])
    assert guard.stats().timeouts == 0
    assert guard.gate.in_use == 0
