"""The command line's one output module: numbers, and progress on a terminal or a pipe.

Progress is written the way pgbench's ``-P`` does it: on stderr whether or
not stderr is a terminal. On a terminal it is one live line redrawn in place;
piped, plain lines at most every ``every`` seconds of the caller's clock, and
the lines that stay (a run's result) always.
"""

from __future__ import annotations

import io

import pytest

from poolguard.cli import _output


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        raise OSError("no real terminal")  # columns() falls back to the environment


def test_piped_progress_is_plain_lines_at_most_every_period() -> None:
    stream = io.StringIO()
    status = _output.StatusLine(stream, every=5.0)
    for now in (0.0, 1.0, 4.9, 5.0, 7.0, 10.5):
        status.show(f"at {now}", now)
    assert stream.getvalue().splitlines() == ["at 0.0", "at 5.0", "at 10.5"]
    assert "\r" not in stream.getvalue()
    status.say("run done", 11.0)
    status.show("at 12.0", 12.0)  # within 5 s of the line that stayed
    status.show("at 16.0", 16.0)
    assert stream.getvalue().splitlines()[-2:] == ["run done", "at 16.0"]


def test_the_first_piped_line_waits_when_told_when_the_last_was() -> None:
    stream = io.StringIO()
    status = _output.StatusLine(stream, every=5.0, last=100.0)
    status.show("too soon", 101.0)
    status.show("due", 105.0)
    assert stream.getvalue() == "due\n"


def test_on_a_terminal_one_live_line_is_redrawn_and_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    stream = _Terminal()
    status = _output.StatusLine(stream)
    assert status.tty
    status.show("x" * 100, 0.0)
    status.show("short", 0.1)
    assert stream.getvalue() == "\r" + "x" * 39 + "\r" + "short".ljust(39)
    status.say("stays", 0.2)
    assert stream.getvalue().endswith("\r" + " " * 39 + "\rstays\n")
    status.clear()  # nothing live any more: nothing written
    assert stream.getvalue().endswith("stays\n")


def test_quiet_progress_writes_nothing() -> None:
    stream = _Terminal()
    status = _output.StatusLine(stream, on=False)
    status.show("x", 0.0)
    status.say("y", 1.0)
    assert stream.getvalue() == ""


def test_numbers() -> None:
    assert _output.percentile([], 99) is None
    assert _output.percentile([7.0], 50) == 7.0
    assert _output.percentile([float(i) for i in range(1, 101)], 50) == pytest.approx(50.5)
    assert _output.rounded(None, 2) is None
    assert _output.rounded(1.23456, 3) == 1.235
    assert (_output.ms(None), _output.ms(1.25), _output.ms(1.25, 3)) == ("-", "1.2", "1.250")
    assert (_output.ms_text(None), _output.ms_text(2.04)) == ("-", "2.0 ms")
    assert (_output.ms_cell(None), _output.ms_cell(12.346), _output.ms_cell(1234.6)) == (
        "-", "12.35", "1235")


def test_fit_and_wrap_keep_within_the_width() -> None:
    line = "   " + " ".join(["word"] * 40)
    fitted = _output.fit(line, 4).splitlines()
    assert all(len(x) <= _output.WIDTH for x in fitted)
    assert fitted[0].startswith("   word")
    assert fitted[1].startswith("       word")
    assert _output.fit("short") == "short"
    wrapped = _output.wrap(" ".join(["x"] * 60), "  - ", "    ").splitlines()
    assert wrapped[0].startswith("  - x")
    assert wrapped[1].startswith("    x")
    assert all(len(x) <= _output.WIDTH for x in wrapped)
