"""What every watcher is: the `ChildWatcher` protocol, and what the watchers of a child forked
by this process share."""

from __future__ import annotations

import errno
import os
from typing import Protocol

import anyio.lowlevel

from .._forking import Waited, reap


class ChildWatcher(Protocol):
    """The parent's handle on one child, until it is reaped.

    A child forked here is watched by `PidfdWatcher` or `ThreadWatcher`; one forked by a zygote
    helper by `ZygoteWatcher`, which hears from the helper instead.
    """

    pid: int  # 0 until known (a zygote's child: until the helper says it forked)
    # A zygote's child: the helper's anonymous memory at fork, which the child starts with (it
    # says so with the pid, when the call has a memory limit). None for a child forked here.
    anonymous_at_fork: int | None
    # Whether `fileno` may go into a `ReadySet` (an epoll): a pidfd or a pipe, not a thread.
    pollable: bool

    async def started(self) -> None:
        """Return once `pid` is known (or the child is known never to have started)."""

    async def wait_exited(self) -> None:
        """Return once the child has exited; it stays a zombie until `reap`."""

    def fileno(self) -> int:
        """An fd that turns readable once the child has exited (or there is news of it)."""

    def has_exited(self) -> bool:
        """After `fileno` turned readable: whether that meant the child exited."""

    def send_signal(self, sig: int) -> None:
        """Signal the child itself; a no-op once it has exited. Only call it before `reap`."""

    def signal_group(self, sig: int) -> None:
        """Signal the child's process group (the child and what it started), before `reap`."""

    def reap(self, *, block: bool = False) -> Waited | None:
        """The exited child's wait status and resource usage, or None if nobody can know them
        (see `_forking.reap`). ``block`` is for a child already sent SIGKILL, with no loop."""

    def failure(self) -> Exception | None:
        """Why there is no outcome to read, when the watcher knows better than the child's exit
        status (a zygote helper that died, or could not fork); else None."""

    def close(self) -> None:
        """Release what the watcher holds (call once, after the last wait)."""


class ForkedChild:
    """What the watchers of a child forked by this process share."""

    pid: int
    pollable = False
    anonymous_at_fork: int | None = None

    async def started(self) -> None:
        pass  # known since fork

    def has_exited(self) -> bool:
        return True  # their fd turns readable for nothing else

    def signal_group(self, sig: int) -> None:
        # Only while the child is unreaped: until then its pid, which is the group id, is ours.
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def reap(self, *, block: bool = False) -> Waited | None:
        return reap(self.pid, block=block)

    def failure(self) -> Exception | None:
        return None


class GoneWatcher(ForkedChild):
    """The watcher of a child that was reaped by someone else before it could be watched."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    async def wait_exited(self) -> None:
        await anyio.lowlevel.checkpoint()

    def fileno(self) -> int:
        raise OSError(errno.ESRCH, "the child is gone: it has no pidfd")

    def send_signal(self, sig: int) -> None:
        pass  # gone, and its pid may be another process's by now

    def signal_group(self, sig: int) -> None:
        pass  # the same goes for its group id

    def close(self) -> None:
        pass
