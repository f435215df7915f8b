"""The fork-with-threads policy: which threads count, the one warning, and quiet forks.

A child forked while another thread of the parent holds a lock (stdio's, logging's, a C
library's) can hang on that lock. The policy, on every Python version:

* The first fork-mode fork made while a thread that counts runs issues one
  `ThreadedForkWarning` per process, attributed to the user's call (its file and line, captured
  where the call entered the library: a fan-out's forks run in tasks the library started).
* Threads that do not count hold no lock a child could need: the library's own watcher
  threads, and idle workers of the thread caches of trio, anyio and asyncio (a thread waiting
  for work in the cache's loop, or asyncio's waiting for a process). A cache worker running a
  job counts; so does every other thread (a progress bar's refresher, a logging queue's).
* Python's own ``DeprecationWarning`` (3.12+) about forking a multi-threaded process, which
  would come with every fork, and under pytest with every test, is silenced around the
  library's forks alone, whatever the warning filters are.
* The pytest plugin forks its tests with no warning at all (`quiet_forks`).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any, Final

from ._errors import ThreadedForkWarning
from ._watch import THREAD_PREFIX

# Where a call entered the library: the user's file, line and module.
Site = tuple[str, int, str]

# Whether ThreadedForkWarning was issued: once per process (see docs/zygote.md).
_warned = False
# Set while the pytest plugin forks a test (see quiet_forks).
_quiet = False


def caller(depth: int = 1) -> Site:
    """The file, line and module of the frame ``depth`` levels above the caller: at the API
    entry, the user's call. (A frame's position, not the frame: nothing is kept alive.)"""
    frame = sys._getframe(depth + 1)
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "?")


def fork(site: Site | None) -> int:
    """``os.fork()``, under the policy: the first fork made while a thread that counts runs
    warns, once per process, at ``site``."""
    global _warned
    if not _warned and not _quiet and threading.active_count() > 1:
        others = hazardous_threads()
        if others:
            _warned = True  # first: a filter may turn the warning into an exception
            _warn(others, site)
    return _fork_quietly()


def hazardous_threads() -> list[threading.Thread]:
    """The threads other than this one that may hold a lock a child could need."""
    me = threading.current_thread()
    frames = sys._current_frames()
    # This thread's entry is this very frame: kept, it would hold our callers (and the call's
    # result) in a reference cycle.
    del frames[threading.get_ident()]
    return [
        thread
        for thread in threading.enumerate()
        if thread is not me
        and not thread.name.startswith(THREAD_PREFIX)
        and not _idle(frames.get(thread.ident or 0))
    ]


# Where an idle worker of a thread cache waits for work: (the end of its file's path, the
# function). Its innermost frames are these, under the stdlib's waiting frames (below).
_IDLE_LOOPS: Final = frozenset(
    {
        ("trio/_core/_thread_cache.py", "_work"),  # trio.to_thread's cache
        ("anyio/_backends/_asyncio.py", "run"),  # anyio.to_thread on asyncio
        ("concurrent/futures/thread.py", "_worker"),  # asyncio's default executor, and others
    }
)
_WAITING: Final = frozenset({("threading.py", "wait"), ("queue.py", "get")})
# Threads whose whole life is harmless: asyncio's thread that waits for one subprocess (3.11's
# ThreadedChildWatcher), then hands its status to the loop, and ends.
_HARMLESS: Final = frozenset({("asyncio/unix_events.py", "_do_waitpid")})


def _idle(frame: Any) -> bool:
    """Whether a thread whose innermost frame is ``frame`` holds no lock a child could need:
    it waits for work in a thread cache, or is a thread that never takes one."""
    innermost = frame
    while frame is not None and _place(frame, _WAITING):
        frame = frame.f_back
    if frame is not None and _place(frame, _IDLE_LOOPS):
        return True
    frame = innermost
    while frame is not None:
        if _place(frame, _HARMLESS):
            return True
        frame = frame.f_back
    return False


def _place(frame: Any, places: frozenset[tuple[str, str]]) -> bool:
    filename = frame.f_code.co_filename.replace(os.sep, "/")
    name = frame.f_code.co_name
    return any(name == function and filename.endswith(path) for path, function in places)


def _warn(others: list[threading.Thread], site: Site | None) -> None:
    warning = ThreadedForkWarning(
        f"forking a child while other threads run ({', '.join(t.name for t in others)}): if one "
        "of them holds a lock when the fork happens (stdio's, logging's, a C library's), the "
        "child may hang on it. Use zygote mode (zygote=True), whose children are forked from a "
        "helper that runs no thread. aioisolate warns about this once per process."
    )
    if site is None:
        warnings.warn(warning, stacklevel=3)
        return
    filename, lineno, module = site
    warnings.warn_explicit(warning, ThreadedForkWarning, filename, lineno, module)


# Python's warning, as it words it (3.12 and 3.13).
_PYTHONS: Final = re.compile(r".*multi-threaded, use of fork\(\) may lead to deadlocks")
# A filter for that warning from this module alone: it names the function that calls fork.
_SILENCE: Final = (
    "ignore",
    _PYTHONS,
    DeprecationWarning,
    re.compile(re.escape(__name__) + r"\Z"),
    0,
)


def _fork_quietly() -> int:
    """``os.fork()`` without Python's own warning about threads (3.12+).

    The filter goes in front of whatever filters there are (pytest's for each test included),
    just around the fork, and out again in both processes. It is added and removed as one
    entry, not by saving and restoring the whole list as ``catch_warnings`` does, which would
    undo a change another thread made meanwhile.
    """
    if sys.version_info < (3, 12):
        return os.fork()
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is None:  # a later Python: its own way of changing filters, thread-safe there
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _PYTHONS.pattern, DeprecationWarning)
            return os.fork()
    warnings.filters.insert(0, _SILENCE)
    mutated()
    try:
        return os.fork()
    finally:
        with contextlib.suppress(ValueError):  # reset meanwhile (warnings.resetwarnings)
            warnings.filters.remove(_SILENCE)
        mutated()


@contextlib.contextmanager
def quiet_forks() -> Iterator[None]:
    """No `ThreadedForkWarning` for the forks made inside: the pytest plugin's. Its parent's
    threads are the test runner's, and the advice (zygote mode) cannot apply to a test. A
    child forked inside must call `end_quiet_forks`, for the forks it makes itself."""
    global _quiet
    previous, _quiet = _quiet, True
    try:
        yield
    finally:
        _quiet = previous


def end_quiet_forks() -> None:
    global _quiet
    _quiet = False
