"""Who holds the connections: the report behind ``pool.exhausted`` and PoolTimeout.

Built from the gate's map of checked-out records to their holds, only
when asked (a timeout, an alert, a call): it reads each holder's statement
and finds where its thread or task is in application code now, so the hot
path records nothing but a timestamp and a thread id.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import TYPE_CHECKING

from ._fingerprint import fingerprint
from ._hold import REQUEST, RUNNING_SINCE, SITE, STATEMENT, T0, TASK, THREAD, WAIT, WIRE
from ._sites import task_site, thread_site

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ._hold import Hold

__all__ = [
    "Holder",
    "HolderGroup",
    "describe_groups",
    "group_holders",
    "holders",
    "pinging_group",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Holder:
    """One checked-out connection.

    Attributes:
        age: seconds since it was checked out.
        wait: seconds its checkout waited for a permit.
        tag: the ``poolguard.request(tag=...)`` it was taken under, if any.
        fingerprint: id of the statement it runs now, or ran last.
        statement: that statement, normalised (no literal values).
        running: a statement is executing on it now.
        running_for: seconds the current statement has run (0 if none).
        idle_in_transaction: no statement runs, but one ran since checkout:
            with SQLAlchemy's autobegin the transaction is still open.
        site: where it was checked out (``capture_call_sites``), else where
            its thread or task is in application code now.
        on_wire: the guard's own round trip in flight before its statement,
            e.g. ``"SET LOCAL statement_timeout (behind a connection pooler:
            likely waiting for a server connection)"``; None when there is none.
    """

    age: float
    wait: float
    tag: str | None
    fingerprint: str | None
    statement: str | None
    running: bool
    running_for: float
    idle_in_transaction: bool
    site: str | None
    on_wire: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class HolderGroup:
    """Holders that run the same statement from the same site."""

    fingerprint: str | None
    statement: str | None
    site: str | None
    count: int
    oldest: float
    youngest: float
    running: int
    idle_in_transaction: int
    tags: tuple[str, ...]
    #: How many of them have the guard's own round trip in flight, and what it is.
    on_wire: int = 0
    on_wire_what: str | None = None


def holders(holds: Iterable[Hold], now: float, db_system: str | None = None) -> list[Holder]:
    """Describe each hold (``now`` on the same clock as the holds' ``T0``).

    ``db_system`` says how to read the statements (see :func:`.fingerprint`).
    """
    result = []
    for hold in holds:
        statement = hold[STATEMENT]
        fp = fingerprint(statement, db_system) if statement is not None else None
        since = hold[RUNNING_SINCE]
        running = bool(since)
        site = hold[SITE]
        if site is None:
            task = hold[TASK]
            site = task_site(task) if task is not None else thread_site(hold[THREAD])
        request = hold[REQUEST]
        result.append(
            Holder(
                age=max(0.0, now - hold[T0]),
                wait=hold[WAIT],
                tag=request.tag if request is not None else None,
                fingerprint=fp.id if fp is not None else None,
                statement=fp.text if fp is not None else None,
                running=running,
                running_for=max(0.0, now - since) if running else 0.0,
                idle_in_transaction=not running and statement is not None,
                site=site,
                on_wire=hold[WIRE],
            )
        )
    return result


def group_holders(items: Iterable[Holder]) -> list[HolderGroup]:
    """Group holders by statement and site, biggest group (then oldest) first."""
    groups: dict[tuple[str | None, str | None], list[Holder]] = defaultdict(list)
    for holder in items:
        groups[(holder.fingerprint, holder.site)].append(holder)
    result = [
        HolderGroup(
            fingerprint=fp,
            statement=members[0].statement,
            site=site,
            count=len(members),
            oldest=max(h.age for h in members),
            youngest=min(h.age for h in members),
            running=sum(h.running for h in members),
            idle_in_transaction=sum(h.idle_in_transaction for h in members),
            tags=tuple(sorted({h.tag for h in members if h.tag})),
            on_wire=sum(h.on_wire is not None for h in members),
            on_wire_what=next((h.on_wire for h in members if h.on_wire), None),
        )
        for (fp, site), members in groups.items()
    ]
    result.sort(key=lambda g: (-g.count, -g.oldest))
    return result


def pinging_group(pings: list[tuple[float, str]], now: float) -> HolderGroup | None:
    """Checkouts in their pre-ping (no hold yet) as one group, or None."""
    starts = [start for start, _ in pings]
    if not starts:
        return None
    what = pings[0][1]
    return HolderGroup(
        fingerprint=None,
        statement=None,
        site=None,
        count=len(starts),
        oldest=max(0.0, now - min(starts)),
        youngest=max(0.0, now - max(starts)),
        running=0,
        idle_in_transaction=0,
        tags=(),
        on_wire=len(starts),
        on_wire_what=what,
    )


def describe_groups(groups: list[HolderGroup], limit: int = 3) -> str:
    """One line naming the top groups, for error messages."""
    parts = []
    for g in groups[:limit]:
        what = g.statement or "no statement yet"
        state = []
        if g.running:
            state.append(f"{g.running} running")
        if g.idle_in_transaction:
            state.append(f"{g.idle_in_transaction} idle in transaction")
        if g.on_wire:
            state.append(f"{g.on_wire} on the wire: {g.on_wire_what}")
        tags = f" tag={','.join(g.tags)}" if g.tags else ""
        parts.append(
            f"{g.count}x {what[:120]!r} at {g.site or 'unknown site'}{tags} "
            f"(held {g.youngest:.1f}-{g.oldest:.1f}s{'; ' if state else ''}{', '.join(state)})"
        )
    if len(groups) > limit:
        parts.append(f"+{sum(g.count for g in groups[limit:])} more")
    return "; ".join(parts)
