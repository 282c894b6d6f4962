"""Guard options: one validated, immutable :class:`Config`.

Options come from keyword arguments of :func:`poolguard.wrap` and from
``POOLGUARD_*`` environment variables; a keyword argument wins over the
environment, the environment wins over the default. Every value is checked
when it is given, and a bad one raises :class:`ValueError` naming the option,
the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["ENV_PREFIX", "Config"]

ENV_PREFIX = "POOLGUARD_"


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of one guard.

    Attributes:
        name: The pool's name in stats, errors and logs. ``None`` derives one
            from the engine's URL (backend and database, never credentials).
        acquire_timeout: Longest time in seconds a checkout waits for a
            connection before :class:`poolguard.PoolTimeout`. ``None`` keeps
            the pool's own ``pool_timeout`` (30 s unless configured), so a
            guard adopted blind rejects nothing plain SQLAlchemy would have
            served. ``0`` means never wait.
    """

    name: str | None = None
    acquire_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise _bad("name", self.name, "a non-empty string, or None")
        if self.acquire_timeout is not None:
            object.__setattr__(
                self, "acquire_timeout", _seconds("acquire_timeout", self.acquire_timeout)
            )

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The names of all options, as accepted by :func:`poolguard.wrap`."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, base: Config | None = None, **options: Any) -> Config:
        """Return ``base`` (default: :meth:`from_env`) with ``options`` applied."""
        check_option_names(options)
        return dataclasses.replace(base if base is not None else cls.from_env(), **options)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build a config from ``POOLGUARD_<OPTION>`` variables (upper case).

        An empty variable counts as unset. Unknown ``POOLGUARD_*`` variables are
        ignored, so that other tools may share the prefix.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            var = ENV_PREFIX + field.name.upper()
            raw = env.get(var, "").strip()
            if not raw:
                continue
            value: Any = raw if field.name == "name" else _parse_float(var, raw)
            try:
                cls(**{field.name: value})
            except ValueError as exc:
                raise ValueError(f"environment variable {var}={raw!r}: {exc}") from None
            values[field.name] = value
        return cls(**values)


def check_option_names(options: Mapping[str, Any]) -> None:
    """Raise :class:`TypeError` for an option name :class:`Config` does not know."""
    known = Config.option_names()
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"unknown poolguard option {key!r}{hint}; allowed: {', '.join(sorted(known))}"
            )


def _bad(option: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"poolguard option {option}={value!r} is invalid: expected {allowed}")


def _seconds(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(option, value, "a number of seconds >= 0, or None")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise _bad(option, value, "a finite number of seconds >= 0, or None")
    return seconds


def _parse_float(var: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(
            f"environment variable {var}={raw!r} is invalid: expected a number of seconds"
        ) from None
