"""Resource limits: rlimits set by the child on itself, and the parent's memory watchdog."""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable

import anyio
import anyio.to_thread
import psutil

# How often the watchdog looks at a child's memory. Reading it costs a walk of the child's
# page tables (about 1 ms per GB), done in a worker thread.
WATCH_INTERVAL = 0.05


def apply_in_child(memory_limit: int | None, cpu_limit: float | None) -> None:
    """Limit this (child) process: growth of its address space, and CPU seconds."""
    if memory_limit is not None:
        # Relative to what fork gave us: an absolute limit would fail even small allocations
        # in the child of a large parent.
        _lower_soft_limit(resource.RLIMIT_AS, _address_space() + memory_limit)
    if cpu_limit is not None:
        seconds = math.ceil(cpu_limit)
        # SIGXCPU at the soft limit; SIGKILL a second later if the function catches that.
        _lower_limits(resource.RLIMIT_CPU, seconds, seconds + 1)
        # SIGXCPU's default action dumps core; a core file of a big process is slow to write.
        _lower_limits(resource.RLIMIT_CORE, 0, None)


def _address_space() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _lower_soft_limit(which: int, soft: int) -> None:
    # The hard limit is left alone: code that raises its own soft limit back is caught by the
    # parent's watchdog instead.
    current_soft, hard = resource.getrlimit(which)
    resource.setrlimit(which, (_min_limit(soft, current_soft), hard))


def _lower_limits(which: int, soft: int, hard: int | None) -> None:
    current_soft, current_hard = resource.getrlimit(which)
    new_hard = current_hard if hard is None else _min_limit(hard, current_hard)
    resource.setrlimit(which, (_min_limit(_min_limit(soft, current_soft), new_hard), new_hard))


def _min_limit(a: int, b: int) -> int:
    if a == resource.RLIM_INFINITY:
        return b
    if b == resource.RLIM_INFINITY:
        return a
    return min(a, b)


def private_memory(pid: int) -> int | None:
    """Bytes of memory only this process holds (USS), or None once it is gone.

    Not RSS: a forked child shares the parent's pages until it writes to them, and RSS counts
    those shared pages in full.
    """
    try:
        return int(psutil.Process(pid).memory_full_info().uss)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


async def watch_memory(pid: int, limit: int, exceeded: Callable[[int], None]) -> None:
    """Call ``exceeded(bytes_seen)`` once the child's private memory passes ``limit``.

    Catches what the child's rlimit cannot: native code that raised its own limit back, or
    memory the child writes into that it inherited (copy-on-write pages count only here).
    """
    while True:
        # Not abandoned on cancel: the read ends within milliseconds, and an abandoned thread
        # would hold a /proc fd after the call returned.
        used = await anyio.to_thread.run_sync(private_memory, pid)
        if used is None:
            return
        if used > limit:
            exceeded(used)
            return
        await anyio.sleep(WATCH_INTERVAL)
