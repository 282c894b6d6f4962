"""``poolguard demo``: the postmortem, replayed as a small service, plain and guarded.

The scenario (:mod:`poolguard.cli.scenario`) runs twice at the same time, on
two pools of the same size: one plain SQLAlchemy, one behind
``poolguard.wrap()`` configured as the README recommends. Steady logins
(critical) and other work (normal, background) run; then an unoptimized
query (:func:`~poolguard.cli.scenario.scan_auth_tokens`, tag
``auth-token-scan``) starts holding connections; then the fix stops it.

While it runs, a live line shows both sides, and the guard's events (captured
from the ``poolguard`` logger) and the first shed or failed request of each
kind are printed as they happen. At the end: per kind and priority, the
requests served, failed and shed with p50/p99 latency; how long after the
storm began a log event named the culprit statement and its call site; the
shedding and breaker figures; and the events poolguard logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from time import perf_counter
from typing import TYPE_CHECKING, Any, TextIO

from ._db import parse_url, ping, shown
from .scenario import KINDS, PhaseStats, Sample, SideResult, Traffic, run_side

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

__all__ = ["QUICK", "STANDARD", "add_arguments", "guard_options", "run"]

SCAN_TAG = "auth-token-scan"
#: The default run: under a minute (both sides run at once).
STANDARD = Traffic(pre=5.0, storm=15.0, after=5.0, report_query=2.0, report_tag=SCAN_TAG,
                   drain_timeout=60.0)
#: ``--quick``: a few seconds, for CI.
QUICK = Traffic(pre=1.0, storm=2.5, after=1.0, report_query=1.0, report_tag=SCAN_TAG,
                drain_timeout=60.0)

#: Events that name the statement holding the pool (and its call site).
CULPRIT_EVENTS = ("pool.exhausted", "query.slow", "connection.held_too_long")
#: At most this many events are kept (counted all the same).
_MAX_EVENTS = 5000
_SIDES = ("plain", "guarded")
_LABEL = {"login": "login", "api": "api", "batch": "batch", "report": SCAN_TAG}


def guard_options(traffic: Traffic) -> dict[str, Any]:
    """The guarded side's ``poolguard.wrap`` options, as the README recommends them."""
    return {
        "name": "auth-db",
        # Nothing waits 30 s to fail.
        "acquire_timeout": 1.0,
        # 2 of the 10 connections only logins may take.
        "reserved_critical": 2,
        # One query class never holds more than half of the pool.
        "tag_limits": {traffic.report_tag: 0.5},
        # Background jobs never queue behind a full pool.
        "max_waiting_background": 0,
        # A standing queue sheds non-critical waits and serves the newest first.
        "codel": True,
        # The database cancels a statement running past this (the scan takes longer).
        "statement_timeout": round(traffic.report_query * 0.75, 3),
        # Requests of this service take milliseconds: a longer hold is worth a warning.
        "leak_threshold": round(traffic.report_query / 4, 3),
        "slow_query_threshold": 0.25,
        "capture_call_sites": True,
        # Opens only if the database itself fails (here it never does).
        "breaker": True,
    }


# -- capturing poolguard's events -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Event:
    """One event poolguard logged, with the time it was logged."""

    at: float  # perf_counter()
    level: str
    name: str
    fields: dict[str, Any]


class EventCapture(logging.Handler):
    """A handler on the ``poolguard`` logger that keeps its structured events."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[Event] = []
        self.counts: Counter[str] = Counter()
        self._lock_events = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "poolguard", None)
        if not isinstance(fields, dict):
            return
        name = str(fields.get("event", record.getMessage().split(" ", 1)[0]))
        rest = {k: v for k, v in fields.items() if k != "event"}
        with self._lock_events:
            self.counts[name] += 1
            if len(self.events) < _MAX_EVENTS:
                self.events.append(Event(perf_counter(), record.levelname, name, rest))

    def snapshot(self) -> list[Event]:
        with self._lock_events:
            return list(self.events)

    def __enter__(self) -> EventCapture:
        logger = logging.getLogger("poolguard")
        self._saved = (logger.level, logger.propagate)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the demo prints them itself
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("poolguard")
        logger.removeHandler(self)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]


def _names_culprit(event: Event) -> bool:
    """Whether ``event`` names the scan's statement and its call site."""
    if event.name not in CULPRIT_EVENTS:
        return False
    if event.name == "pool.exhausted":
        holders = event.fields.get("top_holders") or []
        top = holders[0] if holders else {}
        return _is_scan(top.get("statement"), top.get("site"))
    return _is_scan(event.fields.get("statement"), event.fields.get("site"))


def _is_scan(statement: object, site: object) -> bool:
    return (
        isinstance(statement, str) and "auth_tokens" in statement
        and isinstance(site, str) and site.endswith("in scan_auth_tokens")
    )


def _culprit(event: Event) -> dict[str, Any]:
    fields = event.fields
    if event.name == "pool.exhausted":
        fields = (fields.get("top_holders") or [{}])[0]
    return {
        "event": event.name,
        "fingerprint": fields.get("fingerprint"),
        "statement": fields.get("statement"),
        "site": fields.get("site"),
        "tag": fields.get("tag") or (fields.get("tags") or [None])[0],
    }


# -- live progress ------------------------------------------------------------


class Live:
    """What both sides have done so far (fed by the scenario's observer)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals = {side: Counter[str]() for side in _SIDES}
        self.login_ends: dict[str, list[float]] = {side: [] for side in _SIDES}
        self.notes: list[tuple[float, str]] = []
        self._seen: set[tuple[str, str, str]] = set()

    def observer(self, side: str) -> Callable[[Sample], None]:
        def observe(sample: Sample) -> None:
            outcome = sample.outcome
            group = "ok" if outcome == "ok" else "shed" if outcome.startswith("shed:") else "failed"
            with self.lock:
                self.totals[side][group] += 1
                if sample.kind == "login" and group == "ok":
                    self.login_ends[side].append(sample.end)
                key = (side, sample.kind, outcome)
                if group != "ok" and key not in self._seen:
                    self._seen.add(key)
                    what = "shed" if group == "shed" else "failed"
                    why = outcome.split(":", 1)[-1]
                    priority = KINDS[sample.kind][0]
                    self.notes.append((sample.end, (
                        f"{side:<7} first {_LABEL[sample.kind]} request {what} ({why}; "
                        f"{priority}) after {sample.latency * 1000:.0f} ms"
                    )))

        return observe

    def logins_per_second(self, side: str, now: float) -> int:
        with self.lock:
            return sum(1 for end in self.login_ends[side] if now - 1.0 <= end <= now)

    def take_notes(self) -> list[tuple[float, str]]:
        with self.lock:
            notes, self.notes = self.notes, []
        return notes


def _short(text: object, width: int = 70) -> str:
    value = str(text)
    return value if len(value) <= width else value[: width - 3] + "..."


def describe_event(event: Event) -> str:
    """One line for an event, the fields that matter for it first."""
    f = event.fields
    name = event.name
    if name in ("connection.held_too_long", "query.slow"):
        took = f.get("held_ms") if name == "connection.held_too_long" else f.get("duration_ms")
        return (f"{name}: {_short(f.get('statement'))!r} at {f.get('site')} "
                f"(tag {f.get('tag')}, {took} ms)")
    if name == "pool.exhausted":
        return (f"{name} ({f.get('reason')}): {f.get('in_use')}/{f.get('capacity')} in use, "
                f"{f.get('waiting')} waiting; held by {_short(f.get('summary'), 90)}")
    if name == "query.error":
        return (f"{name}: {f.get('error_type')} after {f.get('duration_ms')} ms in "
                f"{_short(f.get('statement'), 50)!r} at {f.get('site')}")
    text = " ".join(f"{k}={v}" for k, v in f.items() if k != "pool" and v is not None)
    return f"{name}: {_short(text, 110)}"


def _event_key(event: Event) -> tuple[str, ...]:
    f = event.fields
    if event.name.startswith(("breaker.", "alert.")):
        return (event.name, str(event.at))  # every transition
    return (event.name, str(f.get("fingerprint")), str(f.get("error_type")))


#: Text output stays within this many columns (an 80-column terminal).
WIDTH = 79
#: Without a terminal, a progress line at most this often.
PLAIN_EVERY = 5.0


def _columns(stream: TextIO) -> int:
    """Columns of the terminal ``stream`` writes to (less one: no wrap at the edge)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns - 1
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns - 1


class Display:
    """The demo's story (notes) on ``out``; its progress on ``err``: a live line
    on a terminal, a plain line every :data:`PLAIN_EVERY` s otherwise."""

    def __init__(
        self,
        out: TextIO,
        traffic: Traffic,
        *,
        story: bool = True,
        progress: bool = True,
        err: TextIO | None = None,
    ) -> None:
        self.out = out
        self.err = sys.stderr if err is None else err
        self.traffic = traffic
        self.story = story
        self.progress = progress
        self.tty = self.err.isatty()
        self._line = False
        self._last_plain = -PLAIN_EVERY

    def _clear(self) -> None:
        if self._line:
            self.err.write("\r" + " " * _columns(self.err) + "\r")
            self.err.flush()
            self._line = False

    def note(self, at: float, text: str) -> None:
        if not self.story:
            return
        self._clear()
        self.out.write(fit(f"{'+' + format(at, '.2f') + 's':>9}  {text}", 11) + "\n")
        self.out.flush()

    def status(self, elapsed: float, live: Live) -> None:
        if not self.progress:
            return
        t = self.traffic
        phase = "before" if elapsed < t.pre else "storm" if elapsed < t.pre + t.storm else "fixed"
        totals = live.totals

        def pair(key: str) -> str:
            return f"{totals['plain'][key]}|{totals['guarded'][key]}"

        line = (
            f"[{phase} {elapsed:.1f}s] plain|guarded logins/s "
            f"{live.logins_per_second('plain', elapsed)}|"
            f"{live.logins_per_second('guarded', elapsed)} ok {pair('ok')} "
            f"failed {pair('failed')} shed {pair('shed')}"
        )
        if self.tty:
            width = _columns(self.err)
            self.err.write("\r" + line[:width].ljust(width))
            self._line = True
        elif elapsed - self._last_plain >= PLAIN_EVERY:
            self._last_plain = elapsed
            self.err.write(line + "\n")
        self.err.flush()

    def done(self) -> None:
        self._clear()
        self.out.flush()


# -- running ------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``poolguard demo``."""
    parser.add_argument(
        "--url",
        help="database URL (PostgreSQL or MariaDB, e.g. postgresql+psycopg://user@host/db); "
        "default: a SQLite file in a temporary folder",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a short run (a few seconds), for CI")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout (no story, progress on "
                        "stderr)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    """Run the demo; print the report (or JSON) on stdout."""
    traffic = QUICK if args.quick else STANDARD
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="poolguard-demo-") as tmp:
        if args.url:
            urls = dict.fromkeys(_SIDES, args.url)
            where = shown(parse_url(args.url))
        else:
            urls = {side: f"sqlite:///{os.path.join(tmp, f'{side}.db')}" for side in _SIDES}
            where = "SQLite, a file in a temporary folder"
        server = ping(urls["guarded"])
        options = guard_options(traffic)
        display = Display(out, traffic, story=not args.json, progress=not args.quiet)
        if not args.json:
            out.write(_intro(where, server, traffic))
            out.flush()
        results, capture = _run_both(urls, traffic, options, display)
    report = build_report(results, capture, traffic, options, where, server)
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        out.write("\n" + format_summary(report))
    out.flush()
    return 0


def _intro(where: str, server: str, traffic: Traffic) -> str:
    text = (
        f"poolguard demo: the postmortem, replayed on {where} ({server}). "
        f"Two copies of one service, each with a {traffic.pool_size}-connection pool, run the "
        f"same traffic at the same time: plain SQLAlchemy, and poolguard.wrap() as the README "
        f"recommends. Logins (critical), API calls (normal) and batch jobs (background) run "
        f"steadily; after {traffic.pre:g} s, {traffic.report_threads} callers start an "
        f"unoptimized query ({SCAN_TAG}, {traffic.report_query:g} s a run) and retry as fast "
        f"as they may; {traffic.storm:g} s later the fix stops it. (Progress on stderr.)"
    )
    return textwrap.fill(text, WIDTH, break_on_hyphens=False) + "\n\n"


def _run_both(
    urls: dict[str, str], traffic: Traffic, options: dict[str, Any], display: Display
) -> tuple[dict[str, SideResult], EventCapture]:
    live = Live()
    results: dict[str, SideResult] = {}
    errors: list[BaseException] = []
    start_at = perf_counter() + 1.0  # time for both pools to open their connections

    def side_thread(side: str) -> None:
        try:
            results[side] = run_side(
                urls[side], guarded=side == "guarded", traffic=traffic, options=options,
                start_at=start_at, observer=live.observer(side),
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            errors.append(exc)

    with EventCapture() as capture:
        threads = [threading.Thread(target=side_thread, args=(side,), name=f"demo-{side}",
                                    daemon=True) for side in _SIDES]
        for thread in threads:
            thread.start()
        shown_keys: set[tuple[str, ...]] = set()
        seen_events = 0
        phases_told = 0
        story = [
            (traffic.pre, f"storm: {traffic.report_threads} callers start the unoptimized "
                          f"query ({SCAN_TAG})"),
            (traffic.pre + traffic.storm, "the fix is deployed: the unoptimized query stops"),
        ]
        while any(t.is_alive() for t in threads):
            time.sleep(0.25 if display.tty else 0.1)
            elapsed = perf_counter() - start_at
            notes = live.take_notes()
            while phases_told < len(story) and elapsed >= story[phases_told][0]:
                notes.append((story[phases_told][0], f"{'':<7} {story[phases_told][1]}"))
                phases_told += 1
            events = capture.snapshot()
            for event in events[seen_events:]:
                key = _event_key(event)
                if key not in shown_keys:
                    shown_keys.add(key)
                    notes.append((event.at - start_at,
                                  f"guarded {event.level:<7} {describe_event(event)}"))
            seen_events = len(events)
            for at, text in sorted(notes):
                display.note(at, text)
            if elapsed >= 0:
                display.status(elapsed, live)
        display.done()
    if errors:
        raise errors[0]
    return results, capture


# -- the report -----------------------------------------------------------------


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _stats_dict(st: PhaseStats) -> dict[str, Any]:
    return {
        "attempted": st.requests,
        "served": st.served,
        "failed": st.failed,
        "shed": st.shed,
        "shed_reasons": st.shed_reasons,
        "errors": st.errors,
        "p50_ms": _round(st.p50_ms),
        "p99_ms": _round(st.p99_ms),
        "per_second": round(st.per_second, 2),
    }


def build_report(
    results: dict[str, SideResult],
    capture: EventCapture,
    traffic: Traffic,
    options: dict[str, Any],
    where: str,
    server: str,
) -> dict[str, Any]:
    """Everything the demo found, as a JSON-ready dict."""
    events = capture.snapshot()
    guarded = results["guarded"]
    storm_at = guarded.started_at + traffic.pre
    culprit = None
    for event in events:
        if _names_culprit(event):
            culprit = {"after_storm_s": round(event.at - storm_at, 3), **_culprit(event)}
            break
    firsts: list[dict[str, Any]] = []
    keys: set[tuple[str, ...]] = set()
    for event in events:
        key = _event_key(event)
        if key in keys or event.name == "connection.returned_after_warning":
            continue
        keys.add(key)
        firsts.append({"t_s": round(event.at - guarded.started_at, 3), "level": event.level,
                       "event": event.name, **event.fields})
    breaker = [
        {"t_s": round(e.at - guarded.started_at, 3), "state": e.name.split(".", 1)[1]}
        for e in events if e.name.startswith("breaker.")
    ]
    sides: dict[str, Any] = {}
    for side in _SIDES:
        result = results[side]
        sides[side] = {
            "phases": {
                phase: {
                    "by_priority": {
                        p: _stats_dict(st) for p, st in result.priorities[phase].items()
                    },
                    "by_kind": {
                        _LABEL[k]: {"priority": st.priority, **_stats_dict(st)}
                        for k, st in result.phases[phase].items()
                    },
                }
                for phase in result.phases
            },
            "storm_logins_per_second": result.storm_logins_per_second,
            "peak_scans_running": result.peak_reports,
            "rejections": result.rejections,
            "leftover": result.leftover,
            "duration_s": round(result.duration, 3),
            "culprit": culprit if side == "guarded" else None,
        }
    storm = {side: results[side].priorities["storm"][KINDS["login"][0]] for side in _SIDES}
    headline = {
        "storm_critical_served": {side: storm[side].served for side in _SIDES},
        "storm_critical_p99_ms": {side: _round(storm[side].p99_ms) for side in _SIDES},
        "time_to_culprit_s": {"plain": None,
                              "guarded": culprit["after_storm_s"] if culprit else None},
    }
    return {
        "command": "demo",
        "database": {"where": where, "server": server},
        "traffic": dataclasses.asdict(traffic),
        "guarded_options": options,
        "headline": headline,
        "sides": sides,
        "breaker": breaker,
        "event_counts": dict(sorted(capture.counts.items())),
        "events": firsts[:20],
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_summary(report: dict[str, Any]) -> str:
    """The report as text: the storm side by side, then what the guard said."""
    lines = [*_storm_lines(report), "", *_guard_lines(report)]
    return "\n".join(fit(line.rstrip()) for line in lines) + "\n"


def fit(line: str, indent: int = 4) -> str:
    """``line`` wrapped within :data:`WIDTH`, continued ``indent`` further in."""
    if len(line) <= WIDTH:
        return line
    lead = " " * (len(line) - len(line.lstrip()))
    return textwrap.fill(line.strip(), WIDTH, initial_indent=lead,
                         subsequent_indent=lead + " " * indent,
                         break_on_hyphens=False, break_long_words=True)


def _storm_lines(report: dict[str, Any]) -> list[str]:
    sides = report["sides"]
    traffic = report["traffic"]
    lines: list[str] = []
    cols = f"{'served':>6} {'failed':>6} {'shed':>6} {'p99 ms':>7}"
    lines.append(f"During the storm ({traffic['storm']:g} s; the requests that started in it):")
    lines.append(f"{'':<15}  {'plain SQLAlchemy':^28}   {'poolguard.wrap':^28}")
    lines.append(f"{'kind':<15}  {cols}   {cols}")
    for kind in KINDS:
        label = _LABEL[kind]
        row = f"{label:<15} "
        for i, side in enumerate(_SIDES):
            st = sides[side]["phases"]["storm"]["by_kind"][label]
            row += ("   " if i else " ") + (
                f"{st['served']:>6} {st['failed']:>6} {st['shed']:>6} {_ms(st['p99_ms']):>7}"
            )
        lines.append(row)
    by_priority: dict[str, list[str]] = {}
    for kind, (priority, _) in KINDS.items():
        by_priority.setdefault(priority, []).append(_LABEL[kind])
    lines.append("(" + "; ".join(f"{' and '.join(kinds)}: {priority}"
                                 for priority, kinds in by_priority.items())
                 + ". Latencies of the served requests.)")
    lines.append("")
    head = report["headline"]
    served, p99 = head["storm_critical_served"], head["storm_critical_p99_ms"]
    lines.append(
        f"Logins (critical) served during the storm: plain {served['plain']} "
        f"(p99 {_ms(p99['plain'])} ms), guarded {served['guarded']} "
        f"(p99 {_ms(p99['guarded'])} ms)."
    )
    lines.append(
        "Logins served in each second of the storm: plain "
        f"{sides['plain']['storm_logins_per_second']}, guarded "
        f"{sides['guarded']['storm_logins_per_second']}."
    )
    for phase, label in (("pre", "before the storm"), ("after", "after the fix")):
        if phase in sides["plain"]["phases"]:
            crit = {s: sides[s]["phases"][phase]["by_priority"]["critical"] for s in _SIDES}
            lines.append(
                f"Login p99 {label}: plain {_ms(crit['plain']['p99_ms'])} ms, "
                f"guarded {_ms(crit['guarded']['p99_ms'])} ms."
            )
    return lines


def _guard_lines(report: dict[str, Any]) -> list[str]:
    sides = report["sides"]
    traffic = report["traffic"]
    culprit = sides["guarded"]["culprit"]
    lines = ["Who held the pool:"]
    lines.append("  plain:   never said: plain SQLAlchemy logs nothing; requests just waited.")
    if culprit is None:
        lines.append("  guarded: no event named the culprit.")
    else:
        lines.append(
            f"  guarded: {culprit['after_storm_s']:.2f} s after the storm began, "
            f"{culprit['event']} named {_short(culprit['statement'], 200)!r} "
            f"at {culprit['site']} (tag {culprit['tag']})."
        )
    lines.append("")
    rejections = sides["guarded"]["rejections"]
    shed = ", ".join(f"{k} {v}" for k, v in rejections.items()) or "none"
    lines.append(f"Shed by the guard (reason/priority): {shed}.")
    scan = {s: sides[s]["phases"]["storm"]["by_kind"][SCAN_TAG] for s in _SIDES}
    cut = scan["guarded"]["errors"].get("error:StatementTimeout", 0)
    limit = report["guarded_options"]["statement_timeout"]
    lines.append(
        f"Statement timeout: the database cancelled {cut} runs of the scan at {limit:g} s "
        f"(plain: each ran its full {traffic['report_query']:g} s)."
    )
    peak = {s: sides[s]["peak_scans_running"]["storm"] for s in _SIDES}
    lines.append(f"Most scans holding connections at once: plain {peak['plain']}, "
                 f"guarded {peak['guarded']} (tag limit).")
    if report["breaker"]:
        moves = ", ".join(f"{b['state']} at +{b['t_s']:.1f}s" for b in report["breaker"])
        lines.append(f"Circuit breaker: {moves}.")
    else:
        lines.append("Circuit breaker: stayed closed (the database was healthy; one query was "
                     "the problem).")
    lines.append("")
    counts = report["event_counts"]
    total = sum(counts.values())
    lines.append(f"Events poolguard logged ({total} in all: "
                 f"{', '.join(f'{k} {v}' for k, v in counts.items())}); the first of each:")
    for event in report["events"][:12]:
        fields = {k: v for k, v in event.items() if k not in ("t_s", "level", "event", "pool")}
        described = describe_event(Event(0.0, event["level"], event["event"], fields))
        stamp = "+" + format(event["t_s"], ".2f") + "s"
        lines.append(f"{stamp:>9}  {event['level']:<7} {described}")
    lines.append("")
    opts = " ".join(f"{k}={v}" for k, v in report["guarded_options"].items())
    lines.append(f"Guard options: {opts}")
    return lines
