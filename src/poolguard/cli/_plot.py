"""``poolguard bench --plot``: throughput and p99 against pool size, as an image.

:func:`check_plot` refuses a plot that cannot be made before anything is
measured; :func:`plot` draws it (matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ._db import CliError, UsageError, install_hint

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from ._runner import Cell

__all__ = ["check_plot", "plot"]


def check_plot(path: Path | None) -> None:
    """Fail before measuring anything if the plot cannot be made."""
    if path is None:
        return
    if importlib.util.find_spec("matplotlib") is None:
        raise CliError(f"--plot needs matplotlib: {install_hint('plot')} "
                       "(or pip install matplotlib)")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        what = f"'.{suffix}' is no image format matplotlib writes" if suffix else (
            "the file name has no extension to tell the image format")
        raise UsageError(f"--plot {path}: {what}; use one of "
                         f"{', '.join('.' + f for f in formats)} (e.g. bench.png)")
    if not path.resolve().parent.is_dir():
        raise UsageError(f"--plot {path}: folder {path.parent} does not exist")


def plot(results: Sequence[Cell], recommended: int | None, path: Path, title: str) -> None:
    """Throughput (with the runs' range) and p99 against pool size, one line per
    concurrency, saved as an image (the format from the file name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    pools = sorted({r.pool_size for r in results})
    for c in sorted({r.concurrency for r in results}):
        rows = sorted((r for r in results if r.concurrency == c), key=lambda r: r.pool_size)
        xs = [r.pool_size for r in rows]
        spread = [[r.throughput - r.throughput_min for r in rows],
                  [r.throughput_max - r.throughput for r in rows]]
        left.errorbar(xs, [r.throughput for r in rows], yerr=spread, marker="o", capsize=3,
                      label=f"{c} workers")
        right.plot(xs, [r.p99_ms if r.p99_ms is not None else float("nan") for r in rows],
                   marker="o", label=f"{c} workers")
    for ax, label in ((left, "throughput (requests/s; bars: range of runs)"),
                      (right, "latency p99 (ms)")):
        ax.set_xlabel("pool size")
        ax.set_ylabel(label)
        if len(pools) > 1 and pools[-1] / pools[0] >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(pools)
        ax.set_xticklabels([str(p) for p in pools])
        ax.grid(True, alpha=0.3)
        if recommended is not None:
            ax.axvline(recommended, color="grey", linestyle="--", linewidth=1)
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    left.legend(loc="lower right")
    if recommended is not None:
        left.set_title(f"recommended pool size: {recommended}", fontsize=10)
    right.set_title("request latency, checkout included", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

