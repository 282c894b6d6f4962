"""How the command line writes: numbers, text within 80 columns, and progress on stderr.

Results go to stdout and fit :data:`WIDTH` columns. Progress goes to stderr,
whether or not stderr is a terminal (like pgbench's ``-P``): on a terminal a
live line redrawn in place, otherwise a plain line at most every
:data:`PLAIN_EVERY` seconds (:class:`StatusLine`).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
import textwrap
from typing import TextIO

__all__ = [
    "PLAIN_EVERY",
    "WIDTH",
    "StatusLine",
    "columns",
    "fit",
    "ms",
    "ms_cell",
    "ms_text",
    "percentile",
    "rounded",
    "wrap",
]

#: Text output stays within this many columns (an 80-column terminal).
WIDTH = 79
#: Without a terminal, a progress line at most this often (seconds).
PLAIN_EVERY = 5.0


# -- numbers ---------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (1 to 99) of ``values``, inclusive method; None if empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def rounded(value: float | None, digits: int) -> float | None:
    """``round(value, digits)``, keeping None (nothing measured)."""
    return None if value is None else round(value, digits)


def ms(value: float | None, digits: int = 1) -> str:
    """Milliseconds as a bare number, ``-`` for None."""
    return "-" if value is None else f"{value:.{digits}f}"


def ms_text(value: float | None) -> str:
    """Milliseconds in a sentence: ``12.3 ms``, ``-`` for None."""
    return "-" if value is None else f"{ms(value)} ms"


def ms_cell(value: float | None) -> str:
    """Milliseconds in a narrow table column: 2 decimals, none from 1,000 on."""
    if value is None:
        return "-"
    return ms(value, 2 if value < 1000 else 0)


# -- text within WIDTH ------------------------------------------------------------------


def wrap(text: str, first: str = "", rest: str = "") -> str:
    """``text`` as a paragraph within :data:`WIDTH`, its lines led by ``first``/``rest``."""
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=rest,
                         break_on_hyphens=False, break_long_words=False)


def fit(line: str, indent: int = 4) -> str:
    """``line`` as is if it fits :data:`WIDTH`; else wrapped, continued ``indent`` further in."""
    if len(line) <= WIDTH:
        return line
    lead = " " * (len(line) - len(line.lstrip()))
    return textwrap.fill(line.strip(), WIDTH, initial_indent=lead,
                         subsequent_indent=lead + " " * indent,
                         break_on_hyphens=False, break_long_words=True)


def columns(stream: TextIO) -> int:
    """Columns of the terminal ``stream`` writes to (less one: no wrap at the edge)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns - 1
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns - 1


# -- progress ------------------------------------------------------------------------


class StatusLine:
    """Progress on a stream (stderr by default), terminal or not.

    :meth:`show` redraws a live line in place on a terminal; elsewhere it
    writes a plain line, at most one every ``every`` seconds of the caller's
    clock (the first at once, unless ``last`` says when the previous one was).
    :meth:`say` writes a line that stays; :meth:`clear` removes the live line
    before anything else is written to the same terminal.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        on: bool = True,
        every: float = PLAIN_EVERY,
        last: float = -math.inf,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.on = on
        self.tty = self.stream.isatty()
        self.every = every
        self._last_plain = last
        self._live = False

    def show(self, line: str, now: float) -> None:
        """The progress as of ``now`` (live, or a plain line when one is due)."""
        if not self.on:
            return
        if self.tty:
            width = columns(self.stream)
            self.stream.write("\r" + line[:width].ljust(width))
            self._live = True
        elif now - self._last_plain >= self.every:
            self._last_plain = now
            self.stream.write(line + "\n")
        self.stream.flush()

    def say(self, line: str, now: float) -> None:
        """A line that stays (a run's result); the next plain line is due ``every`` after it."""
        if not self.on:
            return
        self.clear()
        self.stream.write(line + "\n")
        self._last_plain = now
        self.stream.flush()

    def clear(self) -> None:
        """Remove the live line, if one is shown."""
        if self._live:
            self.stream.write("\r" + " " * columns(self.stream) + "\r")
            self.stream.flush()
            self._live = False
