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
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

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
_RESERVE = "reserve"  # 0, a whole number >= 1, or a share 0 < x < 1
_WAITERS = "waiters"  # int >= 0, or None
_TAGS = "tags"  # mapping tag -> count or share, or None; "a=2,b=0.5" in the environment


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
        reserved_critical: Connections only ``priority="critical"`` requests
            may take: a whole number, or a share of the pool (``0.2``).
        max_waiting_critical: Most ``critical`` requests that may wait at
            once; the next one is shed (``LoadShed``, reason ``queue_full``).
            ``None``: no limit.
        max_waiting_normal: The same for ``normal`` requests.
        max_waiting_background: The same for ``background`` requests (``0``:
            background work never waits).
        codel: Shed queue delay with CoDel: once the shortest acquire wait
            over ``codel_interval`` exceeds ``codel_target`` (a standing
            queue), non-critical requests wait at most ``2 x codel_target``
            (reason ``queue_delay``) and waiters are served newest first.
        codel_target: CoDel's target wait, seconds (Facebook uses 5 ms).
        codel_interval: CoDel's interval, seconds (Facebook uses 100 ms).
        tag_limits: Bulkheads: the most connections one ``request(tag=...)``
            may hold at once, as a count or a share of the pool, e.g.
            ``{"reports": 2, "search": 0.25}``; past it the request is shed
            (reason ``tag_limit``). Environment: ``reports=2,search=0.25``.
        adaptive_limit: Let non-critical requests use only as many
            connections as a Gradient2 limit allows, which shrinks when hold
            times grow (the database slows down) and grows back when they
            recover; the rest wait or are shed as configured.
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
    reserved_critical: float = _opt(0, _RESERVE)
    max_waiting_critical: int | None = _opt(None, _WAITERS)
    max_waiting_normal: int | None = _opt(None, _WAITERS)
    max_waiting_background: int | None = _opt(None, _WAITERS)
    codel: bool = _opt(False, _FLAG)
    codel_target: float = _opt(0.005, _SECONDS)
    codel_interval: float = _opt(0.1, _SECONDS)
    tag_limits: Mapping[str, float] | None = _opt(None, _TAGS)
    adaptive_limit: bool = _opt(False, _FLAG)

    @property
    def policies_on(self) -> bool:
        """Whether any admission policy (shedding, reserve, CoDel, bulkheads) is set."""
        return bool(
            self.reserved_critical
            or self.codel
            or self.tag_limits
            or self.adaptive_limit
            or self.max_waiting_critical is not None
            or self.max_waiting_normal is not None
            or self.max_waiting_background is not None
        )

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
    if value is None and (default is None or kind in (_UTILISATION, _WAITERS, _TAGS)):
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
    return _check_policy(option, kind, value)


def _check_policy(option: str, kind: str, value: Any) -> Any:
    if kind == _RESERVE:
        number = _number(option, value, "0, a whole number of connections, or a share 0 < x < 1")
        if number < 0 or (number >= 1 and not number.is_integer()):
            raise _bad(option, value, "0, a whole number of connections, or a share 0 < x < 1")
        return number
    if kind == _WAITERS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _bad(option, value, "a whole number >= 0, or None")
        return value
    if kind == _TAGS:
        from .policies import check_tag_limits

        if not isinstance(value, Mapping):
            raise _bad(option, value, "a mapping of tag to a count or a share of the pool")
        try:
            return MappingProxyType(check_tag_limits(value))
        except ValueError as exc:
            shown = dict(value)
            raise ValueError(f"poolguard option {option}={shown!r} is invalid: {exc}") from None
    raise AssertionError(kind)


def _parse(kind: str, raw: str, default: Any) -> Any:  # noqa: PLR0911
    if raw.lower() == "none" and (default is None or kind == _UTILISATION):
        return None
    if kind == _NAME:
        return raw
    if kind == _TAGS:
        from .policies import parse_tag_limits

        return parse_tag_limits(raw)
    if kind == _FLAG:
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError("expected true/false, yes/no, on/off or 1/0")
    if kind in (_COUNT, _WAITERS):
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
    try:
        return float(raw)
    except ValueError:
        unit = " of seconds" if kind == _SECONDS else ""
        raise ValueError(f"expected a number{unit}") from None
