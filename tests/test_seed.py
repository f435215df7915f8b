"""The example programs: leaky, heavy and searching code, isolated."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import anyio
import heavy_work
import leaky_compute
import parallel_tree_search as c4
import psutil
import pytest
import tree_search
from helpers import FORK_WARNINGS, assert_no_fork_warning

from aioisolate import isolated

EXAMPLES = Path(__file__).parent.parent / "examples"


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@pytest.mark.anyio
async def test_leaky_compute_leaks_in_process_but_not_isolated() -> None:
    calls = 20
    leak = calls * leaky_compute.LEAK_BYTES  # 200 MB

    start = rss()
    for i in range(calls):
        assert await isolated(leaky_compute.leaky_compute, i) == i * i
    isolated_growth = rss() - start

    start = rss()
    try:
        for i in range(calls):
            assert leaky_compute.leaky_compute(i) == i * i
        in_process_growth = rss() - start
    finally:
        leaky_compute._leaked.clear()

    assert await isolated(leaky_compute.leaky_compute, 7) == 49
    assert in_process_growth > 0.9 * leak
    assert isolated_growth < 0.1 * leak


@pytest.mark.anyio
async def test_heavy_work_returns_its_string() -> None:
    result = await isolated(heavy_work.heavy_work, 20_000)
    assert result == heavy_work.heavy_work(20_000)
    assert result.startswith("2000 records kept, score total ")


@pytest.mark.anyio
async def test_isolated_tree_search() -> None:
    assert await tree_search.isolated_tree_search(3, 2) == 8
    assert await tree_search.isolated_tree_search(4, 2) == 16


@pytest.mark.anyio
async def test_48_tree_searches_in_a_task_group() -> None:
    depths = [d % 12 for d in range(48)]
    results: dict[int, int] = {}

    async def search(i: int) -> None:
        results[i] = await isolated(tree_search.tree_search, depths[i], 2)

    async with anyio.create_task_group() as tg:
        for i in range(len(depths)):
            tg.start_soon(search, i)
    assert [results[i] for i in range(len(depths))] == [2**d for d in depths]


@pytest.mark.asyncio
async def test_48_tree_searches_with_gather() -> None:
    depths = [d % 12 for d in range(48)]
    results = await asyncio.gather(*(isolated(tree_search.tree_search, d, 2) for d in depths))
    assert results == [2**d for d in depths]


@pytest.mark.anyio
async def test_connect_four_search_finds_the_winning_move() -> None:
    board: c4.Board = tuple(() for _ in range(c4.COLUMNS))
    for column in (0, 1, 2):  # three in a row for player 1, player 2 answering on top
        board = c4.play(c4.play(board, column, 1), column, -1)
    column, value = await c4.best_move(board, 3, progress=False)
    assert (column, value) == (3, c4.WIN)


@pytest.mark.anyio
async def test_connect_four_isolated_agrees_with_in_process() -> None:
    board: c4.Board = tuple(() for _ in range(c4.COLUMNS))
    board = c4.play(c4.play(board, 3, 1), 2, -1)
    in_process = max(
        (c4.search_root_move((board, column, 4)) for column in c4.moves(board)),
        key=lambda scored: scored[1],
    )
    assert await c4.best_move(board, 4, progress=False) == in_process


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("parallel_tree_search.py", "best move: column"),
        ("leaky_compute.py", "20 in-process calls: parent RSS grew by"),
        ("heavy_work.py", "50000 records kept"),
        ("tree_search.py", "depth 8, branching 3: 6561 leaves"),
    ],
)
def test_example_runs(script: str, expected: str) -> None:
    # parallel_tree_search draws a tqdm_progress bar (on stderr): without a monitor thread.
    result = subprocess.run(
        [sys.executable, *FORK_WARNINGS, str(EXAMPLES / script)]
        + (["--depth", "6"] if script == "parallel_tree_search.py" else []),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert expected in result.stdout
    assert_no_fork_warning(result.stderr)
