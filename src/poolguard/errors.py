"""Exceptions raised by poolguard.

Every error that means "you got no connection" also subclasses
:class:`sqlalchemy.exc.TimeoutError`, so ``except sqlalchemy.exc.TimeoutError``
clauses written for plain SQLAlchemy keep catching them.
"""

from __future__ import annotations

import sqlalchemy.exc

__all__ = [
    "CircuitOpen",
    "DeadlineExceeded",
    "LoadShed",
    "PoolTimeout",
    "PoolerSaturated",
    "PoolguardError",
    "Rejected",
    "StatementTimeout",
]


class PoolguardError(Exception):
    """Base class of every exception poolguard raises on purpose."""


class _NoConnection(PoolguardError, sqlalchemy.exc.TimeoutError):
    """An error that means "you got no connection", its details as attributes."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.__dict__.update(details)

    def __reduce__(self) -> tuple[object, ...]:
        # SQLAlchemyError pickles through its positional args only; keep the rest.
        return (_rebuild, (type(self), str(self.args[0]), dict(self.__dict__)))


class PoolTimeout(_NoConnection):
    """No connection could be acquired before the acquire timeout ran out.

    The message names the pool and its numbers at the moment of the timeout.
    """

    pool_name: str
    timeout: float
    in_use: int
    capacity: int | None
    waiting: int

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
        super().__init__(message, pool_name=pool_name, timeout=timeout, in_use=in_use,
                         capacity=capacity, waiting=waiting)


class PoolerSaturated(PoolTimeout, sqlalchemy.exc.OperationalError):
    """PgBouncer (the pooler in front of the database) is saturated: its queue
    timed out (``query_wait_timeout``) or it refused the client
    (``max_client_conn``). Not a database failure: the breaker does not count it.

    A :class:`PoolTimeout` (so a ``sqlalchemy.exc.TimeoutError``) and still a
    ``sqlalchemy.exc.OperationalError``, what plain SQLAlchemy raised for it
    (``.orig`` is the driver's error). ``timeout`` is the time the client
    waited; ``pooler`` is the pooler's ``host:port``; ``error`` what it said.
    """

    message: str
    pooler: str
    error: str
    retry_after: float

    def __init__(
        self,
        message: str,
        *,
        pool_name: str,
        pooler: str,
        error: str,
        timeout: float,
        in_use: int,
        capacity: int | None,
        waiting: int,
        retry_after: float,
        orig: BaseException | None = None,
        statement: str | None = None,
    ) -> None:
        sqlalchemy.exc.OperationalError.__init__(
            self, statement, None, orig if orig is not None else Exception(message)
        )
        self.args = (message,)
        # OperationalError.__init__ took the place of _NoConnection's: set the details alike.
        self.__dict__.update(
            message=message, pool_name=pool_name, pooler=pooler, error=error, timeout=timeout,
            in_use=in_use, capacity=capacity, waiting=waiting, retry_after=retry_after,
        )

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


class Rejected(_NoConnection):
    """A checkout turned away at once, without waiting, by a policy.

    Attributes:
        reason: why (``queue_full``, ``queue_delay``, ``tag_limit``,
            ``health_busy``; later also ``circuit_open``).
        priority: the request's priority.
        retry_after: seconds after which a retry has a fair chance.
        pool_name: the pool's name.
    """

    reason: str
    priority: str
    retry_after: float
    pool_name: str

    def __init__(
        self, message: str, *, reason: str, priority: str, retry_after: float, pool_name: str
    ) -> None:
        super().__init__(message, reason=reason, priority=priority, retry_after=retry_after,
                         pool_name=pool_name)


class LoadShed(Rejected):
    """Shed to keep the pool for work that can still succeed (see ``reason``)."""


class CircuitOpen(Rejected):
    """The circuit breaker is open: the database is in trouble, so the checkout
    fails at once without dialing it (``reason`` is ``circuit_open``)."""


class DeadlineExceeded(PoolguardError, sqlalchemy.exc.TimeoutError):
    """The request's deadline (``poolguard.request(timeout=...)``) has passed.

    Raised before a checkout or a statement that would start after the
    deadline, and for a statement cut off by the client-side watchdog
    (whose connection is then discarded).
    """


class StatementTimeout(PoolguardError, sqlalchemy.exc.OperationalError):
    """The database cancelled a statement at its time limit.

    Still a ``sqlalchemy.exc.OperationalError`` (and ``.orig`` is the
    driver's error). Bound parameters are never part of it. The connection
    stays usable once its transaction is rolled back.
    """

    def __init__(self, statement: str | None, orig: BaseException, limit: float) -> None:
        sqlalchemy.exc.OperationalError.__init__(self, statement, None, orig)
        self.limit = limit

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.statement, self.orig, self.limit))

    def __str__(self) -> str:
        return f"statement cancelled at its {self.limit:.3f}s time limit: {self.statement}"


def _rebuild(cls: type[PoolguardError], message: str, attrs: dict[str, object]) -> PoolguardError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(attrs)
    return error
