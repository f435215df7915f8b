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
4. On cancellation, timeout or any error: `_Child.kill_and_reap` (SIGTERM and a grace period
   if asked for, then SIGKILL), which cannot be interrupted.

Captured stdout/stderr and the memory watchdog run beside the reader in step 2.
"""

from __future__ import annotations

import _signal
import contextlib
import fcntl
import inspect
import mmap
import os
import resource
import signal
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final

import anyio
import anyio.abc
import anyio.lowlevel

from . import _child, _fds, _limits, _platform, _protocol, _spill, _zygote, _zygote_main
from ._codec import PICKLE
from ._errors import (
    ChildCrashed,
    CPULimitExceeded,
    IsolationError,
    IsolationTimeout,
    MemoryLimitExceeded,
    ThreadedForkWarning,
)
from ._options import Options
from ._output import Tail
from ._report import CallReport

# signal.pthread_sigmask() turns each signal number into an enum member, which for all of them
# costs a tenth of a millisecond on every call: the raw _signal functions do not.
_ALL_SIGNALS = _signal.valid_signals()


async def run_in_child(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    reports: list[CallReport] | None = None,
) -> tuple[Any, CallReport]:
    """Run ``func(*args)`` in a forked child; return its result and report, or raise.

    The report is also appended to ``reports``, on every path, cancellation included.
    """
    mechanism = _platform.select_watcher()
    child = await spawn(func, args, options, mechanism)
    try:
        await child.pace()
        if options.timeout is None:
            await child.collect()
        else:
            with anyio.move_on_after(options.timeout) as deadline:
                await child.collect()
            if deadline.cancelled_caught and not child.reaped:
                child.timed_out = True
                await child.kill_and_reap()
    except BaseException:
        await child.kill_and_reap()
        raise
    finally:
        child.close()
        report = child.report()
        if reports is not None:
            reports.append(report)
    try:
        return child.outcome(), report
    except IsolationError as exc:
        # Not one raised by the function itself: an error from a nested call keeps its own.
        if exc.report is None:
            exc.report = report
        raise


_fork_lock_var: anyio.lowlevel.RunVar[anyio.Lock] = anyio.lowlevel.RunVar("aioisolate.forks")


async def spawn(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    mechanism: _platform.Mechanism,
    *,
    stream: bool = False,
) -> _Child:
    """`_spawn`, with forks paced: one per event loop at a time, and the new child holds the
    event loop's fork lock until its caller's `_Child.pace` (called first thing inside the
    caller's kill-and-reap protection) has let the loop turn.

    A fork holds the event loop for a millisecond or more (more in a big parent). When calls
    reach it together (a fan-out starting, children ending at the same time), timers and other
    tasks then run between two forks, and a burst never freezes the loop.
    """
    if options.zygote is not None:
        return await _spawn_in_zygote(options.zygote, func, args, options, stream=stream)
    try:
        forks = _fork_lock_var.get()
    except LookupError:
        forks = anyio.Lock(fast_acquire=True)
        _fork_lock_var.set(forks)
    await forks.acquire()
    try:
        await anyio.lowlevel.checkpoint_if_cancelled()
        child = _spawn(func, args, options, mechanism, stream=stream)
    except BaseException:
        forks.release()
        raise
    child.fork_turn = forks
    return child


def _spawn(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    mechanism: _platform.Mechanism,
    *,
    stream: bool = False,
) -> _Child:
    loop_kind = _child.current_loop_kind()
    parent_pid = os.getpid()
    _flush_parent_stdio()
    pid = -1
    opened: list[int] = []  # fds of ours not yet handed to a _Child, closed if anything fails
    watcher: _platform.ChildWatcher | None = None
    with _fds.lock:
        try:
            pipes, spill = _open_pipes(options, stream, opened)
            write_ends = [w for _, w in pipes.values()]
            # The watchdog's baseline: a read of /proc, so only for calls that have one.
            anonymous_at_fork = None
            if options.memory_limit is not None:
                _, anonymous_at_fork = _platform.resident_memory()
            # Blocked across fork: a signal arriving in the child before it resets the
            # handlers would run the parent's (and wake the parent's loop through its wakeup fd).
            sigmask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _ALL_SIGNALS)
            plan = _child.Plan(
                write_fd=pipes["result"][1],
                # Listed now: the at-fork hook empties the set in the child.
                inherited_fds=list(_fds.library_fds.difference(write_ends, [spill])),
                sigmask=sigmask,
                parent_pid=parent_pid,
                loop_kind=loop_kind,
                memory_limit=options.memory_limit,
                cpu_limit=options.cpu_limit,
                stdout=_output_target(options.stdout, pipes.get("stdout")),
                stderr=_output_target(options.stderr, pipes.get("stderr")),
                stream=stream,
                codec=options.codec,
                sandbox=options.sandbox,
                sandboxed=options.sandbox.active,
                spill_fd=-1 if spill is None else spill,
                nice=options.nice,
                result_limit=options.result_limit,
            )
            started = time.monotonic()
            try:
                pid = _fork()
                if pid == 0:
                    try:
                        _child.run(func, args, plan)
                    finally:
                        os._exit(_child.EXIT_INTERNAL)
            finally:
                # A signal that arrived during fork (Ctrl-C, say) is delivered here, and its
                # KeyboardInterrupt is cleaned up below like any other failure.
                _signal.pthread_sigmask(_signal.SIG_SETMASK, sigmask)
            for fd in write_ends:
                opened.remove(fd)
                _fds.close(fd)
            try:
                # The child does this too; whichever runs first, the group exists before we
                # return, so a kill sent right away still reaches the child's descendants.
                os.setpgid(pid, pid)
            except OSError:
                pass
            watcher = _platform.watch(pid, mechanism, _fds.library_fds)
            return _new_child(watcher, pipes, opened, options, started, anonymous_at_fork, spill)
        except BaseException as exc:
            _undo_spawn(pid, opened, watcher)
            if isinstance(exc, OSError):
                raise _cannot_start(exc) from exc
            raise


def _open_pipes(
    options: Options, stream: bool, opened: list[int]
) -> tuple[dict[str, tuple[int, int]], int | None]:
    """The call's pipes (result, and the outputs it captures) and its spill file, if any; each
    fd is listed in ``opened`` as it is made. Call with the fork lock held."""
    pipes: dict[str, tuple[int, int]] = {}
    for name in ("result", "stdout", "stderr"):
        if name == "result" or getattr(options, name) == "capture":
            pipes[name] = os.pipe2(os.O_CLOEXEC)
            opened.extend(pipes[name])
            _fds.library_fds.update(pipes[name])
    spill = None
    if not stream and options.codec is PICKLE:
        spill = _platform.spill_file(_fds.library_fds)
        if spill is not None:
            opened.append(spill)
    return pipes, spill


def _new_child(
    watcher: _platform.ChildWatcher,
    pipes: dict[str, tuple[int, int]],
    opened: list[int],
    options: Options,
    started: float,
    anonymous_at_fork: int | None,
    spill: int | None,
) -> _Child:
    """The `_Child` of a child just started, once the write ends of its pipes are closed."""
    for fd in opened:
        os.set_blocking(fd, False)
    return _Child(
        watcher,
        _protocol.FrameReader(pipes["result"][0], max_size=options.result_limit),
        {
            name: Tail(pipes[name][0], options.max_output)
            for name in ("stdout", "stderr")
            if name in pipes
        },
        options,
        started,
        anonymous_at_fork,
        spill,
    )


async def _spawn_in_zygote(
    zygote: _zygote.Zygote,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    *,
    stream: bool,
) -> _Child:
    """`spawn` for zygote mode: the helper forks, so nothing here holds the event loop long
    (and there is no fork to pace)."""
    payload = _zygote.Payload(func, args, options.codec)  # TypeError if it cannot be pickled
    imports: tuple[str, ...] = ()
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        imports = _LOOP_MODULES[_child.current_loop_kind()]
    try:
        payload.open()
        for _ in payload.slices():
            await anyio.lowlevel.checkpoint()
        while True:
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                return _start_in_zygote(zygote, payload, options, stream, imports)
            except _zygote.Busy:
                await zygote.wait_writable()
            except _zygote.TooBig as exc:
                if payload.inline is None:
                    raise IsolationError(
                        f"the call's request to the zygote is {exc.args[0]} bytes, more than "
                        "its socket carries in one message: a very large env= or other option"
                    ) from None
                payload.to_file()  # the pickle goes in the file instead
                payload.open()
                for _ in payload.slices():
                    await anyio.lowlevel.checkpoint()
    except OSError as exc:
        raise _cannot_start(exc) from exc
    finally:
        payload.close()


_LOOP_MODULES: Final = {
    "asyncio": ("asyncio",),
    "uvloop": ("asyncio", "uvloop"),
    "trio": ("trio",),
}


def _start_in_zygote(
    zygote: _zygote.Zygote,
    payload: _zygote.Payload,
    options: Options,
    stream: bool,
    imports: tuple[str, ...],
) -> _Child:
    _flush_parent_stdio()  # the child may write where we do
    opened: list[int] = []
    watcher = None
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = None  # deleted: the child stays in the helper's working directory
    with _fds.lock:
        try:
            pipes, spill = _open_pipes(options, stream, opened)
            fds = {"result": pipes["result"][1]}
            plan_outputs: dict[str, int] = {}
            for name, ours in (("stdout", 1), ("stderr", 2)):
                how = getattr(options, name)
                if name in pipes:
                    fds[name] = pipes[name][1]
                elif how == "inherit" and _is_open(ours):
                    fds[name] = ours  # ours now, as a forked child would have it
                else:
                    plan_outputs[name] = _child.DISCARD
            if spill is not None:
                fds["spill"] = spill
            if payload.fd >= 0:
                fds["payload"] = payload.fd
            plan = _child.Plan(
                write_fd=-1,  # the helper fills in the fds
                inherited_fds=[],
                sigmask=set(),
                parent_pid=0,
                loop_kind=_child.current_loop_kind(),
                memory_limit=options.memory_limit,
                cpu_limit=options.cpu_limit,
                stream=stream,
                sandbox=options.sandbox,
                sandboxed=options.sandbox.active,
                nice=options.nice,
                result_limit=options.result_limit,
                stdout=plan_outputs.get("stdout", _child.INHERIT),
                stderr=plan_outputs.get("stderr", _child.INHERIT),
            )
            request = _zygote_main.Request(
                plan,
                cwd,
                payload.inline,
                payload_at=payload.at,
                payload_size=payload.size,
                kill_descendants=options.kill_descendants,
                imports=imports,
            )
            started = time.monotonic()
            watcher = zygote.start_call(request, fds, payload.nbytes)
            for _, write_end in pipes.values():
                opened.remove(write_end)
                _fds.close(write_end)
            return _new_child(watcher, pipes, opened, options, started, None, spill)
        except BaseException:
            if watcher is not None:  # sent: the helper kills it, and reaps it
                watcher.send_signal(signal.SIGKILL)
                watcher.signal_group(signal.SIGKILL)
                watcher.close()
            for fd in opened:
                _fds.close(fd)
            raise


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


# Whether ThreadedForkWarning was issued: once per process (see docs/how-it-works.md).
_warned_threads = False
# Set while the pytest plugin forks a test (see quiet_forks).
_quiet = False


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


def _fork() -> int:
    """os.fork(), and the fork-with-threads policy: the first fork made while another thread
    runs warns, once per process; Python 3.12+'s own warning, which would come with every
    call, is silenced for our forks."""
    global _warned_threads
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
        t
        for t in threading.enumerate()
        if t is not me and not t.name.startswith(_platform.THREAD_PREFIX)
    ]
    if not others:
        return os.fork()
    if not _warned_threads:
        _warned_threads = True  # first: a filter may turn the warning into an exception
        warnings.warn(
            ThreadedForkWarning(
                f"forking a child while other threads run ({', '.join(t.name for t in others)}): "
                "if one of them holds a lock when the fork happens (stdio's, logging's, a C "
                "library's), the child may hang on it. Use zygote mode (Isolator(mode='zygote'), "
                "or zygote=), whose children are forked from a helper that runs no thread. "
                "aioisolate warns about this once per process."
            ),
            stacklevel=2,
        )
    return os.fork()


if sys.version_info >= (3, 12):
    # The interpreter's own warning about forking a threaded process comes with every fork:
    # ours are covered by the policy above. A filter for this module alone, set once (changing
    # filters around each fork would not be safe with the other threads running).
    warnings.filterwarnings(
        "ignore", r".*multi-threaded.*fork", DeprecationWarning, r"aioisolate\._call"
    )


def _output_target(how: str, pipe: tuple[int, int] | None) -> int:
    if pipe is not None:
        return pipe[1]
    return _child.DISCARD if how == "discard" else _child.INHERIT


def _undo_spawn(pid: int, opened: list[int], watcher: _platform.ChildWatcher | None) -> None:
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
        watcher.close()
    for fd in opened:
        _fds.close(fd)


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

    def __init__(
        self,
        watcher: _platform.ChildWatcher,
        reader: _protocol.FrameReader,
        outputs: dict[str, Tail],
        options: Options,
        started: float,
        anonymous_at_fork: int | None,
        spill_fd: int | None = None,
    ) -> None:
        self.spill_fd = spill_fd
        self.spilled: mmap.mmap | None = None  # the spill file, mapped once the child is gone
        self.watcher = watcher
        self.reader = reader
        self.outputs = outputs
        self.options = options
        self.started = started
        # The parent's anonymous resident memory at fork (the child starts with this much),
        # when a memory limit needs it.
        self.anonymous_at_fork = anonymous_at_fork
        self.killed = False  # whether we sent the child a signal
        self.ended: float | None = None
        self.reaped = False
        self.waited: tuple[int, resource.struct_rusage] | None = (
            None  # (status, rusage), None if unknown
        )
        self.protocol_error: IsolationError | None = None
        self.timed_out = False
        self.exited = False  # seen to exit by a stream's wait, not yet reaped
        self.memory_seen: int | None = None  # set when the watchdog killed the child
        self.fork_turn: anyio.Lock | None = None  # the loop's fork lock, until `pace`

    @property
    def pid(self) -> int:
        """The child's pid; 0 while a zygote has not yet said it forked."""
        return self.watcher.pid

    async def pace(self) -> None:
        """Let the event loop turn once after this fork (twice if other calls wait to fork),
        then let the next fork go. Call it inside the protection that kills and reaps."""
        forks, self.fork_turn = self.fork_turn, None
        if forks is not None:
            try:
                await anyio.lowlevel.checkpoint()
                if forks.statistics().tasks_waiting:
                    await anyio.lowlevel.checkpoint()
            finally:
                forks.release()

    async def collect(self) -> None:
        """Read the result while waiting for the child to exit; return once it is reaped."""
        tails = {tail.fd: tail for tail in self.outputs.values()}
        with _fds.lock:
            ready = _platform.ready_set(self.watcher, [self.reader.fd, *tails], _fds.library_fds)
        if ready is None:
            await self._collect_with_tasks()
        else:
            try:
                if self.options.memory_limit is None:
                    await self._collect_ready(ready, tails)
                else:
                    async with _task_group() as tg:
                        self._watch_memory(tg)
                        await self._collect_ready(ready, tails)
                        tg.cancel_scope.cancel()
            finally:
                with _fds.lock:
                    ready.close()
        # All the child wrote is in the pipes now. Take it without waiting for EOF, which a
        # descendant that left the process group could postpone for ever.
        self._read_available()
        for tail in self.outputs.values():
            tail.read_available()
        if self.reader.complete and self.reader.kind == _protocol.SPILLED:
            self._take_spill()

    def _take_spill(self) -> None:
        if self.spill_fd is None:
            self.protocol_error = IsolationError("the child sent a spilled result unasked")
            return
        assert self.reader.payload is not None
        try:
            self.spilled = _spill.take(
                self.spill_fd, self.reader.payload, self.options.result_limit
            )
        except IsolationError as exc:
            self.protocol_error = exc
        except (OSError, ValueError) as exc:  # mmap: out of memory, or a file that shrank
            self.protocol_error = IsolationError(
                f"the child's spilled result could not be mapped in the parent: {exc}"
            )

    async def _collect_ready(self, ready: _platform.ReadySet, tails: dict[int, Tail]) -> None:
        """`collect` with one wait for all the fds of the call (see `_platform.ReadySet`)."""
        exit_fd = self.watcher.fileno()
        while not self.reaped:
            await ready.wait()
            for fd in ready.ready():
                if fd == exit_fd:
                    if self.watcher.has_exited():
                        self._reap()
                elif fd == self.reader.fd:
                    if self._take_final():
                        ready.discard(fd)
                else:
                    tails[fd].read_available()
                    if tails[fd].eof:
                        ready.discard(fd)

    async def _collect_with_tasks(self) -> None:
        """`collect` with a task per fd: where there is no `_platform.ReadySet`."""
        async with _task_group() as tg:
            tg.start_soon(lambda: self._read(final=True))
            self._serve(tg)
            await self.watcher.wait_exited()
            self._reap()
            tg.cancel_scope.cancel()

    def frame_ready(self) -> bool:
        """Read what the pipe holds now; True if that settles the next frame (it is complete,
        the stream ended, or it was refused) without waiting."""
        self._read_available()
        if not (self.reader.complete or self.reader.eof or self.protocol_error):
            if not self.exited:
                return False
            # The child is gone and everything it wrote was in the pipe: it ends here.
            self.reader.eof = True
        return True

    async def next_frame(self) -> bool:
        """Wait for the next frame of a stream: True once one is complete, False at EOF.

        Captured output, the memory watchdog and the child's exit are served while it waits
        (between two waits the child may be paused on a full pipe, never harmed).
        """
        if self.frame_ready():
            # Let other tasks run (and a cancellation in), as any await should.
            await anyio.lowlevel.checkpoint()
        else:
            async with _task_group() as tg:
                self._serve(tg)
                tg.start_soon(self._notice_exit, tg.cancel_scope)
                await self._read()
                tg.cancel_scope.cancel()
            self.frame_ready()
        if self.protocol_error is not None:
            raise self.protocol_error
        return self.reader.complete

    async def _notice_exit(self, waiting: anyio.CancelScope) -> None:
        # A descendant still holding the pipe would keep EOF from coming: once the child has
        # exited, its group goes (while it is a zombie, the group id is still its own), and
        # what is left in the pipe is all there will be.
        await self.watcher.wait_exited()
        self.exited = True
        if self.options.kill_descendants:
            self._signal_group(signal.SIGKILL)
        waiting.cancel()

    def _serve(self, tg: anyio.abc.TaskGroup) -> None:
        """Start what runs beside the reader: output drains and the memory watchdog."""
        for tail in self.outputs.values():
            tg.start_soon(tail.drain)
        self._watch_memory(tg)

    def _watch_memory(self, tg: anyio.abc.TaskGroup) -> None:
        if self.options.memory_limit is not None:
            tg.start_soon(self._watchdog, self.options.memory_limit)

    async def _watchdog(self, limit: int) -> None:
        await self.watcher.started()
        if self.pid:
            await _limits.watch_memory(self.pid, limit, self._inherited() or 0, self._too_big)

    def _inherited(self) -> int | None:
        """The anonymous memory the child started with, if known: its parent's at fork."""
        if self.anonymous_at_fork is None:
            return self.watcher.anonymous_at_fork  # forked by a zygote, which said
        return self.anonymous_at_fork

    async def _read(self, *, final: bool = False) -> None:
        """Read until a frame is complete, or EOF. With ``final`` (the frame that ends the
        call), go on to EOF: a child that writes anything after it is killed."""
        while not (self._take_final() if final else self._take_frame()):
            await anyio.wait_readable(self.reader.fd)

    def _take_frame(self) -> bool:
        """Read what the result pipe holds; True once a frame is complete, or at EOF."""
        self._read_available()
        return self.protocol_error is not None or self.reader.eof or self.reader.complete

    def _take_final(self) -> bool:
        """Read what the result pipe holds; True once it needs no more watching: the last frame
        came and nothing follows it (EOF), or the child broke the protocol."""
        return self._take_frame() and (
            not self.reader.complete or self.protocol_error is not None or self._nothing_follows()
        )

    def _nothing_follows(self) -> bool:
        """False while the pipe may still bring data after the last frame."""
        try:
            extra = os.read(self.reader.fd, 1)
        except BlockingIOError:
            return False  # nothing yet: wait for EOF
        if extra:
            self.protocol_error = IsolationError(
                "the child wrote more after its result; it was killed"
            )
            self.kill()
        else:
            self.reader.eof = True
        return True

    def _read_available(self) -> None:
        if self.protocol_error is None:
            try:
                self.reader.read_available()
            except IsolationError as exc:
                self.protocol_error = exc
                self.kill()

    def _too_big(self, used: int) -> None:
        self.memory_seen = used
        self.kill()

    def send(self, sig: int) -> None:
        """Signal the child, and its process group unless told to spare its descendants."""
        if not self.reaped:
            self.killed = True
            self.watcher.send_signal(sig)
            if self.options.kill_descendants:
                self._signal_group(sig)

    def kill(self) -> None:
        self.send(signal.SIGKILL)

    def _signal_group(self, sig: int) -> None:
        self.watcher.signal_group(sig)  # only while the child is unreaped (see the watcher)

    def _reap(self, *, block: bool = False) -> None:
        if self.options.kill_descendants:
            # Whatever the child started (a subprocess, say) dies with it.
            self._signal_group(signal.SIGKILL)
        self.waited = self.watcher.reap(block=block)
        self.ended = time.monotonic()
        self.reaped = True
        # What the child wrote last is in the pipes now: take it without waiting for EOF,
        # which a descendant that left the process group could postpone for ever.
        for tail in self.outputs.values():
            tail.read_available()

    async def kill_and_reap(self) -> None:
        """Stop the child and wait until it is reaped, however often the caller is interrupted.

        With ``kill_grace``, SIGTERM first and SIGKILL only if the child outlives the grace.
        Captured output is drained meanwhile, so a child writing as it ends is not blocked.
        """
        pending: BaseException | None = None
        if self.options.kill_grace and not self.reaped:
            self.send(signal.SIGTERM)
            try:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.options.kill_grace):
                    await self._wait_exited()
            except BaseException as exc:
                # Cancelled again (asyncio), or a KeyboardInterrupt (trio delivers it through
                # shields): cut the grace short; SIGKILL follows.
                pending = exc
        self.kill()
        while not self.reaped:
            try:
                with anyio.CancelScope(shield=True):
                    await self._wait_exited()
            except anyio.get_cancelled_exc_class() as exc:
                # asyncio's task.cancel() goes through shields. The child is already dying, so
                # wait on, and pass the cancellation on once it is reaped.
                pending = exc
                continue
            except BaseException as exc:
                # A KeyboardInterrupt or a failing watcher. The child has been sent SIGKILL:
                # waiting for it without the loop is short.
                pending = exc
                self._reap(block=True)
                break
            self._reap()
        if pending is not None:
            raise pending

    async def _wait_exited(self) -> None:
        if not self.outputs:
            await self.watcher.wait_exited()
            return
        async with _task_group() as tg:
            for tail in self.outputs.values():
                tg.start_soon(tail.drain)
            await self.watcher.wait_exited()
            tg.cancel_scope.cancel()

    def close(self) -> None:
        if self.fork_turn is not None:  # failed before `pace`
            self.fork_turn.release()
            self.fork_turn = None
        if not self.reader.complete:
            self.reader.reset()  # a half-read result (up to its full size) goes now, not at GC
        for fd in [self.reader.fd, *(tail.fd for tail in self.outputs.values())]:
            anyio.notify_closing(fd)
            _fds.close(fd)
        if self.spill_fd is not None:
            _fds.close(self.spill_fd)  # its mapping, if any, lives on
        with _fds.lock:
            self.watcher.close()

    def report(self) -> CallReport:
        exitcode, sig = _exit_fields(self.waited)
        rusage = self.waited[1] if self.waited else None
        stdout, stderr = self.outputs.get("stdout"), self.outputs.get("stderr")
        return CallReport(
            pid=self.pid,
            exitcode=exitcode,
            signal=sig,
            wall_time=(self.ended or time.monotonic()) - self.started,
            user_time=rusage.ru_utime if rusage else 0.0,
            system_time=rusage.ru_stime if rusage else 0.0,
            peak_memory=self._peak_memory(rusage),
            result_bytes=self.reader.received + (len(self.spilled) if self.spilled else 0),
            stdout=stdout.data if stdout else None,
            stderr=stderr.data if stderr else None,
            stdout_dropped=stdout.dropped if stdout else 0,
            stderr_dropped=stderr.dropped if stderr else 0,
        )

    def _peak_memory(self, rusage: resource.struct_rusage | None) -> int:
        if rusage is None:
            return 0
        # ru_maxrss counts what the child had resident from the start, shared with the parent.
        # The child says how much that was; a child that died before saying is measured
        # against the anonymous memory it inherited, which fork always counts for it.
        baseline = self.reader.resident_at_start
        if baseline is None:
            baseline = self._inherited()
        if baseline is None:
            _, baseline = _platform.resident_memory()  # ours now: close to ours at fork
        return max(0, _platform.maxrss_bytes(rusage) - baseline)

    def outcome(self) -> Any:
        if self.timed_out:
            raise IsolationTimeout(
                f"child process {self.pid} ran for longer than timeout={self.options.timeout} "
                "seconds; it was killed",
                pid=self.pid,
                timeout=self.options.timeout,  # type: ignore[arg-type]  # set, as it fired
            )
        if self.protocol_error is not None:
            raise self.protocol_error
        if self.reader.complete:
            payload = self.reader.payload
            assert payload is not None
            return _protocol.decode(self.reader.kind, payload, self.options.codec, self.spilled)
        raise self._crash()

    def _crash(self) -> IsolationError:
        exitcode, sig = _exit_fields(self.waited)
        where = self._stderr_tail()
        failure = self.watcher.failure()
        if isinstance(failure, IsolationError):
            return failure
        if isinstance(failure, OSError):
            return _cannot_start(failure)
        if self.memory_seen is not None:
            limit = self.options.memory_limit
            assert limit is not None
            return MemoryLimitExceeded(
                f"child process {self.pid} grew by {_mib(self.memory_seen)} of memory beyond "
                f"what it inherited, over its memory_limit of {_mib(limit)}, and was killed"
                f"{where}",
                pid=self.pid,
                limit=limit,
                observed=self.memory_seen,
            )
        if self.options.cpu_limit is not None and self._cpu_limit_hit(sig):
            return CPULimitExceeded(
                f"child process {self.pid} used up its cpu_limit of {self.options.cpu_limit:g} "
                f"CPU seconds and was stopped by {sig.name if sig else 'the kernel'}{where}",
                pid=self.pid,
                signal=sig,
                limit=self.options.cpu_limit,
            )
        if self.waited is None:
            return ChildCrashed(
                f"child process {self.pid} ended without sending a result, and its exit status "
                "is unknown: something else in this process reaped it (a waitpid(-1), or "
                f"SIGCHLD set to SIG_IGN){where}",
                pid=self.pid,
                exitcode=None,
                signal=None,
            )
        sent = ""
        if self.reader.received:
            sent = f" (it had sent {self.reader.received} bytes of it)"
        if sig is not None:
            return ChildCrashed(
                f"child process {self.pid} was killed by {sig.name} "
                f"({signal.strsignal(sig)}) before sending its result{sent}{where}",
                pid=self.pid,
                exitcode=None,
                signal=sig,
            )
        why = ""
        if exitcode == _child.EXIT_INTERNAL:
            why = (
                "; unless the function chose that code, the child could not send its outcome "
                "(its stderr says why)"
            )
        return ChildCrashed(
            f"child process {self.pid} exited with code {exitcode} before sending its result"
            f"{sent}{why}{where}",
            pid=self.pid,
            exitcode=exitcode,
            signal=None,
        )

    def _cpu_limit_hit(self, sig: signal.Signals | None) -> bool:
        if sig == signal.SIGXCPU:
            return True
        # A child that handles SIGXCPU gets SIGKILL at the hard limit, a second later. A
        # SIGKILL from us (a timeout, say) or below that much CPU time came from elsewhere.
        if sig == signal.SIGKILL and not self.killed and self.waited is not None:
            used: float = self.waited[1].ru_utime + self.waited[1].ru_stime
            return used >= _limits.cpu_hard_limit(self.options.cpu_limit or 0) - 0.05
        return False

    def _stderr_tail(self, lines: int = 40) -> str:
        tail = self.outputs.get("stderr")
        if tail is None or not tail.data.strip():
            return ""
        text = tail.data.decode(errors="replace").rstrip()
        # faulthandler's report of a crash starts with this line and lists the innermost frame
        # first: show its beginning, which says where the crash happened.
        start = text.rfind("Fatal Python error")
        if start >= 0:
            shown = text[start:].splitlines()
            cut = shown[:lines] + (["  ..."] if len(shown) > lines else [])
            return "\nThe child's crash report (faulthandler):\n" + "\n".join(cut)
        shown = text.splitlines()[-lines:]
        return "\nThe end of the child's stderr:\n" + "\n".join(shown)


@contextlib.asynccontextmanager
async def _task_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group of the call's own: a lone exception (a KeyboardInterrupt, say) leaves it as
    itself, not wrapped in an exception group the caller never asked for."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _exit_fields(
    waited: tuple[int, resource.struct_rusage] | None,
) -> tuple[int | None, signal.Signals | None]:
    if waited is None:
        return None, None
    code = os.waitstatus_to_exitcode(waited[0])
    if code < 0:
        return None, signal.Signals(-code)
    return code, None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _cannot_start(exc: OSError) -> IsolationError:
    return IsolationError(
        f"could not start a child process: {exc}. The system is short of processes, memory or "
        "file descriptors; retry later or lower the number of concurrent calls (limiter=)"
    )
