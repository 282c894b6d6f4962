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
from ._routes import (
    DefaultLike,
    RouteMiddleware,
    RoutesLike,
    register_handlers,
    rejection_response,
    template_tag,
)

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


def _flask_of(app: object) -> Any:
    # ``app.wsgi_app`` is a bound method of the Flask app; a Werkzeug-style
    # app may carry its ``url_map`` itself.
    for candidate in (app, getattr(app, "__self__", None)):
        if candidate is not None and getattr(candidate, "url_map", None) is not None:
            return candidate
    return None


def _rule_template(flask_app: Any, environ: WSGIEnvironment) -> str | None:
    """The URL rule Werkzeug will route this request to, as written (``/users/<int:id>``).

    Binds the app's URL map the way Flask does (``SERVER_NAME``, subdomain
    matching); a 404, 405 or redirect gives ``None``, never the raw path.
    """
    url_map = flask_app.url_map
    config = getattr(flask_app, "config", None)
    server_name = None
    subdomain = None
    if isinstance(config, dict) and not url_map.host_matching:
        server_name = config.get("SERVER_NAME")
        if not getattr(flask_app, "subdomain_matching", True):
            subdomain = url_map.default_subdomain or ""
    try:
        adapter = url_map.bind_to_environ(environ, server_name=server_name, subdomain=subdomain)
        rule, _ = adapter.match(return_rule=True)
    except Exception:  # noqa: BLE001 - the app answers these itself (404, 405, redirects)
        return None
    template = getattr(rule, "rule", None)
    return template if isinstance(template, str) and template else None


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
        route_tags: tag each request with its URL rule (``"GET
            /users/<int:id>"``) unless its route sets a tag, when the app
            has a Werkzeug ``url_map`` (Flask); ``False`` for no such tag.

    The scope covers the call of the application and every step of the
    response iterable (a streamed body runs inside it too). A
    ``poolguard.Rejected`` (and ``PoolTimeout``) raised before the
    application called ``start_response`` becomes a 503 with ``Retry-After``
    and a JSON body; afterwards it propagates, as do all other exceptions.
    """

    def _prepare_route_tags(self) -> None:
        self._flask = _flask_of(self.app) if self.route_tags else None

    def _template_tag(self, method: str, path: str, request_info: Any) -> str | None:
        if self._flask is None:
            return None
        template = _rule_template(self._flask, request_info)
        return None if template is None else template_tag(method, template)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request_scope = self.request_scope(
            environ.get("REQUEST_METHOD", "GET"), _route_path(environ), environ
        )
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
            with request_scope as ctx:
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
    app: Any, routes: RoutesLike = None, *, default: DefaultLike = None,
    catch_timeouts: bool = True, route_tags: bool = True,
) -> None:
    """Guard a Flask application: wrap ``app.wsgi_app`` and register error handlers.

    See :class:`PoolguardWSGIMiddleware` for the arguments.
    """
    middleware = PoolguardWSGIMiddleware(
        app.wsgi_app, routes, default=default, catch_timeouts=catch_timeouts, route_tags=route_tags
    )
    if middleware.route_tags:
        # ``app.wsgi_app`` may already be another middleware: route on the app.
        middleware._flask = app
    app.wsgi_app = middleware
    register_handlers(app.register_error_handler, _flask_handler, catch_timeouts)
