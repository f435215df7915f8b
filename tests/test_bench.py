"""The benchmark's report on synthetic runs: statistics, ratios, targets' verdicts, the check.

These need neither the bench extra nor a measurement: `bench.report` imports no peer and no
matplotlib.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.plan import Scenario, plan

# Nothing here forks: run once, not once per child watcher.
pytestmark = pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)

SCENARIOS = plan(quick=True)

# A run where aioisolate meets every target: the medians of each (scenario, system).
MEDIANS = {
    ("latency", "aioisolate"): 1050.0,
    ("latency", "python-floor"): 1000.0,
    ("latency", "multiprocessing"): 2000.0,
    ("latency", "pebble-concurrent"): 3000.0,
    ("fanout", "aioisolate"): 980.0,
    ("fanout", "python-floor"): 1000.0,
    ("bandwidth", "aioisolate"): 900.0,
    ("bandwidth", "python-floor"): 500.0,
    ("zygote", "aioisolate-zygote"): 900.0,
    ("zygote", "python-floor"): 1000.0,
}


def synthetic(medians: dict[tuple[str, str], float], lag_p99: float = 1.0) -> dict[str, Any]:
    """A result file with one run per row of the quick plan."""
    runs = []
    for scenario in SCENARIOS:
        for system, param in scenario.rows:
            value = medians.get((scenario.name, system), 100.0)
            samples: dict[str, list[float]] = {scenario.metric: [value * 0.9, value, value * 1.1]}
            if scenario.name == "forkcost":
                samples |= {"base_us": [value / 2], "grown_mib": [50.0]}
            if scenario.name == "zygote":
                samples |= {"rss_mib": [float(param["rss_mib"])]}
            if scenario.name == "argument":
                samples |= {"base_ms": [value / 2]}
            if scenario.name == "lag":
                samples = {
                    "lag_ms": [0.1] * 98 + [lag_p99] * 2,
                    "idle_lag_ms": [0.1],
                    "wall_s": [1],
                }
            if scenario.name == "growth":
                samples = {
                    "rss_mib_before": [30.0],
                    "rss_mib_after": [31.0],
                    "fds_before": [8.0],
                    "fds_after": [8.0],
                    "calls_per_s": [300.0],
                }
            runs.append(
                {"scenario": scenario.name, "system": system, "param": param, "samples": samples}
            )
    return {"mode": "quick", "seed": 1, "wall_s": 60.0, "machine": {}, "runs": runs}


def verdicts(results: dict[str, Any]) -> dict[str, str]:
    return {t.name: t.verdict() for t in report.targets(report.Run(results, SCENARIOS))}


def test_percentile_interpolates_between_ranks() -> None:
    assert report.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert report.percentile([float(i) for i in range(11)], 10) == pytest.approx(1.0)
    assert report.percentile([7.0], 99) == 7.0
    assert math.isnan(report.percentile([], 50))
    stats = report.Stats.of([float(i) for i in range(101)])
    assert (stats.median, stats.p10, stats.p90, stats.n) == (50, 10, 90, 101)


def test_slope_is_least_squares() -> None:
    assert report.slope([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == pytest.approx(2.0)
    assert report.slope([(0.0, 0.0), (1.0, 1.0), (2.0, 0.0), (3.0, 1.0)]) == pytest.approx(0.2)
    assert math.isnan(report.slope([(1.0, 1.0), (1.0, 2.0)]))


def test_ratio_is_nan_when_a_side_is_missing() -> None:
    assert report.ratio(3.0, 2.0) == 1.5
    assert math.isnan(report.ratio(3.0, 0.0))
    assert math.isnan(report.ratio(report.NAN, 2.0))


@pytest.mark.parametrize(
    ("value", "text"),
    [(3422.4, "3,422"), (12.345, "12.3"), (0.25641, "0.256"), (0.0, "0"), (math.nan, "–")],
)
def test_numbers_keep_three_significant_digits(value: float, text: str) -> None:
    assert report.number(value) == text


def test_every_target_met() -> None:
    assert set(verdicts(synthetic(MEDIANS)).values()) == {"met"}


def test_targets_missed_say_by_how_much() -> None:
    slow = MEDIANS | {("latency", "aioisolate"): 1500.0, ("bandwidth", "aioisolate"): 500.0}
    found = verdicts(synthetic(slow, lag_p99=5.0))
    assert found["trivial call vs the Python sync fork floor"] == "missed by 0.400×"
    # The best isolated peer (multiprocessing, 2000 µs) against 1500 µs: 1.33, not 1.4.
    assert found["best isolated peer's latency ÷ ours"] == "missed by 0.0667×"
    assert found["1 MiB bytes result vs the raw pipe floor"] == "missed by 0.500×"
    assert found["loop lag p99 during a 20-call fan-out, default settings"].startswith("missed")


def test_zygote_targets_compare_it_with_itself_and_the_floor() -> None:
    results = synthetic(MEDIANS)
    for run in results["runs"]:
        if run["scenario"] != "zygote":
            continue
        # Slower with the largest parent, and the floor faster than it with the smallest.
        if run["system"] == "aioisolate-zygote" and run["param"] == {"rss_mib": 2048}:
            run["samples"]["us"] = [1500.0]
        if run["system"] == "python-floor" and run["param"] == {"rss_mib": 32}:
            run["samples"]["us"] = [800.0]
    found = verdicts(results)
    assert found["zygote trivial call, parent at 2,048 MiB vs at 32 MiB"] == "missed by 0.167×"
    floor = "zygote trivial call vs the Python sync fork floor, parent at 32 MiB"
    assert found[floor] == "missed by 0.125×"  # 900 ÷ 800


def test_fd_and_rss_growth_targets() -> None:
    results = synthetic(MEDIANS)
    growth = next(run for run in results["runs"] if run["scenario"] == "growth")
    growth["samples"]["fds_after"] = [9.0]
    growth["samples"]["rss_mib_after"] = [40.0]
    found = verdicts(results)
    assert found["open fds after 200 calls"] == "missed by 1.00 fds"
    assert found["RSS growth over 200 calls"] == "missed by 5.49 MB"  # 10 MiB is 10.49 MB


def test_check_passes_a_complete_run() -> None:
    assert report.check(synthetic(MEDIANS), SCENARIOS) == []


def test_check_names_missing_rows_errors_and_targets() -> None:
    results = synthetic(MEDIANS)
    results["runs"] = [run for run in results["runs"] if run["system"] != "python-floor"]
    results["runs"].append(
        {"scenario": "latency", "system": "loky", "param": {}, "error": "exit status 1: boom"}
    )
    problems = report.check(results, SCENARIOS)
    assert "latency loky {}: exit status 1: boom" in problems
    assert "latency aioisolate {}: no ratio to the floor" in problems
    assert any(p.startswith("target 'fan-out throughput at cap 2") for p in problems)


def test_render_shows_every_scenario_and_na_rows() -> None:
    text = report.render(synthetic(MEDIANS) | {"machine": MACHINE}, SCENARIOS, "figure.png")
    for scenario in SCENARIOS:
        assert f"### {scenario.title}" in text
    assert "![" in text
    assert "(figure.png)" in text
    assert "| C floor: fork, _exit, waitpid | yes | n/a |" in text
    # Zygote mode has a table of its own against the parent's size, not a fork cost row.
    assert "| aioisolate, zygote mode | yes | n/a |" in text
    assert "| aioisolate, zygote mode | yes | 2,048 MiB |" in text


def test_write_page_keeps_the_prose_around_the_markers(tmp_path: Path) -> None:
    page = tmp_path / "performance.md"
    report.write_page(page, "first\n")
    assert page.read_text().count(report.START) == 1
    page.write_text(
        page.read_text().replace("# Performance", "# Performance\n\nBy hand.") + "End.\n"
    )
    report.write_page(page, "second\n")
    text = page.read_text()
    assert "By hand." in text
    assert text.endswith("End.\n")
    assert "second\n" in text
    assert "first" not in text


def test_quick_plan_is_small() -> None:
    by_name: dict[str, Scenario] = {scenario.name: scenario for scenario in SCENARIOS}
    assert all(scenario.rounds == 1 for scenario in SCENARIOS)
    assert by_name["latency"].settings["calls"] <= 20
    assert {param["mib"] for _, param in by_name["bandwidth"].rows} == {1}
    systems = {name for name, _ in by_name["latency"].rows}
    assert {"aioisolate", "c-floor", "python-floor", "multiprocessing"} <= systems
    assert {"pebble-concurrent", "aioisolate-zygote"} <= systems
    # The zygote's targets need every size, in quick mode too: few calls each instead.
    assert by_name["zygote"].settings["calls"] <= 5
    rows = {(name, param["rss_mib"]) for name, param in by_name["zygote"].rows}
    assert rows >= {
        (name, mib)
        for name in ("aioisolate", "aioisolate-zygote", "python-floor")
        for mib in (32, 2048)
    }
    assert {param["mib"] for _, param in by_name["argument"].rows} == {1, 100}
    assert by_name["argument"].settings["reps"] <= 3


MACHINE = {
    "cpu": "test CPU",
    "logical_cpus": 2,
    "usable_cpus": 2,
    "ram_gib": 1.0,
    "kernel": "6.0",
    "python": "3.11",
    "page_size": 4096,
    "transparent_hugepages": "never",
    "load_average": [0.0, 0.0, 0.0],
    "date": "2026-01-01T00:00:00+00:00",
    "aioisolate_commit": "abc1234",
    "versions": {"aioisolate": "0.1"},
}
