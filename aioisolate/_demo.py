"""``python -m aioisolate demo``: what isolation changes, side by side with running in-process.

Four scenarios, each run both ways: a function that leaks 10 MB a call, heavy work that
returns a short string, a segfault, and a tree search fanned out over the CPUs. The table at
the end says what each way cost the program: its memory, its time, its life.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import psutil

from ._api import isolated, isolated_map
from ._errors import ChildCrashed
from ._map import MapProgress

LEAK_BYTES = 10 << 20
_leaked: list[bytes] = []


def leaky_compute(n: int) -> int:
    """Square ``n``, leaking 10 MB that nothing frees (a stand-in for a leaky C library)."""
    _leaked.append(b"\xff" * LEAK_BYTES)  # written, not just reserved: it counts in RSS
    return n * n


def heavy_work(records: int) -> str:
    """Build many small dicts, keep a tenth: a fragmented heap, and a short string out."""
    table = [{"id": i, "name": f"record-{i}", "score": (i * 7919) % 1000} for i in range(records)]
    kept = table[::10]
    del table
    digest = hashlib.sha256()
    for row in kept:
        digest.update(str(row["name"]).encode())
    return f"{len(kept)} records kept, digest {digest.hexdigest()[:12]}"


def tree_search(root: int, depth: int = 8, branching: int = 6) -> int:
    """A negamax over a synthetic game tree, with a table of every position it scored (as a
    transposition table does): it allocates as it goes."""
    table: dict[int, int] = {}

    def visit(node: int, remaining: int) -> int:
        if remaining == 0:
            return (node * 2654435761) % 1001 - 500
        if node in table:
            return table[node]
        best = max(-visit(node * branching + i + 1, remaining - 1) for i in range(branching))
        table[node] = best
        return best

    return visit(root, depth)


SEGFAULT = "import ctypes; ctypes.string_at(0)"


def _segfault() -> None:
    import ctypes

    ctypes.string_at(0)


@dataclass
class Row:
    scenario: str
    in_process: str
    isolated: str


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / (1 << 20)


async def _leak(calls: int) -> Row:
    before = _rss_mib()
    for n in range(calls):
        await isolated(leaky_compute, n)
    isolated_growth = _rss_mib() - before
    before = _rss_mib()
    for n in range(calls):
        leaky_compute(n)
    in_process_growth = _rss_mib() - before
    _leaked.clear()
    return Row(
        f"leaky function, {calls} calls of 10 MB",
        f"RSS +{in_process_growth:.0f} MiB, kept for good",
        f"RSS +{isolated_growth:.1f} MiB",
    )


async def _heavy(records: int) -> Row:
    gc.collect()
    before = _rss_mib()
    start = time.perf_counter()
    remote = await isolated(heavy_work, records)
    isolated_time = time.perf_counter() - start
    isolated_growth = _rss_mib() - before
    before = _rss_mib()
    start = time.perf_counter()
    local = heavy_work(records)
    in_process_time = time.perf_counter() - start
    gc.collect()
    in_process_growth = _rss_mib() - before
    assert local == remote
    return Row(
        f"heavy work, {records:,} records, a short string out",
        f"{in_process_time:.2f} s, RSS +{in_process_growth:.0f} MiB after",
        f"{isolated_time:.2f} s, RSS +{isolated_growth:.1f} MiB; same string",
    )


async def _crash() -> Row:
    # In-process, a segfault kills the program: shown in a Python of its own, so that the
    # demo lives on to tell.
    died = await anyio.run_process([sys.executable, "-c", SEGFAULT], check=False)
    code = died.returncode
    ended = signal.Signals(-code).name if code < 0 else f"exit code {code}"
    try:
        await isolated(_segfault)
        caught = "no crash?"
    except ChildCrashed as exc:
        caught = f"ChildCrashed ({exc.signal.name if exc.signal else exc.exitcode}) caught"
    return Row("segfault in C code", f"the program dies ({ended})", f"{caught}; program goes on")


async def _fan_out(roots: int, progress: bool, quick: bool) -> Row:
    search = functools.partial(tree_search, depth=6 if quick else 8)
    gc.collect()
    before = _rss_mib()
    start = time.perf_counter()
    local = [search(root) for root in range(roots)]
    in_process_time = time.perf_counter() - start
    in_process_growth = _rss_mib() - before
    on_progress = _rich_progress("isolated searches", roots) if progress else None
    before = _rss_mib()
    start = time.perf_counter()
    async with isolated_map(search, range(roots), on_progress=on_progress) as results:
        remote = [value async for value in results]
    isolated_time = time.perf_counter() - start
    isolated_growth = _rss_mib() - before
    assert local == remote
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Row(
        f"tree search, {roots} roots fanned out",
        f"{in_process_time:.2f} s one after another, RSS +{in_process_growth:.0f} MiB",
        f"{isolated_time:.2f} s on {cpus} CPUs, RSS +{isolated_growth:.1f} MiB; same scores",
    )


def _rich_progress(description: str, total: int) -> Callable[[MapProgress], None]:
    from rich.progress import Progress

    # Redrawn on the fan-out's updates, not by rich's refresh thread: a fork while that thread
    # holds the console's lock could leave a child hanging on it.
    bar = Progress(transient=True, auto_refresh=False)
    task = bar.add_task(description, total=total)
    bar.start()

    def update(progress: MapProgress) -> None:
        bar.update(task, completed=progress.done + progress.failed, refresh=True)
        if progress.finished:
            bar.stop()

    return update


def _render(rows: list[Row], rich: bool) -> None:
    if rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="aioisolate: in-process versus isolated", show_lines=True)
        table.add_column("scenario", style="bold")
        table.add_column("in-process", style="red")
        table.add_column("isolated", style="green")
        for row in rows:
            table.add_row(row.scenario, row.in_process, row.isolated)
        Console().print(table)
        return
    widths = [
        max(len(getattr(row, name)) for row in rows + [Row("scenario", "in-process", "isolated")])
        for name in ("scenario", "in_process", "isolated")
    ]
    line = "+".join("-" * (w + 2) for w in widths)
    print(f"+{line}+")
    for row in [Row("scenario", "in-process", "isolated"), *rows]:
        cells = (row.scenario, row.in_process, row.isolated)
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |")
        if row.scenario == "scenario":
            print(f"+{line}+")
    print(f"+{line}+")


def _fancy() -> bool:
    """A table drawn with rich, and progress bars, on a terminal (with rich installed)."""
    if not sys.stdout.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


async def demo(*, quick: bool = False, fancy: bool | None = None) -> list[Row]:
    """Run the four scenarios and print the table; return its rows."""
    fancy = _fancy() if fancy is None else fancy
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("a leaky function", lambda: _leak(5 if quick else 10)),
        ("heavy work", lambda: _heavy(100_000 if quick else 1_000_000)),
        ("a segfault", _crash),
        ("a fanned-out tree search", lambda: _fan_out(4 if quick else 8, fancy, quick)),
    ]
    rows = []
    for name, step in steps:
        print(f"running {name} both ways...", file=sys.stderr, flush=True)
        rows.append(await step())
    _render(rows, fancy)
    return rows


def run(quick: bool = False) -> None:
    anyio.run(lambda: demo(quick=quick))
