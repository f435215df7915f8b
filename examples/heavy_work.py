"""Heavy work that fragments the heap, returning a short string.

Building millions of small objects and dropping most of them leaves the allocator's arenas
fragmented: the memory is free but stays mapped in the process. Run in a child, the whole heap
goes back to the kernel when the child exits, and only the string crosses the pipe.

    python examples/heavy_work.py
"""

from __future__ import annotations

import hashlib

import anyio

from aioisolate import isolated


def heavy_work(records: int = 500_000) -> str:
    """Build ``records`` small dicts, keep every tenth, and summarise them."""
    table = [{"id": i, "name": f"record-{i}", "score": (i * 7919) % 1000} for i in range(records)]
    kept = table[::10]
    del table  # frees 90% of the objects, scattered across the heap
    digest = hashlib.sha256()
    for row in kept:
        digest.update(row["name"].encode())
    total = sum(row["score"] for row in kept)
    return f"{len(kept)} records kept, score total {total}, digest {digest.hexdigest()[:16]}"


async def main() -> None:
    print(await isolated(heavy_work))


if __name__ == "__main__":
    anyio.run(main)
