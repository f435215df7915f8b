"""The parent's side of one isolated call: fork, pipe, pidfd, read, reap, kill.

One `run_in_child` call goes through these steps, and every path after ``fork()`` ends with
the child reaped and our fds closed:

1. `_spawn` (no await anywhere in it): create the result pipe, fork with signals blocked,
   close the pipe's write end, open the watcher. A sibling call can only fork once we yield to
   the loop, by which time the write end is closed, so no other child ever holds it.
2. `_Child.collect`: read the result frame as it arrives (a result larger than the pipe buffer
   needs the parent reading while the child writes) while waiting for the child to exit.
3. On exit: kill what is left of the child's process group while the child is still a zombie
   (its pid, and so the group id, cannot have been reused), then reap it.
4. On cancellation, timeout or any error: `_Child.kill_and_reap`, which cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio

from . import _child, _platform, _protocol
from ._errors import ChildCrashed, IsolationError, IsolationTimeout

# Held from creating a pipe to closing its write end in the parent, so that a fork from another
# event-loop thread cannot copy a write end that is not its own.
_fork_lock = threading.Lock()

# Every fd this module holds open: each child closes them all, since they are other calls'.
_library_fds: set[int] = set()


def _after_fork_in_child() -> None:
    global _fork_lock
    # The forking thread held the lock; in the child it must be usable again (for nested
    # isolated calls). The fds are closed by the child itself; forget them here.
    _fork_lock = threading.Lock()
    _library_fds.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


async def run_in_child(
    func: Callable[..., Any], args: tuple[Any, ...], *, timeout: float | None
) -> Any:
    """Run ``func(*args)`` in a forked child; return its result or raise what it raised."""
    mechanism = _platform.select_watcher()
    await anyio.lowlevel.checkpoint_if_cancelled()
    child = _spawn(func, args, mechanism)
    try:
        with anyio.move_on_after(timeout) as deadline:
            await child.collect()
        if deadline.cancelled_caught and not child.reaped:
            assert timeout is not None
            await child.kill_and_reap()
            raise IsolationTimeout(
                f"child process {child.pid} ran for longer than timeout={timeout} seconds; "
                "it was killed",
                pid=child.pid,
                timeout=timeout,
            )
    except BaseException:
        await child.kill_and_reap()
        raise
    finally:
        child.close()
    return child.outcome()


def _spawn(
    func: Callable[..., Any], args: tuple[Any, ...], mechanism: _platform.Mechanism
) -> _Child:
    loop_kind = _loop_kind()
    parent_pid = os.getpid()
    _flush_parent_stdio()
    read_fd = write_fd = pid = -1
    watcher: _platform.ChildWatcher | None = None
    with _fork_lock:
        try:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            _library_fds.update((read_fd, write_fd))
            # Taken now: the at-fork hook empties the set in the child.
            others = list(_library_fds - {write_fd})
            # Blocked across fork: a signal arriving in the child before it resets the
            # handlers would run the parent's (and wake the parent's loop through its wakeup fd).
            sigmask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            try:
                pid = os.fork()
                if pid == 0:
                    try:
                        _child.run(
                            func,
                            args,
                            write_fd=write_fd,
                            inherited_fds=others,
                            sigmask=sigmask,
                            parent_pid=parent_pid,
                            loop_kind=loop_kind,
                        )
                    finally:
                        os._exit(_child.EXIT_INTERNAL)
            finally:
                # A signal that arrived during fork (Ctrl-C, say) is delivered here, and its
                # KeyboardInterrupt is cleaned up below like any other failure.
                signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
            _close(write_fd)
            write_fd = -1
            try:
                # The child does this too; whichever runs first, the group exists before we
                # return, so a kill sent right away still reaches the child's descendants.
                os.setpgid(pid, pid)
            except OSError:
                pass
            watcher = _platform.watch(pid, mechanism)
            if isinstance(watcher, _platform.PidfdWatcher):
                _library_fds.add(watcher.pidfd)
            os.set_blocking(read_fd, False)
            return _Child(pid, watcher, _protocol.FrameReader(read_fd))
        except BaseException as exc:
            _undo_spawn(pid, read_fd, write_fd, watcher)
            if pid == -1 and isinstance(exc, OSError):
                raise _cannot_start(exc) from exc
            raise


def _undo_spawn(
    pid: int, read_fd: int, write_fd: int, watcher: _platform.ChildWatcher | None
) -> None:
    """Clean up after a failure inside `_spawn`, where there is no event loop to wait with."""
    if pid > 0:
        # Unreaped, so the pid and group id are still this child's. It has just been forked
        # and is killed outright, so the blocking wait is short.
        for kill in (os.kill, os.killpg):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
        _platform.reap(pid, block=True)
    if watcher is not None:
        if isinstance(watcher, _platform.PidfdWatcher):
            _library_fds.discard(watcher.pidfd)
        watcher.close()
    for fd in (read_fd, write_fd):
        if fd != -1:
            _close(fd)


def _flush_parent_stdio() -> None:
    # Text still buffered in the parent would otherwise be printed again by the child. A
    # stream that cannot be flushed (closed, or a reader that went away) is not our business.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass


class _Child:
    """The parent's view of one running child, from fork until it is reaped."""

    def __init__(self, pid: int, watcher: _platform.ChildWatcher, reader: _protocol.FrameReader):
        self.pid = pid
        self.watcher = watcher
        self.reader = reader
        self.reaped = False
        self.status: int | None = None
        self.protocol_error: IsolationError | None = None

    async def collect(self) -> None:
        """Read the result while waiting for the child to exit; return once it is reaped."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read)
                await self.watcher.wait_exited()
                self._reap()
                # All the child wrote is in the pipe now. Take it without waiting for EOF, which
                # a descendant that left the process group could postpone for ever.
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The task group is ours, not the caller's: a lone KeyboardInterrupt (or error)
            # must reach the caller as itself.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        self._read_available()

    async def _read(self) -> None:
        while True:
            self._read_available()
            if self.reader.complete or self.reader.eof or self.protocol_error:
                return
            await anyio.wait_readable(self.reader.fd)

    def _read_available(self) -> None:
        if self.protocol_error is None:
            try:
                self.reader.read_available()
            except IsolationError as exc:
                self.protocol_error = exc
                self.kill()

    def kill(self) -> None:
        """SIGKILL the child and its process group; a no-op once reaped."""
        if not self.reaped:
            self.watcher.send_signal(signal.SIGKILL)
            self._kill_group()

    def _kill_group(self) -> None:
        # Only while the child is unreaped: until then its pid, which is the group id, is ours.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def _reap(self, *, block: bool = False) -> None:
        # Descendants still in the group (a subprocess the function started, say) die with it.
        self._kill_group()
        self.status = _platform.reap(self.pid, block=block)
        self.reaped = True

    async def kill_and_reap(self) -> None:
        """Kill the child and wait until it is reaped, however often the caller is interrupted."""
        self.kill()
        pending: BaseException | None = None
        while not self.reaped:
            try:
                with anyio.CancelScope(shield=True):
                    await self.watcher.wait_exited()
            except anyio.get_cancelled_exc_class() as exc:
                # asyncio's task.cancel() goes through shields. The child is already dying, so
                # wait on, and pass the cancellation on once it is reaped.
                pending = exc
                continue
            except BaseException as exc:
                # A KeyboardInterrupt (trio delivers it through shields) or a failing watcher.
                # The child has been sent SIGKILL: waiting for it without the loop is short.
                pending = exc
                self._reap(block=True)
                break
            self._reap()
        if pending is not None:
            raise pending

    def close(self) -> None:
        anyio.notify_closing(self.reader.fd)
        _close(self.reader.fd)
        if isinstance(self.watcher, _platform.PidfdWatcher):
            _library_fds.discard(self.watcher.pidfd)
        self.watcher.close()

    def outcome(self) -> Any:
        if self.protocol_error is not None:
            raise self.protocol_error
        if self.reader.complete:
            return _protocol.decode(self.reader.kind, self.reader.payload)  # type: ignore[arg-type]
        raise self._crash()

    def _crash(self) -> ChildCrashed:
        if self.status is None:
            return ChildCrashed(
                f"child process {self.pid} ended without sending a result, and its exit status "
                "is unknown: something else in this process reaped it (a waitpid(-1), or "
                "SIGCHLD set to SIG_IGN)",
                pid=self.pid,
                exitcode=None,
                signal=None,
            )
        code = os.waitstatus_to_exitcode(self.status)
        sent = ""
        if self.reader.received:
            sent = f" (it had sent {self.reader.received} bytes of it)"
        if code < 0:
            sig = signal.Signals(-code)
            return ChildCrashed(
                f"child process {self.pid} was killed by {sig.name} "
                f"({signal.strsignal(sig)}) before sending its result{sent}",
                pid=self.pid,
                exitcode=None,
                signal=sig,
            )
        why = ""
        if code == _child.EXIT_INTERNAL:
            why = (
                "; unless the function chose that code, the child could not send its outcome "
                "(its stderr says why)"
            )
        return ChildCrashed(
            f"child process {self.pid} exited with code {code} before sending its result"
            f"{sent}{why}",
            pid=self.pid,
            exitcode=code,
            signal=None,
        )


def _loop_kind() -> _child.LoopKind:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "trio"  # anyio runs on asyncio or trio
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def _close(fd: int) -> None:
    _library_fds.discard(fd)
    os.close(fd)


def _cannot_start(exc: OSError) -> IsolationError:
    return IsolationError(
        f"could not start a child process: {exc}. The system is short of processes, memory or "
        "file descriptors; retry later or lower the number of concurrent calls (limiter=)"
    )
