"""``poolguard demo``: the postmortem, replayed as a small service, plain and guarded.

The scenario (:mod:`poolguard.cli.scenario`) runs twice at the same time, on
two pools of the same size: one plain SQLAlchemy, one behind
``poolguard.wrap()`` with the recommended setting (:mod:`poolguard.recommended`),
a tag limit on the culprit named in advance, and thresholds set to the demo's
clock (:func:`option_parts`). Steady logins
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
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from time import perf_counter
from typing import TYPE_CHECKING, Any, TextIO

from poolguard import recommended

from ._db import parse_url, ping, shown
from ._events import Event, EventCapture, describe_event, event_key, short
from ._output import StatusLine, fit, ms, rounded, wrap
from .scenario import (
    KINDS,
    PhaseStats,
    Sample,
    SideResult,
    Traffic,
    named_in_advance,
    run_side,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

__all__ = ["QUICK", "STANDARD", "add_arguments", "guard_options", "option_parts", "run"]

SCAN_TAG = "auth-token-scan"
#: The default run: under a minute (both sides run at once).
STANDARD = Traffic(pre=5.0, storm=15.0, after=5.0, report_query=2.0, report_tag=SCAN_TAG,
                   drain_timeout=60.0)
#: ``--quick``: a few seconds, for CI.
QUICK = Traffic(pre=1.0, storm=2.5, after=1.0, report_query=1.0, report_tag=SCAN_TAG,
                drain_timeout=60.0)

#: Events that name the statement holding the pool (and its call site).
CULPRIT_EVENTS = ("pool.exhausted", "query.slow", "connection.held_too_long")
_SIDES = ("plain", "guarded")
_LABEL = {"login": "login", "api": "api", "batch": "batch", "report": SCAN_TAG}


def guard_options(traffic: Traffic) -> dict[str, Any]:
    """The guarded side's ``poolguard.wrap`` options: :func:`option_parts` in one dict."""
    options: dict[str, Any] = {"name": "auth-db"}
    for part in option_parts(traffic).values():
        options.update(part)
    return options


def option_parts(traffic: Traffic) -> dict[str, dict[str, Any]]:
    """The guarded side's options by where they come from.

    ``recommended``: the recommended setting (:mod:`poolguard.recommended`),
    as is. ``named in advance``: the scan's tag, which only a guard told
    about the culprit beforehand could name (see :func:`scenario.named_in_advance`).
    ``demo clock``: thresholds scaled to the demo's seconds-long scan; a
    service sets its own from its slowest legitimate statement.
    """
    return {
        "recommended": recommended.options(),
        "named in advance": named_in_advance(traffic),
        "demo clock": {
            # The database cancels a statement running past this (the scan takes longer).
            "statement_timeout": round(traffic.report_query * 0.75, 3),
            # Requests of this service take milliseconds: a longer hold is worth a warning.
            "leak_threshold": round(traffic.report_query / 4, 3),
            "slow_query_threshold": 0.25,
        },
    }


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




class Display:
    """The demo's story (notes) on ``out``; its progress on ``err`` (a
    :class:`~poolguard.cli._output.StatusLine`: live on a terminal, plain lines
    otherwise)."""

    def __init__(self, out: TextIO, traffic: Traffic, status_line: StatusLine,
                 *, story: bool = True) -> None:
        self.out = out
        self.traffic = traffic
        self.story = story
        self.status_line = status_line
        self.tty = status_line.tty

    def note(self, at: float, text: str) -> None:
        if not self.story:
            return
        self.status_line.clear()
        self.out.write(fit(f"{'+' + format(at, '.2f') + 's':>9}  {text}", 11) + "\n")
        self.out.flush()

    def status(self, elapsed: float, live: Live) -> None:
        t = self.traffic
        phase = "before" if elapsed < t.pre else "storm" if elapsed < t.pre + t.storm else "fixed"
        totals = live.totals

        def pair(key: str) -> str:
            return f"{totals['plain'][key]}|{totals['guarded'][key]}"

        self.status_line.show(
            f"[{phase} {elapsed:.1f}s] plain|guarded logins/s "
            f"{live.logins_per_second('plain', elapsed)}|"
            f"{live.logins_per_second('guarded', elapsed)} ok {pair('ok')} "
            f"failed {pair('failed')} shed {pair('shed')}",
            elapsed,
        )

    def done(self) -> None:
        self.status_line.clear()
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
        display = Display(out, traffic, StatusLine(on=not args.quiet), story=not args.json)
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
        f"same traffic at the same time: plain SQLAlchemy, and poolguard.wrap() with the "
        f"recommended setting, plus a tag limit on the unoptimized query named in advance. "
        f"Logins (critical), API calls (normal) and batch jobs (background) run "
        f"steadily; after {traffic.pre:g} s, {traffic.report_threads} callers start an "
        f"unoptimized query ({SCAN_TAG}, {traffic.report_query:g} s a run) and retry as fast "
        f"as they may; {traffic.storm:g} s later the fix stops it. (Progress on stderr.)"
    )
    return wrap(text) + "\n\n"


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
                key = event_key(event)
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


def _stats_dict(st: PhaseStats) -> dict[str, Any]:
    return {
        "attempted": st.requests,
        "served": st.served,
        "failed": st.failed,
        "shed": st.shed,
        "shed_reasons": st.shed_reasons,
        "errors": st.errors,
        "p50_ms": rounded(st.p50_ms, 2),
        "p99_ms": rounded(st.p99_ms, 2),
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
        key = event_key(event)
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
        "storm_critical_p99_ms": {side: rounded(storm[side].p99_ms, 2) for side in _SIDES},
        "time_to_culprit_s": {"plain": None,
                              "guarded": culprit["after_storm_s"] if culprit else None},
    }
    return {
        "command": "demo",
        "database": {"where": where, "server": server},
        "traffic": dataclasses.asdict(traffic),
        "guarded_options": options,
        "guarded_option_parts": option_parts(traffic),
        "headline": headline,
        "sides": sides,
        "breaker": breaker,
        "event_counts": dict(sorted(capture.counts.items())),
        "events": firsts[:20],
    }


def format_summary(report: dict[str, Any]) -> str:
    """The report as text: the storm side by side, then what the guard said."""
    lines = [*_storm_lines(report), "", *_guard_lines(report)]
    return "\n".join(fit(line.rstrip()) for line in lines) + "\n"


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
                f"{st['served']:>6} {st['failed']:>6} {st['shed']:>6} {ms(st['p99_ms']):>7}"
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
        f"(p99 {ms(p99['plain'])} ms), guarded {served['guarded']} "
        f"(p99 {ms(p99['guarded'])} ms)."
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
                f"Login p99 {label}: plain {ms(crit['plain']['p99_ms'])} ms, "
                f"guarded {ms(crit['guarded']['p99_ms'])} ms."
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
            f"{culprit['event']} named {short(culprit['statement'], 200)!r} "
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
                 f"guarded {peak['guarded']} (tag limit, named in advance).")
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
    lines.append(f"Guard options (name={report['guarded_options']['name']}):")
    labels = {"recommended": "the recommended setting (poolguard.recommended)",
              "named in advance": "named in advance (only a guard told of the culprit has it)",
              "demo clock": "set to the demo's clock (a service sets its own)"}
    for part, options in report["guarded_option_parts"].items():
        opts = " ".join(f"{k}={v}" for k, v in options.items())
        lines.append(f"  {labels.get(part, part)}: {opts}")
    return lines
