"""What is measured: one coroutine per scenario, run inside a worker on the system's loop.

Each takes the system, the parameter (what the row of the table varies) and the settings (how
much to measure, which quick mode shrinks), and returns the samples by metric plus some info.
Time-boxed loops stop at ``calls`` or once ``seconds`` have passed, whichever comes first, so
that a system taking 100 ms a call still finishes its share in time.
"""

from __future__ import annotations

import gc
import math
import mmap
import os
import resource
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import psutil

from . import tasks
from .systems import Runner, System, cpus

Samples = dict[str, list[float]]
Measured = dict[str, Any]  # {"samples": Samples, "info": {...}}
Param = dict[str, Any]
Settings = dict[str, Any]

MiB = 1 << 20
# Linux 5.14's MADV_POPULATE_WRITE, which the mmap module has no name for: the kernel allocates
# every page of a range in one call, several times faster than a page fault per page.
MADV_POPULATE_WRITE = 23


def calibrate(milliseconds: float) -> int:
    """The iterations of `tasks.spin` that take ``milliseconds`` here (best of a few tries)."""
    iterations = 10_000
    while True:
        best = min(_time_spin(iterations) for _ in range(5))
        if best > 0.02:
            return max(1, round(iterations * milliseconds / 1e3 / best))
        iterations *= 4


def _time_spin(iterations: int) -> float:
    start = time.perf_counter()
    tasks.spin(iterations)
    return time.perf_counter() - start


def _until(count: int, minimum: int, seconds: float) -> Iterator[int]:
    """0, 1, 2... up to ``count``, or fewer once ``seconds`` have passed (``minimum`` at least)."""
    deadline = time.perf_counter() + seconds
    for i in range(count):
        if i >= minimum and time.perf_counter() > deadline:
            return
        yield i


async def _timed_calls(runner: Runner, settings: Settings) -> list[float]:
    """Sequential trivial calls: the time of each, in µs."""
    times = []
    for _ in _until(settings["calls"], settings["min_calls"], settings["seconds"]):
        start = time.perf_counter_ns()
        value = await runner.call(tasks.trivial)
        times.append((time.perf_counter_ns() - start) / 1e3)
        if value != 1:
            raise AssertionError(f"trivial call returned {value!r}")
    return times


async def _warm_up(runner: Runner, calls: int) -> None:
    """Start what a system starts lazily (pools, a forkserver, a manager) before timing."""
    for _ in range(calls):
        await runner.call(tasks.trivial)


async def latency(system: System, param: Param, settings: Settings) -> Measured:
    """Sequential trivial calls; and the parent's minor page faults per call."""
    async with system.open(1) as runner:
        if system.name == "c-floor":
            times = runner.timed(settings["calls"], 0, False)
            return {"samples": {"us": times}, "info": {"calls": len(times)}}
        await _warm_up(runner, settings["warmup"])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = await _timed_calls(runner, settings)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {
        "samples": {"us": times, "minflt": [faults / len(times)]},
        "info": {"calls": len(times)},
    }


async def fanout(system: System, param: Param, settings: Settings) -> Measured:
    """Small CPU tasks through the system at a cap: calls per second."""
    cap = param["cap"]
    iterations = calibrate(settings["task_ms"])
    async with system.open(cap) as runner:
        await runner.map(tasks.spin, iter([iterations] * 2 * cap))
        inputs = (
            iterations
            for _ in _until(settings["tasks"], settings["min_tasks"], settings["seconds"])
        )
        start = time.perf_counter()
        results = await runner.map(tasks.spin, inputs)
        elapsed = time.perf_counter() - start
    if results != [iterations] * len(results):
        raise AssertionError("a fan-out task returned something else")
    return {
        "samples": {"calls_per_s": [len(results) / elapsed]},
        "info": {"tasks": len(results), "iterations": iterations},
    }


async def bandwidth(system: System, param: Param, settings: Settings) -> Measured:
    """One call returning a large result: MiB/s, the result's type and length checked."""
    kind, nbytes = param["kind"], param["mib"] * MiB

    async def fetch(runner: Runner, size: int) -> Any:
        if kind == "raw":
            return await runner.raw(size)
        return await runner.call(tasks.payload, kind, size)

    rates = []
    async with system.open(1) as runner:
        tasks.check_payload(await fetch(runner, MiB), kind, MiB)  # warm up the path
        for _ in _until(settings["reps"], 1, settings["seconds"]):
            start = time.perf_counter()
            value = await fetch(runner, nbytes)
            elapsed = time.perf_counter() - start
            tasks.check_payload(value, kind, nbytes)
            del value
            rates.append(param["mib"] / elapsed)
    return {"samples": {"mib_s": rates}, "info": {"reps": len(rates)}}


async def argument(system: System, param: Param, settings: Settings) -> Measured:
    """Calls taking a ``mib`` MiB bytes argument and returning its length; and trivial calls
    from the same worker before the argument existed."""
    nbytes = param["mib"] * MiB

    async def ship(runner: Runner, data: bytes) -> float:
        start = time.perf_counter_ns()
        value = await runner.call(tasks.length, data)
        elapsed = (time.perf_counter_ns() - start) / 1e6
        if value != len(data):
            raise AssertionError(f"the child saw {value!r} bytes of {len(data)}")
        return elapsed

    async with system.open(1) as runner:
        await _warm_up(runner, settings["warmup"])
        base = [us / 1e3 for us in await _timed_calls(runner, settings)]
        await ship(runner, tasks.payload("bytes", MiB))  # warm up the path of a large argument
        data = tasks.payload("bytes", nbytes)
        times = [await ship(runner, data) for _ in _until(settings["reps"], 3, settings["seconds"])]
        del data
    return {"samples": {"ms": times, "base_ms": base}, "info": {"reps": len(times)}}


def _ballast(kind: str, mib: int) -> Any:
    """``mib`` MiB of resident memory in the parent: one numpy array, small objects, or plain
    4 KiB pages."""
    if kind == "numpy":
        import numpy as np

        return np.ones(mib * MiB, dtype=np.uint8)
    if kind == "pages":
        return _pages(mib)
    # A float object and its slot in the list take 32 bytes.
    return [float(i) for i in range(mib * MiB // 32)]


def _pages(mib: int) -> mmap.mmap | None:
    """``mib`` MiB of private anonymous memory on 4 KiB pages, every page written.

    The page size of a heap of small Python objects, whatever the machine's transparent huge
    page setting; and no numpy, so that a parent can stay near the size of a bare interpreter.
    Private: fork leaves a shared mapping's pages out of the child's page tables.
    """
    if mib <= 0:
        return None
    memory = mmap.mmap(-1, mib * MiB, flags=mmap.MAP_PRIVATE)
    memory.madvise(mmap.MADV_NOHUGEPAGE)  # before the pages are allocated
    try:
        memory.madvise(MADV_POPULATE_WRITE)
    except OSError:
        pass  # an older kernel: the writes below fault the pages in
    block = tasks.ONE * MiB
    for offset in range(0, len(memory), MiB):
        memory[offset : offset + MiB] = block
    return memory


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / MiB


async def forkcost(system: System, param: Param, settings: Settings) -> Measured:
    """Trivial calls from a small parent, then from one holding ``mib`` MiB resident."""
    kind, mib = param["kind"], param["mib"]
    _ballast(kind, 0)  # imports numpy before the parent's size is taken
    async with system.open(1) as runner:
        if system.name == "c-floor":
            base = runner.timed(settings["calls"], 0, kind == "numpy")
            times = runner.timed(settings["calls"], mib, kind == "numpy")
            return {
                "samples": {"us": times, "base_us": base, "grown_mib": [float(mib)]},
                "info": {"calls": len(times)},
            }
        await _warm_up(runner, settings["warmup"])
        base = await _timed_calls(runner, settings)
        before = _rss_mib()
        ballast = _ballast(kind, mib)
        grown = _rss_mib() - before
        times = await _timed_calls(runner, settings)
        del ballast
    return {
        "samples": {"us": times, "base_us": base, "grown_mib": [grown]},
        "info": {"calls": len(times)},
    }


async def zygote(system: System, param: Param, settings: Settings) -> Measured:
    """Trivial calls from a parent grown to ``rss_mib`` MiB resident on 4 KiB pages."""
    async with system.open(1) as runner:
        await _warm_up(runner, settings["warmup"])
        # Topped up from what the worker holds now, imports and the system's own state included
        # (to the size or up to 1 MiB above it).
        ballast = _ballast("pages", param["rss_mib"] - math.floor(_rss_mib()))
        rss = _rss_mib()
        times = await _timed_calls(runner, settings)
        del ballast
    return {"samples": {"us": times, "rss_mib": [rss]}, "info": {"calls": len(times)}}


async def _tick(lateness: list[float], until: Callable[[], bool]) -> None:
    """Ask for a wake-up every 1 ms; record how late each comes (actual - scheduled), in ms."""
    while not until():
        scheduled = time.perf_counter() + 0.001
        await anyio.sleep(0.001)
        lateness.append((time.perf_counter() - scheduled) * 1e3)


async def lag(system: System, param: Param, settings: Settings) -> Measured:
    """How late a 1 ms ticker in the parent's loop runs while a fan-out of CPU calls runs."""
    iterations = calibrate(settings["call_ms"])
    idle: list[float] = []
    busy: list[float] = []
    async with system.open(param["cap"]) as runner:
        await runner.map(tasks.spin, iter([1] * 2 * (param["cap"] or cpus())))
        deadline = time.perf_counter() + settings["idle_seconds"]
        await _tick(idle, lambda: time.perf_counter() > deadline)
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_tick, busy, done.is_set)
            start = time.perf_counter()
            results = await runner.map(tasks.spin, iter([iterations] * settings["calls"]))
            elapsed = time.perf_counter() - start
            done.set()
    if len(results) != settings["calls"]:
        raise AssertionError(f"{len(results)} of {settings['calls']} calls came back")
    return {
        "samples": {"lag_ms": busy, "idle_lag_ms": idle, "wall_s": [elapsed]},
        "info": {"calls": len(results), "ticks": len(busy), "iterations": iterations},
    }


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def growth(system: System, param: Param, settings: Settings) -> Measured:
    """Many sequential trivial calls in one parent: its RSS and open fds before and after."""
    async with system.open(None) as runner:
        await _warm_up(runner, settings["warmup"])
        gc.collect()
        rss, fds = _rss_mib(), _open_fds()
        start = time.perf_counter()
        for _ in range(settings["calls"]):
            await runner.call(tasks.trivial)
        elapsed = time.perf_counter() - start
        gc.collect()
        samples = {
            "rss_mib_before": [rss],
            "rss_mib_after": [_rss_mib()],
            "fds_before": [float(fds)],
            "fds_after": [float(_open_fds())],
            "calls_per_s": [settings["calls"] / elapsed],
        }
    return {"samples": samples, "info": {"calls": settings["calls"]}}


SCENARIOS: dict[str, Callable[[System, Param, Settings], Awaitable[Measured]]] = {
    "latency": latency,
    "fanout": fanout,
    "bandwidth": bandwidth,
    "argument": argument,
    "forkcost": forkcost,
    "zygote": zygote,
    "lag": lag,
    "growth": growth,
}
