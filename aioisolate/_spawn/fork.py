"""Fork mode: the child is forked from this process, and inherits the function and its
arguments as they are (nothing is pickled on the way in).

The start is synchronous from the pipes to the watcher (no await anywhere in it): a sibling
call can only fork once we yield to the loop, by which time the write ends of this call's
pipes are closed, so no other child ever holds them. Forks are paced: one per event loop at a
time, and the next only once the loop has turned after this one (see `RunningChild._pace`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from .. import _child, _fds, _forking, _linux, _threads, _watch
from .._options import Options
from .._outcome import cannot_start
from .._running import RunningChild
from .base import CallPipes, flush_parent_stdio, plan_for

_fork_lock_var: anyio.lowlevel.RunVar[anyio.Lock] = anyio.lowlevel.RunVar("aioisolate.forks")


class ForkSpawner:
    """Starts each call's child with a fork of this process."""

    async def spawn(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        options: Options,
        *,
        stream: bool,
        site: _threads.Site | None,
    ) -> RunningChild:
        mechanism = _watch.select_watcher()  # raises before any fork if the forced one fails
        try:
            forks = _fork_lock_var.get()
        except LookupError:
            forks = anyio.Lock(fast_acquire=True)
            _fork_lock_var.set(forks)
        await forks.acquire()
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
            # The child holds the lock until its first wait has let the loop turn.
            return _start(func, args, options, stream, mechanism, forks, site)
        except BaseException:
            forks.release()
            raise


FORK = ForkSpawner()


def _start(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    stream: bool,
    mechanism: _watch.Mechanism,
    forks: anyio.Lock,
    site: _threads.Site | None,
) -> RunningChild:
    parent_pid = os.getpid()
    flush_parent_stdio()
    pid = -1
    pipes: CallPipes | None = None
    watcher: _watch.ChildWatcher | None = None
    with _fds.lock:
        try:
            pipes = CallPipes(options, stream=stream)
            spill = -1 if pipes.spill is None else pipes.spill
            # The watchdog's baseline: a read of /proc, so only for calls that have one.
            anonymous_at_fork = None
            if options.memory_limit is not None:
                _, anonymous_at_fork = _linux.resident_memory()
            plan = plan_for(
                options,
                stream=stream,
                write_fd=pipes.result[1],
                stdout=pipes.output_target("stdout", options.stdout),
                stderr=pipes.output_target("stderr", options.stderr),
                spill_fd=spill,
                # Listed now: the at-fork hook empties the set in the child.
                inherited_fds=list(_fds.library_fds.difference(pipes.write_ends, [spill])),
                parent_pid=parent_pid,
            )
            started = time.monotonic()

            def child(sigmask: set[int]) -> None:
                _child.run(func, args, plan, sigmask)

            pid = _forking.fork(child, os_fork=lambda: _threads.fork(site))
            pipes.close_write_ends()
            watcher = _watch.watch(pid, mechanism, _fds.library_fds)
            return pipes.running(
                watcher,
                options,
                started=started,
                stream=stream,
                anonymous_at_fork=anonymous_at_fork,
                fork_turn=forks,
            )
        except BaseException as exc:
            # No event loop to wait with here: the child, just forked and killed outright, is
            # reaped at once.
            if pid > 0:
                _forking.kill_now(pid)
            if watcher is not None:
                watcher.close()
            if pipes is not None:
                pipes.close()
            if isinstance(exc, OSError):
                raise cannot_start(exc) from exc
            raise
