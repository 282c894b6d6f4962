"""``poolguard.fallback``: serve a degraded answer instead of an error.

When the pool sheds a request or cannot serve it in time, a page can often
still answer: from a cache, with a default, without the optional part.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast, overload

from .errors import PoolTimeout, Rejected

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from types import TracebackType

__all__ = ["fallback"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_log = logging.getLogger("poolguard")

#: What "the database could not be had" means by default.
DEFAULT_ON: tuple[type[BaseException], ...] = (Rejected, PoolTimeout)


class fallback(Generic[T]):  # noqa: N801 - used like a function
    """Catch "no connection" errors and serve a fallback instead.

    As a decorator, the function returns ``value`` (or ``factory()``, called
    with the function's arguments) when it raises one of ``on``. As a
    context manager it suppresses those errors and records them::

        @poolguard.fallback([])                      # a default
        def recommendations(user_id): ...

        @poolguard.fallback(factory=lambda user_id: cache.get(user_id))
        async def profile(user_id): ...

        with poolguard.fallback() as fb:
            extra = load_optional_part()
        if fb.triggered: ...

    Args:
        value: returned instead of the error.
        factory: called with the wrapped function's arguments to build the
            fallback (wins over ``value``).
        on: exception types that trigger the fallback; by default
            ``poolguard.Rejected`` and ``poolguard.PoolTimeout``. Other errors
            always propagate.
    """

    def __init__(
        self,
        value: T | None = None,
        *,
        factory: Callable[..., T] | None = None,
        on: tuple[type[BaseException], ...] = DEFAULT_ON,
    ) -> None:
        if not on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise ValueError(f"poolguard.fallback on={on!r} is invalid: expected exception types")
        self.value = value
        self.factory = factory
        self.on = on
        #: The error that triggered the fallback (context manager use).
        self.error: BaseException | None = None

    @property
    def triggered(self) -> bool:
        """Whether the block raised one of ``on`` (context manager use)."""
        return self.error is not None

    def __enter__(self) -> fallback[T]:
        self.error = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is not None and isinstance(exc, self.on):
            self.error = exc
            _log.info("fallback served instead of %s", type(exc).__name__)
            return True
        return False

    def _substitute(self, error: BaseException, args: Any, kwargs: Any) -> T:
        _log.info("fallback served instead of %s", type(error).__name__)
        if self.factory is not None:
            return self.factory(*args, **kwargs)
        return cast("T", self.value)

    @overload
    def __call__(self, fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | T]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R | T]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        on = self.on
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except on as error:
                    return self._substitute(error, args, kwargs)

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return fn(*args, **kwargs)
            except on as error:
                return self._substitute(error, args, kwargs)

        return wrapper
