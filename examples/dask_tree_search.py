"""Connect-four searches fanned out over a Dask cluster, each in its own isolated child.

For several opening positions, every root move is searched to a fixed depth by the same
negamax as examples/parallel_tree_search.py. Each search is one isolated call on the cluster:
it runs in a child forked on a worker, with a timeout and a memory limit, so a search that
blows up takes down neither the worker nor the others.

    python examples/dask_tree_search.py                      # a LocalCluster on this machine
    python examples/dask_tree_search.py --scheduler tcp://scheduler:8786

The workers need aioisolate (pip install 'aioisolate[dask]'); this program's search code is
sent to them by value, so they need no copy of it.
"""

from __future__ import annotations

import argparse
import time

import anyio
import cloudpickle
import parallel_tree_search as c4
from distributed import LocalCluster

from aioisolate import DaskEngine, isolated_map, tqdm_progress

# Workers of a remote cluster have no copy of the search module: send its code with the calls.
cloudpickle.register_pickle_by_value(c4)

OPENINGS = [(3, 3), (3, 2), (2, 3), (3, 4), (4, 3), (2, 2), (1, 3), (3, 5)]


def openings(count: int) -> list[c4.Board]:
    empty: c4.Board = tuple(() for _ in range(c4.COLUMNS))
    return [c4.play(c4.play(empty, a, 1), b, -1) for a, b in OPENINGS[:count]]


async def search_all(
    engine: DaskEngine, boards: list[c4.Board], depth: int, *, progress: bool = True
) -> list[tuple[int, int]]:
    """The best move and its score for each board, every root move an isolated call."""
    jobs = [
        (n, (board, column, depth)) for n, board in enumerate(boards) for column in c4.moves(board)
    ]
    on_progress = tqdm_progress(desc="searches", total=len(jobs)) if progress else None
    best: dict[int, tuple[int, int]] = {}
    async with isolated_map(
        search_one,
        jobs,
        engine=engine,
        timeout=600,
        memory_limit="2GiB",
        ordered=False,
        on_progress=on_progress,
    ) as results:
        async for n, (column, value) in results:
            if n not in best or value > best[n][1]:
                best[n] = (column, value)
    return [best[n] for n in range(len(boards))]


def search_one(job: tuple[int, tuple[c4.Board, int, int]]) -> tuple[int, tuple[int, int]]:
    n, search = job
    return n, c4.search_root_move(search)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheduler", help="a Dask scheduler's address (default: a LocalCluster)")
    parser.add_argument("--depth", type=int, default=7)
    parser.add_argument("--positions", type=int, default=4, choices=range(1, len(OPENINGS) + 1))
    parser.add_argument("--workers", type=int, default=2, help="for the LocalCluster")
    args = parser.parse_args()

    boards = openings(args.positions)
    if args.scheduler is not None:
        target: object = args.scheduler
    else:
        target = await anyio.to_thread.run_sync(
            lambda: LocalCluster(
                n_workers=args.workers,
                threads_per_worker=1,
                host="127.0.0.1",
                dashboard_address=":0",
            )
        )
    try:
        start = time.monotonic()
        async with DaskEngine(target) as engine:
            best = await search_all(engine, boards, args.depth)
        elapsed = time.monotonic() - start
    finally:
        if isinstance(target, LocalCluster):
            await anyio.to_thread.run_sync(target.close)
    for n, (column, value) in enumerate(best):
        print(f"opening {OPENINGS[n]}: best move column {column} (score {value})")
    print(
        f"{sum(len(c4.moves(b)) for b in boards)} searches at depth {args.depth}: {elapsed:.1f} s"
    )


if __name__ == "__main__":
    anyio.run(main)
