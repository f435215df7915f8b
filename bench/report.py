"""From the raw samples of a run to its report: statistics, tables, targets, and the check.

Every figure is a median over all samples of all rounds, with p10-p90 as its spread; every
ratio divides two medians of the same run. Nothing here imports matplotlib (see `plot`), so the
tests can import it without the bench extra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .plan import Param, Scenario, floor_param, key, ours_param
from .systems import SYSTEMS

Results = dict[str, Any]  # a run as saved to JSON: machine, mode, runs...

START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
NAN = float("nan")
MB_PER_MIB = 2**20 / 1e6


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return NAN
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Stats:
    median: float
    p10: float
    p90: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        return cls(
            percentile(values, 50), percentile(values, 10), percentile(values, 90), len(values)
        )


def ratio(value: float, reference: float) -> float:
    """``value / reference``, NaN when either is missing or the reference is zero."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return NAN
    return value / reference


def slope(points: Sequence[tuple[float, float]]) -> float:
    """The least-squares slope of y over x; NaN without two distinct x."""
    if len({x for x, _ in points}) < 2:
        return NAN
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return covariance / sum((x - mean_x) ** 2 for x, _ in points)


@dataclass
class Row:
    """All the runs of one (scenario, system, parameter): samples pooled over the rounds."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    info: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def stats(self, metric: str) -> Stats:
        return Stats.of(self.samples.get(metric, []))

    def median(self, metric: str) -> float:
        return self.stats(metric).median


def gather(results: Results) -> dict[tuple[str, str, str], Row]:
    """The runs of a result file, grouped by (scenario, system, parameter key)."""
    rows: dict[tuple[str, str, str], Row] = {}
    for run in results["runs"]:
        row = rows.setdefault((run["scenario"], run["system"], key(run["param"])), Row())
        if run.get("error"):
            row.errors.append(run["error"])
            continue
        for metric, values in run["samples"].items():
            row.samples.setdefault(metric, []).extend(values)
        row.info.append(run.get("info", {}))
    return rows


class Run:
    """A run's results, read through its plan."""

    def __init__(self, results: Results, scenarios: list[Scenario]) -> None:
        self.results = results
        self.scenarios = {scenario.name: scenario for scenario in scenarios}
        self.rows = gather(results)

    def row(self, scenario: str, system: str, param: Param) -> Row:
        return self.rows.get((scenario, system, key(param)), Row())

    def median(self, scenario: str, system: str, param: Param, metric: str | None = None) -> float:
        return self.row(scenario, system, param).median(metric or self.scenarios[scenario].metric)

    def forkcost_points(self, system: str, kind: str) -> list[tuple[float, float]]:
        """(MiB grown, median µs) of a system's fork-cost rows of one kind, and (0, the small
        parent's median over all of them) first."""
        rows = [
            row
            for name, param in self.scenarios["forkcost"].rows
            if name == system and param["kind"] == kind
            for row in [self.row("forkcost", name, param)]
            if row.samples.get("us")
        ]
        if not rows:
            return []
        base = Stats.of([value for row in rows for value in row.samples["base_us"]]).median
        return [(0.0, base)] + [(row.median("grown_mib"), row.median("us")) for row in rows]

    def smallest_parent(self) -> Param:
        """The zygote scenario's parameter with the parent at its smallest."""
        sizes = [param["rss_mib"] for _, param in self.scenarios["zygote"].rows]
        return {"rss_mib": min(sizes, default=0)}

    def versus_smallest(self, system: str, param: Param) -> float:
        """A zygote scenario row's median over the same system's with the smallest parent."""
        value = self.median("zygote", system, param)
        return ratio(value, self.median("zygote", system, self.smallest_parent()))

    def versus_ours(self, scenario: Scenario, system: str, param: Param) -> float:
        value = self.median(scenario.name, system, param)
        ours = self.median(scenario.name, "aioisolate", ours_param(scenario, param))
        return ratio(value, ours)

    def versus_floor(self, scenario: Scenario, system: str, param: Param) -> float:
        if scenario.floor is None:
            return NAN
        value = self.median(scenario.name, system, param)
        floor = self.median(scenario.name, scenario.floor, floor_param(scenario, param))
        return ratio(value, floor)


# --- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal of the project and what this run measured against it."""

    name: str
    measured: float
    goal: float
    relation: str  # "<=", ">=", "<" or "=="
    unit: str  # appended to numbers: "×", " ms", " MB", " fds"
    detail: str = ""

    def met(self) -> bool:
        if not math.isfinite(self.measured):
            return False
        return {
            "<=": self.measured <= self.goal,
            "<": self.measured < self.goal,
            ">=": self.measured >= self.goal,
            "==": self.measured == self.goal,
        }[self.relation]

    def verdict(self) -> str:
        if not math.isfinite(self.measured):
            return "not measured"
        if self.met():
            return "met"
        return f"missed by {number(abs(self.measured - self.goal))}{self.unit}"


def targets(run: Run) -> list[Target]:
    """The project's targets, from this run's medians."""
    found: list[Target] = []
    median = run.median

    ours = median("latency", "aioisolate", {})
    found.append(
        Target(
            "trivial call vs the Python sync fork floor",
            ratio(ours, median("latency", "python-floor", {})),
            1.1,
            "<=",
            "×",
            "latency ÷ floor latency",
        )
    )
    peers = {
        name: median("latency", name, {})
        for name, system in SYSTEMS.items()
        if system.role == "peer" and system.isolated
    }
    measured = {name: value for name, value in peers.items() if math.isfinite(value)}
    best = min(measured, key=measured.__getitem__) if measured else None
    found.append(
        Target(
            "best isolated peer's latency ÷ ours",
            ratio(measured[best], ours) if best else NAN,
            1.4,
            ">=",
            "×",
            f"best isolated peer: {SYSTEMS[best].title}" if best else "no isolated peer measured",
        )
    )
    found.append(
        Target(
            "fan-out throughput at cap 2 vs the Python floor",
            ratio(
                median("fanout", "aioisolate", {"cap": 2}),
                median("fanout", "python-floor", {"cap": 2}),
            ),
            0.95,
            ">=",
            "×",
            "calls/s ÷ floor calls/s",
        )
    )
    largest = max(
        (param["mib"] for name, param in run.scenarios["bandwidth"].rows if name == "aioisolate"),
        default=256,
    )
    floor = median("bandwidth", "python-floor", {"kind": "raw", "mib": largest})
    for kind in ("bytes", "numpy"):
        found.append(
            Target(
                f"{largest} MiB {kind} result vs the raw pipe floor",
                ratio(median("bandwidth", "aioisolate", {"kind": kind, "mib": largest}), floor),
                1.5,
                ">=",
                "×",
                "MiB/s ÷ raw pipe MiB/s",
            )
        )
    small = run.smallest_parent()
    large = max((param["rss_mib"] for _, param in run.scenarios["zygote"].rows), default=0)
    at_small = f"at {small['rss_mib']:,} MiB"
    found.append(
        Target(
            f"zygote trivial call, parent at {large:,} MiB vs {at_small}",
            run.versus_smallest("aioisolate-zygote", {"rss_mib": large}),
            1.5,
            "<=",
            "×",
            "zygote latency ÷ its own with the smallest parent",
        )
    )
    found.append(
        Target(
            f"zygote trivial call vs the Python sync fork floor, parent {at_small}",
            ratio(
                median("zygote", "aioisolate-zygote", small),
                median("zygote", "python-floor", small),
            ),
            1.0,
            "<",
            "×",
            "zygote latency ÷ floor latency",
        )
    )
    lag = percentile(run.row("lag", "aioisolate", {"cap": None}).samples.get("lag_ms", []), 99)
    calls = run.scenarios["lag"].settings["calls"]
    found.append(
        Target(
            f"loop lag p99 during a {calls}-call fan-out, default settings",
            lag,
            3.0,
            "<=",
            " ms",
            "lateness of a 1 ms ticker",
        )
    )
    growth = run.row("growth", "aioisolate", {})
    calls = run.scenarios["growth"].settings["calls"]
    rss = growth.median("rss_mib_after") - growth.median("rss_mib_before")
    found.append(
        Target(
            f"RSS growth over {calls:,} calls", rss * MB_PER_MIB, 5.0, "<", " MB", "after − before"
        )
    )
    fds = growth.median("fds_after") - growth.median("fds_before")
    found.append(
        Target(f"open fds after {calls:,} calls", fds, 0.0, "==", " fds", "after − before")
    )
    return found


# --- formatting ------------------------------------------------------------------------------


def number(value: float) -> str:
    """Three significant digits, or the whole number above 1,000: 3,422 / 12.5 / 0.256."""
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{round(value, digits):,.{digits}f}"


def times(value: float) -> str:
    return f"{number(value)}×" if math.isfinite(value) else "–"


def spread(stats: Stats) -> str:
    return f"{number(stats.p10)}–{number(stats.p90)}" if stats.n else "–"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _param_cells(scenario: Scenario, param: Param) -> list[str]:
    if scenario.name == "fanout":
        return [str(param["cap"])]
    if scenario.name == "bandwidth":
        return [param["kind"]]
    if scenario.name == "forkcost":
        return [f"{param['mib']:,} MiB {param['kind']}"]
    if scenario.name == "zygote":
        return [f"{param['rss_mib']:,} MiB"]
    if scenario.name == "argument":
        return [f"{param['mib']:,} MiB bytes"]
    return []


PARAM_HEADERS = {
    "fanout": ["cap"],
    "bandwidth": ["result"],
    "argument": ["argument"],
    "forkcost": ["parent holds"],
    "zygote": ["parent's size"],
}


def _note(row: Row, system: str) -> str:
    if row.errors:
        return "error: " + row.errors[-1].strip().splitlines()[-1][:120]
    return SYSTEMS[system].note


def _generic_table(run: Run, scenario: Scenario, rows: Sequence[tuple[str, Param]]) -> str:
    extra = {
        "latency": ["loop", "parent faults/call"],
        "argument": ["trivial call ms", "over trivial ms", "MiB/s"],
        "forkcost": ["RSS grown MiB", "small parent µs", "µs per MiB"],
        "zygote": ["RSS MiB", "× smallest parent"],
    }.get(scenario.name, [])
    header = [
        "system",
        "isolated per call",
        *PARAM_HEADERS.get(scenario.name, []),
        f"median {scenario.unit}",
        "p10–p90",
        "× aioisolate",
        "× floor",
        "n",
        *extra,
        "note",
    ]
    lines = []
    for name, param in rows:
        system, row = SYSTEMS[name], run.row(scenario.name, name, param)
        stats = row.stats(scenario.metric)
        cells = [
            system.title,
            yes_no(system.isolated),
            *_param_cells(scenario, param),
            number(stats.median) if stats.n else ("error" if row.errors else "not run"),
            spread(stats),
            times(run.versus_ours(scenario, name, param)),
            times(run.versus_floor(scenario, name, param)),
            f"{stats.n:,}",
        ]
        if scenario.name == "latency":
            loop = {"c-floor": "none (C)", "python-floor": "none (blocking)"}.get(name, system.loop)
            cells += [loop, number(row.median("minflt"))]
        elif scenario.name == "forkcost":
            grown, base = row.median("grown_mib"), row.median("base_us")
            cells += [number(grown), number(base), number(ratio(stats.median - base, grown))]
        elif scenario.name == "argument":
            base = row.median("base_ms")
            rate = ratio(param["mib"], stats.median / 1e3)
            cells += [number(base), number(stats.median - base), number(rate)]
        elif scenario.name == "zygote":
            cells += [number(row.median("rss_mib")), times(run.versus_smallest(name, param))]
        lines.append([*cells, _note(row, name)])
    for name, reason in scenario.na.items():
        system = SYSTEMS[name]
        blanks = [""] * (len(header) - 4)
        lines.append([system.title, yes_no(system.isolated), "n/a", *blanks, reason])
    return table(header, lines)


def _per_mib_table(run: Run, scenario: Scenario) -> str:
    kinds = list(dict.fromkeys(param["kind"] for _, param in scenario.rows))
    header = ["system", *(f"{kind}: µs per resident MiB" for kind in kinds)]
    lines = [
        [SYSTEMS[name].title, *(number(slope(run.forkcost_points(name, kind))) for kind in kinds)]
        for name in dict.fromkeys(name for name, _ in scenario.rows)
    ]
    return table(header, lines)


def _lag_table(run: Run, scenario: Scenario) -> str:
    header = [
        "system",
        "isolated per call",
        "concurrency",
        "p50 ms",
        "p99 ms",
        "max ms",
        "× aioisolate (p99)",
        "idle p99 ms",
        "fan-out wall s",
        "ticks",
        "note",
    ]
    ours = percentile(run.row("lag", "aioisolate", {"cap": None}).samples.get("lag_ms", []), 99)
    lines = []
    for name, param in scenario.rows:
        system, row = SYSTEMS[name], run.row("lag", name, param)
        lag = row.samples.get("lag_ms", [])
        p99 = percentile(lag, 99)
        lines.append(
            [
                system.title,
                yes_no(system.isolated),
                "default" if param["cap"] is None else f"cap {param['cap']}",
                number(percentile(lag, 50)),
                number(p99),
                number(max(lag, default=NAN)),
                times(ratio(p99, ours)),
                number(percentile(row.samples.get("idle_lag_ms", []), 99)),
                number(row.median("wall_s")),
                f"{len(lag):,}",
                _note(row, name),
            ]
        )
    return table(header, lines)


def _growth_table(run: Run, scenario: Scenario) -> str:
    row = run.row("growth", "aioisolate", {})
    before, after = row.median("rss_mib_before"), row.median("rss_mib_after")
    fds_before, fds_after = row.median("fds_before"), row.median("fds_after")
    header = ["calls", "RSS before MiB", "RSS after MiB", "growth MiB", "fds before", "fds after",
              "calls/s", "note"]  # fmt: skip
    cells = [
        f"{scenario.settings['calls']:,}",
        number(before),
        number(after),
        number(after - before),
        f"{fds_before:.0f}",
        f"{fds_after:.0f}",
        number(row.median("calls_per_s")),
        _note(row, "aioisolate"),
    ]
    return table(header, [cells])


def _targets_table(run: Run) -> str:
    rows = [
        [
            target.name,
            f"{number(target.measured)}{target.unit}",
            f"{target.relation} {number(target.goal)}{target.unit}",
            target.verdict(),
            target.detail,
        ]
        for target in targets(run)
    ]
    return table(["target", "measured", "goal", "verdict", "how"], rows)


def _machine_table(results: Results) -> str:
    m = results["machine"]
    rows = [
        ["CPU", f"{m['cpu']}, {m['logical_cpus']} logical CPUs ({m['usable_cpus']} usable)"],
        ["RAM", f"{m['ram_gib']} GiB"],
        ["kernel", f"Linux {m['kernel']}, page size {m['page_size']} B, "
                   f"transparent huge pages: {m['transparent_hugepages']}"],
        ["Python", m["python"]],
        ["date", m["date"]],
        ["load average at start", " / ".join(str(x) for x in m["load_average"])],
        ["aioisolate", f"{m['versions'].get('aioisolate')} at {m['aioisolate_commit']}"],
        ["peers", ", ".join(f"{k} {v}" for k, v in m["versions"].items() if k != "aioisolate")],
    ]  # fmt: skip
    return table(["machine", ""], rows)


def _settings(scenario: Scenario) -> str:
    settings = ", ".join(f"{k}={v:,}" for k, v in scenario.settings.items())
    rounds = f"{scenario.rounds} round" + ("s" if scenario.rounds > 1 else "")
    return f"_{rounds}; per run: {settings}._"


def _rounds(scenarios: list[Scenario]) -> str:
    return ", ".join(f"{s.name} {s.rounds}" for s in scenarios)


def render(results: Results, scenarios: list[Scenario], plot_name: str | None) -> str:
    """The markdown of a run: machine, targets, one table per scenario, the plot."""
    run = Run(results, scenarios)
    wall = results.get("wall_s", NAN)
    parts = [
        f"_Measured by `python -m bench` ({results['mode']} mode) in {wall / 60:.1f} min, "
        f"seed {results['seed']}; rounds: {_rounds(scenarios)}. Every figure is the median of "
        "all samples of all rounds, with p10–p90 as its spread; every ratio divides two medians "
        "of this run. × aioisolate and × floor are this row's median over theirs: below 1 is "
        "faster for times, slower for rates._",
        _machine_table(results),
        "### Targets",
        _targets_table(run),
    ]
    if plot_name:
        parts.append(f"![latency, fan-out, bandwidth and fork cost of this run]({plot_name})")
    for scenario in scenarios:
        better = "higher" if scenario.higher_is_better else "lower"
        parts.append(f"### {scenario.title}")
        parts.append(
            f"{scenario.what[0].upper()}{scenario.what[1:]} ({better} is better). {scenario.how} "
            f"{_settings(scenario)}"
        )
        if scenario.name == "lag":
            parts.append(_lag_table(run, scenario))
        elif scenario.name == "growth":
            parts.append(_growth_table(run, scenario))
        elif scenario.name == "bandwidth":
            for mib in sorted({param["mib"] for _, param in scenario.rows}):
                rows = [(name, param) for name, param in scenario.rows if param["mib"] == mib]
                parts.append(f"**{mib} MiB**")
                parts.append(_generic_table(run, scenario, rows))
        else:
            parts.append(_generic_table(run, scenario, scenario.rows))
        if scenario.name == "forkcost":
            parts.append(
                "The cost per resident MiB, fitted by least squares over the sizes of each kind "
                "(with the small parent at 0 MiB):"
            )
            parts.append(_per_mib_table(run, scenario))
    return "\n\n".join(parts) + "\n"


def write_page(path: Path, block: str) -> None:
    """Put ``block`` between the markers of the page at ``path``; keep the prose around them."""
    text = path.read_text() if path.exists() else "# Performance\n\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
    else:
        head, tail = text.rstrip("\n") + "\n\n", "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{START}\n{block}{END}{tail}")


# --- the check -------------------------------------------------------------------------------


def check(results: Results, scenarios: list[Scenario]) -> list[str]:
    """What is missing or not a finite number among the ratios the report should show."""
    run = Run(results, scenarios)
    problems = []
    for scenario in scenarios:
        for name, param in scenario.rows:
            where = f"{scenario.name} {name} {key(param)}"
            for error in run.row(scenario.name, name, param).errors:
                problems.append(f"{where}: {error.strip().splitlines()[-1]}")
            if scenario.name == "lag":
                lag = run.row("lag", name, param).samples.get("lag_ms", [])
                if not math.isfinite(percentile(lag, 99)):
                    problems.append(f"{where}: no lag measured")
                continue
            if scenario.name == "growth":
                continue
            if not math.isfinite(run.versus_ours(scenario, name, param)):
                problems.append(f"{where}: no ratio to aioisolate")
            if scenario.floor and not math.isfinite(run.versus_floor(scenario, name, param)):
                problems.append(f"{where}: no ratio to the floor")
    for target in targets(run):
        if not math.isfinite(target.measured):
            problems.append(f"target {target.name!r}: not measured")
    return problems
