"""Who holds the pool, and the culprit nobody named: attribution, detection, isolation.

Nothing here runs per checkout or per statement. The guard's scan samples
the holds it already keeps (one per checked-out connection: statement,
since when it runs, request tag) every :data:`PRESSED_INTERVAL` seconds
while isolation is on (else once a second). Each sample adds, per (statement shape, tag) pair,
the connections held now x the time since the last sample: connection-seconds,
decayed over about :data:`WINDOW` seconds.

:class:`Detector` is the pure part (fed explicit times and observations): it
tracks pressure (a standing queue, a pool at capacity, sheds or timeouts)
and decides. A *culprit* is a statement shape (or, failing that, a request
tag) that, while the pressure has lasted :data:`PRESSURE_FOR`, holds at least
``culprit_share`` of the connection-seconds, holds :data:`MIN_HELD`
connections or more now, and runs slow: its running statements (a tag: its
holds) have been going for :data:`SLOW_RATIO` times as long as everyone
else's, and at least :data:`MIN_DURATION`. When every shape is slow alike the
ratio stays near 1: nothing is isolated. A shape is isolated only in the tags
(None: untagged code) whose own running statements of it are that slow: the
same text run fast elsewhere goes on (everywhere only when no sample saw it
running slow). A hold waiting on the wire in a pooler's queue is nobody's
consumer: it is left out of the samples.

Before any pressure, a shape that holds ``culprit_share`` of the pool's
connections now and runs slow (the same test) is *capped*: at most that many
of its statements run at once (:meth:`Culprits.check_statement` counts them
over the holds, for that shape's statements only). Waiting for pressure
would wait until it holds the whole pool, and its running statements cannot
be taken back. A cap ends once its hold time is over and none of its
statements runs slow; a capped shape that still meets the bar under pressure
is isolated.

An isolation is lifted gradually: after its hold time (:data:`HOLD_FIRST`,
doubled by each relapse up to :data:`HOLD_MAX`) and once the pressure is
gone (or :data:`HOLD_MAX` has passed whatever the pressure), one execution in
8, then in 4, then in 2 goes through, a step a :data:`STEP`; a probe seen
running as slow as the culprit did isolates it again; past the last step it
is released.

:class:`Culprits` is the guard's side: it reads the holds and the gate,
keeps the mapping the statement timer checks (``shapes``: None unless a
shape is isolated, so the statement path pays one attribute read), sheds
with :class:`poolguard.LoadShed` (reason ``culprit``), and logs
``culprit.isolated`` / ``culprit.released`` and the ``load.shed`` summary.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._context import _current
from ._fingerprint import fingerprint
from ._hold import REQUEST, RUNNING_SINCE, SITE, STATEMENT, T0, TASK, THREAD, WIRE
from ._policies import CRITICAL, NORMAL
from ._sites import task_site, thread_site
from .errors import LoadShed

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    from ._breakers import Breakers
    from ._config import Config
    from ._context import RequestContext
    from ._hold import Hold
    from ._log import EventLog
    from ._parts import GuardParts
    from ._recorder import Recorder

__all__ = [
    "SHAPE",
    "TAG",
    "Attribution",
    "Change",
    "Culprits",
    "Detector",
    "Isolation",
    "Observation",
    "ShedSummary",
]

SHAPE = "shape"
TAG = "tag"
REASON = "culprit"

#: Seconds between samples while the pool is under pressure or something is isolated.
PRESSED_INTERVAL = 0.2
#: Seconds between samples otherwise (the scan's own period).
CALM_INTERVAL = 1.0
#: Time constant (seconds) of the decayed connection-seconds.
WINDOW = 10.0
#: The longest gap a sample accounts for (a quiet pool is not sampled).
MAX_GAP = 1.0
#: Seconds the pressure must last before anything is isolated.
PRESSURE_FOR = 0.5
#: Seconds without pressure after which the pressure is over.
PRESSURE_CLEAR = 1.0
#: A culprit runs at least this many times as long as the others...
SLOW_RATIO = 4.0
#: ... and at least this long (seconds, as seen by the samples).
MIN_DURATION = 0.1
#: A culprit holds at least this many connections when it is isolated.
MIN_HELD = 2
#: Seconds an isolation lasts at least; each relapse doubles it, up to HOLD_MAX.
HOLD_FIRST = 2.0
HOLD_MAX = 30.0
#: While lifted: one execution in N goes through, N stepping down every STEP seconds.
RAMP = (8, 4, 2)
STEP = 1.0
#: A shape whose connection-seconds come this much from one tag is isolated in that tag only.
SCOPE_SHARE = 0.9
#: Most isolations at once, and most (shape, tag) pairs tracked.
MAX_ISOLATED = 4
MAX_PAIRS = 512
#: Seconds between two ``load.shed`` summaries.
SHED_SUMMARY_EVERY = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Observation:
    """One checked-out connection as a sample sees it."""

    shape: str | None
    tag: str | None
    #: Seconds since its checkout.
    age: float
    #: Seconds its statement has been running (0: none runs now).
    running: float
    #: Waiting on the wire for a pooler (its ``SET LOCAL`` queued in PgBouncer):
    #: it holds no server connection, so it is nobody's consumer.
    wire: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Attribution:
    """Who holds the pool: one statement shape or request tag.

    Attributes:
        kind: ``"shape"`` or ``"tag"``.
        key: the shape's fingerprint, or the tag (None: no statement yet / untagged).
        held: connections it holds now (at the last sample).
        share: its share of the connection-seconds over the recent window.
        connection_seconds: its decayed connection-seconds.
        running_for: how long its statements (a tag: its checkouts) had been
            running when the samples saw them, on average.
        isolated: ``"isolated"``, ``"probing"`` (being lifted), ``"capped"``
            (a shape bounded to ``culprit_share`` of the pool) or None.
    """

    kind: str
    key: str | None
    held: int
    share: float
    connection_seconds: float
    running_for: float
    isolated: str | None


@dataclasses.dataclass(slots=True)
class Isolation:
    """One isolated shape or tag and where its lifting stands."""

    kind: str
    key: str
    share: float
    #: A probe running this long (seconds) is as slow as the culprit was.
    slow: float
    since: float
    hold: float
    #: None: isolated; else the index in RAMP of the fraction let through.
    step: int | None = None
    step_at: float = 0.0
    isolations: int = 1
    #: A shape isolated only in the requests of some tags (``tags``; None in
    #: it: untagged code): those whose own executions of it run slow.
    #: ``scope``: the tag when there is one only.
    scoped: bool = False
    scope: str | None = None
    tags: frozenset[str | None] | None = None
    #: A shape capped, not isolated: at most ``cap`` of its statements run at
    #: once (the early bound, before any pressure); None: isolated.
    cap: int | None = None
    #: The least a statement of it runs to count as slow (seconds).
    bar: float = 0.0
    counter: Any = dataclasses.field(default_factory=itertools.count)

    def covers(self, shape: str | None, tag: str | None) -> bool:
        """Whether a hold running ``shape`` under ``tag`` belongs to this isolation."""
        if self.kind == TAG:
            return tag == self.key
        return shape == self.key and (self.tags is None or tag in self.tags)

    @property
    def phase(self) -> str:
        if self.cap is not None:
            return "capped"
        return "isolated" if self.step is None else "probing"

    def admit(self) -> bool:
        """Whether this execution (or checkout) goes through: a probe while lifted."""
        step = self.step
        return step is not None and next(self.counter) % RAMP[step] == 0


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """What a sample changed: ``isolated`` (new or again) or ``released``."""

    action: str
    isolation: Isolation
    held: int


class _Pair:
    """Decayed totals of one (shape, tag) pair."""

    __slots__ = ("age_n", "age_sum", "cs", "run_n", "run_sum")

    def __init__(self) -> None:
        self.cs = self.run_sum = self.run_n = self.age_sum = self.age_n = 0.0

    def decay(self, factor: float) -> None:
        self.cs *= factor
        self.run_sum *= factor
        self.run_n *= factor
        self.age_sum *= factor
        self.age_n *= factor


def _mean(total: float, n: float) -> float:
    return total / n if n > 1e-9 else 0.0


class Detector:
    """Pressure, attribution and isolation decisions: pure, fed explicit times."""

    def __init__(self, share: float = 0.5) -> None:
        self.share = share
        self.enabled = True
        self.pairs: dict[tuple[str | None, str | None], _Pair] = {}
        self.isolated: dict[tuple[str, str], Isolation] = {}
        self.held: dict[tuple[str | None, str | None], int] = {}
        #: Per shape, decayed [statements completed, their seconds].
        self.done: dict[str, list[float]] = {}
        #: Tags of the checkouts waiting at the last sample.
        self.waiting: set[str | None] = set()
        self.last: float | None = None
        self.pressure_since: float | None = None
        self.pressed_at = -math.inf
        #: Isolations decided so far, by kind.
        self.isolations = {SHAPE: 0, TAG: 0}

    # -- state ----------------------------------------------------------------

    def pressured(self) -> bool:
        """Some pressure was seen lately (samples come faster)."""
        return self.pressure_since is not None

    def standing(self, now: float) -> bool:
        """The pressure has lasted PRESSURE_FOR."""
        since = self.pressure_since
        return since is not None and now - since >= PRESSURE_FOR

    def interval(self) -> float:
        """Seconds until the next sample is due.

        While isolation is on, samples come every PRESSED_INTERVAL: a slow
        shape must be capped before it holds the pool, and one arriving a few
        times a second takes half a pool of 10 in well under a second.
        """
        return (
            PRESSED_INTERVAL
            if self.enabled or self.pressure_since is not None or self.isolated
            else CALM_INTERVAL
        )

    def reset(self) -> list[Change]:
        """Forget the isolations (the option was turned off); return them released."""
        released = [Change("released", iso, 0) for iso in self.isolated.values()]
        self.isolated = {}
        return released

    # -- a sample ----------------------------------------------------------------

    def sample(
        self,
        now: float,
        observations: Iterable[Observation],
        pressed: bool,
        done: Mapping[str, tuple[float, float]] | None = None,
        waiting: Iterable[str | None] = (),
        capacity: int | None = None,
    ) -> list[Change]:
        """Account one sample taken at ``now``; return what it changed.

        ``done``: per shape, the statements completed since the last sample
        and their seconds; ``waiting``: the tags of the checkouts waiting now;
        ``capacity``: the pool's size (None: unbounded, nothing is capped).
        """
        obs = list(observations)
        self._pressure(now, pressed)
        factor = self._account(now, obs)
        self._done(factor, done or {})
        self.waiting = set(waiting)
        changes: list[Change] = []
        if not self.enabled:
            return changes
        self._lift(now, obs, changes)
        if len(self.isolated) < MAX_ISOLATED:
            found = None
            if self.standing(now):
                found = self._find(now, SHAPE, obs) or self._find(now, TAG, obs)
            if found is None and capacity:
                found = self._cap(now, capacity)
            if found is not None:
                changes.append(found)
        return changes

    def _pressure(self, now: float, pressed: bool) -> None:
        if pressed:
            self.pressed_at = now
            if self.pressure_since is None:
                self.pressure_since = now
        elif self.pressure_since is not None and now - self.pressed_at >= PRESSURE_CLEAR:
            self.pressure_since = None

    def _done(self, factor: float, done: Mapping[str, tuple[float, float]]) -> None:
        totals = self.done
        if factor < 1.0:
            for key in list(totals):
                row = totals[key]
                row[0] *= factor
                row[1] *= factor
                if row[0] < 1e-3:
                    del totals[key]
        for key, (n, seconds) in done.items():
            if n > 0 and (key in totals or len(totals) < MAX_PAIRS):
                row = totals.setdefault(key, [0.0, 0.0])
                row[0] += n
                row[1] += seconds

    def _account(self, now: float, obs: list[Observation]) -> float:
        """Add the sample's connection-seconds; return the decay factor applied."""
        last, self.last = self.last, now
        dt = min(max(now - last, 0.0), MAX_GAP) if last is not None else 0.0
        if dt <= 0.0 and last is not None:
            return 1.0
        weight = dt if last is not None else PRESSED_INTERVAL
        pairs = self.pairs
        factor = 1.0
        if dt > 0.0:
            factor = math.exp(-dt / WINDOW)
            for pair in pairs.values():
                pair.decay(factor)
        held: dict[tuple[str | None, str | None], int] = {}
        for o in obs:
            if o.wire:
                continue
            key = (o.shape, o.tag)
            held[key] = held.get(key, 0) + 1
            pair = pairs.get(key) or pairs.setdefault(key, _Pair())
            pair.cs += weight
            pair.age_sum += o.age * weight
            pair.age_n += weight
            if o.running > 0.0:
                pair.run_sum += o.running * weight
                pair.run_n += weight
        self.held = held
        if len(pairs) > MAX_PAIRS or dt > 0.0:
            self._prune()
        return factor

    def _prune(self) -> None:
        pairs = self.pairs
        for key in [k for k, p in pairs.items() if p.cs < 1e-3 and k not in self.held]:
            del pairs[key]
        if len(pairs) > MAX_PAIRS:
            keep = sorted(pairs, key=lambda k: pairs[k].cs, reverse=True)[:MAX_PAIRS]
            self.pairs = {k: pairs[k] for k in keep}

    # -- deciding -----------------------------------------------------------------

    def totals(self, kind: str) -> dict[str | None, list[float]]:
        """Per shape or tag: [connection-seconds, run sum, run n, age sum, age n, held].

        A tag's totals leave out the shapes isolated (their holds are not the tag's doing).
        """
        index = 0 if kind == SHAPE else 1
        shapes = [i for i in self.isolated.values() if i.kind == SHAPE] if kind == TAG else []
        totals: dict[str | None, list[float]] = {}
        for key, pair in self.pairs.items():
            if any(iso.covers(*key) for iso in shapes):
                continue
            row = totals.setdefault(key[index], [0.0] * 6)
            row[0] += pair.cs
            row[1] += pair.run_sum
            row[2] += pair.run_n
            row[3] += pair.age_sum
            row[4] += pair.age_n
            row[5] += self.held.get(key, 0)
        return totals

    def _find(self, now: float, kind: str, obs: list[Observation]) -> Change | None:
        totals = self.totals(kind)
        total_cs = sum(row[0] for row in totals.values())
        isolated = self.isolated
        candidates = [
            (row[0], key)
            for key, row in totals.items()
            if key is not None
            and ((kind, key) not in isolated or isolated[(kind, key)].cap is not None)
        ]
        if total_cs <= 0.0 or not candidates:
            return None
        cs, key = max(candidates)
        assert key is not None
        row = totals[key]
        share = cs / total_cs
        if share < self.share or row[5] < MIN_HELD:
            return None
        if kind == TAG and self._explained(key):
            return None  # one slow shape explains it: that shape is the culprit, if any
        found = self._slow(kind, key, row, [r for k, r in totals.items() if k != key])
        if found is None:
            return None
        slow, bar = found
        capped = isolated.get((kind, key))  # a capped shape still under pressure: isolate it
        iso = isolated[(kind, key)] = Isolation(
            kind=kind, key=key, share=share, slow=slow, since=now, hold=HOLD_FIRST, bar=bar,
            isolations=capped.isolations + 1 if capped is not None else 1,
        )
        if kind == SHAPE:
            self._scope(iso, cs, bar)
        self.isolations[kind] += 1
        return Change("isolated", iso, int(row[5]))

    def _cap(self, now: float, capacity: int) -> Change | None:
        """Cap a shape that holds ``share`` of the pool now and runs slow.

        The early bound, before there is any pressure to see: a slow shape
        taking half the pool is the start of a drain (every new execution of
        it adds a connection held for its whole run, and the ones already
        running cannot be taken back). Capped, it keeps running, at most
        ``share x capacity`` at once; the rest of the pool stays for the
        others. Same test of slowness as isolation: nothing is capped when
        every shape runs slow alike.
        """
        limit = max(MIN_HELD, int(self.share * capacity))
        if limit >= capacity:
            return None
        held: dict[str, int] = {}
        for (shape, _tag), n in self.held.items():
            if shape is not None and (SHAPE, shape) not in self.isolated:
                held[shape] = held.get(shape, 0) + n
        heavy = [(n, key) for key, n in held.items() if n >= limit]
        if not heavy:
            return None
        totals = self.totals(SHAPE)
        total_cs = sum(row[0] for row in totals.values()) or 1.0
        for n, key in sorted(heavy, reverse=True):
            row = totals.get(key)
            if row is None:
                continue
            found = self._slow(SHAPE, key, row, [r for k, r in totals.items() if k != key])
            if found is None:
                continue
            slow, bar = found
            iso = self.isolated[(SHAPE, key)] = Isolation(
                kind=SHAPE, key=key, share=row[0] / total_cs, slow=slow, since=now,
                hold=HOLD_FIRST, cap=limit, bar=bar,
            )
            self._scope(iso, row[0], bar)
            self.isolations[SHAPE] += 1
            return Change("isolated", iso, n)
        return None

    def _slow(
        self, kind: str, key: str, row: list[float], others: list[list[float]]
    ) -> tuple[float, float] | None:
        """How long a probe of a slow ``key`` runs, and the least a slow
        statement runs; None: it is not slow next to the others.

        A shape is slow by its statements (running, or completed lately), a
        tag by its checkouts. None too when nobody else used the pool lately:
        there is nothing to protect.
        """
        at = (1, 2) if kind == SHAPE else (3, 4)
        mine = _mean(row[at[0]], row[at[1]])
        ran = self.done.get(key) if kind == SHAPE else None
        if ran is not None:
            mine = max(mine, _mean(ran[1], ran[0]))
        if mine < MIN_DURATION:  # the common case, answered before any sum
            return None
        seen = sum(r[4] for r in others)
        theirs = _mean(sum(r[at[0]] for r in others), sum(r[at[1]] for r in others))
        if kind == SHAPE:
            done = [r for k, r in self.done.items() if k != key]
            seen += sum(r[0] for r in done)
            theirs = max(theirs, _mean(sum(r[1] for r in done), sum(r[0] for r in done)))
        else:
            seen += sum(1 for tag in self.waiting if tag != key)
        if seen <= 1e-9 or mine < MIN_DURATION or mine < SLOW_RATIO * theirs:
            return None
        bar = max(MIN_DURATION, SLOW_RATIO * theirs)
        return max(bar, mine / 2), bar

    def _scope(self, iso: Isolation, cs: float, bar: float) -> None:
        """Isolate the shape only in the tags (None: untagged code) whose own
        running statements of it run slow (at least ``bar``), the same
        statement text may run fast elsewhere (other parameters, other
        callers): there it goes on. Held nearly all by one tag's requests:
        that tag only. When no tag's running statements are slow (it was
        found slow by the ones completed), everywhere."""
        by_tag: dict[str | None, float] = {}
        slow: set[str | None] = set()
        for (shape, tag), pair in self.pairs.items():
            if shape == iso.key:
                by_tag[tag] = by_tag.get(tag, 0.0) + pair.cs
                if _mean(pair.run_sum, pair.run_n) >= bar:
                    slow.add(tag)
        top = max(by_tag, key=lambda tag: by_tag[tag])
        if by_tag[top] >= SCOPE_SHARE * cs:
            slow = {top}
        if slow:
            iso.scoped, iso.tags = True, frozenset(slow)
            iso.scope = next(iter(slow)) if len(slow) == 1 else None

    def _explained(self, tag: str) -> bool:
        """One shape whose statements run slow holds at least half of ``tag``'s
        connections now: that shape, not the tag, is the culprit to isolate."""
        shapes = [i for i in self.isolated.values() if i.kind == SHAPE]
        held: dict[str | None, int] = {}
        for (shape, pair_tag), n in self.held.items():
            if pair_tag == tag and not any(iso.covers(shape, tag) for iso in shapes):
                held[shape] = held.get(shape, 0) + n
        top = max(held, key=lambda shape: held[shape], default=None)
        if top is None or 2 * held[top] < sum(held.values()):
            return False
        totals = self.totals(SHAPE)
        others = [r for k, r in totals.items() if k != top]
        return top in totals and self._slow(SHAPE, top, totals[top], others) is not None

    def _lift(self, now: float, obs: list[Observation], changes: list[Change]) -> None:
        standing = self.standing(now)
        for ident, iso in list(self.isolated.items()):
            if iso.cap is not None:
                # Lifted once its hold time is over and none of its running
                # statements is slow any more (capped again within a sample if
                # it comes back).
                if now - iso.since >= iso.hold and not any(
                    o.running >= iso.bar for o in obs if iso.covers(o.shape, o.tag)
                ):
                    del self.isolated[ident]
                    changes.append(Change("released", iso, self._held(iso)))
                continue
            if iso.step is None:
                if now - iso.since >= iso.hold and (not standing or now - iso.since >= HOLD_MAX):
                    iso.step, iso.step_at = 0, now
                continue
            mine = [o for o in obs if iso.covers(o.shape, o.tag)]
            seen = max((o.running if iso.kind == SHAPE else o.age for o in mine), default=0.0)
            if seen >= iso.slow:  # a probe as slow as the culprit was: isolate it again
                iso.step, iso.since = None, now
                iso.hold = min(iso.hold * 2, HOLD_MAX)
                iso.isolations += 1
                self.isolations[iso.kind] += 1
                changes.append(Change("isolated", iso, len(mine)))
            elif now - iso.step_at >= STEP:
                if iso.step + 1 >= len(RAMP):
                    del self.isolated[ident]
                    changes.append(Change("released", iso, len(mine)))
                else:
                    iso.step, iso.step_at = iso.step + 1, now

    def _held(self, iso: Isolation) -> int:
        return sum(n for key, n in self.held.items() if iso.covers(*key))

    def attribution(self) -> list[Attribution]:
        """Shapes and tags by their share of the connection-seconds, biggest first."""
        result = []
        for kind in (SHAPE, TAG):
            index = 0 if kind == SHAPE else 1
            totals: dict[str | None, list[float]] = {}
            for pair_key, pair in self.pairs.items():
                row = totals.setdefault(pair_key[index], [0.0, 0.0, 0.0, 0.0])
                row[0] += pair.cs
                if kind == SHAPE:
                    row[1] += pair.run_sum
                    row[2] += pair.run_n
                else:
                    row[1] += pair.age_sum
                    row[2] += pair.age_n
                row[3] += self.held.get(pair_key, 0)
            total = sum(row[0] for row in totals.values()) or 1.0
            for key, row in totals.items():
                iso = self.isolated.get((kind, key)) if key is not None else None
                result.append(
                    Attribution(
                        kind=kind,
                        key=key,
                        held=int(row[3]),
                        share=row[0] / total,
                        connection_seconds=row[0],
                        running_for=_mean(row[1], row[2]),
                        isolated=iso.phase if iso is not None else None,
                    )
                )
        result.sort(key=lambda a: (a.kind, -a.connection_seconds))
        return result


class ShedSummary:
    """Sheds counted by (reason, priority, tag) since the last ``load.shed`` event."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str | None], int] = {}
        #: Sheds counted so far, but culprit isolation's own: a sign of pressure.
        self.total = 0
        self.last = -math.inf
        self._lock = threading.Lock()

    def add(self, reason: str, priority: str) -> None:
        """Count one shed of the request under way (its tag from the context)."""
        request = _current.get()
        key = (reason, priority, request.tag if request is not None else None)
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if reason != REASON:
                self.total += 1

    def take(self, now: float) -> dict[tuple[str, str, str | None], int] | None:
        """The counts to log now (and start afresh), or None: not yet, or none."""
        if not self.counts or now - self.last < SHED_SUMMARY_EVERY:
            return None
        with self._lock:
            counts, self.counts = self.counts, {}
        self.last = now
        return counts

    def emit(self, log: EventLog, now: float) -> None:
        """Log ``load.shed`` if SHED_SUMMARY_EVERY has passed and something was shed."""
        counts = self.take(now)
        if counts is None:
            return
        by: dict[str, dict[str, int]] = {"reason": {}, "priority": {}, "tag": {}}
        for (reason, priority, tag), n in counts.items():
            for field, value in (
                ("reason", reason),
                ("priority", priority),
                ("tag", tag or "(none)"),
            ):
                by[field][value] = by[field].get(value, 0) + n
        log.emit(
            logging.WARNING,
            "load.shed",
            shed=sum(counts.values()),
            by_reason=by["reason"],
            by_priority=by["priority"],
            by_tag=by["tag"],
        )


class Culprits:
    """One guard's attribution and isolation (see the module docstring)."""

    def __init__(
        self,
        parts: GuardParts,
        breakers: Breakers,
        recorder: Recorder,
        *,
        changed: Callable[[], None],
        sheds: Callable[[], int],
        maybe_scan: Callable[[float], None],
    ) -> None:
        self._maybe_scan = maybe_scan
        self._parts = parts
        self._recorder = recorder
        #: Per stats row: (statements, seconds) at the last sample.
        self._counted: dict[str, tuple[int, float]] | None = None
        self._completed_at = -math.inf
        self._log = parts.log
        self._breakers = breakers
        self._changed = changed  # tag isolation changed: refresh the checkout hooks
        self._sheds = sheds  # sheds and timeouts so far
        self._lock = threading.Lock()
        self.detector = Detector()
        self.detector.enabled = False
        #: Isolated shapes by fingerprint; None while none is (read per statement).
        self.shapes: dict[str, Isolation] | None = None
        #: Isolated tags by tag (read per checkout while ``tags_on``).
        self.tags: dict[str, Isolation] = {}
        self.tags_on = False
        self._sheds_seen = 0
        self._sites: dict[tuple[str, str], str | None] = {}
        self._texts: dict[str, str] = {}

    def configure(self, cfg: Config) -> None:
        """Turn isolation on or off (turning it off releases every isolation)."""
        with self._lock:
            detector = self.detector
            detector.share = cfg.culprit_share
            detector.enabled = cfg.isolate_culprits
            changes = [] if cfg.isolate_culprits else detector.reset()
        self._apply(changes, None)

    def interval(self) -> float:
        """Seconds until the next sample is due."""
        return self.detector.interval()

    # -- sampling (from the scan) ----------------------------------------------------

    def sample(self, now: float) -> None:
        """Take one sample of the holds at ``now`` (perf_counter clock)."""
        gate = self._parts.gate()
        holds: list[Hold] = list(gate.out.values())
        db = self._parts.db_system()
        obs = []
        slow_seen = False  # a connection held for MIN_DURATION or more
        for hold in holds:
            statement = hold[STATEMENT]
            shape = None
            if statement is not None:
                fp = fingerprint(statement, db)
                shape = fp.id
                if shape not in self._texts and len(self._texts) < 1024:
                    self._texts[shape] = fp.text
            request = hold[REQUEST]
            since = hold[RUNNING_SINCE]
            running = max(0.0, now - since) if since else 0.0
            age = max(0.0, now - hold[T0])
            slow_seen = slow_seen or age >= MIN_DURATION
            obs.append(
                Observation(
                    shape=shape,
                    tag=request.tag if request is not None else None,
                    age=age,
                    running=running,
                    wire=hold[WIRE] is not None,
                )
            )
        capacity = gate.capacity
        try:
            waiting = [w.tag for w in list(gate.waiters)]
        except RuntimeError:  # changed while copied: none this time
            waiting = []
        # The completed statements (a pass over every query stat) only when a
        # decision may need them, else once a second: the deltas are kept.
        if slow_seen or now - self._completed_at >= CALM_INTERVAL:
            self._completed_at = now
            done = self._completed()
        else:
            done = {}
        sheds = self._sheds()
        pressed = (
            bool(gate.waiting)
            or sheds != self._sheds_seen
            or (capacity is not None and capacity > 0 and gate.in_use >= 0.9 * capacity)
        )
        self._sheds_seen = sheds
        with self._lock:
            changes = self.detector.sample(now, obs, pressed, done, waiting, capacity)
        if changes:
            self._apply(changes, holds)

    def _completed(self) -> dict[str, tuple[float, float]]:
        """Per shape, the statements completed since the last sample and their seconds."""
        counted = self._counted
        now: dict[str, tuple[int, float]] = {}
        done: dict[str, tuple[float, float]] = {}
        for key, stat in list(self._recorder.queries.items()):
            hist = stat.hist
            seconds = hist.sum
            before = counted.get(key) if counted is not None else None
            if before is not None and before[1] == seconds:
                now[key] = before  # nothing new: no bucket sum
                continue
            count = hist.count
            now[key] = (count, seconds)
            if counted is not None:
                n0, s0 = before if before is not None else (0, 0.0)
                if count > n0:
                    done[key] = (count - n0, seconds - s0)
        self._counted = now
        return done

    def _site(self, iso: Isolation, holds: list[Hold] | None) -> str | None:
        ident = (iso.kind, iso.key)
        site = self._sites.get(ident)
        if site is not None or holds is None:
            return site
        db = self._parts.db_system()
        for hold in holds:
            statement = hold[STATEMENT]
            request = hold[REQUEST]
            if iso.kind == SHAPE:
                if statement is None or fingerprint(statement, db).id != iso.key:
                    continue
            elif request is None or request.tag != iso.key:
                continue
            site = hold[SITE]
            if site is None:
                task = hold[TASK]
                site = task_site(task) if task is not None else thread_site(hold[THREAD])
            if site is not None:
                break
        self._sites[ident] = site
        return site

    def _apply(self, changes: list[Change], holds: list[Hold] | None) -> None:
        detector = self.detector
        isolated = list(detector.isolated.values())
        shapes = {iso.key: iso for iso in isolated if iso.kind == SHAPE}
        self.shapes = shapes or None
        self.tags = {iso.key: iso for iso in isolated if iso.kind == TAG}
        tags_on = bool(self.tags)
        if tags_on != self.tags_on:
            self.tags_on = tags_on
            self._changed()
        gate = self._parts.gate()
        for change in changes:
            iso = change.isolation
            site = self._site(iso, holds)
            fields: dict[str, Any] = {
                "kind": iso.kind,
                "shape": iso.key if iso.kind == SHAPE else None,
                "statement": self._texts.get(iso.key, "")[:200] if iso.kind == SHAPE else None,
                "tag": iso.key if iso.kind == TAG else iso.scope,
                "tags": sorted(iso.tags, key=lambda t: (t is not None, t or ""))
                if iso.tags is not None
                else None,
                "scoped": iso.scoped,
                "site": site,
                "share": round(iso.share, 3),
                "cap": iso.cap,
                "held": change.held,
                "size": gate.capacity,
                "checked_out": gate.in_use,
                "waiting": gate.waiting,
            }
            if change.action == "isolated":
                self._log.emit(
                    logging.WARNING,
                    "culprit.isolated",
                    **fields,
                    isolations=iso.isolations,
                    hold_s=iso.hold,
                )
            else:
                self._sites.pop((iso.kind, iso.key), None)
                self._log.emit(logging.INFO, "culprit.released", **fields)

    # -- enforcing -------------------------------------------------------------------

    def check_statement(self, shape: str, request: RequestContext | None) -> None:
        """A statement of an isolated shape: let it through as a probe, or shed it."""
        shapes = self.shapes
        iso = shapes.get(shape) if shapes is not None else None
        if iso is None or (
            iso.tags is not None and (request.tag if request else None) not in iso.tags
        ):
            return
        if iso.cap is not None:
            if self._running(iso) < iso.cap:
                return
        elif iso.admit():
            return
        raise self._shed(iso, request)

    def _running(self, iso: Isolation) -> int:
        """Statements of a capped shape running now (in its scope): a count
        over the holds, paid only by the statements of that shape while it
        is capped. Two racing threads may both pass at ``cap - 1``: a cap
        is a bound on a drain, not a semaphore."""
        db = self._parts.db_system()
        n = 0
        for hold in list(self._parts.gate().out.values()):
            statement = hold[STATEMENT]
            if statement is None or not hold[RUNNING_SINCE] or hold[WIRE] is not None:
                continue
            request = hold[REQUEST]
            if iso.covers(
                fingerprint(statement, db).id, request.tag if request is not None else None
            ):
                n += 1
        return n

    def admit(self, pool: object = None) -> None:
        """A checkout while a breaker is not closed or a tag is isolated."""
        # Sampled here too: an open breaker refuses the checkouts the scan rides on.
        self._maybe_scan(perf_counter())
        if self.tags_on:
            self.check_checkout()
        self._breakers.admit(pool)

    def check_checkout(self) -> None:
        """A checkout while some tag is isolated: shed it if its tag is (never a critical one)."""
        request = _current.get()
        if request is None or request.tag is None or request.priority == CRITICAL:
            return
        iso = self.tags.get(request.tag)
        if iso is None or iso.admit():
            return
        raise self._shed(iso, request)

    def _shed(self, iso: Isolation, request: RequestContext | None) -> LoadShed:
        priority = request.priority if request is not None else NORMAL
        self._parts.reject(REASON, priority)
        name = self._log.pool_name
        site = self._sites.get((iso.kind, iso.key))
        where = f" from {site}" if site else ""
        retry_after = max(0.1, iso.since + iso.hold - perf_counter())
        if iso.kind == SHAPE:
            text = self._texts.get(iso.key, "")
            scope = ""
            if iso.tags is not None:
                names = sorted(repr(tag) if tag else "untagged" for tag in iso.tags)
                scope = f" in requests tagged {', '.join(names)} only"
                if iso.tags == {None}:
                    scope = " in untagged code"
            what = f"statement shape {iso.key} {text[:80]!r}{where}{scope}"
            done = "not sending the statement"
        else:
            what = f"request tag {iso.key!r}{where}"
            done = "not checking out a connection"
        if iso.cap is not None:
            why = (
                f"is capped as a culprit at {iso.cap} statements at once: it held "
                f"{iso.cap} or more of the pool's {self._parts.gate().capacity} connections "
                f"running slow ({iso.bar:.2f}s or more while the rest run far faster)"
            )
        else:
            why = (
                f"is isolated as the culprit: it held {iso.share:.0%} of the pool's "
                "connection-seconds under pressure and runs slow"
            )
        return LoadShed(
            f"pool {name!r}: {what} {why}; {done} (retry after {retry_after:.1f}s)",
            reason=REASON,
            priority=priority,
            retry_after=retry_after,
            pool_name=name,
        )

    # -- reading ----------------------------------------------------------------------

    def attribution(self) -> list[Attribution]:
        """Shapes and tags by their share of the recent connection-seconds."""
        with self._lock:
            return self.detector.attribution()

    def isolated_by_kind(self) -> dict[str, int]:
        """How many shapes and tags are isolated now."""
        counts = {SHAPE: 0, TAG: 0}
        for iso in list(self.detector.isolated.values()):
            counts[iso.kind] += 1
        return counts

    def isolated(self) -> list[Isolation]:
        """The shapes and tags isolated (or being lifted) now."""
        return list(self.detector.isolated.values())
