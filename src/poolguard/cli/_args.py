"""Values of ``poolguard bench``'s options: durations, lists of sizes, guard options.

Each parser raises :class:`argparse.ArgumentTypeError` (argparse names the
option) or :class:`~poolguard.cli._db.UsageError` with the value and what is
allowed.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
from typing import TYPE_CHECKING, Any

from poolguard._config import Config

from ._db import UsageError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DEFAULT_OPTIONS",
    "connect_arg",
    "connect_value",
    "guard_options",
    "option_pair",
    "parse_duration",
    "parse_sizes",
    "positive_int",
]

#: Default guard options of the benchmark's engines (``--option`` overrides them).
DEFAULT_OPTIONS: dict[str, Any] = {"acquire_timeout": 2.0}
#: Config fields that are no ``--option``: set by the benchmark itself, or not text.
_NOT_OPTIONS = ("meter_provider", "breaker_classifier", "name")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min)?\s*$")
_UNIT = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0}


def parse_duration(text: str) -> float:
    """``20s``, ``1.5s``, ``500ms``, ``2m`` or a number of seconds; must be > 0."""
    match = _DURATION.match(text)
    seconds = float(match.group(1)) * _UNIT[match.group(2)] if match else -1.0
    if not match or not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r}: expected a positive time such as 20s, 500ms or 2m"
        )
    return seconds


def parse_sizes(text: str) -> list[int]:
    """``5,10,20``: whole numbers >= 1, in the order given, without repeats."""
    sizes: list[int] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part.isdigit() or int(part) < 1:
            raise argparse.ArgumentTypeError(
                f"invalid list {text!r}: expected comma-separated whole numbers >= 1, "
                "e.g. 5,10,20,40"
            )
        if int(part) not in sizes:
            sizes.append(int(part))
    return sizes


def positive_int(text: str) -> int:
    """A whole number >= 1 (``--repeat``, ``--replicas``, ``--rounds``)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number >= 1")
    return int(text)


def option_pair(text: str) -> tuple[str, str]:
    """``--option NAME=VALUE`` as ``(NAME, VALUE)``, checked by :func:`guard_options`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"invalid option {text!r}: expected NAME=VALUE, e.g. reserved_critical=2"
        )
    return key.strip(), value.strip()


def connect_value(raw: str) -> Any:
    """A ``--connect-arg`` value: ``None``/``null``, ``true``/``false``, an integer,
    a decimal number, or else the text (quoted in ``'...'`` or ``"..."`` to keep
    text that would read as one of the others, e.g. ``'5'``)."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def connect_arg(text: str) -> tuple[str, Any]:
    """``--connect-arg NAME=VALUE`` as ``(NAME, value)`` (see :func:`connect_value`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(
            f"invalid driver option {text!r}: expected NAME=VALUE, e.g. prepare_threshold=None"
        )
    return key.strip(), connect_value(value)


def guard_options(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """``poolguard.wrap`` options from ``--option NAME=VALUE`` pairs, checked by
    :class:`poolguard.Config` (values are written as in ``POOLGUARD_*`` variables)."""
    known = [k for k in Config.option_names() if k not in _NOT_OPTIONS]
    options = dict(DEFAULT_OPTIONS)
    for key, raw in pairs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(
                f"unknown guard option {key!r} in --option{hint}; "
                "see the README's options table"
            )
        try:
            config = Config.from_env({f"POOLGUARD_{key.upper()}": raw})
        except ValueError as exc:
            # "environment variable POOLGUARD_X='v': why" -> "why"
            reason = str(exc).split("': ", 1)[-1]
            raise UsageError(f"--option {key}={raw}: {reason}") from None
        options[key] = getattr(config, key)
    return options

