"""The PgBouncer test bed works: statements pass through it, in transaction mode."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

import poolguard
from _pgbouncer import PgBouncer

pytestmark = pytest.mark.postgresql


def test_guarded_engine_through_pgbouncer(pgbouncer_url: str) -> None:
    # psycopg's automatic prepared statements break under transaction pooling.
    engine = poolguard.wrap(
        sa.create_engine(pgbouncer_url, pool_size=2, connect_args={"prepare_threshold": None})
    )
    try:
        for _ in range(5):
            with engine.connect() as conn:
                assert conn.execute(sa.text("select 41 + 1")).scalar_one() == 42
        assert poolguard.get_guard(engine).stats().acquisitions >= 5
    finally:
        engine.dispose()


def test_own_instance_reports_transaction_mode(postgresql_url: str) -> None:
    url = sa.engine.make_url(postgresql_url)
    with PgBouncer(upstream_port=url.port or 5432, default_pool_size=3) as bouncer:
        engine = sa.create_engine(bouncer.url(url.database or "test"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar_one() == 1
        engine.dispose()
        pools = {row["database"]: row for row in bouncer.admin("SHOW POOLS")}
        assert pools[url.database or "test"]["pool_mode"] == "transaction"
        config = {row["key"]: row["value"] for row in bouncer.admin("SHOW CONFIG")}
        assert config["default_pool_size"] == "3"


def test_own_instance_keeps_answering_after_much_logging(postgresql_url: str) -> None:
    # PgBouncer logs each login and each disconnect to stderr as well as to its
    # log file: an unread pipe filled up after ~64 KB and PgBouncer stopped
    # answering anyone (it hung in a benchmark after ~500 log lines).
    import psycopg

    url = sa.engine.make_url(postgresql_url)
    with PgBouncer(upstream_port=url.port or 5432) as bouncer:
        dsn = (f"host=127.0.0.1 port={bouncer.port} user={bouncer.user} "
               f"dbname={url.database or 'test'} connect_timeout=5")
        for _ in range(600):
            psycopg.connect(dsn).close()
        assert len(bouncer.log()) > 0
        assert bouncer.admin("SHOW VERSION")[0]["version"].startswith("PgBouncer")
