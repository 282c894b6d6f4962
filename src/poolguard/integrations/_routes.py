"""The route mapping shared by the ASGI and WSGI middlewares, and their 503.

A route maps a request (method and path) to the settings of the
:func:`poolguard.request` scope the middleware opens around it::

    {
        "POST /login": {"priority": "critical", "tag": "login", "timeout": 0.8},
        "GET /reports/*": {"priority": "background", "tag": "reports"},
        "/healthz": {"priority": "health"},
    }

Patterns are ``"[METHOD[,METHOD...]] PATH"``. Without a method, any method
matches; ``GET`` also matches ``HEAD``. In the path, ``*`` matches any run of
characters (``/`` included), and a trailing ``/*`` also matches the path
without it (``/reports/*`` matches ``/reports``, ``/reports/`` and
``/reports/7/pdf``); ``*`` alone matches every path. Everything else matches
literally. The first matching route wins; an unmatched request gets the
default route (a plain ``poolguard.request()``: normal priority, no tag, no
timeout, unless ``default=`` says otherwise).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from .._context import request
from ..errors import PoolTimeout, Rejected

__all__ = ["DefaultLike", "Route", "RouteMap", "RoutesLike", "rejection_response", "route_map"]

_SETTINGS = ("priority", "tag", "timeout")
_METHOD = re.compile(r"[A-Z]+")
#: ``Retry-After`` of a :class:`poolguard.PoolTimeout`, which carries none.
TIMEOUT_RETRY_AFTER = 1.0


class Route:
    """One entry of the mapping: a pattern and the request scope it opens.

    Args:
        pattern: ``"[METHOD[,METHOD...]] PATH"`` (see the module docs).
        priority: ``critical``, ``normal``, ``background`` or ``health``;
            ``None`` keeps the default (``normal``).
        tag: the name the work shows up under (bulkheads, holders, query
            events); ``None`` for none.
        timeout: seconds the whole request may wait for connections (the
            deadline of its :func:`poolguard.request`); ``None`` for none.

    A bad pattern or setting raises :class:`ValueError` naming the route.
    """

    __slots__ = ("_methods", "_regex", "pattern", "priority", "tag", "timeout")

    def __init__(
        self,
        pattern: str,
        *,
        priority: str | None = None,
        tag: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.pattern = pattern
        self._methods, self._regex = _compile(pattern)
        try:
            checked = request(timeout=timeout, tag=tag, priority=priority)
        except ValueError as exc:
            message = str(exc).replace("poolguard.request ", "")
            raise ValueError(f"poolguard route {pattern!r}: {message}") from None
        self.priority = priority
        self.tag = tag
        self.timeout = checked._timeout  # validated and made a float

    def matches(self, method: str, path: str) -> bool:
        """Whether a request with this (upper-case) method and path matches."""
        methods = self._methods
        if methods is not None and method not in methods:
            return False
        regex = self._regex
        return regex is None or regex.fullmatch(path) is not None

    def scope(self) -> request:
        """A fresh :func:`poolguard.request` with this route's settings."""
        return request(timeout=self.timeout, tag=self.tag, priority=self.priority)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Route):
            return NotImplemented
        return (self.pattern, self.priority, self.tag, self.timeout) == (
            other.pattern,
            other.priority,
            other.tag,
            other.timeout,
        )

    def __hash__(self) -> int:
        return hash((self.pattern, self.priority, self.tag, self.timeout))

    def __repr__(self) -> str:
        return (
            f"Route({self.pattern!r}, priority={self.priority!r}, tag={self.tag!r}, "
            f"timeout={self.timeout!r})"
        )


def _compile(pattern: object) -> tuple[frozenset[str] | None, re.Pattern[str] | None]:
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(
            f"poolguard route {pattern!r}: expected a pattern like 'GET /path', '/path/*' or '*'"
        )
    parts = pattern.split()
    if len(parts) > 2:
        raise ValueError(
            f"poolguard route {pattern!r}: expected '[METHOD] PATH' (no spaces in the path)"
        )
    path = parts[-1]
    methods: frozenset[str] | None = None
    if len(parts) == 2:
        names = [m.strip().upper() for m in parts[0].split(",")]
        for name in names:
            if not _METHOD.fullmatch(name):
                raise ValueError(
                    f"poolguard route {pattern!r}: method {name!r} is invalid: expected an "
                    "HTTP method such as GET or POST (several: 'GET,POST /path')"
                )
        methods = frozenset(names)
        if "GET" in methods:
            methods |= {"HEAD"}
    if path == "*":
        return methods, None
    if not path.startswith("/"):
        raise ValueError(
            f"poolguard route {pattern!r}: path {path!r} is invalid: expected one starting "
            "with '/', or '*' for every path"
        )
    subtree = path.endswith("/*")
    stem = path[:-2] if subtree else path
    regex = ".*".join(re.escape(piece) for piece in stem.split("*"))
    if subtree:
        regex += "(?:/.*)?"
    return methods, re.compile(regex, re.DOTALL)


def _route_from(pattern: str, settings: object) -> Route:
    if isinstance(settings, Route):
        if settings.pattern != pattern:
            raise ValueError(
                f"poolguard route {pattern!r}: its Route has pattern {settings.pattern!r}"
            )
        return settings
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise ValueError(
            f"poolguard route {pattern!r}: settings {settings!r} are invalid: expected a "
            "mapping with some of priority, tag, timeout"
        )
    for key in settings:
        if key not in _SETTINGS:
            close = difflib.get_close_matches(str(key), _SETTINGS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"poolguard route {pattern!r}: unknown setting {key!r}{hint}; "
                f"allowed: {', '.join(_SETTINGS)}"
            )
    return Route(pattern, **settings)


class RouteMap:
    """An ordered list of routes and a default: ``match()`` picks the first fit.

    Args:
        routes: a mapping of pattern to settings (``{"POST /login":
            {"priority": "critical"}}``), or a sequence of :class:`Route`.
        default: settings (a mapping or a :class:`Route`) for requests no
            route matches; a plain ``poolguard.request()`` if ``None``.
    """

    __slots__ = ("default", "routes")

    def __init__(
        self,
        routes: Mapping[str, Any] | Sequence[Route] | None = None,
        *,
        default: Mapping[str, Any] | Route | None = None,
    ) -> None:
        built: list[Route] = []
        if routes is None:
            pass
        elif isinstance(routes, Mapping):
            built = [_route_from(pattern, settings) for pattern, settings in routes.items()]
        elif isinstance(routes, Sequence) and not isinstance(routes, (str, bytes)):
            for item in routes:
                if not isinstance(item, Route):
                    raise ValueError(
                        f"poolguard routes: {item!r} is not a Route; give a sequence of "
                        "poolguard.integrations.Route or a mapping of pattern to settings"
                    )
                built.append(item)
        else:
            raise ValueError(
                f"poolguard routes={routes!r} is invalid: expected a mapping of pattern to "
                "settings or a sequence of Route"
            )
        seen: set[str] = set()
        for route in built:
            key = " ".join(route.pattern.split())
            if key in seen:
                raise ValueError(
                    f"poolguard route {route.pattern!r} is listed twice; the second "
                    "would never match"
                )
            seen.add(key)
        self.routes: tuple[Route, ...] = tuple(built)
        if isinstance(default, Route):
            self.default = default
        else:
            self.default = _route_from("*", default)

    def match(self, method: str, path: str) -> Route:
        """The first route matching ``method`` and ``path``, else the default."""
        method = method.upper()
        for route in self.routes:
            if route.matches(method, path):
                return route
        return self.default

    def __repr__(self) -> str:
        return f"RouteMap({list(self.routes)!r}, default={self.default!r})"


#: What the middlewares and ``install()`` helpers accept as ``routes``.
RoutesLike = RouteMap | Mapping[str, Any] | Sequence[Route] | None
#: What they accept as ``default``: the settings for requests no route matches.
DefaultLike = Mapping[str, Any] | Route | None


def route_map(routes: RoutesLike, default: DefaultLike = None) -> RouteMap:
    """``routes`` as a :class:`RouteMap` (itself if it already is one)."""
    if isinstance(routes, RouteMap):
        if default is not None:
            raise ValueError("poolguard routes: give default= to the RouteMap, not next to it")
        return routes
    return RouteMap(routes, default=default)


def catch_types(catch_timeouts: bool) -> tuple[type[Exception], ...]:
    """The errors the middlewares answer with a 503."""
    return (Rejected, PoolTimeout) if catch_timeouts else (Rejected,)


AppT = TypeVar("AppT")


class RouteMiddleware(Generic[AppT]):
    """What the ASGI and WSGI middlewares share: the app, its routes, the errors answered."""

    def __init__(
        self,
        app: AppT,
        routes: RoutesLike = None,
        *,
        default: DefaultLike = None,
        catch_timeouts: bool = True,
    ) -> None:
        self.app = app
        self.routes = route_map(routes, default)
        self.catch = catch_types(catch_timeouts)


def register_handlers(
    add: Callable[[type[Exception], Any], object], handler: Any, catch_timeouts: bool
) -> None:
    """Register ``handler`` with a framework's ``add`` for each error answered with a 503."""
    for error_type in catch_types(catch_timeouts):
        add(error_type, handler)


def rejection_response(error: BaseException) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body of the 503 for a rejected or timed-out request.

    The body is ``{"error": "overloaded", "reason": ..., "retry_after": ...}``;
    ``Retry-After`` is the error's ``retry_after`` rounded up to whole
    seconds (at least 1). A :class:`poolguard.PoolTimeout` has reason
    ``timeout`` and ``retry_after`` 1.
    """
    if isinstance(error, Rejected):
        reason, retry_after = error.reason, error.retry_after
    else:
        reason, retry_after = "timeout", TIMEOUT_RETRY_AFTER
    if (
        isinstance(retry_after, bool)
        or not isinstance(retry_after, (int, float))
        or not math.isfinite(retry_after)
        or retry_after < 0
    ):
        retry_after = TIMEOUT_RETRY_AFTER
    body = json.dumps(
        {"error": "overloaded", "reason": reason, "retry_after": round(retry_after, 3)}
    ).encode()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("retry-after", str(max(1, math.ceil(retry_after)))),
        ("cache-control", "no-store"),
    ]
    return 503, headers, body
