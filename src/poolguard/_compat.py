"""The few SQLAlchemy internals poolguard needs, in one place, for 2.0 and 2.1."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

# `await_only` exists under this name in 2.0 and 2.1 (2.1 adds `await_`): it
# suspends the greenlet SQLAlchemy runs pool code in and lets the event loop
# await the awaitable, which is how a sync pool method waits without blocking
# the loop.
from sqlalchemy.util import await_only as _await_only

if TYPE_CHECKING:
    from collections.abc import Awaitable

T = TypeVar("T")

__all__ = ["await_only"]


def await_only(awaitable: Awaitable[T]) -> T:
    """Await from inside SQLAlchemy's greenlet (see module docstring)."""
    return _await_only(awaitable)
