"""``python -m bench``: run the benchmark, interleaved, in fresh interpreters, and report it.

For each round, for each scenario, the rows (system and parameter) run in a shuffled order,
each in a new ``python -m bench.worker``: no system measures in an interpreter another has
warmed, and a slow spell of a shared machine spreads over every system instead of landing
on one. The raw samples go to JSON first, so the report can be redrawn from them
(``--report-only``) without measuring again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import machine, report
from .plan import Scenario, plan
from .systems import FLOOR_BIN_ENV, SYSTEMS

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "bench" / "build"
PAGE = ROOT / "docs" / "performance.md"
RESULTS = ROOT / "bench" / "results" / "latest.json"
WORKER_TIMEOUT = 300  # seconds; a worker past it is killed and its row shows the error


def build_floor() -> Path:
    """Compile bench/floor.c with $CC (default ``cc``) into bench/build/."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise SystemExit(f"bench: no C compiler {compiler!r} for the C floor (set CC)")
    BUILD.mkdir(parents=True, exist_ok=True)
    binary = BUILD / "floor"
    command = [compiler, "-O2", "-Wall", "-Wextra", "-o", str(binary), str(ROOT / "bench/floor.c")]
    subprocess.run(command, check=True)
    return binary


def run_worker(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """One measurement in a fresh interpreter: its samples and info, or its error."""
    command = [sys.executable, "-m", "bench.worker", json.dumps(spec)]
    # A session of its own, so that a worker past its time dies with everything it started.
    with subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as worker:
        try:
            out, err = worker.communicate(timeout=WORKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.communicate()
            return {"error": f"timed out after {WORKER_TIMEOUT} s"}
    if worker.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-5:])
        return {"error": f"exit status {worker.returncode}: {tail}"}
    try:
        measured: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"no JSON on stdout: {out[-200:]!r}"}
    return measured


def _describe(scenario: Scenario, run: dict[str, Any]) -> str:
    if run.get("error"):
        return "error: " + str(run["error"]).splitlines()[0][:100]
    values = run["samples"][scenario.metric]
    return f"{report.number(report.percentile(values, 50))} {scenario.unit}"


def measure(scenarios: list[Scenario], seed: int, floor: Path) -> dict[str, Any]:
    """Every row of every scenario, round after round, in shuffled order within a round."""
    shuffle = random.Random(seed).shuffle
    env = {**os.environ, FLOOR_BIN_ENV: str(floor)}
    jobs = []
    for round_ in range(1, max(s.rounds for s in scenarios) + 1):
        for scenario in scenarios:
            if round_ <= scenario.rounds:
                rows = list(scenario.rows)
                shuffle(rows)
                jobs += [(round_, scenario, name, param) for name, param in rows]
    runs = []
    start = time.monotonic()
    for done, (round_, scenario, name, param) in enumerate(jobs, 1):
        spec = {
            "scenario": scenario.name,
            "system": name,
            "param": param,
            "settings": scenario.settings,
        }
        began = time.monotonic()
        run = {**spec, "round": round_, **run_worker(spec, env)}
        run["seconds"] = round(time.monotonic() - began, 2)
        runs.append(run)
        label = " ".join(f"{k}={v}" for k, v in param.items())
        elapsed = time.monotonic() - start
        print(
            f"[{done:>3}/{len(jobs)} {elapsed / 60:4.1f} min] round {round_} {scenario.name} "
            f"{name} {label}: {_describe(scenario, run)} ({run['seconds']} s)",
            file=sys.stderr,
            flush=True,
        )
    return {"runs": runs, "wall_s": time.monotonic() - start}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round with tiny counts")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit non-zero if a ratio of the report is missing or not a finite number",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help=f"the markdown page to write between its markers (default: {PAGE.relative_to(ROOT)};"
        " with --quick, bench/results/quick.md); the figure goes beside it as .png",
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="the JSON of raw samples (default: bench/results/latest.json; with --quick, "
        "beside --out)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="redraw the report from --results"
    )
    parser.add_argument("--seed", type=int, default=None, help="of the shuffled order")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out: Path = args.out or (ROOT / "bench/results/quick.md" if args.quick else PAGE)
    results_path: Path = args.results or (out.with_suffix(".json") if args.quick else RESULTS)
    if args.report_only:
        results = json.loads(results_path.read_text())
        scenarios = plan(results["mode"] == "quick")
    else:
        scenarios = plan(args.quick)
        seed = args.seed if args.seed is not None else random.randrange(10_000)
        results = {
            "mode": "quick" if args.quick else "full",
            "seed": seed,
            "machine": machine.describe(ROOT),
            "systems": {name: system.title for name, system in SYSTEMS.items()},
        }
        results |= measure(scenarios, seed, build_floor())
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"bench: raw samples in {results_path}", file=sys.stderr)

    figure = out.with_suffix(".png")
    block = report.render(results, scenarios, figure.name)
    report.write_page(out, block)
    from . import plot

    plot.draw(results, scenarios, figure)
    print(block)
    print(f"bench: report in {out}, figure in {figure}", file=sys.stderr)
    if args.check:
        problems = report.check(results, scenarios)
        for problem in problems:
            print(f"bench --check: {problem}", file=sys.stderr)
        if problems:
            return 1
        print("bench --check: every ratio is a finite number", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
