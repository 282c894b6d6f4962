"""What the FastAPI and Flask examples share: routes, tables, the guarded engine.

The examples import it as a sibling module (run them as scripts from any
directory: ``python examples/fastapi_app.py``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import poolguard
from poolguard import recommended

if TYPE_CHECKING:
    from collections.abc import Sequence

#: Priority, tag and deadline per route; the first match wins. ``/reports`` is
#: not in it: nothing marks it (or any route) as the one that will go bad.
ROUTES: dict[str, dict[str, Any]] = {
    "POST /login": {"priority": "critical", "tag": "login", "timeout": 0.8},
    "GET /catalog": {"priority": "normal", "tag": "catalog", "timeout": 0.5},
    "/healthz": {"priority": "health"},
}
#: Everything else: normal priority, two seconds.
DEFAULT_ROUTE: dict[str, Any] = {"timeout": 2.0}

metadata = sa.MetaData()
accounts = sa.Table(
    "example_accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50), nullable=False, unique=True),
)
products = sa.Table(
    "example_products",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(50), nullable=False),
)


def make_engine(url: str, pool_size: int) -> sa.Engine:
    """A guarded engine with the recommended setting, and its tables."""
    engine = poolguard.wrap(
        sa.create_engine(url, pool_size=pool_size, max_overflow=0),
        name="example-db",
        # The recommended setting as is: it names no route or query in advance
        # (nobody knows which one will go bad).
        **recommended.options(),
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(accounts)).scalar_one() == 0:
            conn.execute(sa.insert(accounts), [{"name": n} for n in ("alice", "bob")])
            conn.execute(sa.insert(products), [{"name": f"product {i}"} for i in range(5)])
    return engine


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options of both examples."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", help="database URL (default: a SQLite file in a temp dir)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument(
        "--report-seconds",
        type=float,
        default=2.0,
        help="how long /reports holds its connection (default 2)",
    )
    return parser.parse_args(argv)
