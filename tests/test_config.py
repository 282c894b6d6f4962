"""Options: validation with clear messages, environment variables, precedence."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa

import poolguard
from _support import named
from poolguard import Config

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(-1, "acquire_timeout=-1"), (math.inf, "acquire_timeout=inf"), ("3", "acquire_timeout='3'"),
     (True, "acquire_timeout=True"), (math.nan, "acquire_timeout=nan")],
)
def test_bad_acquire_timeout_names_option_value_and_allowed(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="number of seconds") as info:
        Config(acquire_timeout=value)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize("value", ["", "   ", 3])
def test_bad_name(value: object) -> None:
    with pytest.raises(ValueError, match="name=") as info:
        Config(name=value)  # type: ignore[arg-type]
    assert "non-empty string" in str(info.value)


def test_unknown_option_suggests_the_closest(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(TypeError, match="did you mean 'acquire_timeout'"):
        poolguard.wrap(engine, acquire_timout=1)
    assert not isinstance(engine.pool, poolguard.GuardedPoolMixin)


def test_request_timeout_is_validated() -> None:
    with pytest.raises(ValueError, match=r"timeout=-0\.5"):
        poolguard.request(timeout=-0.5)


def test_from_env_reads_prefixed_variables() -> None:
    cfg = Config.from_env({"POOLGUARD_NAME": "auth-db", "POOLGUARD_ACQUIRE_TIMEOUT": "0.75",
                           "POOLGUARD_UNRELATED": "x"})
    assert cfg == Config(name="auth-db", acquire_timeout=0.75)


def test_from_env_treats_empty_as_unset() -> None:
    assert Config.from_env({"POOLGUARD_ACQUIRE_TIMEOUT": " "}) == Config()


@pytest.mark.parametrize(
    ("raw", "fragment"), [("soon", "expected a number"), ("-2", "seconds >= 0")]
)
def test_from_env_bad_value_names_the_variable(raw: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="POOLGUARD_ACQUIRE_TIMEOUT") as info:
        Config.from_env({"POOLGUARD_ACQUIRE_TIMEOUT": raw})
    assert fragment in str(info.value)
    assert repr(raw) in str(info.value)


def test_keyword_beats_environment_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLGUARD_NAME", "from-env")
    monkeypatch.setenv("POOLGUARD_ACQUIRE_TIMEOUT", "2.5")
    engine = poolguard.wrap(sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}"), name="kw")
    guard = poolguard.get_guard(engine)
    assert guard.name == "kw"
    assert guard.acquire_timeout() == 2.5
    engine.dispose()


def test_default_acquire_timeout_is_the_pools_own(tmp_path: Path) -> None:
    engine = poolguard.wrap(
        sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}", pool_timeout=7), config=Config()
    )
    assert poolguard.get_guard(engine).acquire_timeout() == 7
    engine.dispose()


def test_default_name_has_no_credentials() -> None:
    engine = sa.create_engine("postgresql+psycopg://alice:s3cr3t-pw@127.0.0.1:1/orders")
    poolguard.wrap(engine, config=Config())
    name = poolguard.get_guard(engine).name
    assert name == "postgresql:orders"
    assert "s3cr3t" not in repr(poolguard.get_guard(engine))


def test_guarded_poolclass_reads_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POOLGUARD_ACQUIRE_TIMEOUT", "0.25")
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'x.db'}", poolclass=poolguard.GuardedQueuePool, pool_size=2,
        max_overflow=0,
    )
    guard = poolguard.get_guard(engine)
    assert guard.acquire_timeout() == 0.25
    assert guard.gate.capacity == 2
    engine.dispose()


# -- numbers past float's range, objects that are not what the option takes ---------------

HUGE = 10**400  # an int float() cannot hold


@pytest.mark.parametrize(
    ("option", "allowed"),
    [
        ("acquire_timeout", "a finite number of seconds >= 0"),
        ("slow_query_threshold", "a finite number of seconds >= 0"),
        ("codel_target", "a finite number of seconds >= 0"),
        ("breaker_wait_in_open", "a finite number of seconds >= 0"),
        ("query_log_sample_rate", "a number from 0 to 1"),
        ("alert_utilization", "a share of the pool above 0 and at most 1"),
        ("breaker_failure_rate", "a share above 0 and at most 1"),
        ("reserved_critical", "0, a whole number of connections, or a share 0 < x < 1"),
        ("top_queries", "a whole number >= 1; at most 9223372036854775807"),
        ("breaker_window_size", "a whole number >= 1; at most 9223372036854775807"),
        ("max_waiting_normal", "a whole number >= 0, or None; at most 9223372036854775807"),
        ("connect_retries", "a whole number >= 0; at most 9223372036854775807"),
    ],
)
def test_an_int_beyond_float_range_names_option_value_and_range(option: str, allowed: str) -> None:
    with pytest.raises(ValueError, match=f"poolguard option {option}=") as info:
        Config(**{option: HUGE})
    message = str(info.value)
    assert f"expected {allowed}" in message
    assert "<an integer of 401 digits>" in message  # the value, not 401 digits of it


@pytest.mark.parametrize("option", ["tag_limits", "tag_statement_timeouts"])
def test_an_int_beyond_float_range_in_a_tag_mapping_is_refused(option: str) -> None:
    with pytest.raises(ValueError, match=rf"poolguard option {option}\['reports'\]=<an integer"):
        Config(**{option: {"reports": HUGE}})


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("option", ["breaker_slow_call_duration", "retry_budget", "alert_for"])
def test_non_finite_floats_are_refused(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"poolguard option {option}={value!r} is invalid"):
        Config(**{option: value})


def test_huge_finite_acquire_timeout_is_accepted() -> None:
    # Clamped where it is used (the gate), not refused: "wait practically forever".
    assert Config(acquire_timeout=1e10).acquire_timeout == 1e10


@pytest.mark.parametrize(
    "value", ["yes", 3, object(), lambda: True, lambda a, b: True],
    ids=["str", "int", "object", "no-argument", "two-arguments"],
)
def test_bad_breaker_classifier_is_refused_at_wrap(tmp_path: Path, value: object) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match="poolguard option breaker_classifier=") as info:
        poolguard.wrap(engine, breaker=True, breaker_classifier=value)
    assert "a callable taking the exception" in str(info.value)
    assert not isinstance(engine.pool, poolguard.GuardedPoolMixin)


@pytest.mark.parametrize(
    "value", [bool, len, lambda error: False, lambda error, extra=None: True, print],
    ids=["type", "builtin", "lambda", "default-argument", "varargs"],
)
def test_callables_taking_one_argument_are_valid_classifiers(value: object) -> None:
    assert Config(breaker_classifier=value).breaker_classifier is value


@pytest.mark.parametrize("value", ["global", object(), 1])
def test_bad_meter_provider_is_refused_at_wrap(tmp_path: Path, value: object) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(ValueError, match="poolguard option meter_provider=") as info:
        poolguard.wrap(engine, meter_provider=value)
    assert "MeterProvider (an object with get_meter())" in str(info.value)
    assert not isinstance(engine.pool, poolguard.GuardedPoolMixin)


def test_a_meter_provider_is_accepted() -> None:
    from opentelemetry.sdk.metrics import MeterProvider

    provider = MeterProvider()
    try:
        assert Config(meter_provider=provider).meter_provider is provider
    finally:
        provider.shutdown()


@pytest.mark.parametrize(
    ("var", "raw", "fragment"),
    [
        ("POOLGUARD_TOP_QUERIES", "1" + "0" * 400, "at most 9223372036854775807"),
        ("POOLGUARD_ACQUIRE_TIMEOUT", "1e400", "finite number of seconds"),
        ("POOLGUARD_BREAKER_FAILURE_RATE", "nan", "a share above 0 and at most 1"),
    ],
)
def test_from_env_huge_and_non_finite_values_name_the_variable(
    var: str, raw: str, fragment: str
) -> None:
    with pytest.raises(ValueError, match=f"environment variable {var}=") as info:
        Config.from_env({var: raw})
    assert fragment in str(info.value)


# -- a bad POOLGUARD_* variable under poolclass=Guarded...: one clear failure ---------------


def test_guarded_poolclass_with_a_bad_variable_fails_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]],
) -> None:
    monkeypatch.setenv("POOLGUARD_ACQUIRE_TIMEOUT", "5s")
    monkeypatch.setenv("POOLGUARD_NAME", "from-env")
    engine = sa.create_engine(
        f"sqlite:///{tmp_path / 'x.db'}", poolclass=poolguard.GuardedQueuePool, pool_size=2,
        max_overflow=0,
    )
    try:
        with pytest.raises(ValueError, match="POOLGUARD_ACQUIRE_TIMEOUT='5s'") as info:
            engine.connect()
        assert "expected a number of seconds" in str(info.value)
        with engine.connect() as conn:  # the next checkout works, the variable still bad
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
        # Nor is the environment parsed again.
        monkeypatch.setenv("POOLGUARD_ACQUIRE_TIMEOUT", "0.25")
        for _ in range(3):
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
        guard = poolguard.get_guard(engine)
        assert guard.name == "from-env"  # the good variables still apply
        assert guard.config.acquire_timeout is None  # the bad one does not
        assert guard.stats().permits == 0
        invalid = named(events, "config.invalid")
        assert len(invalid) == 1
        assert invalid[0]["level"] == "error"
    finally:
        engine.dispose()
