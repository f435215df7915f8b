"""The portable watcher (other systems, or where seccomp forbids pidfds): a thread per child.

The thread blocks in ``waitid(P_PID, pid, WEXITED | WNOWAIT)`` and then writes a byte to a
pipe whose read end the event loop waits on. Signals go through ``os.kill``, which is safe
because only the caller reaps the child, and only after the watcher has seen it exit. On Linux
the test suite forces it on (``AIOISOLATE_CHILD_WATCHER=thread``) for every core test.
"""

from __future__ import annotations

import os
import threading
from typing import Final

import anyio

from .base import ForkedChild

# The names of our own threads start with this. They only wait (in waitid), holding no lock a
# child could need, so a fork while they run is not a fork from a threaded process.
THREAD_PREFIX: Final = "aioisolate-"


class ThreadWatcher(ForkedChild):
    """A thread blocks in waitid() on the child and, when it has exited, writes a byte to a
    pipe whose read end the event loop waits on: one thread per child, however often the
    caller waits."""

    def __init__(self, pid: int, registry: set[int]) -> None:
        self.pid = pid
        self.fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        # Registered so that children forked meanwhile close them (see _fds.library_fds).
        registry.update((self.fd, self._write_fd))
        self._registry = registry
        self._thread = threading.Thread(
            target=_signal_exit,
            args=(pid, self._write_fd),
            name=f"{THREAD_PREFIX}watcher-{pid}",
            daemon=True,
        )
        self._thread.start()

    async def wait_exited(self) -> None:
        await anyio.wait_readable(self.fd)

    def fileno(self) -> int:
        return self.fd

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            # Reaped by someone else (SIGCHLD set to SIG_IGN, say), perhaps with its pid
            # already reused: only pidfds rule that out.
            pass

    def close(self) -> None:
        # Called once the child is reaped, so the thread is past waitid() and ends at once;
        # both fds are closed after it, so it can never write to a reused fd number.
        self._thread.join()
        anyio.notify_closing(self.fd)
        for fd in (self.fd, self._write_fd):
            self._registry.discard(fd)
            os.close(fd)


def _signal_exit(pid: int, write_fd: int) -> None:
    try:
        # WNOWAIT leaves the child a zombie, so its pid (and process group id) stay reserved
        # until the caller reaps it.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass  # reaped by someone else: it has exited all the same
    os.write(write_fd, b"x")
