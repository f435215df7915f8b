"""The Linux watcher: a pidfd, readable once the child has exited.

The event loop waits on it like on a socket, and signals go through it, so they can never
reach another process that later reused the pid.
"""

from __future__ import annotations

import errno
import os
import signal

import anyio

from .base import ForkedChild


class PidfdWatcher(ForkedChild):
    pollable = True

    def __init__(self, pid: int, pidfd: int, registry: set[int]) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self._registry = registry

    async def wait_exited(self) -> None:
        await anyio.wait_readable(self.pidfd)

    def fileno(self) -> int:
        return self.pidfd

    def send_signal(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass  # already exited

    def close(self) -> None:
        anyio.notify_closing(self.pidfd)
        self._registry.discard(self.pidfd)
        os.close(self.pidfd)


_verdict: bool | None = None


def pidfd_works() -> bool:
    """Whether this kernel, and any seccomp filter, let us open and signal pidfds.

    Probed once; a probe that fails for want of fds or memory says nothing and is not kept.
    """
    global _verdict
    if _verdict is not None:
        return _verdict
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        _verdict = False
        return False
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            return True  # unknown yet; watch() falls back to a thread if opening one fails
        _verdict = False
        return False
    try:
        signal.pidfd_send_signal(fd, 0)
    except OSError:
        _verdict = False
    else:
        _verdict = True
    finally:
        os.close(fd)
    return _verdict
