"""The figure of a run (docs/performance.png): latency, fan-out, bandwidth and fork cost.

matplotlib is imported here only, and only when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .plan import Scenario
from .report import Results, Run
from .systems import SYSTEMS

OURS = "#d62728"
ZYGOTE = "#ff9896"  # ours too, in a lighter shade: the other mode
OTHERS = "#7f7f7f"
FLOORS = "#1f77b4"
FLOOR_COLORS = {"python-floor": FLOORS, "c-floor": "#17becf"}
PEER_COLORS = ["#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]


def _color(name: str) -> str:
    if name == "aioisolate-zygote":
        return ZYGOTE
    role = SYSTEMS[name].role
    return OURS if role == "ours" else FLOORS if role == "floor" else OTHERS


def _bars(
    ax: Any,
    run: Run,
    scenario: Scenario,
    rows: list[tuple[str, dict[str, Any]]],
    label: Callable[[dict[str, Any]], str] = lambda param: "",
) -> None:
    """Horizontal bars of the rows' medians with p10-p90 whiskers, first row on top."""
    labels, medians, low, high, colors = [], [], [], [], []
    for name, param in rows:
        stats = run.row(scenario.name, name, param).stats(scenario.metric)
        if not stats.n:
            continue
        labels.append(f"{name} {label(param)}".strip())
        medians.append(stats.median)
        low.append(stats.median - stats.p10)
        high.append(stats.p90 - stats.median)
        colors.append(_color(name))
    positions = range(len(labels))
    ax.barh(positions, medians, xerr=[low, high], color=colors, capsize=2)
    ax.set_yticks(list(positions), labels, fontsize=7)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)


def draw(results: Results, scenarios: list[Scenario], path: Path) -> None:
    """Write the figure of a run to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Run(results, scenarios)
    by_name = {scenario.name: scenario for scenario in scenarios}
    fig, axes = plt.subplots(2, 2, figsize=(13, 10), layout="constrained")
    (latency_ax, fanout_ax), (bandwidth_ax, forkcost_ax) = axes

    latency = by_name["latency"]
    _bars(latency_ax, run, latency, list(latency.rows))
    latency_ax.set_xscale("log")
    latency_ax.set_title("Trivial call latency, µs (log; lower is better)")

    fanout = by_name["fanout"]
    _bars(fanout_ax, run, fanout, list(fanout.rows), lambda param: f"cap {param['cap']}")
    fanout_ax.set_title("Fan-out of 0.5 ms tasks, calls/s by cap (higher is better)")

    bandwidth = by_name["bandwidth"]
    largest = max(param["mib"] for _, param in bandwidth.rows)
    rows = [(name, param) for name, param in bandwidth.rows if param["mib"] == largest]
    _bars(bandwidth_ax, run, bandwidth, rows, lambda param: param["kind"])
    bandwidth_ax.set_title(f"{largest} MiB result, MiB/s by kind (higher is better)")

    forkcost = by_name["forkcost"]
    peers = iter(PEER_COLORS)
    for name in dict.fromkeys(name for name, _ in forkcost.rows):
        points = run.forkcost_points(name, "numpy")
        if points:
            xs, ys = zip(*points, strict=True)
            role = SYSTEMS[name].role
            color = {"ours": OURS, "floor": FLOOR_COLORS.get(name)}.get(role) or next(peers)
            style = "--" if role == "floor" else "-"
            forkcost_ax.plot(xs, ys, style, color=color, marker="o", label=name)
    forkcost_ax.set_xlabel("resident MiB added to the parent (numpy array; 0: before)")
    forkcost_ax.set_ylabel("µs per trivial call")
    forkcost_ax.set_title("Fork cost against the parent's size (lower is better)")
    forkcost_ax.legend(fontsize=8)
    forkcost_ax.grid(alpha=0.3)

    fig.suptitle(f"aioisolate benchmark, {results['machine']['date']} ({results['mode']} mode)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
