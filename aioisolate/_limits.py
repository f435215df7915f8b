"""Resource limits: rlimits set by the child on itself, and the parent's memory watchdog."""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

# How often the watchdog looks at a child's memory (a read of /proc/PID/statm).
WATCH_INTERVAL = 0.05


def apply_in_child(memory_limit: int | None, cpu_limit: float | None) -> None:
    """Limit this (child) process: growth of its address space, and CPU seconds."""
    if memory_limit is not None:
        # Relative to what fork gave us: an absolute limit would fail even small allocations
        # in the child of a large parent.
        _lower_soft_limit(resource.RLIMIT_AS, _address_space() + memory_limit)
    if cpu_limit is not None:
        # SIGXCPU at the soft limit; SIGKILL a second later if the function catches that.
        _lower_limits(resource.RLIMIT_CPU, math.ceil(cpu_limit), cpu_hard_limit(cpu_limit))
        # SIGXCPU's default action dumps core; a core file of a big process is slow to write.
        _lower_limits(resource.RLIMIT_CORE, 0, None)


def cpu_hard_limit(cpu_limit: float) -> int:
    """CPU seconds after which the kernel sends SIGKILL (RLIMIT_CPU counts whole seconds)."""
    return math.ceil(cpu_limit) + 1


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


def anonymous_memory(process: psutil.Process) -> int | None:
    """Bytes of anonymous memory the process has resident, or None once it is gone.

    For a forked child, this starts at what the parent had at fork (fork copies that count)
    and grows with every page the child allocates. Unlike USS it does not grow when the
    *parent* writes to pages they shared (the parent gets the copy), and unlike plain RSS it
    leaves out file-backed pages, which the child shares with everyone.
    """
    import psutil

    try:
        info = process.memory_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return int(info.rss - getattr(info, "shared", 0))


async def watch_memory(
    pid: int, limit: int, inherited: int, exceeded: Callable[[int], None]
) -> None:
    """Call ``exceeded(bytes_grown)`` once the child has grown ``limit`` past ``inherited``.

    Catches what the child's rlimit cannot: native code that raised its own limit back. Reading
    the figure is one small read of /proc, done on the event loop's thread.
    """
    # Imported here, in the parent: a zygote helper imports this module for the child's limits.
    import anyio
    import psutil

    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while True:
        used = anonymous_memory(process)
        if used is None:
            return
        if used - inherited > limit:
            exceeded(used - inherited)
            return
        await anyio.sleep(WATCH_INTERVAL)
