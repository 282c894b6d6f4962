"""Web integrations: route mapping, the ASGI and WSGI middlewares, and the examples.

The storm tests run real servers (uvicorn in a subprocess, Werkzeug in a
thread) in front of a SQLite file with a pool of two, and a real HTTP client.
A slow report holds its connection until the test releases it, so "answered
while the pool was saturated" is an order of events, never a time threshold:
every other request must be answered before the slow one is released.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

import poolguard
from poolguard.integrations import Route, RouteMap, rejection_response
from poolguard.integrations.asgi import PoolguardMiddleware
from poolguard.integrations.asgi import install as install_asgi
from poolguard.integrations.wsgi import PoolguardWSGIMiddleware
from poolguard.integrations.wsgi import install as install_wsgi

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, MutableMapping

    from _typeshed.wsgi import StartResponse, WSGIEnvironment

TESTS = Path(__file__).parent
EXAMPLES = TESTS.parent / "examples"
sys.path.insert(0, str(TESTS))
import _webapp  # noqa: E402
from _support import wait_until  # noqa: E402

# Upper bounds that only stop a broken test from hanging; nothing asserts on time.
REQUEST_TIMEOUT = 30.0
STARTUP_LIMIT = 60.0


def shed(reason: str = "queue_full", retry_after: float = 0.25) -> poolguard.LoadShed:
    return poolguard.LoadShed(
        "shed", reason=reason, priority="background", retry_after=retry_after, pool_name="t"
    )


def pool_timeout() -> poolguard.PoolTimeout:
    return poolguard.PoolTimeout(
        "no connection", pool_name="t", timeout=0.1, in_use=2, capacity=2, waiting=0
    )


# --- route mapping --------------------------------------------------------------------------


def test_method_is_optional_case_insensitive_and_get_covers_head() -> None:
    routes = RouteMap(
        {
            "post /login": {"priority": "critical"},
            "GET /items": {"tag": "items"},
            "PUT,DELETE /items": {"tag": "write"},
            "/any": {"tag": "any"},
        }
    )
    assert routes.match("POST", "/login").priority == "critical"
    assert routes.match("post", "/login").priority == "critical"
    assert routes.match("GET", "/login") is routes.default
    assert routes.match("HEAD", "/items").tag == "items"
    assert routes.match("DELETE", "/items").tag == "write"
    assert routes.match("PATCH", "/items") is routes.default
    for method in ("GET", "POST", "OPTIONS"):
        assert routes.match(method, "/any").tag == "any"


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/reports/*", "/reports", True),
        ("/reports/*", "/reports/", True),
        ("/reports/*", "/reports/7/pdf", True),
        ("/reports/*", "/reportsx", False),
        ("/reports/*", "/x/reports/1", False),
        ("/reports*", "/reports-2024", True),
        ("/users/*/orders", "/users/42/orders", True),
        ("/users/*/orders", "/users/42/orders/1", False),
        ("/login", "/login", True),
        ("/login", "/login/", False),
        ("/a.b", "/aXb", False),  # regex characters match literally
        ("/a+(b)", "/a+(b)", True),
        ("*", "/anything/at/all", True),
    ],
)
def test_path_glob(pattern: str, path: str, expected: bool) -> None:
    assert Route(pattern).matches("GET", path) is expected


def test_first_match_wins_and_unmatched_get_the_default() -> None:
    routes = RouteMap(
        [
            Route("GET /reports/daily", priority="normal", tag="daily"),
            Route("GET /reports/*", priority="background", tag="reports", timeout=5),
        ],
        default={"timeout": 2},
    )
    assert routes.match("GET", "/reports/daily").tag == "daily"
    assert routes.match("GET", "/reports/weekly").tag == "reports"
    assert routes.match("GET", "/reports/weekly").timeout == 5.0
    other = routes.match("GET", "/home")
    assert (other.priority, other.tag, other.timeout) == (None, None, 2.0)
    bare = RouteMap().match("GET", "/")
    assert (bare.priority, bare.tag, bare.timeout) == (None, None, None)


def test_route_scope_sets_the_request_context() -> None:
    route = Route("/x", priority="background", tag="x", timeout=3)
    assert poolguard.current_request() is None
    with route.scope() as ctx:
        assert poolguard.current_request() is ctx
        assert (ctx.priority, ctx.tag) == ("background", "x")
        remaining = ctx.remaining()
        assert remaining is not None
        assert 0 < remaining <= 3
    assert poolguard.current_request() is None


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"POST /login": {"priority": "urgent"}}, r"route 'POST /login': priority='urgent'"),
        ({"/x": {"timeout": -1}}, r"route '/x': .*timeout"),
        ({"/x": {"timeout": "1s"}}, r"route '/x': .*timeout"),
        ({"/x": {"tag": ""}}, r"route '/x': tag=''"),
        ({"/x": {"prority": "critical"}}, r"route '/x': unknown setting 'prority' \(did you mean"),
        ({"/x": "critical"}, r"route '/x': settings 'critical' are invalid"),
        ({"G3T /x": {}}, r"route 'G3T /x': method 'G3T' is invalid"),
        ({"reports/*": {}}, r"route 'reports/\*': path 'reports/\*' is invalid"),
        ({"GET /a b": {}}, r"route 'GET /a b': expected '\[METHOD\] PATH'"),
        ({"": {}}, r"route '': expected a pattern"),
        ({"/x": {}, "/x ": {}}, r"route '/x ' is listed twice"),
        (["/x"], r"'/x' is not a Route"),
        ("/x", r"routes='/x' is invalid"),
    ],
)
def test_bad_routes_are_refused_naming_the_route(routes: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouteMap(routes)


def test_bad_default_and_default_next_to_a_route_map_are_refused() -> None:
    with pytest.raises(ValueError, match=r"route '\*': priority='low'"):
        RouteMap({}, default={"priority": "low"})
    with pytest.raises(ValueError, match="give default= to the RouteMap"):
        PoolguardMiddleware(_plain_app, RouteMap({}), default={"timeout": 1})
    with pytest.raises(ValueError, match=r"route '/x': priority='nope'"):
        PoolguardWSGIMiddleware(_wsgi_hello, {"/x": {"priority": "nope"}})


@pytest.mark.parametrize(
    ("error", "reason", "header", "body_retry"),
    [
        (shed("queue_full", 0.25), "queue_full", "1", 0.25),
        (shed("tag_limit", 2.1), "tag_limit", "3", 2.1),
        (shed("queue_delay", 0.0), "queue_delay", "1", 0.0),
        (shed("queue_full", float("nan")), "queue_full", "1", 1.0),
        (pool_timeout(), "timeout", "1", 1.0),
    ],
)
def test_rejection_response(error: Exception, reason: str, header: str, body_retry: float) -> None:
    status, headers, body = rejection_response(error)
    assert status == 503
    fields = dict(headers)
    assert fields["retry-after"] == header
    assert fields["content-type"] == "application/json"
    assert fields["content-length"] == str(len(body))
    assert json.loads(body) == {"error": "overloaded", "reason": reason, "retry_after": body_retry}


def test_import_poolguard_imports_no_web_framework() -> None:
    code = (
        "import sys, poolguard\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'fastapi', 'flask', 'werkzeug', 'uvicorn') "
        "or m.startswith('poolguard.integrations'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(  # noqa: S603 - fixed arguments
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


# --- ASGI, in process -----------------------------------------------------------------------

Message = dict[str, Any]


async def _plain_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _http_scope(method: str = "GET", path: str = "/", root_path: str = "") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "root_path": root_path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
    }


async def _call(app: Any, scope: MutableMapping[str, Any]) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    return sent


def _raising_app(error: BaseException, *, after_start: bool = False) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if after_start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise error

    return app


@pytest.mark.parametrize(
    ("error", "reason", "header"),
    [(shed("tag_limit", 1.5), "tag_limit", b"2"), (pool_timeout(), "timeout", b"1")],
)
async def test_asgi_rejection_before_the_response_is_a_503(
    error: Exception, reason: str, header: bytes
) -> None:
    middleware = PoolguardMiddleware(_raising_app(error), {"/r": {"priority": "background"}})
    start, body = await _call(middleware, _http_scope(path="/r"))
    assert start["type"] == "http.response.start"
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == header
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body["body"])["reason"] == reason
    assert poolguard.current_request() is None


async def test_asgi_pool_timeout_propagates_when_not_caught() -> None:
    error = pool_timeout()
    middleware = PoolguardMiddleware(_raising_app(error), catch_timeouts=False)
    with pytest.raises(poolguard.PoolTimeout) as raised:
        await _call(middleware, _http_scope())
    assert raised.value is error
    # A rejection is still answered.
    middleware = PoolguardMiddleware(_raising_app(shed()), catch_timeouts=False)
    start, _ = await _call(middleware, _http_scope())
    assert start["status"] == 503


@pytest.mark.parametrize(
    "error", [RuntimeError("bug"), ValueError("bad"), poolguard.PoolguardError("other")]
)
async def test_asgi_other_errors_propagate_unchanged(error: Exception) -> None:
    with pytest.raises(type(error)) as raised:
        await _call(PoolguardMiddleware(_raising_app(error)), _http_scope())
    assert raised.value is error
    assert poolguard.current_request() is None


async def test_asgi_rejection_after_the_response_started_propagates() -> None:
    error = shed()
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request"}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    middleware = PoolguardMiddleware(_raising_app(error, after_start=True))
    with pytest.raises(poolguard.LoadShed) as raised:
        await middleware(_http_scope(), receive, send)
    assert raised.value is error
    assert [m["type"] for m in sent] == ["http.response.start"]
    assert sent[0]["status"] == 200


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan"])
async def test_asgi_non_http_scopes_pass_through(scope_type: str) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(poolguard.current_request())
        raise shed()

    middleware = PoolguardMiddleware(app, {"*": {"priority": "critical", "tag": "all"}})
    with pytest.raises(poolguard.LoadShed):
        await _call(middleware, {"type": scope_type, "path": "/ws"})
    assert seen == [None]


async def test_asgi_each_request_gets_its_own_context() -> None:
    arrived: list[str] = []
    gate = asyncio.Event()
    seen: dict[str, tuple[str | None, str | None]] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        arrived.append(scope["path"])
        if len(arrived) == 2:
            gate.set()
        await gate.wait()  # both requests are inside their scopes now
        ctx = poolguard.current_request()
        assert ctx is not None
        seen[scope["path"]] = (ctx.tag, ctx.priority)
        await _plain_app(scope, receive, send)

    middleware = PoolguardMiddleware(
        app,
        {
            "GET /api/login": {"priority": "critical", "tag": "login"},
            "GET /api/*": {"priority": "background", "tag": "api"},
        },
        default={"tag": "other"},
    )
    await asyncio.wait_for(
        asyncio.gather(
            _call(middleware, _http_scope(path="/api/login")),
            _call(middleware, _http_scope(path="/api/report")),
        ),
        REQUEST_TIMEOUT,
    )
    assert seen == {"/api/login": ("login", "critical"), "/api/report": ("api", "background")}
    assert poolguard.current_request() is None


async def test_asgi_matches_the_path_below_root_path() -> None:
    seen: list[str | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ctx = poolguard.current_request()
        seen.append(ctx.tag if ctx else None)
        await _plain_app(scope, receive, send)

    middleware = PoolguardMiddleware(app, {"/login": {"tag": "login"}})
    await _call(middleware, _http_scope(path="/auth/login", root_path="/auth"))
    await _call(middleware, _http_scope(path="/login"))
    await _call(middleware, _http_scope(path="/auth/other", root_path="/auth"))
    assert seen == ["login", "login", None]


# --- Starlette / FastAPI, in process --------------------------------------------------------


def _fastapi_app() -> Any:
    from fastapi import FastAPI, HTTPException

    app = FastAPI()

    @app.get("/shed/sync")
    def shed_sync() -> None:
        raise shed("queue_full", 0.4)

    @app.get("/shed/async")
    async def shed_async() -> None:
        raise shed("tag_limit", 3)

    @app.get("/timeout")
    def timed_out() -> None:
        raise pool_timeout()

    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("an ordinary bug")

    @app.get("/missing")
    def missing() -> None:
        raise HTTPException(status_code=404, detail="no such thing")

    @app.get("/ctx/sync")
    def ctx_sync() -> dict[str, Any]:
        return _webapp.context_info()

    @app.get("/ctx/async")
    async def ctx_async() -> dict[str, Any]:
        return _webapp.context_info()

    return app


ROUTES = {"/shed/*": {"priority": "background"}, "/ctx/*": {"priority": "critical", "tag": "c"}}


async def _get(app: Any, path: str, *, raise_app_exceptions: bool = False) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", timeout=REQUEST_TIMEOUT
    ) as client:
        return await client.get(path)


def _assert_503(response: httpx.Response, reason: str, retry_after: str) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == retry_after
    assert response.json()["error"] == "overloaded"
    assert response.json()["reason"] == reason


@pytest.mark.parametrize("how", ["add_middleware", "install"])
async def test_fastapi_rejections_are_503_and_other_errors_are_not(how: str) -> None:
    app = _fastapi_app()
    if how == "install":
        install_asgi(app, routes=ROUTES)
    else:
        # No exception handler: the 503 can only come from the middleware, so
        # Starlette's ExceptionMiddleware (inside it) let the error through and
        # ServerErrorMiddleware (outside it) did not see it.
        app.add_middleware(PoolguardMiddleware, routes=ROUTES)
    _assert_503(await _get(app, "/shed/sync"), "queue_full", "1")
    _assert_503(await _get(app, "/shed/async"), "tag_limit", "3")
    _assert_503(await _get(app, "/timeout"), "timeout", "1")
    bug = await _get(app, "/bug")
    assert bug.status_code == 500
    assert "retry-after" not in bug.headers
    with pytest.raises(RuntimeError, match="an ordinary bug"):
        await _get(app, "/bug", raise_app_exceptions=True)
    missing = await _get(app, "/missing")
    assert (missing.status_code, missing.json()) == (404, {"detail": "no such thing"})


async def test_fastapi_endpoints_see_the_route_context_sync_and_async() -> None:
    app = _fastapi_app()
    install_asgi(app, routes=ROUTES)
    for path in ("/ctx/sync", "/ctx/async"):  # a worker thread, and the request's task
        body = (await _get(app, path)).json()
        assert (body["tag"], body["priority"]) == ("c", "critical"), path


async def test_install_answers_503_behind_other_middleware() -> None:
    from starlette.middleware.base import BaseHTTPMiddleware

    async def passthrough(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    app = _fastapi_app()
    app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)  # inside poolguard's
    install_asgi(app, routes=ROUTES)
    app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)  # outside poolguard's
    _assert_503(await _get(app, "/shed/async"), "tag_limit", "3")
    assert (await _get(app, "/bug")).status_code == 500


async def test_wrapping_a_starlette_app_from_outside_is_too_late() -> None:
    # The documented reason to use add_middleware/install: around the whole
    # app, ServerErrorMiddleware has already answered 500 when the error comes
    # out, so the middleware must re-raise instead of answering 503.
    wrapped = PoolguardMiddleware(_fastapi_app(), ROUTES)
    assert (await _get(wrapped, "/shed/sync")).status_code == 500
    with pytest.raises(poolguard.LoadShed):
        await _get(wrapped, "/shed/sync", raise_app_exceptions=True)


# --- WSGI, in process -----------------------------------------------------------------------


def _wsgi_hello(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


class _Capture:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.calls.append((status, headers))
        return lambda data: None


def _environ(method: str = "GET", path: str = "/") -> dict[str, Any]:
    return {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "wsgi.errors": sys.stderr,
    }


def test_wsgi_streamed_body_runs_inside_the_request_context() -> None:
    closed: list[str | None] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            for _ in range(2):
                ctx = poolguard.current_request()
                yield f"{ctx.tag if ctx else None};".encode()

        def close(self) -> None:
            ctx = poolguard.current_request()
            closed.append(ctx.tag if ctx else None)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    middleware = PoolguardWSGIMiddleware(app, {"GET /stream": {"tag": "stream"}})
    capture = _Capture()
    result = middleware(_environ(path="/stream"), capture)
    assert poolguard.current_request() is None  # nothing leaks between steps
    chunks = list(result)
    result.close()  # type: ignore[attr-defined]
    assert b"".join(chunks) == b"stream;stream;"
    assert closed == ["stream"]
    assert capture.calls[0][0] == "200 OK"
    assert poolguard.current_request() is None


def test_wsgi_generator_app_shed_on_its_first_step_is_a_503() -> None:
    closed: list[bool] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        try:
            raise shed("queue_delay", 0.01)  # before start_response: a checkout failed
            yield b"never"  # pragma: no cover
        finally:
            closed.append(True)

    capture = _Capture()
    body = b"".join(PoolguardWSGIMiddleware(app)(_environ(), capture))
    assert capture.calls[0][0].startswith("503")
    assert dict(capture.calls[0][1])["retry-after"] == "1"
    assert json.loads(body)["reason"] == "queue_delay"
    assert closed == [True]


def test_wsgi_errors_after_start_and_other_errors_propagate() -> None:
    error = shed()

    def late(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"part"
        raise error

    result = PoolguardWSGIMiddleware(late)(_environ(), _Capture())
    with pytest.raises(poolguard.LoadShed) as raised:
        list(result)
    assert raised.value is error

    def started_then_shed(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        start_response("200 OK", [])
        raise error

    with pytest.raises(poolguard.LoadShed):
        PoolguardWSGIMiddleware(started_then_shed)(_environ(), _Capture())

    bug = RuntimeError("bug")

    def buggy(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        raise bug

    with pytest.raises(RuntimeError) as raised_bug:
        PoolguardWSGIMiddleware(buggy)(_environ(), _Capture())
    assert raised_bug.value is bug

    timeout = pool_timeout()

    def timing_out(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        raise timeout

    with pytest.raises(poolguard.PoolTimeout):
        PoolguardWSGIMiddleware(timing_out, catch_timeouts=False)(_environ(), _Capture())
    capture = _Capture()
    PoolguardWSGIMiddleware(timing_out)(_environ(), capture)
    assert capture.calls[0][0].startswith("503")
    assert poolguard.current_request() is None


def _flask_app(**config: Any) -> Any:
    from flask import Flask

    app = Flask(__name__)
    app.config.update(config)

    @app.get("/shed")
    def shed_view() -> str:
        raise shed("tag_limit", 1.2)

    @app.get("/timeout")
    def timeout_view() -> str:
        raise pool_timeout()

    @app.get("/bug")
    def bug_view() -> str:
        raise RuntimeError("an ordinary bug")

    @app.get("/ctx")
    def ctx_view() -> dict[str, Any]:
        return _webapp.context_info()

    return app


@pytest.mark.parametrize(
    "config", [{}, {"PROPAGATE_EXCEPTIONS": True}, {"TESTING": True}, {"DEBUG": True}]
)
def test_flask_install_answers_503_whatever_the_error_propagation(config: dict[str, Any]) -> None:
    app = _flask_app(**config)
    install_wsgi(app, routes={"GET /ctx": {"priority": "background", "tag": "ctx"}})
    client = app.test_client()
    response = client.get("/shed")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert response.headers["Content-Type"] == "application/json"
    assert response.get_json() == {"error": "overloaded", "reason": "tag_limit", "retry_after": 1.2}
    response = client.get("/timeout")
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    assert client.get("/ctx").get_json()["tag"] == "ctx"
    if config:  # errors propagate out of Flask: unchanged, through the middleware
        with pytest.raises(RuntimeError, match="an ordinary bug"):
            client.get("/bug")
    else:
        assert client.get("/bug").status_code == 500


def test_flask_middleware_alone_needs_propagating_exceptions() -> None:
    # Why install() registers an error handler: by default Flask turns the
    # error into a 500 before the WSGI middleware sees it.
    app = _flask_app()
    app.wsgi_app = PoolguardWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    assert app.test_client().get("/shed").status_code == 500
    app.config["PROPAGATE_EXCEPTIONS"] = True
    response = app.test_client().get("/shed")
    assert (response.status_code, response.headers["Retry-After"]) == (503, "2")


def test_flask_webapp_serves_context_and_500s(sqlite_url: str) -> None:
    app = _webapp.create_flask_app(sqlite_url)
    client = app.test_client()
    try:
        assert client.get("/ctx/sync").get_json()["tag"] == "ctx"
        assert client.post("/login").get_json()["priority"] == "critical"
        assert client.get("/boom").status_code == 500
    finally:
        app.extensions["webapp"].engine.dispose()


# --- real servers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _server_process(args: list[str], env: dict[str, str], banner: str) -> Iterator[str]:
    """Run a server process; yield its base URL (its port read from ``banner``)."""
    proc = subprocess.Popen(  # noqa: S603 - fixed arguments
        args,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        limit = time.monotonic() + STARTUP_LIMIT
        port = None
        while port is None:
            if time.monotonic() > limit or proc.poll() is not None:
                pytest.fail("the server did not start:\n" + "".join(output))
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            found = re.search(banner, line)
            if found:
                port = int(found.group(1))
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        reader.join(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def _uvicorn_webapp(url: str) -> Iterator[str]:
    args = [
        sys.executable, "-m", "uvicorn", "--factory", "_webapp:create_fastapi_app",
        "--app-dir", str(TESTS), "--host", "127.0.0.1", "--port", "0",
        "--no-access-log", "--timeout-graceful-shutdown", "5",
    ]  # fmt: skip
    with _server_process(
        args, {_webapp.URL_ENV: url}, r"Uvicorn running on http://127\.0\.0\.1:(\d+)"
    ) as base:
        yield base


@contextlib.contextmanager
def _werkzeug_thread(app: Any) -> Iterator[str]:
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=15)


def _storm(base: str) -> None:
    """Saturate the pool with a held report; everything else must answer meanwhile."""
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        assert client.get("/catalog").json() == {"source": "db", "items": [1, 2]}
        assert client.get("/healthz").json()["db"] == "ok"
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            slow = pool.submit(
                httpx.get, f"{base}/reports", params={"hold": "1"}, timeout=REQUEST_TIMEOUT
            )
            try:
                wait_until(
                    # Not /healthz: its probe takes a connection, and a report
                    # arriving meanwhile finds none (background never waits).
                    lambda: slow.done() or client.get("/_test/in_use").json()["in_use"] >= 1,
                    "the slow report to take its connection",
                    STARTUP_LIMIT,
                )
                assert not slow.done(), slow.result().text

                # More reports: shed at once (bulkhead, background never waits).
                for _ in range(3):
                    response = client.get("/reports")
                    assert response.status_code == 503, response.text
                    assert int(response.headers["retry-after"]) >= 1
                    assert response.json()["error"] == "overloaded"
                    assert response.json()["reason"] in {"tag_limit", "queue_full"}
                # Degraded, not failed: the last good catalog.
                assert client.get("/catalog").json() == {"source": "cache", "items": [1, 2]}
                # Normal work waits at most its route's deadline, then 503.
                dashboard = client.get("/dashboard")
                assert dashboard.status_code == 503, dashboard.text
                assert dashboard.headers["retry-after"] == "1"
                assert dashboard.json()["reason"] in {"timeout", "queue_delay"}
                # Critical work takes the reserved connection.
                login = client.post("/login")
                assert login.status_code == 200, login.text
                assert (login.json()["tag"], login.json()["priority"]) == ("login", "critical")
                # The health check answers, without waiting for a connection.
                health = client.get("/healthz")
                assert health.status_code == 200
                assert (health.json()["db"], health.json()["in_use"]) == ("busy", 1)

                # All of the above was answered while the slow report held on.
                assert not slow.done()
            finally:
                client.post("/_test/release")
            assert slow.result().status_code == 200
            assert slow.result().json() == {"released": True}
        # Recovered: the bulkhead is free again.
        assert client.get("/reports").status_code == 200
        assert client.get("/healthz").json() == {
            "status": "ok", "db": "ok", "in_use": 0, "capacity": 2
        }  # fmt: skip


def _errors_and_context(base: str, *, async_endpoint: bool) -> None:
    # A connection of its own: uvicorn drops the connection of a request
    # whose app raised, and a pooled client could reuse it meanwhile.
    boom = httpx.get(f"{base}/boom", timeout=REQUEST_TIMEOUT)
    assert boom.status_code == 500
    assert "retry-after" not in boom.headers
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        paths = ["/ctx/sync", "/ctx/async"] if async_endpoint else ["/ctx/sync"]
        for path in paths:
            body = client.get(path).json()
            assert (body["tag"], body["priority"]) == ("ctx", "critical"), path
            assert 0 < body["remaining"] <= 30


@pytest.mark.timing
def test_asgi_real_server_storm(tmp_path: Path) -> None:
    with _uvicorn_webapp(f"sqlite:///{tmp_path / 'web.sqlite3'}") as base:
        _storm(base)
        _errors_and_context(base, async_endpoint=True)


@pytest.mark.timing
def test_wsgi_real_server_storm(tmp_path: Path) -> None:
    app = _webapp.create_flask_app(f"sqlite:///{tmp_path / 'web.sqlite3'}")
    try:
        with _werkzeug_thread(app) as base:
            _storm(base)
            _errors_and_context(base, async_endpoint=False)
    finally:
        app.extensions["webapp"].engine.dispose()


@pytest.mark.parametrize(
    ("script", "banner"),
    [
        ("fastapi_app.py", r"Uvicorn running on http://127\.0\.0\.1:(\d+)"),
        ("flask_app.py", r"Running on http://127\.0\.0\.1:(\d+)"),
    ],
)
def test_example_runs(script: str, banner: str, tmp_path: Path) -> None:
    args = [
        sys.executable, str(EXAMPLES / script), "--port", "0", "--pool-size", "4",
        "--report-seconds", "0", "--url", f"sqlite:///{tmp_path / 'example.sqlite3'}",
    ]  # fmt: skip
    with (
        _server_process(args, {}, banner) as base,
        httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client,
    ):
        assert client.get("/healthz").json()["db"] == "ok"
        assert client.post("/login", params={"user": "alice"}).json()["ok"] is True
        assert client.post("/login", params={"user": "mallory"}).status_code == 401
        assert client.get("/reports").json() == {"products": 5}
        assert client.get("/catalog").json()["source"] == "db"


# --- tags without configuration: the route template -----------------------------------------


def _templated_fastapi_app(**options: Any) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.applications import Starlette
    from starlette.routing import Host, Mount
    from starlette.routing import Route as StarletteRoute

    app = FastAPI()
    install_asgi(
        app,
        routes={"GET /named/*": {"tag": "named"}, "GET /prio/*": {"priority": "critical"}},
        **options,
    )

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        # Runs inside the middleware's scope: what tag did a 404 get?
        return JSONResponse(_webapp.context_info(), status_code=404)

    @app.get("/users/{user_id}")
    def user(user_id: int) -> dict[str, Any]:
        return _webapp.context_info()

    @app.post("/users/{user_id}")
    async def update_user(user_id: int) -> dict[str, Any]:
        return _webapp.context_info()

    @app.get("/named/{name}")
    def named(name: str) -> dict[str, Any]:
        return _webapp.context_info()

    @app.get("/prio/{name}")
    def prio(name: str) -> dict[str, Any]:
        return _webapp.context_info()

    async def item(request: Any) -> Any:
        return JSONResponse(_webapp.context_info())

    async def sub_not_found(request: Any, exc: Exception) -> Any:
        return JSONResponse(_webapp.context_info(), status_code=404)

    sub = Starlette(
        routes=[StarletteRoute("/items/{item_id:int}", item)],
        exception_handlers={404: sub_not_found},
    )
    app.router.routes.append(Mount("/sub", app=sub))

    async def files(scope: Any, receive: Any, send: Any) -> None:
        # A mounted app without routes, like StaticFiles.
        await JSONResponse(_webapp.context_info())(scope, receive, send)

    app.router.routes.append(Mount("/static", app=files))
    host_app = Starlette(routes=[StarletteRoute("/page/{n}", item)])
    app.router.routes.append(Host("{sub}.example.org", app=host_app))
    return app


async def test_asgi_tags_requests_with_their_route_template() -> None:
    app = _templated_fastapi_app()
    user = await _get(app, "/users/7")
    assert (user.status_code, user.json()["tag"]) == (200, "GET /users/{user_id}")
    # A second request to another id: the same tag (answered from the cache).
    assert (await _get(app, "/users/8")).json()["tag"] == "GET /users/{user_id}"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.post("/users/7")).json()["tag"] == "POST /users/{user_id}"
    # A route inside a mounted router: the mount's path, then the route as written.
    assert (await _get(app, "/sub/items/4")).json()["tag"] == "GET /sub/items/{item_id:int}"
    # A mounted app without routes: the mount's path format.
    assert (await _get(app, "/static/css/a.css")).json()["tag"] == "GET /static/{path}"
    # A Host route depends on the host header too: never answered from the cache.
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example.org") as c:
        assert (await c.get("/page/1")).json()["tag"] == "GET /page/{n}"
        assert (await c.get("/page/2")).json()["tag"] == "GET /page/{n}"
    assert (await _get(app, "/page/1")).json()["tag"] is None
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example.org") as c:
        assert (await c.get("/page/1")).json()["tag"] == "GET /page/{n}"


async def test_asgi_route_map_tag_wins_and_priority_only_keeps_the_template() -> None:
    app = _templated_fastapi_app()
    assert (await _get(app, "/named/x")).json()["tag"] == "named"
    body = (await _get(app, "/prio/x")).json()
    assert (body["tag"], body["priority"]) == ("GET /prio/{name}", "critical")


@pytest.mark.parametrize("path", ["/nothing/secret-token-123", "/sub/nothing", "/users"])
async def test_asgi_unmatched_path_gets_no_tag(path: str) -> None:
    response = await _get(_templated_fastapi_app(), path)
    assert response.status_code == 404
    assert response.json()["tag"] is None


async def test_asgi_route_tags_false_turns_it_off() -> None:
    app = _templated_fastapi_app(route_tags=False)
    assert (await _get(app, "/users/7")).json()["tag"] is None
    assert (await _get(app, "/named/x")).json()["tag"] == "named"


@pytest.mark.parametrize("bad", [None, 0, "yes"])
def test_bad_route_tags_are_refused(bad: Any) -> None:
    from fastapi import FastAPI
    from flask import Flask

    for make in (
        lambda: PoolguardMiddleware(_plain_app, route_tags=bad),
        lambda: install_asgi(FastAPI(), route_tags=bad),
        lambda: PoolguardWSGIMiddleware(_wsgi_hello, route_tags=bad),
        lambda: install_wsgi(Flask(__name__), route_tags=bad),
    ):
        with pytest.raises(ValueError, match=r"route_tags=.*expected True .* or False"):
            make()


async def test_asgi_plain_app_without_routes_gets_no_tag() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(poolguard.current_request())
        await _plain_app(scope, receive, send)

    await _call(PoolguardMiddleware(app), _http_scope(path="/users/7"))
    assert seen[0] is not None
    assert seen[0].tag is None


async def test_head_shares_the_get_tag() -> None:
    # HEAD runs the GET endpoint, so it shares its tag and bulkhead. The
    # middleware alone, with Starlette's scope["app"], shows what HEAD gets
    # (its answer has no body to carry the tag). A Starlette route takes
    # HEAD with GET (a FastAPI one answers 405, and gets no tag).
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(poolguard.current_request())
        await _plain_app(scope, receive, send)

    for path in ["/sub/items/4", "/users/7"]:
        scope = _http_scope("HEAD", path)
        scope["app"] = _templated_fastapi_app()
        await _call(PoolguardMiddleware(app), scope)
    assert [ctx.tag for ctx in seen] == ["GET /sub/items/{item_id:int}", None]

    flask_seen: list[Any] = []
    flask_app = _templated_flask_app()

    @flask_app.get("/seen/<int:n>")
    def seen_view(n: int) -> str:
        flask_seen.append(poolguard.current_request())
        return ""

    assert flask_app.test_client().head("/seen/3").status_code == 200
    assert flask_seen[0].tag == "GET /seen/<int:n>"


async def test_asgi_template_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from poolguard.integrations import asgi

    monkeypatch.setattr(asgi, "TEMPLATE_CACHE_SIZE", 3)
    app = _templated_fastapi_app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for n in range(10):
            body = (await client.get(f"/users/{n}")).json()
            assert body["tag"] == "GET /users/{user_id}"
            assert (await client.get(f"/nothing/{n}")).json()["tag"] is None
    middleware = app.middleware_stack
    while not isinstance(middleware, PoolguardMiddleware):
        middleware = middleware.app
    assert 0 < len(middleware._templates) <= 3


def _templated_flask_app(**options: Any) -> Any:
    from flask import Flask

    app = Flask(__name__)
    install_wsgi(
        app,
        routes={"GET /named/*": {"tag": "named"}, "GET /prio/*": {"priority": "critical"}},
        **options,
    )

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[dict[str, Any], int]:
        return _webapp.context_info(), 404

    @app.get("/users/<int:user_id>")
    def user(user_id: int) -> dict[str, Any]:
        return _webapp.context_info()

    @app.post("/users/<int:user_id>")
    def update_user(user_id: int) -> dict[str, Any]:
        return _webapp.context_info()

    @app.get("/named/<name>")
    def named(name: str) -> dict[str, Any]:
        return _webapp.context_info()

    @app.get("/prio/<name>")
    def prio(name: str) -> dict[str, Any]:
        return _webapp.context_info()

    return app


def test_flask_tags_requests_with_their_url_rule() -> None:
    client = _templated_flask_app().test_client()
    assert client.get("/users/7").get_json()["tag"] == "GET /users/<int:user_id>"
    assert client.post("/users/7").get_json()["tag"] == "POST /users/<int:user_id>"
    assert client.get("/named/x").get_json()["tag"] == "named"
    body = client.get("/prio/x").get_json()
    assert (body["tag"], body["priority"]) == ("GET /prio/<name>", "critical")
    for path in ["/nothing/secret-token-123", "/users/not-a-number"]:
        response = client.get(path)
        assert response.status_code == 404
        assert response.get_json()["tag"] is None


def test_flask_route_tags_false_and_a_bare_middleware() -> None:
    client = _templated_flask_app(route_tags=False).test_client()
    assert client.get("/users/7").get_json()["tag"] is None
    assert client.get("/named/x").get_json()["tag"] == "named"
    # The middleware alone around app.wsgi_app finds the Flask app itself.
    app = _flask_app()

    @app.get("/users/<int:user_id>")
    def user(user_id: int) -> dict[str, Any]:
        return _webapp.context_info()

    app.wsgi_app = PoolguardWSGIMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    assert app.test_client().get("/users/7").get_json()["tag"] == "GET /users/<int:user_id>"


def test_wsgi_plain_app_without_a_url_map_gets_no_tag() -> None:
    seen: list[Any] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.append(poolguard.current_request())
        return _wsgi_hello(environ, start_response)

    capture = _Capture()
    list(PoolguardWSGIMiddleware(app)(_environ(path="/users/7"), capture))
    assert seen[0] is not None
    assert seen[0].tag is None


def _user_tags(base: str, template: str) -> None:
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client:
        body = client.get("/users/7").json()
    # The guard saw the request's checkout under the template tag.
    assert body["holder_tags"] == [template]
    assert (body["id"], body["tag"], body["priority"]) == (7, template, "normal")


def test_asgi_real_server_tags_with_the_route_template(tmp_path: Path) -> None:
    with _uvicorn_webapp(f"sqlite:///{tmp_path / 'web.sqlite3'}") as base:
        _user_tags(base, "GET /users/{user_id}")


def test_wsgi_real_server_tags_with_the_url_rule(tmp_path: Path) -> None:
    app = _webapp.create_flask_app(f"sqlite:///{tmp_path / 'web.sqlite3'}")
    try:
        with _werkzeug_thread(app) as base:
            _user_tags(base, "GET /users/<int:user_id>")
    finally:
        app.extensions["webapp"].engine.dispose()


@pytest.mark.timing
def test_per_tag_bulkhead_works_with_no_route_map(tmp_path: Path) -> None:
    # The promise: tag_limits keyed by a route template isolate that
    # route with no route mapping at all.
    import sqlalchemy as sa
    from flask import Flask

    engine = poolguard.wrap(
        sa.create_engine(f"sqlite:///{tmp_path / 'bulkhead.sqlite3'}", pool_size=2, max_overflow=0),
        acquire_timeout=5,
        tag_limits={"GET /slow/<int:n>": 1},
    )
    guard = poolguard.get_guard(engine)
    release = threading.Event()
    app = Flask(__name__)
    install_wsgi(app)

    @app.get("/slow/<int:n>")
    def slow(n: int) -> dict[str, Any]:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).scalar_one()
            release.wait(REQUEST_TIMEOUT)
        return {"n": n}

    @app.get("/fast")
    def fast() -> dict[str, Any]:
        with engine.connect() as conn:
            return {"value": conn.execute(sa.text("SELECT 1")).scalar_one()}

    try:
        with (
            _werkzeug_thread(app) as base,
            httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT) as client,
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool,
        ):
            held = pool.submit(client.get, "/slow/1")
            tags = ["GET /slow/<int:n>"]
            try:
                wait_until(
                    lambda: held.done() or [h.tag for h in guard.holders()] == tags,
                    "the first slow request to hold its connection",
                    STARTUP_LIMIT,
                )
                assert not held.done(), held.result().text
                second = client.get("/slow/2")
                assert second.status_code == 503, second.text
                assert second.json()["reason"] == "tag_limit"
                # Other routes still get the rest of the pool.
                assert client.get("/fast").json() == {"value": 1}
                assert not held.done()
            finally:
                release.set()
            assert held.result().json() == {"n": 1}
    finally:
        engine.dispose()
