"""Per-request settings carried in a :mod:`contextvars` variable.

``poolguard.request(...)`` marks a unit of work (an HTTP request, a job). The
guard reads it only when it needs it, so code that never uses it pays nothing.
"""

from __future__ import annotations

import functools
import inspect
import time
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast, overload

from ._config import _seconds
from ._policies import NORMAL, PRIORITIES

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["MAX_TAG_CHARS", "RequestContext", "current_request", "request"]

#: Longest tag kept; a longer one is cut (tags go into every log line, holders
#: report and metric label of its request).
MAX_TAG_CHARS = 128

P = ParamSpec("P")
R = TypeVar("R")


class RequestContext:
    """What the guard knows about the current request.

    Attributes:
        deadline: ``time.monotonic()`` value after which the request has no
            time left, or ``None`` for no deadline.
        tag: a short, low-cardinality name of the unit of work (an endpoint,
            a job type), shown in holders reports and query events.
        priority: ``critical``, ``normal`` (the default), ``background`` or
            ``health``; admission policies serve and shed by it.
        statement_timeout: time limit of each statement in this request, or
            ``None`` for the tag's or the guard's.
    """

    __slots__ = ("_token", "deadline", "priority", "statement_timeout", "tag")

    def __init__(
        self,
        deadline: float | None,
        tag: str | None = None,
        priority: str = NORMAL,
        statement_timeout: float | None = None,
    ) -> None:
        self.deadline = deadline
        self.tag = tag
        self.priority = priority
        self.statement_timeout = statement_timeout
        # What restores the scope around this one: kept on the context the
        # scope created, not on the ``request`` object, so that one object can
        # be entered by many tasks/threads at once and nested in itself.
        self._token: Token[RequestContext | None] | None = None

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left before the deadline (never negative), or ``None``."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - (time.monotonic() if now is None else now))

    def __repr__(self) -> str:
        return (
            f"RequestContext(priority={self.priority!r}, tag={self.tag!r}, "
            f"remaining={self.remaining()!r})"
        )


_current: ContextVar[RequestContext | None] = ContextVar("poolguard_request", default=None)


def current_request() -> RequestContext | None:
    """The innermost active :func:`request`, or ``None`` outside any."""
    return _current.get()


class request:  # noqa: N801 - used like a function: `with poolguard.request(...)`
    """Scope a unit of work: ``with``/``async with`` block or decorator.

    Args:
        timeout: Seconds this unit of work may take from entering the scope.
            A checkout inside waits at most what is left of it (and never more
            than the guard's own ``acquire_timeout``). A nested scope can only
            shorten the budget of the scope around it, never extend it.
        tag: Name of the unit of work (``"login"``, ``"GET /orders"``); a
            nested scope without a tag keeps the outer one's. Control
            characters become ``?`` and a tag longer than
            :data:`MAX_TAG_CHARS` is cut (it may come from request data).
        priority: ``"critical"``, ``"normal"``, ``"background"`` or
            ``"health"`` (never waits); a nested scope without one keeps the
            outer one's, and the default is ``"normal"``.
        statement_timeout: Time limit of each statement, enforced by the
            database; a nested scope without one keeps the outer one's.

    As a decorator it opens a fresh scope on every call, for sync and async
    functions alike. One object may be entered by concurrent tasks or threads,
    and within itself: each entry opens its own scope.
    """

    __slots__ = ("_priority", "_statement_timeout", "_tag", "_timeout")

    def __init__(
        self,
        *,
        timeout: float | None = None,
        tag: str | None = None,
        priority: str | None = None,
        statement_timeout: float | None = None,
    ) -> None:
        self._statement_timeout = (
            None if statement_timeout is None else _seconds("statement_timeout", statement_timeout)
        )
        if priority is not None and priority not in PRIORITIES:
            raise ValueError(
                f"poolguard.request priority={priority!r} is invalid: expected one of "
                f"{', '.join(PRIORITIES)}"
            )
        self._priority = priority
        self._timeout = None if timeout is None else _seconds("timeout", timeout)
        if tag is not None and (not isinstance(tag, str) or not tag):
            raise ValueError(
                f"poolguard.request tag={repr(tag)[:100]} is invalid: expected a non-empty string"
            )
        self._tag = None if tag is None else _clean_tag(tag)

    def _open(self) -> RequestContext:
        outer = _current.get()
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        if outer is not None and outer.deadline is not None:
            deadline = outer.deadline if deadline is None else min(deadline, outer.deadline)
        tag = self._tag if self._tag is not None or outer is None else outer.tag
        priority = self._priority or (outer.priority if outer is not None else NORMAL)
        limit = self._statement_timeout
        if limit is None and outer is not None:
            limit = outer.statement_timeout
        ctx = RequestContext(deadline, tag, priority, limit)
        ctx._token = _current.set(ctx)
        return ctx

    def _close(self) -> None:
        # The innermost scope of *this* context is the one to close: a with
        # block exits in the context it entered in (one task, one thread).
        ctx = _current.get()
        token = ctx._token if ctx is not None else None
        if ctx is None or token is None:
            raise RuntimeError("poolguard.request: exited a scope that is not open here")
        ctx._token = None
        _current.reset(token)

    def __enter__(self) -> RequestContext:
        return self._open()

    def __exit__(self, *exc_info: object) -> None:
        self._close()

    async def __aenter__(self) -> RequestContext:
        return self._open()

    async def __aexit__(self, *exc_info: object) -> None:
        self._close()

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        # The object itself opens a fresh scope per call: entries do not share state.
        scope = self
        if inspect.iscoroutinefunction(fn):
            afn = cast("Callable[P, Awaitable[Any]]", fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                with scope:
                    return await afn(*args, **kwargs)

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            with scope:
                return fn(*args, **kwargs)

        return wrapper


def _clean_tag(tag: str) -> str:
    if len(tag) > MAX_TAG_CHARS:
        tag = tag[: MAX_TAG_CHARS - 3] + "..."
    if tag.isprintable():
        return tag
    # Control and format characters (newline, ESC, bidi overrides, U+2028...)
    # would forge, hide or reorder log lines.
    return "".join(c if c.isprintable() else "?" for c in tag)
