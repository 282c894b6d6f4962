"""``explain_slow_queries`` runs nothing the application did not ask for and
never touches its transaction, on real databases.

The incidents: a multi-statement (MariaDB ``MULTI_STATEMENTS``, PostgreSQL
``no_parameters``) ``SELECT 1; UPDATE counter ...`` was sent again prefixed
with ``EXPLAIN``, so the UPDATE ran twice; an ``EXPLAIN`` that failed after a
``SELECT ... INTO`` aborted the application's PostgreSQL transaction. A plain
slow SELECT is still explained (the positive control), inside and outside a
transaction, and the application's transaction goes on as if nothing ran.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from pymysql.constants import CLIENT

from _support import named
from poolguard._explain import refusal

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from _support import EngineFactory

COUNTER = "h4_explain_counter"


@pytest.fixture
def make_engine(make_engine: EngineFactory) -> EngineFactory:
    """A guarded engine with one connection (temporary tables stay visible) that
    explains every statement."""
    return make_engine.using(slow_query_threshold=0, explain_slow_queries=True)


def _counter(engine: Engine) -> int:
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TEMPORARY TABLE {COUNTER} (n INTEGER)")
        conn.exec_driver_sql(f"INSERT INTO {COUNTER} (n) VALUES (0)")
    return 0


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        value: int = conn.exec_driver_sql(f"SELECT n FROM {COUNTER}").scalar_one()
        return value


# -- nothing runs twice --------------------------------------------------------------------------


def test_mariadb_multi_statement_runs_once(
    mariadb_url: str, make_engine: EngineFactory, debug_events: list[dict[str, Any]]
) -> None:
    multi = {"client_flag": CLIENT.MULTI_STATEMENTS}
    engine = make_engine(mariadb_url, pool={"connect_args": multi})
    _counter(engine)
    with engine.begin() as conn:
        result = conn.exec_driver_sql(f"SELECT 1; UPDATE {COUNTER} SET n = n + 1")
        assert result.all() == [(1,)]
    assert _count(engine) == 1
    skipped = named(debug_events, "query.explain_skipped")
    assert {"more than one statement"} <= {e["reason"] for e in skipped}


def test_postgresql_no_parameters_multi_statement_runs_once(
    postgresql_url: str, make_engine: EngineFactory, debug_events: list[dict[str, Any]]
) -> None:
    engine = make_engine(postgresql_url)
    _counter(engine)
    with engine.begin() as conn:
        multi = conn.execution_options(no_parameters=True)
        multi.exec_driver_sql(f"SELECT 1; UPDATE {COUNTER} SET n = n + 1")
        # The application's transaction is intact: it goes on and commits.
        assert conn.exec_driver_sql(f"SELECT n FROM {COUNTER}").scalar_one() == 1
    assert _count(engine) == 1
    assert named(debug_events, "query.explain_failed") == []
    reasons = {e["reason"] for e in named(debug_events, "query.explain_skipped")}
    assert "more than one statement" in reasons


# -- the application's transaction is never touched ---------------------------------------------


def test_postgresql_select_into_leaves_the_transaction_usable(
    postgresql_url: str, make_engine: EngineFactory, debug_events: list[dict[str, Any]]
) -> None:
    engine = make_engine(postgresql_url)
    _counter(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SELECT n INTO TEMP h4_into FROM {COUNTER}")
        conn.exec_driver_sql(f"UPDATE {COUNTER} SET n = n + 5")
        assert conn.exec_driver_sql("SELECT count(*) FROM h4_into").scalar_one() == 1
    assert _count(engine) == 5
    skipped = named(debug_events, "query.explain_skipped")
    assert "may write or lock" in {e["reason"] for e in skipped}


def test_a_failing_explain_inside_a_transaction_is_rolled_back_to_its_savepoint(
    postgresql_url: str, make_engine: EngineFactory, debug_events: list[dict[str, Any]]
) -> None:
    # A plain SELECT that moves the transaction's search_path away from its
    # own table as it runs: the EXPLAIN that follows cannot find the table
    # and fails; the application's transaction must live on.
    engine = make_engine(postgresql_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS public.h4_explain_t")
        conn.exec_driver_sql("CREATE TABLE public.h4_explain_t (n INTEGER)")
        conn.exec_driver_sql("INSERT INTO public.h4_explain_t (n) VALUES (0)")
    try:
        with engine.begin() as conn:
            assert conn.exec_driver_sql(
                "SELECT set_config('search_path', 'h4_nowhere', true), n FROM h4_explain_t"
            ).one() == ("h4_nowhere", 0)
            conn.exec_driver_sql("UPDATE public.h4_explain_t SET n = n + 1")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT n FROM public.h4_explain_t").scalar_one() == 1
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS public.h4_explain_t")
    failed = named(debug_events, "query.explain_failed")
    assert [e["error_type"] for e in failed] == ["UndefinedTable"]


@pytest.mark.parametrize("in_transaction", [True, False], ids=["transaction", "autocommit"])
def test_plain_select_is_explained_and_the_transaction_state_is_kept(
    db_url: str, make_engine: EngineFactory, debug_events: list[dict[str, Any]],
    in_transaction: bool,
) -> None:
    engine = make_engine(db_url)
    _counter(engine)
    select = f"SELECT n FROM {COUNTER} WHERE n >= :low"
    if in_transaction:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE {COUNTER} SET n = n + 1")
            assert conn.execute(sa.text(select), {"low": 0}).scalar_one() == 1
            # The application's uncommitted write is still there after the EXPLAIN.
            assert conn.exec_driver_sql(f"SELECT n FROM {COUNTER}").scalar_one() == 1
            conn.exec_driver_sql(f"UPDATE {COUNTER} SET n = n + 1")
        assert _count(engine) == 2
    else:
        with engine.connect() as raw:
            conn = raw.execution_options(isolation_level="AUTOCOMMIT")
            assert conn.execute(sa.text(select), {"low": 0}).scalar_one() == 0
            # Still in autocommit, no transaction left open by the EXPLAIN (a
            # READ ONLY one would refuse this; an open one would be rolled back).
            conn.exec_driver_sql(f"UPDATE {COUNTER} SET n = n + 1")
            raw.rollback()
        assert _count(engine) == 1
    explains = [e for e in named(debug_events, "query.explain") if COUNTER in e["statement"]
                and ">=" in e["statement"]]
    assert len(explains) == 1
    assert COUNTER in explains[0]["plan"]
    assert explains[0]["full_scans"] == [COUNTER]
    assert named(debug_events, "query.explain_failed") == []


def test_select_without_parameters_is_explained_with_none(
    db_url: str, make_engine: EngineFactory, debug_events: list[dict[str, Any]]
) -> None:
    # no_parameters: the driver gets no parameters, so a % is a percent sign.
    # The EXPLAIN must be sent the same way (with () the driver reads
    # placeholders, fails, and on PostgreSQL that failure aborted the transaction).
    engine = make_engine(db_url)
    _counter(engine)
    with engine.begin() as conn:
        plain = conn.execution_options(no_parameters=True)
        assert plain.exec_driver_sql(
            f"SELECT n FROM {COUNTER} WHERE 'a%' LIKE 'a%'"
        ).all() == [(0,)]
        conn.exec_driver_sql(f"UPDATE {COUNTER} SET n = n + 1")
    assert _count(engine) == 1
    assert named(debug_events, "query.explain_failed") == []
    explains = [e for e in named(debug_events, "query.explain") if "LIKE" in e["statement"]]
    assert len(explains) == 1


# -- what is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "operation", "reason"),
    [
        ("SELECT 1; UPDATE t SET n = n + 1", "SELECT", "more than one statement"),
        ("SELECT 1 /* ; */", "SELECT", "more than one statement"),
        ("SELECT * INTO TEMP x FROM t", "SELECT", "may write or lock"),
        ("SELECT a INTO @v FROM t", "SELECT", "may write or lock"),
        ("SELECT a FROM t INTO OUTFILE '/tmp/x'", "SELECT", "may write or lock"),
        ("SELECT * FROM t FOR UPDATE", "SELECT", "may write or lock"),
        ("SELECT * FROM t FOR SHARE", "SELECT", "may write or lock"),
        ("SELECT * FROM t LOCK IN SHARE MODE", "SELECT", "may write or lock"),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "WITH", "may write or lock"),
        ("WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT 1", "WITH", "may write or lock"),
        ("SELECT @a := 1", "SELECT", "may write or lock"),
        ("/* /* */ SELECT 1 */ UPDATE t SET n = 1", "SELECT", "may write or lock"),
        ("UPDATE t SET n = 1", "UPDATE", "not a SELECT"),
        ("INSERT INTO t VALUES (1)", "INSERT", "not a SELECT"),
        ("CALL p()", "CALL", "not a SELECT"),
    ],
)
def test_refused(statement: str, operation: str, reason: str) -> None:
    assert refusal(statement, operation, {}) == reason


@pytest.mark.parametrize(
    "statement",
    ["SELECT a FROM t WHERE b = %(b)s", "SELECT 1;", "SELECT 1 ;\n",
     "WITH x AS (SELECT 1) SELECT * FROM x", "SELECT replace(a, 'x', 'y') FROM t"],
)
def test_plain_reads_are_accepted(statement: str) -> None:
    assert refusal(statement, statement.split(maxsplit=1)[0].upper(), {}) is None


def test_executemany_is_refused() -> None:
    assert refusal("SELECT 1", "SELECT", [{}, {}]) == "executemany"
