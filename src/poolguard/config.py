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

# Kinds of option values: how each is checked and parsed from the environment.
_NAME = "name"
_SECONDS = "seconds"  # float >= 0, or None where the default is None
_FRACTION = "fraction"  # float in [0, 1]
_UTILISATION = "utilisation"  # float in (0, 1], or None
_COUNT = "count"  # int >= 1
_FLAG = "flag"  # bool
_OBJECT = "object"  # not from the environment


def _opt(default: Any, kind: str) -> Any:
    return dataclasses.field(default=default, metadata={"kind": kind})


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of one guard.

    Attributes:
        name: The pool's name in stats, errors, logs and metrics
            (``db.client.connection.pool.name``). ``None`` derives one from
            the engine's URL (backend and database, never credentials).
        acquire_timeout: Longest time in seconds a checkout waits for a
            connection before :class:`poolguard.PoolTimeout`. ``None`` keeps
            the pool's own ``pool_timeout`` (30 s unless configured), so a
            guard adopted blind rejects nothing plain SQLAlchemy would have
            served. ``0`` means never wait.
        slow_query_threshold: A statement running at least this many seconds
            logs ``query.slow`` at WARNING. ``None`` turns that off.
        query_log_sample_rate: Share (0 to 1) of the other statements that log
            ``query`` at DEBUG, when DEBUG is enabled for poolguard.
        log_parameters: Put bound parameter values in query events. Off by
            default: values can be personal data or secrets.
        leak_threshold: A connection held longer than this many seconds logs
            one ``connection.held_too_long`` warning with where it was taken
            and what it runs. ``None`` (the default) turns that off.
        capture_call_sites: Record the application frame that checked each
            connection out (a short stack walk per checkout). Without it the
            holders report shows where each holder's thread or task is now.
        alert_utilization: Share of the pool's capacity in use that raises
            ``alert.utilization`` (and a holders report) once it has lasted
            ``alert_for`` seconds. ``None`` turns the alert off.
        alert_wait_time: Longest acquire wait, in seconds, within a second
            that raises ``alert.wait_time`` once it has lasted ``alert_for``.
            ``None`` turns the alert off.
        alert_for: Seconds a condition must hold before an alert fires, and
            must be clear (below 80% of its threshold) before it clears.
        top_queries: Most statement shapes tracked; the rest count as
            ``(other)``.
        explain_slow_queries: The first time a statement shape is slow, run
            ``EXPLAIN`` on it (PostgreSQL, MariaDB/MySQL, SQLite) and log the
            plan, flagging full scans. Runs the statement's plan, never the
            statement; off by default.
        metrics: Register OpenTelemetry instruments (through
            ``opentelemetry-api``; nothing is exported unless the application
            installs an SDK ``MeterProvider``).
        metrics_legacy_names: Also emit the older ``db.client.connections.*``
            metric names (milliseconds, ``pool.name``/``state`` attributes).
        meter_provider: The ``MeterProvider`` to use instead of the global one.
    """

    name: str | None = _opt(None, _NAME)
    acquire_timeout: float | None = _opt(None, _SECONDS)
    slow_query_threshold: float | None = _opt(1.0, _SECONDS)
    query_log_sample_rate: float = _opt(1.0, _FRACTION)
    log_parameters: bool = _opt(False, _FLAG)
    leak_threshold: float | None = _opt(None, _SECONDS)
    capture_call_sites: bool = _opt(False, _FLAG)
    alert_utilization: float | None = _opt(0.9, _UTILISATION)
    alert_wait_time: float | None = _opt(0.5, _SECONDS)
    alert_for: float = _opt(5.0, _SECONDS)
    top_queries: int = _opt(200, _COUNT)
    explain_slow_queries: bool = _opt(False, _FLAG)
    metrics: bool = _opt(True, _FLAG)
    metrics_legacy_names: bool = _opt(False, _FLAG)
    meter_provider: Any = dataclasses.field(default=None, metadata={"kind": _OBJECT})

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _check(field.name, field.metadata["kind"], value, field.default)
            if checked is not value:
                object.__setattr__(self, field.name, checked)

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

        An empty variable counts as unset; ``none`` sets an option that may be
        ``None`` to ``None``. Unknown ``POOLGUARD_*`` variables are ignored, so
        that other tools may share the prefix.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            kind = field.metadata["kind"]
            var = ENV_PREFIX + field.name.upper()
            raw = env.get(var, "").strip()
            if not raw or kind == _OBJECT:
                continue
            try:
                value = _parse(kind, raw, field.default)
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


def _number(option: str, value: object, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(option, value, allowed)
    return float(value)


def _seconds(option: str, value: object) -> float:
    seconds = _number(option, value, "a finite number of seconds >= 0")
    if seconds < 0:
        raise _bad(option, value, "a finite number of seconds >= 0")
    return seconds


def _check(option: str, kind: str, value: Any, default: Any) -> Any:  # noqa: PLR0911, PLR0912
    if kind == _OBJECT:
        return value
    if value is None and (default is None or kind == _UTILISATION):
        return None
    if kind == _NAME:
        if not isinstance(value, str) or not value.strip():
            raise _bad(option, value, "a non-empty string, or None")
        return value
    if kind == _SECONDS:
        allowed = " or None" if default is None else ""
        if value is None:
            raise _bad(option, value, f"a finite number of seconds >= 0{allowed}")
        return _seconds(option, value)
    if kind == _FRACTION:
        number = _number(option, value, "a number from 0 to 1")
        if not 0 <= number <= 1:
            raise _bad(option, value, "a number from 0 to 1")
        return number
    if kind == _UTILISATION:
        number = _number(option, value, "a share of the pool above 0 and at most 1, or None")
        if not 0 < number <= 1:
            raise _bad(option, value, "a share of the pool above 0 and at most 1, or None")
        return number
    if kind == _COUNT:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(option, value, "a whole number >= 1")
        return value
    if kind == _FLAG:
        if not isinstance(value, bool):
            raise _bad(option, value, "True or False")
        return value
    raise AssertionError(kind)


def _parse(kind: str, raw: str, default: Any) -> Any:
    if raw.lower() == "none" and (default is None or kind == _UTILISATION):
        return None
    if kind == _NAME:
        return raw
    if kind == _FLAG:
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError("expected true/false, yes/no, on/off or 1/0")
    if kind == _COUNT:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
    try:
        return float(raw)
    except ValueError:
        unit = " of seconds" if kind == _SECONDS else ""
        raise ValueError(f"expected a number{unit}") from None
