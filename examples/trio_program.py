"""Isolated calls from a trio program: a nursery of computations, each with limits of its own.

Four calls start together in a trio nursery (as many children run at once as the default
limiter allows: one per CPU). Two finish, and their lines show what their children did (the
CallReport: pid, wall and CPU time, peak memory); one asks for more memory than its limit
allows and gets MemoryError; one searches forever until a trio timeout cancels it, which kills
its child.

    python examples/trio_program.py
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from typing import Unpack

import psutil
import trio

from aioisolate import CallOptions, CallReport, isolated, isolated_with_report


def count_primes(below: int) -> int:
    """The number of primes below ``below``, by the sieve of Eratosthenes."""
    sieve = bytearray([1]) * below
    sieve[:2] = b"\0\0"
    for n in range(2, math.isqrt(below - 1) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, below, n)))
    return sum(sieve)


def build_index(entries: int) -> int:
    """Build a dict of ``entries`` strings and return its size: memory for the report to show."""
    index = {i: str(i) * 10 for i in range(entries)}
    return len(index)


def allocate(mib: int) -> int:
    return len(bytearray(mib << 20))


def search_forever(announce_fd: int) -> None:
    os.write(announce_fd, str(os.getpid()).encode())  # tell the parent which child this is
    while True:
        pass


def figures(report: CallReport) -> str:
    cpu = report.user_time + report.system_time
    peak = report.peak_memory / (1 << 20)
    return (
        f"child {report.pid}: wall {report.wall_time:.2f} s, cpu {cpu:.2f} s, peak {peak:.1f} MiB"
    )


async def run(
    label: str, func: Callable[[int], int], arg: int, **limits: Unpack[CallOptions]
) -> None:
    try:
        value, report = await isolated_with_report(func, arg, **limits)
    except MemoryError:
        # The function's own exception, re-raised here: it comes with no report.
        print(f"{label:<24} MemoryError in the child (memory_limit={limits.get('memory_limit')})")
    else:
        print(f"{label:<24} {value:>10,}   {figures(report)}")


async def endless_search(seconds: float) -> None:
    """Search forever in a child until a trio timeout cancels the call, killing the child."""
    read_end, write_end = os.pipe()  # the child's first act is to write its pid here
    try:
        async with trio.lowlevel.FdStream(read_end) as announcements:
            # No deadline yet: the timeout starts when the child does, so that waiting for a
            # free CPU (the limiter) does not count against it.
            with trio.move_on_after(math.inf) as timeout:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(isolated, search_forever, write_end)
                    pid = int(await announcements.receive_some())
                    started = trio.current_time()
                    timeout.deadline = started + seconds
    finally:
        os.close(write_end)
    # Cancelling the call killed the child and reaped it before the cancellation went on.
    ran = trio.current_time() - started
    state = "still running" if psutil.pid_exists(pid) else "killed and reaped"
    print(
        f"{'endless search':<24} cancelled by trio.move_on_after after {ran:.2f} s: child {pid} {state}"
    )


async def main() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(run, "primes below 20,000,000", count_primes, 20_000_000, timeout=30)
        )
        nursery.start_soon(
            partial(run, "index of 1,000,000", build_index, 1_000_000, memory_limit="1GiB")
        )
        nursery.start_soon(partial(run, "1 GiB buffer", allocate, 1024, memory_limit="100MiB"))
        nursery.start_soon(endless_search, 1.0)
    print(f"children left running: {len(psutil.Process().children())}")


if __name__ == "__main__":
    trio.run(main)
