"""WSGI middleware: per-route request scopes, and a 503 for shed requests.

With Flask::

    from poolguard.integrations.wsgi import install

    install(app, routes={
        "POST /login": {"priority": "critical", "tag": "login", "timeout": 0.8},
        "GET /reports/*": {"priority": "background", "tag": "reports"},
        "/healthz": {"priority": "health"},
    })

Flask turns an exception of a view into a 500 before any WSGI middleware
sees it (unless ``PROPAGATE_EXCEPTIONS`` is on), so ``install()`` both wraps
``app.wsgi_app`` in :class:`PoolguardWSGIMiddleware` (the request scopes) and
registers Flask error handlers for ``poolguard.Rejected`` (and
``PoolTimeout``) that answer the 503.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from .._context import RequestContext, _current
from ._routes import DefaultLike, RouteMiddleware, RoutesLike, register_handlers, rejection_response

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from types import TracebackType

    # WSGIApplication is named (as a string) in a base class, which ruff does not read.
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment  # noqa: F401

__all__ = ["PoolguardWSGIMiddleware", "install"]


def _route_path(environ: WSGIEnvironment) -> str:
    # PEP 3333 strings are bytes decoded as latin-1; patterns are text.
    raw: str = environ.get("PATH_INFO", "") or "/"
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return raw


class _Body:
    """The application's response iterable, each step inside the request's scope."""

    __slots__ = ("_ctx", "_first", "_inner", "_iterator")

    def __init__(
        self,
        inner: Iterable[bytes],
        iterator: Iterator[bytes],
        first: list[bytes],
        ctx: RequestContext,
    ) -> None:
        self._inner = inner
        self._iterator = iterator
        self._first = first
        self._ctx = ctx

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._first:
            return self._first.pop()
        token = _current.set(self._ctx)
        try:
            return next(self._iterator)
        finally:
            _current.reset(token)

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            token = _current.set(self._ctx)
            try:
                close()
            finally:
                _current.reset(token)


class PoolguardWSGIMiddleware(RouteMiddleware["WSGIApplication"]):
    """Opens the matched route's :func:`poolguard.request` around each request.

    Args:
        app: the WSGI application to wrap (for Flask: ``app.wsgi_app``).
        routes: the route mapping (see :class:`poolguard.integrations.RouteMap`).
        default: settings for requests no route matches.
        catch_timeouts: also answer 503 for ``poolguard.PoolTimeout``
            (``Retry-After: 1``); ``False`` lets it propagate.

    The scope covers the call of the application and every step of the
    response iterable (a streamed body runs inside it too). A
    ``poolguard.Rejected`` (and ``PoolTimeout``) raised before the
    application called ``start_response`` becomes a 503 with ``Retry-After``
    and a JSON body; afterwards it propagates, as do all other exceptions.
    """

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        route = self.routes.match(environ.get("REQUEST_METHOD", "GET"), _route_path(environ))
        started = False

        def start_tracking(
            status: str,
            headers: list[tuple[str, str]],
            exc_info: tuple[type[BaseException], BaseException, TracebackType]
            | tuple[None, None, None]
            | None = None,
        ) -> Any:
            nonlocal started
            started = True
            return start_response(status, headers, exc_info)

        result: Iterable[bytes] | None = None
        try:
            with route.scope() as ctx:
                result = self.app(environ, start_tracking)
                if isinstance(result, (list, tuple)):
                    return result
                iterator = iter(result)
                first: list[bytes] = []
                if not started:
                    # A generator application calls start_response on its
                    # first step: take it here, where a 503 is still possible.
                    with contextlib.suppress(StopIteration):
                        first.append(next(iterator))
                return _Body(result, iterator, first, ctx)
        except self.catch as error:
            if started:
                raise
            if result is not None:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            status, headers, body = rejection_response(error)
            start_response(f"{status} Service Unavailable", headers)
            return [body]


def _flask_handler(error: Exception) -> tuple[bytes, int, list[tuple[str, str]]]:
    status, headers, body = rejection_response(error)
    return body, status, [(k, v) for k, v in headers if k != "content-length"]


def install(
    app: Any, routes: RoutesLike = None, *, default: DefaultLike = None, catch_timeouts: bool = True
) -> None:
    """Guard a Flask application: wrap ``app.wsgi_app`` and register error handlers.

    See :class:`PoolguardWSGIMiddleware` for the arguments.
    """
    app.wsgi_app = PoolguardWSGIMiddleware(
        app.wsgi_app, routes, default=default, catch_timeouts=catch_timeouts
    )
    register_handlers(app.register_error_handler, _flask_handler, catch_timeouts)
