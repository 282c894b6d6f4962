"""``poolguard demo``: the postmortem, replayed as a small service, plain and guarded.

The scenario (:mod:`poolguard.cli.scenario`) runs twice at the same time, on
two pools of the same size: one plain SQLAlchemy, one behind
``poolguard.wrap()`` with the recommended setting
(:func:`poolguard.recommended.options`) and nothing else: no option names the
query that will go bad. Requests arrive at a fixed rate (an open loop) and are
served by a fixed set of worker threads behind a bounded accept queue, each
with a 1 s deadline, so what a side fails to serve counts: requests that got
no worker in time, failed, were shed or were answered late. Logins (critical),
API calls (normal) and batch jobs (background) run steadily; then the storm of
the chosen variant (``--variant``, see :data:`~poolguard.cli.scenario.VARIANTS`)
starts; then it stops.

While it runs, a live line shows both sides, and the guard's events (captured
from the ``poolguard`` logger) and the first shed or failed request of each
kind are printed as they happen. At the end: per kind, the requests served,
failed and shed with their p99 latency; the protected traffic's goodput and
p99 before and during the storm on both sides, judged against issue 13's bar
(:func:`~poolguard.cli.scenario.assess`); how long after the storm began a log
event named the culprit statement and its call site; what the guard shed and
isolated; and the events poolguard logged.
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

from ._db import parse_url, ping, shown
from ._events import Event, EventCapture, describe_event, event_key, short
from ._output import StatusLine, fit, ms, rounded, wrap
from .scenario import (
    KINDS,
    VARIANTS,
    PhaseStats,
    Sample,
    SideResult,
    Traffic,
    assess,
    guarded_options,
    isolations,
    run_side,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

__all__ = ["QUICK", "STANDARD", "add_arguments", "guard_options", "run", "traffic_for"]

#: The default run: under a minute (both sides run at once).
STANDARD = Traffic(pre=5.0, storm=15.0, after=5.0, drain_timeout=60.0)
#: ``--quick``: a few seconds, for CI.
QUICK = Traffic(pre=1.5, storm=3.0, after=1.0, drain_timeout=60.0)

#: Events that name the statement holding the pool (and its call site).
CULPRIT_EVENTS = ("pool.exhausted", "query.slow", "connection.held_too_long", "culprit.isolated")
_SIDES = ("plain", "guarded")


def traffic_for(variant: str, *, quick: bool = False) -> Traffic:
    """The demo's schedule for ``variant``."""
    return dataclasses.replace(QUICK if quick else STANDARD, variant=variant)


def guard_options() -> dict[str, Any]:
    """The guarded side's ``poolguard.wrap`` options: its pool's name and exactly
    :func:`poolguard.recommended.options` (see :func:`scenario.guarded_options`)."""
    return {"name": "auth-db", **guarded_options()}


def _label(traffic: Traffic, kind: str) -> str:
    """How the report names ``kind``: the culprit by its function."""
    if kind != "culprit":
        return kind
    return f"culprit ({traffic.kind.culprit_site or 'none'})"


def _names_culprit(event: Event, traffic: Traffic) -> bool:
    """Whether ``event`` names the variant's slow statement and its call site."""
    if event.name not in CULPRIT_EVENTS or not traffic.kind.has_culprit:
        return False
    fields = event.fields
    if event.name == "pool.exhausted":
        holders = fields.get("top_holders") or []
        fields = holders[0] if holders else {}
    # culprit.isolated may call the statement its shape.
    statement = fields.get("statement") or fields.get("shape")
    site = fields.get("site")
    return (
        isinstance(statement, str)
        and traffic.kind.culprit_table in statement
        and isinstance(site, str)
        and site.endswith(f"in {traffic.kind.culprit_site}")
    )


def _culprit(event: Event) -> dict[str, Any]:
    fields = event.fields
    if event.name == "pool.exhausted":
        fields = (fields.get("top_holders") or [{}])[0]
    return {
        "event": event.name,
        "fingerprint": fields.get("fingerprint"),
        "statement": fields.get("statement") or fields.get("shape"),
        "site": fields.get("site"),
        "tag": fields.get("tag") or (fields.get("tags") or [None])[0],
    }


# -- live progress ------------------------------------------------------------


class Live:
    """What both sides have done so far (fed by the scenario's observer)."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self.lock = threading.Lock()
        self.totals = {side: Counter[str]() for side in _SIDES}
        self.served_ends: dict[str, list[float]] = {side: [] for side in _SIDES}
        self.notes: list[tuple[float, str]] = []
        self._seen: set[tuple[str, str, str]] = set()

    def observer(self, side: str) -> Callable[[Sample], None]:
        protected = self.traffic.kind.protected
        priorities = self.traffic.kind.kinds()

        def observe(sample: Sample) -> None:
            outcome = sample.outcome
            group = "ok" if outcome == "ok" else "shed" if outcome.startswith("shed:") else "failed"
            with self.lock:
                self.totals[side][group] += 1
                if sample.kind in protected and group == "ok":
                    self.served_ends[side].append(sample.end)
                key = (side, sample.kind, outcome)
                if group != "ok" and key not in self._seen:
                    self._seen.add(key)
                    what = "shed" if group == "shed" else "failed"
                    why = outcome.split(":", 1)[-1]
                    priority = priorities[sample.kind][0] or "no request scope"
                    label = _label(self.traffic, sample.kind)
                    self.notes.append(
                        (
                            sample.end,
                            (
                                f"{side:<7} first {label} request {what} "
                                f"({why}; {priority}) after {sample.latency * 1000:.0f} ms"
                            ),
                        )
                    )

        return observe

    def served_per_second(self, side: str, now: float) -> int:
        with self.lock:
            return sum(1 for end in self.served_ends[side] if now - 1.0 <= end <= now)

    def take_notes(self) -> list[tuple[float, str]]:
        with self.lock:
            notes, self.notes = self.notes, []
        return notes


class Display:
    """The demo's story (notes) on ``out``; its progress on ``err`` (a
    :class:`~poolguard.cli._output.StatusLine`: live on a terminal, plain lines
    otherwise)."""

    def __init__(
        self, out: TextIO, traffic: Traffic, status_line: StatusLine, *, story: bool = True
    ) -> None:
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
        phase = "before" if elapsed < t.pre else "storm" if elapsed < t.pre + t.storm else "after"
        totals = live.totals

        def pair(key: str) -> str:
            return f"{totals['plain'][key]}|{totals['guarded'][key]}"

        self.status_line.show(
            f"[{phase} {elapsed:.1f}s] plain|guarded protected served/s "
            f"{live.served_per_second('plain', elapsed)}|"
            f"{live.served_per_second('guarded', elapsed)} ok {pair('ok')} "
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
    parser.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default="tagged",
        help="what goes bad: tagged (a normal request with its own tag), untagged (code "
        "outside any poolguard.request), critical (the login flow's own query), uniform "
        "(control: the database is slow for everyone); default tagged",
    )
    parser.add_argument("--quick", action="store_true", help="a short run (a few seconds), for CI")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results as JSON on stdout (no story, progress on stderr)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    """Run the demo; print the report (or JSON) on stdout."""
    traffic = traffic_for(args.variant, quick=args.quick)
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="poolguard-demo-") as tmp:
        if args.url:
            urls = dict.fromkeys(_SIDES, args.url)
            where = shown(parse_url(args.url))
        else:
            urls = {side: f"sqlite:///{os.path.join(tmp, f'{side}.db')}" for side in _SIDES}
            where = "SQLite, a file in a temporary folder"
        server = ping(urls["guarded"])
        options = guard_options()
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


def _storm_text(traffic: Traffic) -> str:
    variant = traffic.kind
    if variant.name == "tagged":
        return (
            f"{traffic.culprit_rate:g} requests/s (normal, tag {variant.culprit_tag}) "
            f"start running a {traffic.culprit_query:g} s query"
        )
    if variant.name == "untagged":
        return (
            f"a job runner outside any poolguard.request starts {traffic.culprit_rate:g} "
            f"runs/s of a {traffic.culprit_query:g} s query"
        )
    if variant.name == "critical":
        return (
            f"{traffic.culprit_rate:g} logins/s (critical) also run a "
            f"{traffic.culprit_query:g} s query"
        )
    return f"every statement takes {traffic.uniform_extra * 1000:g} ms more (no culprit)"


def _intro(where: str, server: str, traffic: Traffic) -> str:
    protected = " and ".join(traffic.kind.protected)
    text = (
        f"poolguard demo ({traffic.variant}: {traffic.kind.title}), replayed on {where} "
        f"({server}). Two copies of one service, each with a {traffic.pool_size}-connection "
        f"pool and {traffic.workers} worker threads, serve the same traffic at the same time: "
        f"plain SQLAlchemy, and poolguard.wrap() with the recommended setting only (no option "
        f"names the query that goes bad). Requests arrive at a fixed rate ({traffic.login_rate:g} "
        f"logins/s, {traffic.api_rate:g} API calls/s, {traffic.batch_rate:g} batch jobs/s), "
        f"each with a {traffic.deadline:g} s deadline: no worker in time, failed, shed or "
        f"late counts as not served. After {traffic.pre:g} s, {_storm_text(traffic)}; "
        f"{traffic.storm:g} s later it stops. Protected traffic: {protected}. "
        f"(Progress on stderr.)"
    )
    return wrap(text) + "\n\n"


def _run_both(
    urls: dict[str, str], traffic: Traffic, options: dict[str, Any], display: Display
) -> tuple[dict[str, SideResult], EventCapture]:
    live = Live(traffic)
    results: dict[str, SideResult] = {}
    errors: list[BaseException] = []
    start_at = perf_counter() + 1.0  # time for both pools to open their connections

    def side_thread(side: str) -> None:
        try:
            results[side] = run_side(
                urls[side],
                guarded=side == "guarded",
                traffic=traffic,
                options=options,
                start_at=start_at,
                observer=live.observer(side),
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            errors.append(exc)

    with EventCapture() as capture:
        threads = [
            threading.Thread(target=side_thread, args=(side,), name=f"demo-{side}", daemon=True)
            for side in _SIDES
        ]
        for thread in threads:
            thread.start()
        shown_keys: set[tuple[str, ...]] = set()
        seen_events = 0
        phases_told = 0
        story = [
            (traffic.pre, f"storm: {_storm_text(traffic)}"),
            (traffic.pre + traffic.storm, "the storm stops"),
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
                    notes.append(
                        (event.at - start_at, f"guarded {event.level:<7} {describe_event(event)}")
                    )
            seen_events = len(events)
            for at, text in sorted(notes):
                display.note(at, text)
            if elapsed >= 0:
                display.status(elapsed, live)
        display.done()
    if errors:
        raise errors[0]
    results["guarded"].isolations = isolations(
        {"event": e.name, **e.fields} for e in capture.snapshot()
    )
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
        if _names_culprit(event, traffic):
            culprit = {"after_storm_s": round(event.at - storm_at, 3), **_culprit(event)}
            break
    firsts: list[dict[str, Any]] = []
    keys: set[tuple[str, ...]] = set()
    for event in events:
        key = event_key(event)
        if key in keys or event.name == "connection.returned_after_warning":
            continue
        keys.add(key)
        firsts.append(
            {
                "t_s": round(event.at - guarded.started_at, 3),
                "level": event.level,
                "event": event.name,
                **event.fields,
            }
        )
    breaker = [
        {"t_s": round(e.at - guarded.started_at, 3), "state": e.name.split(".", 1)[1]}
        for e in events
        if e.name.startswith("breaker.")
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
                        k: {"priority": st.priority, **_stats_dict(st)}
                        for k, st in result.phases[phase].items()
                    },
                    "protected": _stats_dict(result.protected[phase]),
                }
                for phase in result.phases
            },
            "storm_protected_per_second": result.storm_served_per_second,
            "peak_culprits_running": result.peak_culprits,
            "rejections": result.rejections,
            "leftover": result.leftover,
            "duration_s": round(result.duration, 3),
            "culprit": culprit if side == "guarded" else None,
            "assessment": assess(result),
        }
    storm = {side: results[side].protected["storm"] for side in _SIDES}
    headline = {
        "protected": list(traffic.kind.protected),
        "storm_protected_served": {side: storm[side].served for side in _SIDES},
        "storm_protected_p99_ms": {side: rounded(storm[side].p99_ms, 2) for side in _SIDES},
        "goodput_kept": {side: sides[side]["assessment"]["goodput_kept"] for side in _SIDES},
        "time_to_culprit_s": {
            "plain": None,
            "guarded": culprit["after_storm_s"] if culprit else None,
        },
    }
    return {
        "command": "demo",
        "variant": traffic.variant,
        "database": {"where": where, "server": server},
        "traffic": dataclasses.asdict(traffic),
        "guarded_options": options,
        "headline": headline,
        "sides": sides,
        "isolations": guarded.isolations,
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
    traffic = Traffic(**report["traffic"])
    lines: list[str] = []
    cols = f"{'served':>6} {'failed':>6} {'shed':>6} {'p99 ms':>7}"
    lines.append(f"During the storm ({traffic.storm:g} s; the requests that arrived in it):")
    lines.append(f"{'':<15}  {'plain SQLAlchemy':^28}   {'poolguard.wrap':^28}")
    lines.append(f"{'kind':<15}  {cols}   {cols}")
    for kind in KINDS:
        if not sides["plain"]["phases"]["storm"]["by_kind"][kind]["attempted"]:
            continue
        row = f"{kind:<15} "
        for i, side in enumerate(_SIDES):
            st = sides[side]["phases"]["storm"]["by_kind"][kind]
            row += ("   " if i else " ") + (
                f"{st['served']:>6} {st['failed']:>6} {st['shed']:>6} {ms(st['p99_ms']):>7}"
            )
        lines.append(row)
    priorities = traffic.kind.kinds()
    lines.append(
        "("
        + "; ".join(
            f"{_label(traffic, k)}: {priorities[k][0] or 'no request scope'}" for k in KINDS
        )
        + ". Failed: no worker within the deadline, accept "
        "queue full, timed out, answered late or an error. Latencies from arrival to answer.)"
    )
    lines.append("")
    lines.append(f"Protected traffic ({' and '.join(traffic.kind.protected)}):")
    for side in _SIDES:
        a = sides[side]["assessment"]
        kept = "-" if a["goodput_kept"] is None else f"{a['goodput_kept']:.0%}"
        ratio = "-" if a["p99_ratio"] is None else f"{a['p99_ratio']:.1f}x"
        lines.append(
            f"  {side:<8} {a['goodput_pre']:.1f}/s before, {a['goodput_storm']:.1f}/s during "
            f"({kept} kept); p99 {ms(a['p99_pre_ms'])} -> {ms(a['p99_storm_ms'])} ms ({ratio})"
        )
        lines.append(f"  {'':<8} {a['verdict']}")
    lines.append(
        "Protected requests served in each second of the storm: plain "
        f"{sides['plain']['storm_protected_per_second']}, guarded "
        f"{sides['guarded']['storm_protected_per_second']}."
    )
    return lines


def _guard_lines(report: dict[str, Any]) -> list[str]:
    sides = report["sides"]
    traffic = Traffic(**report["traffic"])
    culprit = sides["guarded"]["culprit"]
    lines = ["Who held the pool:"]
    lines.append("  plain:   never said: plain SQLAlchemy logs nothing; requests just waited.")
    if not traffic.kind.has_culprit:
        lines.append("  guarded: no culprit in this variant (the database was slow for everyone).")
    elif culprit is None:
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
    bad = {s: sides[s]["phases"]["storm"]["by_kind"]["culprit"] for s in _SIDES}
    if traffic.kind.has_culprit:
        outcomes = {
            s: ", ".join(
                f"{k} {v}" for k, v in {**bad[s]["shed_reasons"], **bad[s]["errors"]}.items()
            )
            or "none"
            for s in _SIDES
        }
        lines.append(
            f"The culprit's runs: plain {bad['plain']['served']} served "
            f"({outcomes['plain']}); guarded {bad['guarded']['served']} served "
            f"({outcomes['guarded']})."
        )
        peak = {s: sides[s]["peak_culprits_running"]["storm"] for s in _SIDES}
        lines.append(
            f"Most culprit statements running at once: plain {peak['plain']}, "
            f"guarded {peak['guarded']}."
        )
    found = report["isolations"]
    false = sides["guarded"]["assessment"]["false_isolations"]
    lines.append(f"Isolations (culprit.isolated): {len(found)}, of which false: {false}.")
    if report["breaker"]:
        moves = ", ".join(f"{b['state']} at +{b['t_s']:.1f}s" for b in report["breaker"])
        lines.append(f"Circuit breaker: {moves}.")
    else:
        lines.append("Circuit breaker: stayed closed.")
    lines.append("")
    counts = report["event_counts"]
    total = sum(counts.values())
    lines.append(
        f"Events poolguard logged ({total} in all: "
        f"{', '.join(f'{k} {v}' for k, v in counts.items())}); the first of each:"
    )
    for event in report["events"][:12]:
        fields = {k: v for k, v in event.items() if k not in ("t_s", "level", "event", "pool")}
        described = describe_event(Event(0.0, event["level"], event["event"], fields))
        stamp = "+" + format(event["t_s"], ".2f") + "s"
        lines.append(f"{stamp:>9}  {event['level']:<7} {described}")
    lines.append("")
    options = report["guarded_options"]
    opts = " ".join(f"{k}={v}" for k, v in options.items() if k != "name")
    lines.append(
        f"Guard options (name={options['name']}): the recommended setting "
        f"(poolguard.recommended.options()), nothing else: {opts}"
    )
    return lines
