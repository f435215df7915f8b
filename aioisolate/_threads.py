"""The fork-with-threads policy: which threads count, the one warning, and quiet forks.

A child forked while another thread of the parent holds a lock (stdio's, logging's, a C
library's) can hang on that lock. The first fork-mode fork made while other threads run warns
with `ThreadedForkWarning`, once per process; the library's own watcher threads only wait in
``waitid`` and hold no lock, so they do not count. Python 3.12+'s own warning, which would come
with every fork, is silenced for the library's forks. The pytest plugin forks its tests with
no warning at all (`quiet_forks`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings
from collections.abc import Iterator

from ._errors import ThreadedForkWarning
from ._watch import THREAD_PREFIX

# Whether ThreadedForkWarning was issued: once per process (see docs/how-it-works.md).
_warned = False
# Set while the pytest plugin forks a test (see quiet_forks).
_quiet = False


def fork() -> int:
    """``os.fork()``, under the policy: the first fork made while another thread runs warns,
    once per process."""
    global _warned
    if _quiet:
        # Around the fork alone, which both processes leave: the child has the filters the
        # parent had.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*multi-threaded.*fork", DeprecationWarning)
            return os.fork()
    if threading.active_count() == 1:
        return os.fork()
    me = threading.current_thread()
    others = [
        t for t in threading.enumerate() if t is not me and not t.name.startswith(THREAD_PREFIX)
    ]
    if not others:
        return os.fork()
    if not _warned:
        _warned = True  # first: a filter may turn the warning into an exception
        warnings.warn(
            ThreadedForkWarning(
                f"forking a child while other threads run ({', '.join(t.name for t in others)}): "
                "if one of them holds a lock when the fork happens (stdio's, logging's, a C "
                "library's), the child may hang on it. Use zygote mode (zygote=True), whose "
                "children are forked from a helper that runs no thread. aioisolate warns about "
                "this once per process."
            ),
            stacklevel=3,
        )
    return os.fork()


if sys.version_info >= (3, 12):
    # The interpreter's own warning about forking a threaded process comes with every fork:
    # ours are covered by the policy above. A filter for this module alone, set once (changing
    # filters around each fork would not be safe with the other threads running).
    warnings.filterwarnings(
        "ignore", r".*multi-threaded.*fork", DeprecationWarning, r"aioisolate\._threads"
    )


@contextlib.contextmanager
def quiet_forks() -> Iterator[None]:
    """No fork-with-threads warning, ours or Python's, for the forks made inside: the pytest
    plugin's. Its parent's threads are the test runner's, and the advice (zygote mode) cannot
    apply to a test; pytest's own warning filters for each test would let Python's through.
    A child forked inside must call `end_quiet_forks`, for the forks it makes itself."""
    global _quiet
    previous, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = previous


def end_quiet_forks() -> None:
    global _quiet
    _quiet = False
