"""A tree search fanned out over isolated children, one per branch at the root.

Each child searches its subtree (allocating as much as it likes) and sends back one number.

    python examples/tree_search.py
"""

from __future__ import annotations

import anyio

from aioisolate import isolated


def tree_search(depth: int, branching: int) -> int:
    """Count the leaves of a full tree, building each level as a list like a real search."""
    if depth == 0:
        return 1
    children = [tree_search(depth - 1, branching) for _ in range(branching)]
    return sum(children)


async def isolated_tree_search(depth: int, branching: int) -> int:
    """The same count, with every subtree under the root searched in its own child."""
    if depth == 0:
        return 1
    results = [0] * branching

    async def search(i: int) -> None:
        results[i] = await isolated(tree_search, depth - 1, branching)

    async with anyio.create_task_group() as tg:
        for i in range(branching):
            tg.start_soon(search, i)
    return sum(results)


async def main() -> None:
    for depth in range(1, 9):
        leaves = await isolated_tree_search(depth, 3)
        print(f"depth {depth}, branching 3: {leaves} leaves")


if __name__ == "__main__":
    anyio.run(main)
