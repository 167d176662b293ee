"""The chart: one panel per workload, a bar per contender (median, with the range)."""

from __future__ import annotations

import importlib
import os
import statistics
from typing import Any

from .runner import Results
from .targets import values

__all__ = ["draw"]

_AIOSHM = "#1f77b4"
_SEED = "#ff7f0e"
_PEER = "#8c8c8c"
_CEILING = "#2ca02c"


def _colour(key: str) -> str:
    if key.startswith("aioshm"):
        return _AIOSHM
    if key == "seed":
        return _SEED
    if key == "memcpy":
        return _CEILING
    return _PEER


def draw(results: Results, path: str) -> str | None:
    """Draw the chart into ``path`` (PNG); return why not if it cannot be drawn."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return "matplotlib is not installed"
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    panels = []
    for workload in results.workloads:
        rows = []
        for contender in results.contenders[workload.key]:
            got = values(results, workload.key, contender.key)
            failed = any(
                m.error for m in results.measurements.get((workload.key, contender.key), [])
            )
            if got and not failed:
                rows.append((contender.key, contender.label, got))
        if rows:
            panels.append((workload, rows))
    if not panels:
        return "nothing was measured"

    ncols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    tallest = max(len(rows) for _, rows in panels)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(7.5 * ncols, 0.42 * tallest * nrows + 1.6 * nrows), squeeze=False
    )
    for ax, (workload, rows) in zip(axes.flat, panels, strict=False):
        _panel(ax, workload.title, workload.unit, workload.higher_is_better, rows)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    how = "quick smoke run, 1 round" if results.quick else f"median of {results.rounds} rounds"
    fig.suptitle(
        f"aioshm benchmarks ({how}; bars: median, whiskers: min\N{EN DASH}max; log scale)",
        fontsize=11,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _panel(
    ax: Any, title: str, unit: str, higher_is_better: bool, rows: list[tuple[str, str, list[float]]]
) -> None:
    rows = list(reversed(rows))  # matplotlib draws the first bar at the bottom
    medians = [statistics.median(got) for _, _, got in rows]
    lows = [m - min(got) for m, (_, _, got) in zip(medians, rows, strict=True)]
    highs = [max(got) - m for m, (_, _, got) in zip(medians, rows, strict=True)]
    positions = list(range(len(rows)))
    ax.barh(
        positions,
        medians,
        xerr=[lows, highs],
        color=[_colour(key) for key, _, _ in rows],
        error_kw={"ecolor": "#333333", "capsize": 2, "linewidth": 0.8},
    )
    ax.set_yticks(positions, [name for _, name, _ in rows], fontsize=8)
    ax.set_xscale("log")
    better = "higher is better" if higher_is_better else "lower is better"
    ax.set_title(f"{title} ({unit}, {better})", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", which="both", alpha=0.25)
    top = max(m + h for m, h in zip(medians, highs, strict=True))
    ax.set_xlim(right=top * 5)
    for y, m, h in zip(positions, medians, highs, strict=True):
        text = f"{m:,.0f}" if unit == "msg/s" else f"{m:.2f}" if unit == "GB/s" else f"{m:.0f}"
        ax.text((m + h) * 1.15, y, text, va="center", fontsize=7)
    for key, _, got in rows:
        if key == "memcpy":
            ceiling = statistics.median(got)
            ax.axvline(ceiling, color=_CEILING, linestyle="--", linewidth=0.8)
            ax.text(ceiling, len(rows) - 0.4, " memcpy", color=_CEILING, fontsize=7, va="bottom")
