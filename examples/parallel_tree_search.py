"""A connect-four move search, each root move searched in its own isolated child.

A negamax search with alpha-beta pruning builds a large tree of positions; every root move is
searched in a forked child (in parallel, up to one per CPU), so the memory the searches use
goes back to the kernel as each one finishes and the parent stays small.

    python examples/parallel_tree_search.py [--depth 8]
"""

from __future__ import annotations

import argparse
import time

import anyio
import psutil

from aioisolate import isolated_map, tqdm_progress

ROWS, COLUMNS = 6, 7
Board = tuple[tuple[int, ...], ...]  # columns, each a tuple of 1 and -1 from the bottom up

# Every line of four cells on the board, as (column, row) pairs.
LINES = [
    [(c + i * dc, r + i * dr) for i in range(4)]
    for c in range(COLUMNS)
    for r in range(ROWS)
    for dc, dr in ((1, 0), (0, 1), (1, 1), (1, -1))
    if 0 <= c + 3 * dc < COLUMNS and 0 <= r + 3 * dr < ROWS
]
WIN = 1_000_000


def play(board: Board, column: int, player: int) -> Board:
    return tuple(col + (player,) if i == column else col for i, col in enumerate(board))


def moves(board: Board) -> list[int]:
    # Centre columns first: better moves early make alpha-beta prune more.
    order = sorted(range(COLUMNS), key=lambda c: abs(c - COLUMNS // 2))
    return [c for c in order if len(board[c]) < ROWS]


def cell(board: Board, column: int, row: int) -> int:
    col = board[column]
    return col[row] if row < len(col) else 0


def score(board: Board, player: int) -> int:
    """The position from ``player``'s side: won, lost, or a count of open lines."""
    total = 0
    for line in LINES:
        cells = [cell(board, c, r) for c, r in line]
        mine, theirs = cells.count(player), cells.count(-player)
        if mine == 4:
            return WIN
        if theirs == 4:
            return -WIN
        if not theirs:
            total += mine * mine
        if not mine:
            total -= theirs * theirs
    return total


def negamax(board: Board, depth: int, alpha: int, beta: int, player: int) -> int:
    value = score(board, player)
    if depth == 0 or abs(value) == WIN or not moves(board):
        return value
    best = -WIN - 1
    for column in moves(board):
        best = max(best, -negamax(play(board, column, player), depth - 1, -beta, -alpha, -player))
        alpha = max(alpha, best)
        if alpha >= beta:
            break
    return best


def search_root_move(job: tuple[Board, int, int]) -> tuple[int, int]:
    """Score one root move for player 1: this runs in a child."""
    board, column, depth = job
    return column, -negamax(play(board, column, 1), depth - 1, -WIN - 1, WIN + 1, -1)


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / (1 << 20)


async def best_move(board: Board, depth: int, *, progress: bool = True) -> tuple[int, int]:
    jobs = [(board, column, depth) for column in moves(board)]
    on_progress = tqdm_progress(desc="root moves", total=len(jobs)) if progress else None
    async with isolated_map(search_root_move, jobs, on_progress=on_progress) as results:
        scores = [scored async for scored in results]
    return max(scores, key=lambda scored: scored[1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    args = parser.parse_args()

    board: Board = tuple(() for _ in range(COLUMNS))
    board = play(play(board, 3, 1), 3, -1)  # an opening: both players took the centre
    before = rss_mib()
    start = time.monotonic()
    column, value = await best_move(board, args.depth)
    elapsed = time.monotonic() - start
    print(f"best move: column {column} (score {value}), depth {args.depth}, {elapsed:.2f} s")
    print(f"parent RSS: {before:.1f} MiB before, {rss_mib():.1f} MiB after")


if __name__ == "__main__":
    anyio.run(main)
