"""ASGI middleware: per-route request scopes, and a 503 for shed requests.

Pure ASGI: it works with any ASGI application and imports no framework.
With Starlette or FastAPI::

    from poolguard.integrations.asgi import install

    install(app, routes={
        "POST /login": {"priority": "critical", "tag": "login", "timeout": 0.8},
        "GET /reports/*": {"priority": "background", "tag": "reports"},
        "/healthz": {"priority": "health"},
    })

``install()`` adds :class:`PoolguardMiddleware` with ``app.add_middleware``
(inside Starlette's ``ServerErrorMiddleware``, outside its
``ExceptionMiddleware``, so it sees the endpoint's exceptions before they
become 500s) and registers exception handlers for ``poolguard.Rejected``
(and ``PoolTimeout``) that answer the same 503, so that the answer does not
depend on what other middleware sits in between. Do not wrap the finished
application from outside (``PoolguardMiddleware(app)`` around a Starlette
app): its ``ServerErrorMiddleware`` has already sent a 500 by then.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ._routes import (
    DefaultLike,
    RouteMiddleware,
    RoutesLike,
    register_handlers,
    rejection_response,
    route_map,
)

__all__ = ["ASGIApp", "PoolguardMiddleware", "RejectionResponse", "install"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RejectionResponse:
    """An ASGI response: the 503 for a ``Rejected`` or ``PoolTimeout`` error.

    Starlette exception handlers may return it as their response.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, error: BaseException) -> None:
        status, headers, body = rejection_response(error)
        self.status = status
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self.body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def _route_path(scope: Scope) -> str:
    # The path the application routes on: ASGI's ``path`` includes
    # ``root_path`` (as Starlette reads it).
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


class PoolguardMiddleware(RouteMiddleware[ASGIApp]):
    """Opens the matched route's :func:`poolguard.request` around each HTTP request.

    Args:
        app: the ASGI application to wrap.
        routes: the route mapping (see :class:`poolguard.integrations.RouteMap`).
        default: settings for requests no route matches.
        catch_timeouts: also answer 503 for ``poolguard.PoolTimeout``
            (``Retry-After: 1``); ``False`` lets it propagate.

    A ``poolguard.Rejected`` (and ``PoolTimeout``) raised before the response
    started becomes a 503 with ``Retry-After`` and a JSON body
    ``{"error": "overloaded", "reason": ..., "retry_after": ...}``. After the
    response started it propagates (the status line is gone). Other
    exceptions always propagate unchanged. Websocket and lifespan scopes
    pass through untouched.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.routes.match(scope.get("method", "GET"), _route_path(scope))
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            with route.scope():
                await self.app(scope, receive, send_tracking)
        except self.catch as error:
            if started:
                raise
            await RejectionResponse(error)(scope, receive, send)


async def _handle_rejection(conn: Any, error: Exception) -> RejectionResponse:
    # A Starlette exception handler (``conn`` is the Request or WebSocket).
    if conn.scope.get("type") != "http":
        raise error
    return RejectionResponse(error)


def install(
    app: Any, routes: RoutesLike = None, *, default: DefaultLike = None, catch_timeouts: bool = True
) -> None:
    """Guard a Starlette or FastAPI application: middleware and exception handlers.

    Call it before the application serves its first request. See
    :class:`PoolguardMiddleware` for the arguments.
    """
    app.add_middleware(
        PoolguardMiddleware, routes=route_map(routes, default), catch_timeouts=catch_timeouts
    )
    register_handlers(app.add_exception_handler, _handle_rejection, catch_timeouts)
