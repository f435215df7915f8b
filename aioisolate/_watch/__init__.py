"""How the parent learns that a child exited: the one place a watcher is chosen.

Two ways to watch a child forked here, chosen in `select_watcher`:

* ``pidfd`` (Linux 5.3+, `PidfdWatcher`): a file descriptor for the process, readable once it
  has exited; signals through it can never reach another process that reused the pid.
* ``thread`` (elsewhere, or where seccomp forbids pidfds, `ThreadWatcher`): a thread waits in
  ``waitid(..., WNOWAIT)`` and then writes to a pipe the loop waits on.

A child forked by a zygote helper has a watcher of its own (`ZygoteWatcher`), made by the
zygote spawner. None of them ever calls ``waitpid(-1)``: other libraries' children (asyncio
subprocesses, for one) are theirs to reap. ``AIOISOLATE_CHILD_WATCHER=pidfd|thread`` forces
one; the test suite runs the core tests through both.
"""

from __future__ import annotations

import os
from typing import Final, Literal

from .base import ChildWatcher, GoneWatcher
from .pidfd import PidfdWatcher, pidfd_works
from .thread import THREAD_PREFIX, ThreadWatcher

__all__ = ["ENV_VAR", "THREAD_PREFIX", "ChildWatcher", "Mechanism", "select_watcher", "watch"]

Mechanism = Literal["pidfd", "thread"]

ENV_VAR: Final = "AIOISOLATE_CHILD_WATCHER"


def select_watcher() -> Mechanism:
    """The mechanism for the next child; raises before any fork if the forced one is unusable."""
    forced = os.environ.get(ENV_VAR, "")
    if forced == "thread":
        return "thread"
    if forced not in ("", "pidfd"):
        raise ValueError(f"{ENV_VAR}={forced!r} is not one of 'pidfd' or 'thread'")
    if pidfd_works():
        return "pidfd"
    if forced == "pidfd":
        raise RuntimeError(
            f"{ENV_VAR}=pidfd, but this system does not allow pidfds (Linux 5.3+ without a "
            "seccomp filter that forbids pidfd_open); unset it to use the thread watcher"
        )
    return "thread"


def watch(pid: int, mechanism: Mechanism, registry: set[int]) -> ChildWatcher:
    """A watcher for a child just forked. Raises OSError (out of fds, say) if none can be
    made; the caller then kills and reaps the child without one."""
    if mechanism == "pidfd":
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            # Not even a zombie: the child exited at once and something else reaped it (a
            # stray waitpid(-1), or SIGCHLD set to SIG_IGN). What it wrote is in the pipe.
            return GoneWatcher(pid)
        registry.add(pidfd)
        return PidfdWatcher(pid, pidfd, registry)
    return ThreadWatcher(pid, registry)
