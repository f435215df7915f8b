"""What a run measures: the scenarios, their rows (system and parameter), counts and rounds.

Full mode is sized for about 15 minutes on 2 cores; quick mode checks that every number comes
out, in well under 2 minutes, with tiny counts and without the peers that take 100 ms a call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .systems import SYSTEMS

Param = dict[str, Any]
Settings = dict[str, Any]

# Why a system has no row in a scenario (the tables show these as n/a).
REUSES_WORKERS = "reuses its workers: the parent's size never enters a call"
STARTS_FRESH = "starts its workers by spawn or forkserver, not by forking the parent"
NO_RESULT = "times fork and exit only: it runs no task and returns nothing"
POLLS = "forks as pebble.concurrent.process does, then polls for the result every 100 ms"
SAME_RESULTS = (
    "returns its result as fork mode does (the same pipe and spill file); what differs is the "
    "way in: see Cost of a large argument"
)
FROM_ZYGOTE = "forks from its helper, not the parent: see Zygote mode against the parent's size"


@dataclass(frozen=True)
class Scenario:
    """One scenario of a run, and how its table reads."""

    name: str
    title: str
    what: str
    how: str
    metric: str  # the samples the table's median is taken over
    unit: str
    higher_is_better: bool
    floor: str | None  # the system of the "× floor" column
    rounds: int
    settings: Settings
    rows: tuple[tuple[str, Param], ...]  # (system, parameter), in table order
    na: dict[str, str] = field(default_factory=dict)


def key(param: Param) -> str:
    """A parameter as a dict key, the same for equal parameters."""
    return json.dumps(param, sort_keys=True)


def floor_param(scenario: Scenario, param: Param) -> Param:
    """The parameter of the floor's row that a row is compared with."""
    return {**param, "kind": "raw"} if scenario.name == "bandwidth" else param


def ours_param(scenario: Scenario, param: Param) -> Param:
    """The parameter of aioisolate's row that a row is compared with."""
    if scenario.name == "bandwidth" and param["kind"] == "raw":
        return {**param, "kind": "bytes"}
    if scenario.name == "lag":
        return {"cap": None}
    return param


def _why_not_forked(name: str) -> str:
    if name == "pebble-asynchronous":
        return POLLS
    if name == "aioisolate-zygote":
        return FROM_ZYGOTE
    return STARTS_FRESH if SYSTEMS[name].isolated else REUSES_WORKERS


def plan(quick: bool) -> list[Scenario]:
    """The scenarios of a full run, or of a quick one."""
    names = [name for name, system in SYSTEMS.items() if system.quick or not quick]
    asyncio_names = [n for n in names if n not in ("aioisolate-uvloop", "aioisolate-trio")]
    with_tasks = [n for n in asyncio_names if n != "c-floor"]
    kinds = ["bytes", "bytearray", "numpy"]
    sizes = [1] if quick else [1, 16, 256]
    forked = ["aioisolate", "multiprocessing", "pebble-concurrent", "python-floor", "c-floor"]
    forkcost_params = (
        [{"kind": "numpy", "mib": 50}]
        if quick
        else [
            {"kind": "numpy", "mib": 50},
            {"kind": "numpy", "mib": 500},
            {"kind": "numpy", "mib": 2048},
            {"kind": "objects", "mib": 500},
        ]
    )
    not_forked = {name: _why_not_forked(name) for name in with_tasks if name not in forked}
    # A bare worker's size, and far above it: the same sizes in quick mode, for the targets.
    parent_sizes = [32, 500, 2048]
    modes = ["aioisolate", "aioisolate-zygote", "python-floor"]
    argument_sizes = [1, 100]
    # How each kind of system gets an argument to the other process: by fork (ours, the floor,
    # multiprocessing), by pickle into a memory file (zygote mode), by pickle through a pipe.
    shippers = [*modes, "multiprocessing", "pool-reused"]

    return [
        Scenario(
            name="latency",
            title="Latency of a trivial call",
            what="sequential calls of a function returning a small int; time per call",
            how="The floors are blocking loops with no event loop work; the C floor times fork, "
            "_exit and waitpid alone. Parent faults/call: the measuring process's minor page "
            "faults (getrusage) per call, copy-on-write included.",
            metric="us",
            unit="µs",
            higher_is_better=False,
            floor="python-floor",
            rounds=1 if quick else 5,
            settings={
                "calls": 20 if quick else 200,
                "min_calls": 5,
                "seconds": 1 if quick else 3,
                "warmup": 3 if quick else 5,
            },
            rows=tuple((name, {}) for name in names),
        ),
        Scenario(
            name="fanout",
            title="Fan-out throughput",
            what="~0.5 ms pure-Python CPU tasks at a concurrency cap; calls per second",
            how="The loop is calibrated once per worker. aioisolate runs isolated_map with "
            "limiter=CapacityLimiter(cap); the other adapters keep cap calls in flight (pools "
            "two per worker, so that none waits for work); the Python floor keeps cap children "
            "alive and reaps them with waitpid(-1). A run stops submitting at `tasks` or after "
            "`seconds`, whichever comes first.",
            metric="calls_per_s",
            unit="calls/s",
            higher_is_better=True,
            floor="python-floor",
            rounds=1 if quick else 3,
            settings={
                "tasks": 40 if quick else 500,
                "min_tasks": 20,
                "seconds": 2 if quick else 3,
                "task_ms": 0.5,
            },
            rows=tuple((name, {"cap": cap}) for cap in (2, 8) for name in with_tasks),
            na={"c-floor": NO_RESULT},
        ),
        Scenario(
            name="bandwidth",
            title="Bandwidth of a large result",
            what="one call returning bytes, a bytearray or a numpy uint8 array; MiB/s",
            how="Every result's type and length are checked. The floor's row is the raw pipe "
            "floor: its child writes the bytes to a pipe of the default size and the parent reads "
            "them into a bytearray allocated before the fork, with no pickle; its × aioisolate "
            "compares it with aioisolate's bytes.",
            metric="mib_s",
            unit="MiB/s",
            higher_is_better=True,
            floor="python-floor",
            rounds=1 if quick else 2,
            settings={"reps": 3 if quick else 10, "seconds": 0.5 if quick else 0.7},
            rows=tuple(
                row
                for mib in sizes
                for name in with_tasks
                if name != "aioisolate-zygote"
                for row in (
                    [(name, {"kind": "raw", "mib": mib})]
                    if name == "python-floor"
                    else [(name, {"kind": kind, "mib": mib}) for kind in kinds]
                )
            ),
            na={"c-floor": NO_RESULT, "aioisolate-zygote": SAME_RESULTS},
        ),
        Scenario(
            name="argument",
            title="Cost of a large argument",
            what="one call taking a bytes argument and returning its length; time per call",
            how="Fork mode, the Python floor and multiprocessing's fork Process hand the argument "
            "to the child by fork, which copies the page table entries of its pages; zygote mode "
            "pickles it into a memory file that the child maps, and unpickles a copy of it there; "
            "the reused pool pickles it through a pipe to a warm worker. Trivial call: the same "
            "worker's trivial calls before it made the argument; over trivial: the median minus "
            "that. MiB/s: the argument's size ÷ the median time per call.",
            metric="ms",
            unit="ms",
            higher_is_better=False,
            floor="python-floor",
            rounds=1 if quick else 2,
            settings={
                "calls": 5 if quick else 20,
                "min_calls": 5,
                "reps": 3 if quick else 20,
                "seconds": 0.5 if quick else 1.5,
                "warmup": 3,
            },
            rows=tuple(
                (name, {"mib": mib}) for mib in argument_sizes for name in shippers if name in names
            ),
        ),
        Scenario(
            name="forkcost",
            title="Fork cost against the parent's size",
            what="trivial calls from a parent holding a large resident heap; time per call",
            how="The parent holds a numpy array of ones (numpy advises transparent huge pages for "
            "it) or small Python floats (4 KiB pages), allocated and touched. Small parent: the "
            "same calls in the same worker before it grew. µs per MiB: (median − small parent) ÷ "
            "RSS grown.",
            metric="us",
            unit="µs",
            higher_is_better=False,
            floor="python-floor",
            rounds=1 if quick else 2,
            settings={
                "calls": 10 if quick else 30,
                "min_calls": 5,
                "seconds": 1 if quick else 2,
                "warmup": 3,
            },
            rows=tuple(
                (name, param) for param in forkcost_params for name in forked if name in names
            ),
            na=not_forked,
        ),
        Scenario(
            name="zygote",
            title="Zygote mode against the parent's size",
            what="trivial calls from a parent grown to a given resident size; time per call",
            how="The parent is topped up to the size with private memory on 4 KiB pages, every "
            "page written, as a heap of small Python objects is (the fork cost table above also "
            "has numpy's huge pages); 32 MiB is about the size of a worker that holds nothing. "
            "Zygote mode starts its helper before the parent grows, as an application would at "
            "its start, and forks every child from it; fork mode and the Python floor fork the "
            "parent itself. RSS: the parent's once grown. × smallest parent: this row's median "
            "over the same system's with the parent at its smallest.",
            metric="us",
            unit="µs",
            higher_is_better=False,
            floor="python-floor",
            rounds=1 if quick else 2,
            settings={
                "calls": 5 if quick else 50,
                "min_calls": 5,
                "seconds": 1 if quick else 2,
                "warmup": 3,
            },
            rows=tuple((name, {"rss_mib": mib}) for mib in parent_sizes for name in modes),
        ),
        Scenario(
            name="lag",
            title="Event-loop lag during a fan-out",
            what="a 1 ms ticker in the parent's loop while ~50 ms CPU calls run; lateness",
            how="Lateness is the actual wake-up minus the scheduled one; idle p99 is the same "
            "ticker in the same worker before the fan-out. Concurrency 'default' is aioisolate's "
            "default limiter (one token per CPU), the executor's default max_workers, and one "
            "multiprocessing process per CPU.",
            metric="lag_ms",
            unit="ms",
            higher_is_better=False,
            floor=None,
            rounds=1 if quick else 2,
            settings={
                "calls": 20 if quick else 200,
                "call_ms": 50,
                "idle_seconds": 0.2 if quick else 0.5,
            },
            rows=(
                ("aioisolate", {"cap": None}),
                ("aioisolate", {"cap": 200}),
                ("aioisolate-zygote", {"cap": None}),
                ("pool-reused", {"cap": None}),
                ("multiprocessing", {"cap": None}),
            ),
        ),
        Scenario(
            name="growth",
            title="Growth of the parent over many calls",
            what="sequential trivial calls in one parent; its RSS and open fds before and after",
            how="Default settings; measured after a warm-up of `warmup` calls, with gc.collect() "
            "before each reading.",
            metric="rss_mib_after",
            unit="MiB",
            higher_is_better=False,
            floor=None,
            rounds=1,
            settings={"calls": 200 if quick else 10_000, "warmup": 100},
            rows=(("aioisolate", {}),),
        ),
    ]
