"""The recommendation of ``poolguard bench``: a pool size from the measured runs, and why.

The knee of each concurrency's throughput curve within the noise between
runs, Little's law from the measured hold times, and the server's
``max_connections`` against ``--replicas`` x pool size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._output import ms_text
from ._runner import Cell, cells

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._runner import Result

__all__ = ["KNEE_SHARE", "NOISY_PCT", "SQLITE_WARNING", "recommend"]

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


def recommend(
    results: Sequence[Result],
    *,
    replicas: int = 1,
    server_limit: dict[str, int] | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """The pool size to use, and why: the throughput knee within the noise between
    runs, Little's law, max_connections. ``results`` may hold several runs per cell."""
    reasoning: list[str] = []
    warnings: list[str] = []
    by_c: dict[int, list[Cell]] = {}
    for cell in cells(results):
        by_c.setdefault(cell.concurrency, []).append(cell)
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
        share = row.busy_connections / recommended
        reasoning.append(
            f"Recommended pool size: {recommended} (the largest knee, at {peak} workers); "
            f"there {row.busy_connections:.1f} of {recommended} connections are busy on "
            f"average ({share:.0%}), acquire wait p99 {row.wait_p99_ms:.1f} ms."
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
    if server_limit is not None:
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

