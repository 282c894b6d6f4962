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
import inspect
import math
import os
import sys
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
_RATE = "rate"  # float in (0, 1]
_INT0 = "int0"  # int >= 0
_WINDOW = "window"  # "count" or "time"
_POOLER = "pooler"  # "auto", "transaction", "session" or "none"
_TAG_SECONDS = "tag_seconds"  # mapping tag -> seconds > 0, or None
_TAGS = "tags"  # mapping tag -> count or share, or None; "a=2,b=0.5" in the environment
_FLEET_TAGS = "fleet_tags"  # mapping tag -> whole number >= 1, or None; "a=5,b=2" in env
_ADMIN_URL = "admin_url"  # "auto", a postgresql:// URL of PgBouncer's admin console, or None
_INTERVAL = "interval"  # seconds, 0.1 to 3600


def _opt(default: Any, kind: str, *, nullable: bool = False, shown: bool = True) -> Any:
    # nullable: None is allowed (it turns the feature off) though the default is not None.
    # shown=False: not in repr() (a URL with a password).
    return dataclasses.field(
        default=default, repr=shown, metadata={"kind": kind, "nullable": nullable})


def _default(field: dataclasses.Field[Any]) -> Any:
    """The default as _check and _parse see it: None where the option may be None."""
    return None if field.metadata.get("nullable") else field.default


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
            ``query`` at DEBUG, when DEBUG is enabled for poolguard. ``0``
            (the default) logs none: a per-statement event is something to
            turn on (``1.0`` for every statement), not a default, since
            structlog set up without a level filter passes DEBUG on.
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
        meter_provider: The OpenTelemetry ``MeterProvider`` to use instead of
            the global one (any object with ``get_meter()``).
        reserved_critical: Connections kept for ``priority="critical"``
            requests: a whole number, or a share of the pool (``0.2``).
            Other requests never take the last ones free, less those
            critical requests hold already: a guarantee, not headroom kept
            idle beside critical work that holds its share.
        max_waiting_critical: Most ``critical`` requests that may wait at
            once; the next one is shed (``LoadShed``, reason ``queue_full``).
            ``None``: no limit.
        max_waiting_normal: The same for ``normal`` requests.
        max_waiting_background: The same for ``background`` requests (``0``:
            background work never waits).
        codel: Shed queue delay with CoDel: once the shortest non-critical
            acquire wait over ``codel_interval`` exceeds ``codel_target`` (a standing
            queue), non-critical requests wait at most ``2 x codel_target``
            (reason ``queue_delay``) and waiters are served newest first.
        codel_target: CoDel's target wait, seconds (Facebook uses 5 ms).
        codel_interval: CoDel's interval, seconds (Facebook uses 100 ms).
        tag_limits: Bulkheads: the most connections one ``request(tag=...)``
            may hold at once, as a count or a share of the pool, e.g.
            ``{"reports": 2, "search": 0.25}``; past it the request is shed
            (reason ``tag_limit``). Environment: ``reports=2,search=0.25``.
        breaker: Turn the circuit breaker on (see :mod:`poolguard.breaker`):
            while open, checkouts raise :class:`poolguard.CircuitOpen` at once
            and never dial the database.
        breaker_window: ``"count"`` (the last ``breaker_window_size`` calls)
            or ``"time"`` (the last ``breaker_window_size`` seconds).
        breaker_window_size: Calls, or seconds, in the sliding window.
        breaker_minimum_calls: Calls the window must hold before it can open.
        breaker_failure_rate: Share of failed calls (0 < x <= 1) that opens it.
        breaker_slow_call_rate: Share of slow calls (0 < x <= 1) that opens it.
        breaker_slow_call_duration: Seconds from which a statement is slow.
        breaker_wait_in_open: Seconds open before letting probes through.
        breaker_half_open_calls: Probes let through while half-open.
        breaker_classifier: ``callable(exception) -> bool``, whether an error
            is a failure; default :func:`poolguard.breaker.default_classifier`
            (connect failures, disconnects, timeouts yes; integrity and
            programming errors no). It receives SQLAlchemy's exception (a
            driver error wrapped as ``sqlalchemy.exc.OperationalError`` and
            the like, the driver's own in ``.orig``) or a poolguard one. If
            it raises, the database error still propagates, the classifier's
            error is logged once, and the default classifier decides.
        breaker_per_tag: Give every ``request(tag=...)`` its own breaker with
            the ``breaker_*`` settings (the first 100 tags; with or without
            ``breaker``): with ``breaker_slow_call_duration`` and
            ``breaker_slow_call_rate`` it sheds one slow query shape's tag
            (:class:`poolguard.CircuitOpen`) while the other tags are served.
            A tag's breaker counts its statements, not its checkouts that
            timed out waiting for the pool (the victims of another's).
        connect_retries: Retries of a failed connection set-up (transient
            errors only, exponential backoff with jitter, never past the
            request's deadline nor the acquire timeout); ``0`` turns
            retries off.
        retry_budget: Retries allowed per checkout (0.1: at most one retry
            per ten checkouts, plus a small burst), so that retries never
            multiply the load during an outage.
        statement_timeout: Time limit (seconds) of every statement, enforced
            by the database (see :mod:`poolguard._timeouts`); ``None`` or
            ``0``: none. Counted in whole milliseconds (at least 1) and
            clamped to what the database accepts.
        tag_statement_timeouts: Time limits by request tag, e.g.
            ``{"login": 0.5}``; they win over ``statement_timeout``.
        deadline_floor: The least time a statement gets when a request's
            deadline is near (seconds).
        pooler: The connection pooler in front of PostgreSQL (PgBouncer,
            RDS Proxy, ...): ``"auto"`` finds out on the first connection
            whether there is one (not its pool mode); ``"transaction"`` or
            ``"session"`` says there is one and how it pools; ``"none"``
            says there is none (no probe).
        isolate_culprits: Isolate the culprit nobody named: while the pool
            is under pressure (a standing queue, a pool at capacity, sheds or
            timeouts), the statement shape (else the request tag) that holds
            at least ``culprit_share`` of the recent connection-seconds and
            runs several times slower than everything else is isolated: its
            statements raise :class:`poolguard.LoadShed` (reason ``culprit``)
            before they are sent, in every request, critical ones included
            (an isolated tag's non-critical checkouts are shed). Lifted
            gradually once the pressure is gone. Never isolates anything
            when every statement is slow alike.
        culprit_share: The least share (0 < x <= 1) of the pool's recent
            connection-seconds a culprit holds.
        adaptive_limit: Let non-critical requests use only as many
            connections as a Gradient2 limit allows, which shrinks when hold
            times grow (the database slows down) and grows back when they
            recover; the rest wait or are shed as configured.
        pgbouncer_admin_url: Read PgBouncer's own numbers (``SHOW POOLS``,
            ``SHOW STATS``, ``SHOW CONFIG``) from its admin console on a
            thread of the guard's, off the request path: a URL such as
            ``postgresql://stats:secret@pgbouncer:6432/pgbouncer``, or
            ``"auto"`` for the engine's own host, port, user and password
            with the database ``pgbouncer`` (the user must be in PgBouncer's
            ``stats_users`` or ``admin_users``). ``None``: off.
        pgbouncer_poll_interval: Seconds between two reads of the admin
            console (0.1 to 3600).
        replicas: How many replicas (processes) of the service share the
            database: the divisor of the fleet budgets.
            ``POOLGUARD_REPLICAS`` sets it from the deployment.
        server_connections: The server connections the pooler keeps for
            the database, for the whole fleet (PgBouncer's ``pool_size`` or
            ``default_pool_size``). ``None``: read from its admin console
            when ``pgbouncer_admin_url`` is set; else, behind a pooler that
            may pool by transaction with ``replicas`` set, read once by the
            guard itself with the engine's credentials, off the request path
            (``fleet.server_connections`` says what came of it). With
            ``replicas`` and a pooler that pools by transaction, fewer of
            them than ``replicas`` x the pool turns on the fair share: each
            replica's share of server connections is divided among the
            request tags using it (see ``docs/resilience.md``).
        fleet_tag_limits: Bulkheads for the whole fleet, in server
            connections, e.g. ``{"report": 5}``: each replica may hold
            ``max(1, floor(5 / replicas))`` for the tag, so the fleet never
            holds more than 5 (unless there are more replicas than
            connections: then 1 each, and ``fleet.budget`` warns). They win
            over ``tag_limits`` for the tags they name. Needs ``replicas``.
        fleet_reserved_critical: Connections of the whole fleet only
            ``critical`` requests may take: each replica reserves
            ``ceil(n / replicas)`` (at least the budget in all). Wins over
            ``reserved_critical``. Needs ``replicas``.
    """

    name: str | None = _opt(None, _NAME)
    acquire_timeout: float | None = _opt(None, _SECONDS)
    slow_query_threshold: float | None = _opt(1.0, _SECONDS, nullable=True)
    query_log_sample_rate: float = _opt(0.0, _FRACTION)
    log_parameters: bool = _opt(False, _FLAG)
    leak_threshold: float | None = _opt(None, _SECONDS)
    capture_call_sites: bool = _opt(False, _FLAG)
    alert_utilization: float | None = _opt(0.9, _UTILISATION)
    alert_wait_time: float | None = _opt(0.5, _SECONDS, nullable=True)
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
    statement_timeout: float | None = _opt(None, _SECONDS)
    tag_statement_timeouts: Mapping[str, float] | None = _opt(None, _TAG_SECONDS)
    deadline_floor: float = _opt(0.01, _SECONDS)
    pooler: str = _opt("auto", _POOLER)
    breaker: bool = _opt(False, _FLAG)
    breaker_window: str = _opt("count", _WINDOW)
    breaker_window_size: int = _opt(50, _COUNT)
    breaker_minimum_calls: int = _opt(10, _COUNT)
    breaker_failure_rate: float = _opt(0.5, _RATE)
    breaker_slow_call_rate: float = _opt(1.0, _RATE)
    breaker_slow_call_duration: float = _opt(5.0, _SECONDS)
    breaker_wait_in_open: float = _opt(5.0, _SECONDS)
    breaker_half_open_calls: int = _opt(3, _COUNT)
    breaker_classifier: Any = dataclasses.field(default=None, metadata={"kind": _OBJECT})
    breaker_per_tag: bool = _opt(False, _FLAG)
    isolate_culprits: bool = _opt(False, _FLAG)
    culprit_share: float = _opt(0.5, _RATE)
    connect_retries: int = _opt(2, _INT0)
    retry_budget: float = _opt(0.1, _FRACTION)
    pgbouncer_admin_url: str | None = _opt(None, _ADMIN_URL, shown=False)
    pgbouncer_poll_interval: float = _opt(5.0, _INTERVAL)
    replicas: int | None = _opt(None, _COUNT)
    server_connections: int | None = _opt(None, _COUNT)
    fleet_tag_limits: Mapping[str, int] | None = _opt(None, _FLEET_TAGS)
    fleet_reserved_critical: int = _opt(0, _INT0)

    @property
    def policies_on(self) -> bool:
        """Whether any admission policy (shedding, reserve, CoDel, bulkheads) is set."""
        return bool(
            self.reserved_critical
            or self.codel
            or self.tag_limits
            or self.fleet_tag_limits
            or self.fleet_reserved_critical
            or self.adaptive_limit
            or self.max_waiting_critical is not None
            or self.max_waiting_normal is not None
            or self.max_waiting_background is not None
        )

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _check(field.name, field.metadata["kind"], value, _default(field))
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
        config = dataclasses.replace(base if base is not None else cls.from_env(), **options)
        config.check_fleet()
        return config

    def check_fleet(self) -> None:
        """Raise :class:`ValueError` for a fleet budget without a replica count."""
        for option in ("fleet_tag_limits", "fleet_reserved_critical"):
            if getattr(self, option) and self.replicas is None:
                raise ValueError(
                    f"poolguard option {option} is a budget for the whole fleet: it needs "
                    "replicas=N (or POOLGUARD_REPLICAS), the number of replicas sharing it"
                )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build a config from ``POOLGUARD_<OPTION>`` variables (upper case).

        An empty variable counts as unset; ``none`` sets an option that may be
        ``None`` to ``None``. Unknown ``POOLGUARD_*`` variables are ignored, so
        that other tools may share the prefix. A bad value raises
        :class:`ValueError` naming the variable.
        """
        config, errors = cls._from_env(environ)
        if errors:
            raise errors[0]
        return config

    @classmethod
    def _from_env(
        cls, environ: Mapping[str, str] | None = None
    ) -> tuple[Config, list[ValueError]]:
        # The config of the good variables, and one error per bad one.
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        errors: list[ValueError] = []
        for field in dataclasses.fields(cls):
            kind = field.metadata["kind"]
            var = ENV_PREFIX + field.name.upper()
            raw = env.get(var, "").strip()
            if not raw or kind == _OBJECT:
                continue
            try:
                value = _parse(kind, raw, _default(field))
                cls(**{field.name: value})
            except ValueError as exc:
                shown = _hide_password(raw) if kind == _ADMIN_URL else raw
                errors.append(ValueError(f"environment variable {var}={shown!r}: {exc}"))
                continue
            values[field.name] = value
        config = cls(**values)
        try:
            config.check_fleet()
        except ValueError as exc:
            errors.append(exc)
            config = dataclasses.replace(config, fleet_tag_limits=None, fleet_reserved_critical=0)
        return config, errors


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


#: The largest whole number an option takes (a C ``Py_ssize_t``): beyond it
#: counts stop being counts and turn into OverflowErrors far from the option.
_MAX_WHOLE = sys.maxsize


def _show(value: object) -> str:
    # A huge int printed whole would be a 400-digit error message (or, past
    # 4300 digits, a ValueError of its own from int-to-str conversion).
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        digits = int(math.log10(abs(value))) + 1
        return f"{'-' if value < 0 else ''}<an integer of {digits} digits>"
    return repr(value)


def _bad(option: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"poolguard option {option}={_show(value)} is invalid: expected {allowed}")


def _number(option: str, value: object, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(option, value, allowed)
    try:
        number = float(value)  # an int beyond float's range overflows here
    except OverflowError:
        raise _bad(option, value, allowed) from None
    if not math.isfinite(number):
        raise _bad(option, value, allowed)
    return number


def _seconds(option: str, value: object) -> float:
    seconds = _number(option, value, "a finite number of seconds >= 0")
    if seconds < 0:
        raise _bad(option, value, "a finite number of seconds >= 0")
    return seconds


def _check(option: str, kind: str, value: Any, default: Any) -> Any:
    if kind == _OBJECT:
        check = _OBJECT_CHECKS.get(option)
        return value if value is None or check is None else check(option, value)
    if value is None:
        if default is None or kind in (_UTILISATION, _WAITERS, _TAGS, _TAG_SECONDS, _FLEET_TAGS):
            return None
        allowed = _ALLOWED.get(kind, "a value")
        raise _bad(option, value, allowed)
    return _CHECKS[kind](option, value)


def _in_range(allowed: str, low: float, high: float, *, low_open: bool = False) -> Any:
    def check(option: str, value: Any) -> float:
        number = _number(option, value, allowed)
        if number < low or number > high or (low_open and number == low):
            raise _bad(option, value, allowed)
        return number

    return check


def _whole(allowed: str, low: int) -> Any:
    def check(option: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _bad(option, value, allowed)
        if value > _MAX_WHOLE:
            raise _bad(option, value, f"{allowed}; at most {_MAX_WHOLE}")
        return value

    return check


def _check_name(option: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(option, value, _ALLOWED[_NAME])
    return value


def _check_flag(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(option, value, _ALLOWED[_FLAG])
    return value


def _check_reserve(option: str, value: Any) -> float:
    number = _number(option, value, _ALLOWED[_RESERVE])
    if number < 0 or (number >= 1 and not number.is_integer()):
        raise _bad(option, value, _ALLOWED[_RESERVE])
    return number


def _check_classifier(option: str, value: Any) -> Any:
    allowed = ("a callable taking the exception and returning True (a failure) or False, "
               "or None for the default")
    if not callable(value):
        raise _bad(option, value, allowed)
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return value
    try:
        signature.bind(ValueError())
    except TypeError:
        raise _bad(option, value, allowed) from None
    return value


def _check_meter_provider(option: str, value: Any) -> Any:
    if not callable(getattr(value, "get_meter", None)):
        raise _bad(option, value,
                   "an OpenTelemetry MeterProvider (an object with get_meter()), or None")
    return value


def _check_window(option: str, value: Any) -> str:
    if value not in ("count", "time"):
        raise _bad(option, value, _ALLOWED[_WINDOW])
    return str(value)


def _per_tag(kind: str, check_one: Any) -> Any:
    """A check of a mapping of tag to a value that ``check_one(option, value)`` checks."""

    def check(option: str, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise _bad(option, value, _ALLOWED[kind])
        checked = {}
        for tag, given in value.items():
            if not isinstance(tag, str) or not tag:
                raise _bad(option, dict(value), _ALLOWED[kind])
            checked[tag] = check_one(f"{option}[{tag!r}]", given)
        return MappingProxyType(checked)

    return check


def _connections(option: str, value: Any) -> int:
    # 5.0 from the environment is 5; 2.5 or a share is not a count of connections.
    count = int(value) if isinstance(value, float) and value.is_integer() else value
    return int(_whole("a whole number of server connections >= 1", 1)(option, count))


_check_tag_seconds = _per_tag(_TAG_SECONDS, _seconds)
_check_fleet_tags = _per_tag(_FLEET_TAGS, _connections)


def _hide_password(text: str) -> str:
    """``text`` with the password of a URL in it replaced by ``***``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(text).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return "<not a URL>"


def _check_admin_url(option: str, value: Any) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    allowed = _ALLOWED[_ADMIN_URL]
    if not isinstance(value, str):
        raise _bad(option, value, allowed)
    if value == "auto":
        return value
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):
        raise ValueError(
            f"poolguard option {option}={_hide_password(value)!r} is invalid: expected {allowed}"
        ) from None
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() not in ("postgresql", "postgres") or url.database != "pgbouncer":
        raise ValueError(f"poolguard option {option}={shown!r} is invalid: expected {allowed}")
    return value


def _check_pooler(option: str, value: Any) -> str:
    if value not in ("auto", "transaction", "session", "none"):
        raise _bad(option, value, _ALLOWED[_POOLER])
    return str(value)


def _check_tags(option: str, value: Any) -> Mapping[str, float]:
    from ._policies import check_tag_limits

    if not isinstance(value, Mapping):
        raise _bad(option, value, _ALLOWED[_TAGS])
    for tag, limit in value.items():
        # A count past float's range would escape as an OverflowError.
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > _MAX_WHOLE:
            raise _bad(f"{option}[{tag!r}]", limit, f"{_ALLOWED[_TAGS]}; at most {_MAX_WHOLE}")
    try:
        return MappingProxyType(check_tag_limits(value))
    except ValueError as exc:
        shown = dict(value)
        raise ValueError(f"poolguard option {option}={shown!r} is invalid: {exc}") from None


_ALLOWED = {
    _NAME: "a non-empty string, or None",
    _SECONDS: "a finite number of seconds >= 0",
    _FRACTION: "a number from 0 to 1",
    _UTILISATION: "a share of the pool above 0 and at most 1, or None",
    _RATE: "a share above 0 and at most 1",
    _COUNT: "a whole number >= 1",
    _INT0: "a whole number >= 0",
    _WAITERS: "a whole number >= 0, or None",
    _FLAG: "True or False",
    _RESERVE: "0, a whole number of connections, or a share 0 < x < 1",
    _WINDOW: "'count' or 'time'",
    _POOLER: "'auto', 'transaction', 'session' or 'none'",
    _TAGS: "a mapping of tag to a count or a share of the pool",
    _TAG_SECONDS: "a mapping of tag to seconds >= 0",
    _FLEET_TAGS: "a mapping of tag to a whole number of server connections >= 1",
    _ADMIN_URL: ("'auto', or a postgresql:// URL of PgBouncer's admin console "
                 "(database pgbouncer), or None"),
    _INTERVAL: "a number of seconds from 0.1 to 3600",
}

_OBJECT_CHECKS: dict[str, Any] = {
    "breaker_classifier": _check_classifier,
    "meter_provider": _check_meter_provider,
}

_CHECKS: dict[str, Any] = {
    _NAME: _check_name,
    _SECONDS: _seconds,
    _FRACTION: _in_range(_ALLOWED[_FRACTION], 0, 1),
    _UTILISATION: _in_range(_ALLOWED[_UTILISATION], 0, 1, low_open=True),
    _RATE: _in_range(_ALLOWED[_RATE], 0, 1, low_open=True),
    _COUNT: _whole(_ALLOWED[_COUNT], 1),
    _INT0: _whole(_ALLOWED[_INT0], 0),
    _WAITERS: _whole(_ALLOWED[_WAITERS], 0),
    _FLAG: _check_flag,
    _RESERVE: _check_reserve,
    _WINDOW: _check_window,
    _POOLER: _check_pooler,
    _TAGS: _check_tags,
    _TAG_SECONDS: _check_tag_seconds,
    _FLEET_TAGS: _check_fleet_tags,
    _ADMIN_URL: _check_admin_url,
    _INTERVAL: _in_range(_ALLOWED[_INTERVAL], 0.1, 3600),
}


def _parse(kind: str, raw: str, default: Any) -> Any:  # noqa: PLR0911
    if raw.lower() == "none" and (default is None or kind == _UTILISATION):
        return None
    if kind in (_NAME, _ADMIN_URL):
        return raw
    if kind in (_TAGS, _TAG_SECONDS, _FLEET_TAGS):
        from ._policies import parse_tag_limits

        return parse_tag_limits(raw)
    if kind == _FLAG:
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError("expected true/false, yes/no, on/off or 1/0")
    if kind in (_WINDOW, _POOLER):
        return raw
    if kind in (_COUNT, _WAITERS, _INT0):
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
    try:
        return float(raw)
    except ValueError:
        unit = " of seconds" if kind == _SECONDS else ""
        raise ValueError(f"expected a number{unit}") from None
