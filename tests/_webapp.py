"""The small web service of ``tests/test_web.py``, as a FastAPI and as a Flask app.

One guarded engine with the README's load-shedding policies on a pool of two:
one connection reserved for ``critical`` work, reports limited to half the
pool, background work never waits, CoDel on. Endpoints:

* ``POST /login`` (critical): a quick query.
* ``GET /reports?hold=1`` (background, tag ``reports``): a query, then keeps
  its connection until ``POST /_test/release`` (or :data:`HOLD_LIMIT`).
* ``GET /catalog`` (background): ``poolguard.fallback`` serves the last good
  answer when the pool sheds it.
* ``GET /dashboard`` (normal, a 0.05 s deadline): waits for a connection.
* ``GET /healthz`` (health): pool stats and a probe that never waits.
* ``GET /boom``: an ordinary bug (``RuntimeError``).
* ``GET /ctx/sync``, ``GET /ctx/async``: what ``current_request()`` says.
* ``GET /users/{id}`` (no route: tagged with its template): the tags the
  guard's holders report gives the connection it holds, and the context.

``uvicorn --factory _webapp:create_fastapi_app`` reads the database URL from
``POOLGUARD_WEBAPP_URL``.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import poolguard

if TYPE_CHECKING:
    from fastapi import FastAPI
    from flask import Flask

URL_ENV = "POOLGUARD_WEBAPP_URL"
HOLD_LIMIT = 60.0
"""Longest a held report keeps its connection if nobody releases it (seconds)."""

ROUTES: dict[str, dict[str, Any]] = {
    "POST /login": {"priority": "critical", "tag": "login", "timeout": 10},
    "GET /reports": {"priority": "background", "tag": "reports"},
    "GET /catalog": {"priority": "background", "tag": "catalog"},
    "GET /dashboard": {"priority": "normal", "tag": "dashboard", "timeout": 0.05},
    "/healthz": {"priority": "health"},
    "GET /ctx/*": {"priority": "critical", "tag": "ctx", "timeout": 30},
}


class Service:
    """The endpoints' logic, framework-free."""

    def __init__(self, url: str) -> None:
        self.engine = poolguard.wrap(
            sa.create_engine(url, pool_size=2, max_overflow=0),
            name="webapp",
            acquire_timeout=5,
            reserved_critical=1,
            tag_limits={"reports": 0.5},
            max_waiting_background=0,
            codel=True,
        )
        self.guard = poolguard.get_guard(self.engine)
        self.released = threading.Event()
        self.cached_catalog: list[int] = []
        self._catalog = poolguard.fallback(factory=self._catalog_from_cache)(self._catalog_from_db)

    def _select_one(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT 1")).scalar_one())

    def login(self) -> dict[str, Any]:
        self._select_one()
        return {"ok": True, **context_info()}

    def report(self, hold: bool) -> dict[str, Any]:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).scalar_one()
            if hold:
                self.released.wait(HOLD_LIMIT)
        return {"released": self.released.is_set()}

    def release(self) -> dict[str, Any]:
        self.released.set()
        return {"released": True}

    def in_use(self) -> dict[str, Any]:
        # Reads the stats only: a probe (as /healthz runs) would take the one
        # connection a report needs and race the test that waits for it.
        return {"in_use": self.guard.stats().in_use}

    def _catalog_from_db(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            rows = [int(v) for v in conn.execute(sa.text("SELECT 1 UNION ALL SELECT 2")).scalars()]
        self.cached_catalog = rows
        return {"source": "db", "items": rows}

    def _catalog_from_cache(self) -> dict[str, Any]:
        return {"source": "cache", "items": self.cached_catalog}

    def catalog(self) -> dict[str, Any]:
        return self._catalog()

    def dashboard(self) -> dict[str, Any]:
        return {"value": self._select_one()}

    def user(self, user_id: int) -> dict[str, Any]:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).scalar_one()
            holder_tags = [holder.tag for holder in self.guard.holders()]
        return {"id": user_id, "holder_tags": holder_tags, **context_info()}

    def healthz(self) -> dict[str, Any]:
        stats = self.guard.stats()
        with poolguard.fallback() as probe:
            self._select_one()
        return {
            "status": "ok",
            "db": "busy" if probe.triggered else "ok",
            "in_use": stats.in_use,
            "capacity": stats.capacity,
        }


def context_info() -> dict[str, Any]:
    ctx = poolguard.current_request()
    if ctx is None:
        return {"tag": None, "priority": None, "remaining": None}
    return {"tag": ctx.tag, "priority": ctx.priority, "remaining": ctx.remaining()}


def boom() -> None:
    raise RuntimeError("an ordinary bug")


def create_fastapi_app(url: str | None = None) -> FastAPI:
    """The FastAPI flavour, guarded with ``poolguard.integrations.asgi.install``."""
    from fastapi import FastAPI

    from poolguard.integrations.asgi import install

    svc = Service(url or os.environ[URL_ENV])
    app = FastAPI()
    app.state.service = svc
    install(app, routes=ROUTES)

    @app.post("/login")
    def login() -> dict[str, Any]:
        return svc.login()

    @app.get("/reports")
    def reports(hold: int = 0) -> dict[str, Any]:
        return svc.report(bool(hold))

    @app.post("/_test/release")
    def release() -> dict[str, Any]:
        return svc.release()

    @app.get("/_test/in_use")
    def in_use() -> dict[str, Any]:
        return svc.in_use()

    @app.get("/catalog")
    def catalog() -> dict[str, Any]:
        return svc.catalog()

    @app.get("/dashboard")
    def dashboard() -> dict[str, Any]:
        return svc.dashboard()

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return svc.healthz()

    @app.get("/boom")
    def boom_endpoint() -> None:
        boom()

    @app.get("/ctx/sync")
    def ctx_sync() -> dict[str, Any]:
        return context_info()

    @app.get("/ctx/async")
    async def ctx_async() -> dict[str, Any]:
        return context_info()

    @app.get("/users/{user_id}")
    def user(user_id: int) -> dict[str, Any]:
        return svc.user(user_id)

    return app


def create_flask_app(url: str | None = None) -> Flask:
    """The Flask flavour, guarded with ``poolguard.integrations.wsgi.install``."""
    from flask import Flask, request

    from poolguard.integrations.wsgi import install

    svc = Service(url or os.environ[URL_ENV])
    app = Flask(__name__)
    app.extensions["webapp"] = svc
    install(app, routes=ROUTES)

    @app.post("/login")
    def login() -> dict[str, Any]:
        return svc.login()

    @app.get("/reports")
    def reports() -> dict[str, Any]:
        return svc.report(request.args.get("hold", "0") == "1")

    @app.post("/_test/release")
    def release() -> dict[str, Any]:
        return svc.release()

    @app.get("/_test/in_use")
    def in_use() -> dict[str, Any]:
        return svc.in_use()

    @app.get("/catalog")
    def catalog() -> dict[str, Any]:
        return svc.catalog()

    @app.get("/dashboard")
    def dashboard() -> dict[str, Any]:
        return svc.dashboard()

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return svc.healthz()

    @app.get("/boom")
    def boom_endpoint() -> None:
        boom()

    @app.get("/ctx/sync")
    def ctx_sync() -> dict[str, Any]:
        return context_info()

    @app.get("/users/<int:user_id>")
    def user(user_id: int) -> dict[str, Any]:
        return svc.user(user_id)

    return app
