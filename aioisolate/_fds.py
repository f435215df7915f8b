"""The file descriptors this library holds open, and the lock that keeps forks away from them.

Every child closes all the fds listed here first thing (they are other calls' pipes, pidfds and
sockets). The lock is held from creating an fd to listing it, and around closing one, so that a
fork from another thread can neither copy an fd missing from the list nor close a number that
has meanwhile been reused. Reentrant: code holding it closes fds too.
"""

from __future__ import annotations

import os
import threading

lock = threading.RLock()
library_fds: set[int] = set()


def close(fd: int) -> None:
    """Close one of our fds and forget it."""
    with lock:
        library_fds.discard(fd)
        os.close(fd)


def _after_fork_in_child() -> None:
    global lock
    # The forking thread held the lock; in the child it must be usable again (for nested
    # isolated calls). The fds themselves are closed by the child's setup; forget them here.
    lock = threading.RLock()
    library_fds.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
