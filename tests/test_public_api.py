"""The public surface: what `import poolguard` offers, and how errors relate."""

from __future__ import annotations

import pickle

import pytest
import sqlalchemy.exc

import poolguard

EXPECTED = {
    "wrap", "unwrap", "get_guard", "Config", "Guard", "request", "fallback", "current_request",
    "RequestContext", "PoolStats", "QueryStats", "HistogramSnapshot", "Holder", "HolderGroup",
    "PgBouncerStats",
    "AlertEvent", "PoolguardError", "Rejected", "LoadShed", "CircuitOpen",
    "StatementTimeout", "DeadlineExceeded", "PoolTimeout", "PoolerSaturated", "GuardedPoolMixin",
    "GuardedQueuePool", "GuardedAsyncAdaptedQueuePool", "GuardedNullPool", "GuardedStaticPool",
    "GuardedSingletonThreadPool", "guarded_class",
}


def test_all_is_exactly_the_public_surface() -> None:
    assert set(poolguard.__all__) == EXPECTED
    for name in poolguard.__all__:
        assert getattr(poolguard, name) is not None


def test_pool_timeout_keeps_existing_handlers_working() -> None:
    assert issubclass(poolguard.PoolTimeout, sqlalchemy.exc.TimeoutError)
    assert issubclass(poolguard.PoolTimeout, sqlalchemy.exc.SQLAlchemyError)
    assert issubclass(poolguard.PoolTimeout, poolguard.PoolguardError)


def test_pool_timeout_pickles_with_its_numbers() -> None:
    error = poolguard.PoolTimeout(
        "pool 'p': no connection", pool_name="p", timeout=0.5, in_use=3, capacity=3, waiting=2
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is poolguard.PoolTimeout
    assert (copy.pool_name, copy.timeout, copy.in_use, copy.capacity, copy.waiting) == (
        "p", 0.5, 3, 3, 2
    )
    assert str(copy) == str(error)


def test_request_nesting_only_shortens_the_budget() -> None:
    assert poolguard.current_request() is None
    with poolguard.request(timeout=10) as outer:
        assert outer.deadline is not None
        with poolguard.request(timeout=60) as inner:
            assert inner.deadline == outer.deadline
        with poolguard.request(timeout=0.5) as short:
            assert short.deadline is not None
            assert short.deadline < outer.deadline
        assert poolguard.current_request() is outer
    assert poolguard.current_request() is None


def test_request_tag_is_inherited_unless_overridden() -> None:
    with poolguard.request(tag="login") as outer:
        assert outer.tag == "login"
        with poolguard.request(timeout=1) as inner:
            assert inner.tag == "login"
        with poolguard.request(tag="audit") as other:
            assert other.tag == "audit"


def test_request_rejects_an_empty_tag() -> None:
    with pytest.raises(ValueError, match="tag=''"):
        poolguard.request(tag="")


def test_request_as_decorator_opens_a_fresh_scope_per_call() -> None:
    seen = []

    @poolguard.request(timeout=5)
    def handler() -> None:
        ctx = poolguard.current_request()
        assert ctx is not None
        seen.append(ctx)

    handler()
    handler()
    assert len(seen) == 2
    assert seen[0] is not seen[1]
    assert poolguard.current_request() is None


async def test_request_as_async_decorator() -> None:
    @poolguard.request(timeout=5)
    async def handler() -> float | None:
        ctx = poolguard.current_request()
        return None if ctx is None else ctx.remaining()

    left = await handler()
    assert left is not None
    assert 0 < left <= 5
    assert poolguard.current_request() is None
