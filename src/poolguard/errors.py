"""Exceptions raised by poolguard.

Every error that means "you got no connection" also subclasses
:class:`sqlalchemy.exc.TimeoutError`, so ``except sqlalchemy.exc.TimeoutError``
clauses written for plain SQLAlchemy keep catching them.
"""

from __future__ import annotations

import sqlalchemy.exc

__all__ = ["PoolTimeout", "PoolguardError"]


class PoolguardError(Exception):
    """Base class of every exception poolguard raises on purpose."""


class PoolTimeout(PoolguardError, sqlalchemy.exc.TimeoutError):
    """No connection could be acquired before the acquire timeout ran out.

    The message names the pool and its numbers at the moment of the timeout.
    """

    def __init__(
        self,
        message: str,
        *,
        pool_name: str,
        timeout: float,
        in_use: int,
        capacity: int | None,
        waiting: int,
    ) -> None:
        super().__init__(message)
        self.pool_name = pool_name
        self.timeout = timeout
        self.in_use = in_use
        self.capacity = capacity
        self.waiting = waiting

    def __reduce__(self) -> tuple[object, ...]:
        # SQLAlchemyError pickles through its positional args only; keep the rest.
        return (_rebuild, (type(self), str(self.args[0]), dict(self.__dict__)))


def _rebuild(cls: type[PoolTimeout], message: str, attrs: dict[str, object]) -> PoolTimeout:
    error = cls.__new__(cls)
    PoolguardError.__init__(error, message)
    error.__dict__.update(attrs)
    return error
