"""A Flask service that degrades instead of failing when its pool fills up.

One guarded engine with the recommended setting (and nothing else), and a route
mapping that gives each endpoint a priority, a tag and a deadline::

    pip install "sqlalchemy-poolguard[flask]"
    python examples/flask_app.py                        # SQLite file in a temp dir, port 8000
    python examples/flask_app.py --url postgresql+psycopg://postgres@127.0.0.1/test

Then fill the pool with slow reports and watch the rest of the service::

    for i in $(seq 20); do curl -s localhost:8000/reports >/dev/null & done; sleep 0.5
    curl -si localhost:8000/reports              # 503 + Retry-After: no connection in time
    curl -si -X POST 'localhost:8000/login?user=alice'   # 200: reserved capacity
    curl -s localhost:8000/catalog               # from cache if the pool sheds it
    curl -s localhost:8000/healthz               # at once, with the pool's numbers

``/reports`` holds its connection ``--report-seconds`` (``pg_sleep`` on
PostgreSQL; on SQLite a Python-side sleep while the session holds it).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import Flask, request
from sqlalchemy.orm import Session

import poolguard
from _example_db import DEFAULT_ROUTE, ROUTES, accounts, make_engine, parse_args, products
from poolguard.integrations.wsgi import install

if TYPE_CHECKING:
    from collections.abc import Sequence


def create_app(
    url: str | None = None, *, pool_size: int = 10, report_seconds: float = 2.0
) -> Flask:
    """The service; ``url`` defaults to a SQLite file in a temporary directory."""
    if url is None:
        url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'example.sqlite3'}"
    engine = make_engine(url, pool_size)
    guard = poolguard.get_guard(engine)
    catalog_cache: list[str] = []

    app = Flask(__name__)
    install(app, routes=ROUTES, default=DEFAULT_ROUTE)

    @app.post("/login")
    def login() -> tuple[dict[str, Any], int]:
        user = request.args.get("user", "alice")
        with Session(engine) as session:
            found = session.execute(
                sa.select(accounts.c.id).where(accounts.c.name == user)
            ).scalar_one_or_none()
        if found is None:
            return {"user": user, "ok": False}, 401
        return {"user": user, "ok": True}, 200

    @app.get("/reports")
    def report() -> dict[str, Any]:
        with Session(engine) as session:
            count = session.execute(sa.select(sa.func.count()).select_from(products)).scalar()
            if engine.dialect.name == "postgresql":
                session.execute(sa.text("SELECT pg_sleep(:s)"), {"s": report_seconds})
            else:
                time.sleep(report_seconds)  # the session keeps its connection meanwhile
        return {"products": count}

    def catalog_from_cache() -> dict[str, Any]:
        return {"source": "cache", "products": catalog_cache}

    @app.get("/catalog")
    @poolguard.fallback(factory=catalog_from_cache)
    def catalog() -> dict[str, Any]:
        with Session(engine) as session:
            names = list(session.execute(sa.select(products.c.name)).scalars())
        catalog_cache[:] = names
        return {"source": "db", "products": names}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        stats = guard.stats()
        with poolguard.fallback() as probe, engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))  # health priority: never waits
        return {
            "status": "ok",
            "db": "busy" if probe.triggered else "ok",
            "in_use": stats.in_use,
            "capacity": stats.capacity,
            "waiting": stats.waiting,
        }

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the example with Werkzeug's threaded server until interrupted."""
    args = parse_args(__doc__.split("\n\n")[0], argv)
    app = create_app(args.url, pool_size=args.pool_size, report_seconds=args.report_seconds)
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
