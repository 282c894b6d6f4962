"""Options: validation with clear messages, environment variables, precedence."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

import poolguard
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
