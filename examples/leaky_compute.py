"""A function that leaks 10 MB on every call: run it in-process, then isolated.

In-process, the parent's memory grows by 10 MB a call and never comes back. Isolated, each
leak dies with its child and the parent stays flat.

    python examples/leaky_compute.py
"""

from __future__ import annotations

import anyio
import psutil

from aioisolate import isolated

LEAK_BYTES = 10 << 20
_leaked: list[bytes] = []


def leaky_compute(n: int) -> int:
    """Square ``n``, leaking 10 MB that nothing ever frees (a stand-in for a leaky C library)."""
    _leaked.append(b"\xff" * LEAK_BYTES)  # written, not just reserved: it counts in RSS
    return n * n


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / (1 << 20)


async def main(calls: int = 20) -> None:
    start = rss_mib()
    for i in range(calls):
        assert await isolated(leaky_compute, i) == i * i
    isolated_growth = rss_mib() - start
    print(f"{calls} isolated calls:   parent RSS grew by {isolated_growth:6.1f} MiB")

    start = rss_mib()
    for i in range(calls):
        assert leaky_compute(i) == i * i
    in_process_growth = rss_mib() - start
    print(f"{calls} in-process calls: parent RSS grew by {in_process_growth:6.1f} MiB")


if __name__ == "__main__":
    anyio.run(main)
