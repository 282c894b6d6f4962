"""The recommendation of ``poolguard bench``: a pool size from the measured runs, and why.

The knee of each concurrency's throughput curve within the noise between
runs, Little's law from the measured hold times, and the server's
``max_connections`` against ``--replicas`` x pool size.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._output import ms_text
from ._runner import Cell, cells

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._bouncer import PgBouncerInfo
    from ._runner import Result

__all__ = ["KNEE_SHARE", "NOISY_PCT", "SQLITE_WARNING", "invalid_runs", "recommend"]

#: The knee: the smallest pool whose throughput reaches this share of the best.
KNEE_SHARE = 0.9
#: A spread between runs above this (% of the median) gets a warning.
NOISY_PCT = 10.0
#: Said of every result measured on the default SQLite file.
SQLITE_WARNING = (
    "this ran on SQLite (the default without --url): a file database inside this process, "
    "with no server, no network and one writer at a time. These figures show how the command "
    "works and tell nothing about the pool size for a real database server: run it with "
    "--url against yours (a staging copy), from a machine like the service's."
)


def _indistinct(cell: Cell, best: Cell) -> bool:
    """Whether the runs cannot tell ``cell`` from ``best``: their throughputs overlap."""
    return cell.runs > 1 and best.runs > 1 and cell.throughput_max >= best.throughput_min


def _knee(c: int, rows: list[Cell]) -> tuple[Cell | None, list[str]]:
    """The knee of one concurrency's throughput curve (rows by pool size), and why."""
    best = max(rows, key=lambda r: r.throughput)
    if best.throughput <= 0:
        return None, [f"{c} workers: no request was served; no knee."]
    knee = next(r for r in rows
                if r.throughput >= KNEE_SHARE * best.throughput or _indistinct(r, best))
    runs = f", median of {best.runs} runs, spread {best.spread_pct:.1f}%" if best.runs > 1 else ""
    by_noise = knee is not best and knee.throughput < KNEE_SHARE * best.throughput
    if by_noise:
        within = (f"the noise of it (its best run, {knee.throughput_max:,.0f} req/s, beat the "
                  f"worst run at pool {best.pool_size}, {best.throughput_min:,.0f} req/s)")
    else:
        within = f"{KNEE_SHARE:.0%} of it"
    text = (
        f"{c} workers: throughput is best at pool {best.pool_size} "
        f"({best.throughput:,.0f} req/s{runs}); the smallest pool within {within} is "
        f"{knee.pool_size} ({knee.throughput:,.0f} req/s, p99 {ms_text(knee.p99_ms)})"
    )
    if len(rows) == 1:
        text += "; only one pool size was measured, so this is no knee"
    elif by_noise:
        text += ("; the runs vary too much to rank the sizes above it: a longer --duration "
                 "or more --repeat would")
    elif knee.pool_size >= c:
        text += f"; every worker has a connection there: {c} workers never use more than {c}"
    elif knee is rows[0]:
        text += "; it is the smallest size measured: try smaller ones"
    elif knee is rows[-1]:
        text += "; it still grows at the largest size measured: try larger ones"
    elif knee is best:
        text += (f"; no larger pool did better (p99 at pool {rows[-1].pool_size}: "
                 f"{ms_text(rows[-1].p99_ms)})")
    else:
        gain = best.throughput / knee.throughput - 1
        text += (f"; beyond it, more connections add {gain:.0%} at most, "
                 f"p99 at pool {rows[-1].pool_size}: {ms_text(rows[-1].p99_ms)}")
    # Little's law where the pool is least the limit: the largest pool measured.
    free = rows[-1]
    return knee, [
        text + ".",
        _noise(c, rows, best),
        f"{c} workers, Little's law at pool {free.pool_size} (the least limited): "
        f"L = {free.throughput:,.0f} req/s x {free.mean_hold_ms:.2f} ms mean hold = "
        f"{free.busy_connections:.1f} connections busy on average.",
    ]


def _noise(c: int, rows: list[Cell], best: Cell) -> str:
    """What the spread between runs allows one to conclude at this concurrency."""
    if best.runs == 1:
        return (f"{c} workers: one run per pool size, so no spread was measured: a difference "
                "of a few percent may be noise (--repeat 3 or more).")
    tied = [r.pool_size for r in rows if r is not best and _indistinct(r, best)]
    if tied:
        sizes = ", ".join(map(str, sorted([*tied, best.pool_size])))
        return (f"{c} workers: pools {sizes} differ by less than the noise between runs "
                "(their throughput ranges overlap): these runs cannot tell them apart.")
    widest = max(r.spread_pct for r in rows)
    return (f"{c} workers: every other pool size is outside the noise of the best "
            f"(spread between runs at most {widest:.1f}%).")


def _server_check(
    results: Sequence[Cell], recommended: int | None, replicas: int, server: dict[str, int]
) -> tuple[dict[str, int], list[str], list[str]]:
    """``replicas`` x pool size against the server's max_connections: (limit, notes, warnings)."""
    usable = server["max_connections"] - server.get("reserved", 0)
    limit = {**server, "usable": usable}
    reserved = (f" less {server['reserved']} reserved for superusers"
                if server.get("reserved") else "")
    notes: list[str] = []
    warnings: list[str] = []
    if recommended is not None:
        total = replicas * recommended
        if total > usable:
            warnings.append(
                f"replicas x pool size = {replicas} x {recommended} = {total} connections, "
                f"more than the server's max_connections {server['max_connections']}{reserved} "
                f"({usable}): lower the pool size to {max(1, usable // replicas)} or put a "
                "connection pooler (PgBouncer, ProxySQL) in front."
            )
        else:
            notes.append(
                f"{replicas} replica(s) x pool {recommended} = {total} connections, within the "
                f"server's {usable} usable (max_connections {server['max_connections']}); "
                "other clients need room too."
            )
    over = sorted({r.pool_size for r in results if replicas * r.pool_size > usable})
    if over and (recommended is None or replicas * recommended <= usable):
        warnings.append(
            f"pool sizes {', '.join(map(str, over))} x {replicas} replica(s) would exceed the "
            f"server's {usable} usable connections."
        )
    return limit, notes, warnings


def _pooler_check(
    results: Sequence[Cell],
    recommended: int | None,
    replicas: int,
    pooler: PgBouncerInfo,
    server: dict[str, int] | None,
    busy: float | None,
) -> tuple[list[str], list[str]]:
    """``replicas`` x pool size against PgBouncer's limits: (notes, warnings).

    Behind PgBouncer the fleet's pools are client connections, bounded by
    ``max_client_conn``; the database sees PgBouncer's server connections
    (its ``pool_size``), whatever the pools add up to.
    """
    if not pooler.settings_known:
        return [], [
            f"a connection pooler seems to be in front ({pooler.found_by}); {pooler.problem}. "
            "Without its settings the fleet cannot be checked against them, and the "
            "database's max_connections says nothing about the fleet's pools."
        ]
    size, most = pooler.pool_size or 0, pooler.max_client_conn or 0
    notes = [
        f"{pooler.version or 'PgBouncer'} ({pooler.found_by}): pool_mode {pooler.pool_mode}, "
        f"{size} server connections for this database (default_pool_size "
        f"{pooler.default_pool_size}), max_client_conn {most}, query_wait_timeout "
        f"{pooler.query_wait_timeout:g} s." if pooler.query_wait_timeout is not None else
        f"{pooler.version or 'PgBouncer'} ({pooler.found_by}): pool_mode {pooler.pool_mode}, "
        f"{size} server connections for this database, max_client_conn {most}."
    ]
    warnings: list[str] = []
    if recommended is not None:
        clients = replicas * recommended
        if clients > most:
            warnings.append(
                f"replicas x pool size = {replicas} x {recommended} = {clients} client "
                f"connections, more than PgBouncer's max_client_conn {most}: it refuses the "
                f"rest. Lower the pool size to {max(1, most // replicas)} or raise "
                "max_client_conn."
            )
        else:
            notes.append(
                f"{replicas} replica(s) x pool {recommended} = {clients} client connections, "
                f"within PgBouncer's max_client_conn {most}; other clients need room too."
            )
        share = math.ceil(size / replicas)
        used = ""
        if busy is not None:
            used = (f"; the fleet held {busy:.1f} client connections on average (Little's "
                    "law)" + (", more than the server connections: requests waited in "
                              "PgBouncer's queue while holding them" if busy > size else ""))
        notes.append(
            f"The database sees at most {size} connections from PgBouncer (its pool_size), "
            f"{'which' if clients > size else 'of which'} the fleet's {clients} client "
            f"connections {'share' if clients > size else 'can use as many'}{used}. "
            "A pool per replica "
            f"above its share ({share} = {size} / {replicas} replicas, rounded up) only moves "
            "the waiting from the guard, where priorities and deadlines apply, into "
            "PgBouncer's queue, unless the load is uneven between replicas."
        )
    over = sorted({r.pool_size for r in results if replicas * r.pool_size > most})
    if over and (recommended is None or replicas * recommended <= most):
        warnings.append(
            f"pool sizes {', '.join(map(str, over))} x {replicas} replica(s) would exceed "
            f"PgBouncer's max_client_conn {most}."
        )
    if server is not None:
        usable = server["max_connections"] - server.get("reserved", 0)
        needed = size + (pooler.reserve_pool_size or 0)
        if needed > usable:
            warnings.append(
                f"PgBouncer may open {needed} server connections for this database (pool_size "
                f"+ reserve_pool_size), more than the server's {usable} usable: lower "
                "PgBouncer's pool_size."
            )
    return notes, warnings


def invalid_runs(results: Sequence[Result]) -> list[str]:
    """Why the runs cannot be trusted: one line per cell whose requests failed."""
    lines = []
    for cell in cells(results):
        runs = [r for r in results
                if (r.pool_size, r.concurrency) == (cell.pool_size, cell.concurrency)]
        requests = sum(r.requests for r in runs)
        kinds: dict[str, int] = {}
        for r in runs:
            for key, n in r.error_types.items():
                kinds[key] = kinds.get(key, 0) + n
        failed = cell.timeouts + cell.errors
        if not failed:
            continue
        what = ([f"{cell.timeouts} timed out"] if cell.timeouts else []) + [
            f"{n} {key.removeprefix('error:')}" for key, n in sorted(kinds.items())
        ]
        lines.append(
            f"pool {cell.pool_size} x {cell.concurrency} workers: {failed} of {requests} "
            f"requests failed ({failed / max(requests, 1):.1%}: {', '.join(what)})."
        )
    return lines


def recommend(
    results: Sequence[Result],
    *,
    replicas: int = 1,
    server_limit: dict[str, int] | None = None,
    backend: str | None = None,
    pooler: PgBouncerInfo | None = None,
) -> dict[str, Any]:
    """The pool size to use, and why: the throughput knee within the noise between
    runs, Little's law, max_connections (or PgBouncer's limits when ``pooler``).
    ``results`` may hold several runs per cell.

    Runs where requests failed (timeouts, errors) make the whole sweep
    invalid: it then recommends nothing and says which cells failed.
    """
    reasoning: list[str] = []
    warnings: list[str] = []
    by_c: dict[int, list[Cell]] = {}
    for cell in cells(results):
        by_c.setdefault(cell.concurrency, []).append(cell)
    invalid = invalid_runs(results)
    if invalid:
        return {
            "valid": False,
            "invalid_because": invalid,
            "recommended_pool_size": None,
            "knee_share": KNEE_SHARE,
            "knees": {},
            "littles_law": {},
            "replicas": replicas,
            "server_limit": None,
            "reasoning": [],
            "warnings": ([] if pooler is None else
                         _pooler_check([], None, replicas, pooler, None, None)[1]),
        }
    knees: dict[int, Cell] = {}
    for c, rows in sorted(by_c.items()):
        rows.sort(key=lambda r: r.pool_size)
        knee, why = _knee(c, rows)
        reasoning += why
        if knee is not None:
            knees[c] = knee
    recommended = max((k.pool_size for k in knees.values()), default=None)
    if recommended is not None:
        peak = max(knees, key=lambda c: (knees[c].pool_size, c))
        row = knees[peak]
        share = row.busy_connections / (recommended * replicas)
        fleet = f" ({replicas} replicas: all their pools)" if replicas > 1 else ""
        reasoning.append(
            f"Recommended pool size: {recommended} (the largest knee, at {peak} workers); "
            f"there {row.busy_connections:.1f} of {recommended * replicas} connections{fleet} "
            f"are busy on average ({share:.0%}), acquire wait p99 {row.wait_p99_ms:.1f} ms."
        )
        reasoning.append(
            f"For another rate, Little's law with this hold time: each 1,000 req/s keeps "
            f"{row.mean_hold_ms:.2f} connections busy on average (pool >= rate x "
            f"{row.mean_hold_ms / 1000:.5f} s, plus headroom for bursts)."
        )
        if row.timeouts or row.rejections:
            warnings.append(
                f"at pool {recommended} x {peak} workers, {row.timeouts} checkouts timed out "
                f"and {row.rejections} were rejected: the database, not the pool, is the limit "
                "at that concurrency; bound the concurrency (or the waits) instead."
            )
    limit = None
    if pooler is not None:
        busy = knees[peak].busy_connections if recommended is not None else None
        all_cells = [cell for rows in by_c.values() for cell in rows]
        notes, more = _pooler_check(all_cells, recommended, replicas, pooler, server_limit,
                                    busy)
        reasoning += notes
        warnings += more
        limit = server_limit
    elif server_limit is not None:
        all_cells = [cell for rows in by_c.values() for cell in rows]
        limit, notes, more = _server_check(all_cells, recommended, replicas, server_limit)
        reasoning += notes
        warnings += more
    noisiest = max((cell for rows in by_c.values() for cell in rows),
                   key=lambda cell: cell.spread_pct, default=None)
    if noisiest is not None and noisiest.spread_pct > NOISY_PCT:
        warnings.append(
            f"the same pool size and concurrency varied by up to +/-{noisiest.spread_pct:.0f}% "
            f"between runs (pool {noisiest.pool_size}, {noisiest.concurrency} workers): the "
            "machine is noisy (other load?), and differences smaller than that mean nothing. "
            "Take a longer --duration or more --repeat on a quieter machine before trusting "
            "the recommendation."
        )
    if backend == "sqlite":
        warnings.append(SQLITE_WARNING)
    return {
        "valid": True,
        "invalid_because": [],
        "recommended_pool_size": recommended,
        "knee_share": KNEE_SHARE,
        "knees": {str(c): k.pool_size for c, k in knees.items()},
        "littles_law": {
            str(c): {
                "pool_size": rows[-1].pool_size,
                "throughput": rows[-1].throughput,
                "mean_hold_ms": rows[-1].mean_hold_ms,
                "busy_connections": rows[-1].busy_connections,
            }
            for c, rows in sorted(by_c.items())
        },
        "replicas": replicas,
        "server_limit": limit,
        "reasoning": reasoning,
        "warnings": warnings,
    }

