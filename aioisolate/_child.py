"""What the child does after fork, from its first instruction to ``os._exit``.

The child starts as a copy of the parent in the middle of an event-loop step, with all signals
blocked (see `_forking.fork`). Before running the function it makes itself a fresh process:
its own process group, the default signal handlers, no wakeup fd, no running event loop, stdin
from /dev/null, and none of the parent's other result pipes or pidfds. It then runs the function
(on a new event loop of the parent's kind if the function is async), writes one frame to the
result pipe and leaves through ``os._exit``: never by returning or raising into the parent's
stack, whose ``finally`` blocks and ``atexit`` handlers belong to the parent.
"""

from __future__ import annotations

import _signal
import dataclasses
import faulthandler
import gc
import os
import signal
import sys
import types
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal, NoReturn

from . import _limits, _linux, _protocol, _sandbox
from ._codec import PICKLE, Codec
from ._forking import EXIT_INTERNAL
from ._sandbox import Sandbox

LoopKind = Literal["asyncio", "uvloop", "trio"]

# Plan.stdout / Plan.stderr: keep the parent's, or send to /dev/null; any other value is the
# write end of a pipe the parent drains.
INHERIT: Final = -1
DISCARD: Final = -2


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Everything the child needs to know beyond the function, fixed by the parent before fork."""

    write_fd: int
    inherited_fds: list[int]  # the parent's other fds of ours, for the child to close
    parent_pid: int
    loop_kind: LoopKind
    memory_limit: int | None = None
    cpu_limit: float | None = None
    stdout: int = INHERIT
    stderr: int = INHERIT
    stream: bool = False  # func is a generator function: send its items as they come
    codec: Codec = PICKLE
    sandbox: Sandbox = Sandbox()
    sandboxed: bool = False  # sandbox.active, worked out in the parent
    spill_fd: int = -1  # the call's spill file for a large result (see _spill), if any
    nice: int = 0  # to add to the child's niceness
    result_limit: int | None = None  # max_result_size: a larger result is not spilled


def run(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    plan: Plan,
    sigmask: set[int],
    load: Callable[[Plan], tuple[Callable[..., Any], tuple[Any, ...], Plan]] | None = None,
) -> NoReturn:
    """Set up, run ``func(*args)``, send what came of it, and exit.

    ``sigmask`` is the mask to restore once the handlers are reset (see `_forking.fork`). A
    zygote's child gets the function by ``load`` instead, which unpickles it once the child is
    set up (and returns the plan with the codec it brought).
    """
    code = EXIT_INTERNAL
    try:
        try:
            resident_at_start = _become_fresh_process(plan, sigmask)
            if load is not None:
                # Before the limits and the sandbox, as a forked child has its arguments
                # before them: their copy is not growth, nor is the sandbox in their way.
                func, args, plan = load(plan)
            _confine(plan)
        except Exception as exc:
            frame = _protocol.encode_setup_error(exc)
        else:
            frame = _call(func, args, plan)
            frame = _protocol.encode_stats(resident_at_start) + frame
        _write_all(plan.write_fd, frame)
        code = 0
    except BaseException:
        # Our own machinery failed. The parent sees the exit code; the traceback goes to the
        # child's stderr for whoever debugs it.
        _print_exception()
    finally:
        _flush_stdio()
        os._exit(code)


def _become_fresh_process(plan: Plan, sigmask: set[int]) -> int:
    """Set the child up; return its resident memory when it started, in bytes."""
    # First, before this setup touches (and so copies) anything: the kernel starts a child's
    # peak at its resident size at fork, which is what the parent subtracts from the final peak.
    resident_at_start = _linux.peak_resident()
    # Our own group: Ctrl-C at the terminal reaches only the parent (which then cancels and
    # kills us), and one killpg() reaches everything we start.
    os.setpgid(0, 0)
    _linux.die_with_parent()
    if os.getppid() != plan.parent_pid:
        os._exit(EXIT_INTERNAL)  # the parent died before the line above took effect
    if plan.nice:
        # Below the parent: its event loop gets a CPU as soon as it wakes (and so does each
        # fork it makes), however busy the children keep them.
        os.nice(plan.nice)

    _reset_signal_handlers()
    # Signals were blocked across fork so that none could run a parent's handler here; with the
    # handlers reset it is safe to take them again.
    _signal.pthread_sigmask(_signal.SIG_SETMASK, sigmask)

    # A background process group that reads the terminal is stopped by SIGTTIN.
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    # What the parent had read ahead is still buffered in its stdin object: drain it, which
    # reads up to the end of /dev/null, so that the child does not see the parent's input.
    try:
        if sys.__stdin__ is not None and sys.__stdin__.fileno() == 0:
            sys.__stdin__.read()
    except (OSError, ValueError):
        pass  # closed, or undecodable bytes: nothing readable either way
    for fd, target in ((1, plan.stdout), (2, plan.stderr)):
        if target != INHERIT:
            os.dup2(devnull if target == DISCARD else target, fd)
            if target != DISCARD:
                os.close(target)
            _rebind_stream(fd)
    os.close(devnull)

    for fd in plan.inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass

    _forget_event_loops()
    return resident_at_start


def _confine(plan: Plan) -> None:
    """The call's limits and sandbox, and the last of the setup: just before the function."""
    if plan.memory_limit is not None or plan.cpu_limit is not None:
        _limits.apply_in_child(plan.memory_limit, plan.cpu_limit)
    if plan.sandboxed:
        _sandbox.apply(plan.sandbox, keep_fds={plan.write_fd, plan.spill_fd})
    if plan.stderr >= 0 or faulthandler.is_enabled():
        # A crash then reports the Python line it happened on: always when stderr is captured,
        # and when the parent had faulthandler on (python -X faulthandler, pytest), as it would
        # have there. Re-enabled, as _reset_signal_handlers removed its handlers but not its
        # flag: enable() alone (ours, or the function's own) would see it "already enabled" and
        # install nothing. fd 2, as sys.stderr may be an object without one.
        faulthandler.disable()
        faulthandler.enable(file=2, all_threads=True)
    # Everything inherited is long-lived: moving it out of the collector's reach means a GC
    # pass in the child does not write to (and so copy) every page of the parent's heap.
    gc.freeze()


def _rebind_stream(fd: int) -> None:
    """Point sys.stdout or sys.stderr at the fd just redirected.

    The inherited object may write elsewhere (a test runner's capture file) or hold text the
    parent buffered; a fresh one on the fd sends Python-level output where C-level output goes.
    """
    name = "stdout" if fd == 1 else "stderr"
    old = getattr(sys, name)
    encoding = getattr(old, "encoding", None) or "utf-8"
    stream = open(fd, "w", encoding=encoding, errors="backslashreplace", closefd=False)  # noqa: SIM115
    if fd == 2:
        stream.reconfigure(line_buffering=True)  # as Python's own stderr
    setattr(sys, name, stream)


def _reset_signal_handlers() -> None:
    """Put every handler the parent installed back to what a fresh Python starts with."""
    # No signal may write to the parent's event loop (asyncio, uvloop and trio all wake up
    # through this fd).
    signal.set_wakeup_fd(-1)
    for sig in _RESETTABLE:
        target: Any
        if sig == signal.SIGINT:
            target = signal.default_int_handler
        elif sig in _IGNORED:
            target = _signal.SIG_IGN
        elif _signal.getsignal(sig) == _signal.SIG_IGN:
            continue  # inherited ignored (nohup, say): Python keeps that too
        else:
            target = _signal.SIG_DFL
        try:
            # Set even where getsignal() already says so: handlers installed from C (libuv's
            # SIGCHLD handler, which writes to the parent loop's pipe) are invisible to it.
            _signal.signal(sig, target)
        except (OSError, ValueError):
            pass  # signals reserved by the C library


# The raw _signal functions: signal's wrappers turn every number into an enum member, which
# for all signals costs a tenth of a millisecond, on every call.
_RESETTABLE: Final = sorted(_signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
_IGNORED: Final = frozenset(
    (
        signal.SIGPIPE,  # as Python sets them at startup
        signal.SIGXFSZ,
        # Our own process group is in the background of the parent's terminal: changing
        # terminal modes (getpass, curses) would stop us for ever instead of going ahead.
        signal.SIGTTOU,
        signal.SIGTTIN,
    )
)


def _forget_event_loops() -> None:
    """Clear the parent's event-loop state, which fork copied into this thread."""
    events: Any = sys.modules.get("asyncio.events")  # private names, stable since 3.4
    if events is None:
        return  # a zygote's child: no event loop was ever here (nor trio, nor sniffio)
    events._set_running_loop(None)
    # The policy remembers the parent's loop as this thread's current loop: get_event_loop()
    # would hand the child that object, whose selector is shared with the parent. (Python 3.12+
    # does this reset in its own at-fork hook; 3.11 does not.)
    policy = events._event_loop_policy
    if isinstance(policy, events.BaseDefaultEventLoopPolicy):
        policy._local = events.BaseDefaultEventLoopPolicy._Local()
    trio_run = sys.modules.get("trio._core._run")
    if trio_run is not None:
        # trio.run() refuses to start while this thread-local says a run is active.
        vars(trio_run.GLOBAL_RUN_CONTEXT).clear()
    sniffio = sys.modules.get("sniffio")
    if sniffio is not None:
        sniffio.thread_local.name = None


def _call(func: Callable[..., Any], args: tuple[Any, ...], plan: Plan) -> list[bytes]:
    """Run the function in the caller's context and encode what came of it.

    For a stream, the function returns an iterator (or async iterator): each item is written
    to the result pipe as it comes, and the returned frame is the one that ends the stream.
    """
    # Fork copied the calling task's context, which is current here: the function sees the
    # caller's context variables, except the backend name that anyio set for that task.
    sniffio = sys.modules.get("sniffio")
    if sniffio is not None and sniffio.current_async_library_cvar.get(None) is not None:
        sniffio.current_async_library_cvar.set(None)
    try:
        result = func(*args)
        if plan.stream:
            return _send_items(result, plan)
        if _is_awaitable(result):
            result = _run_on_new_loop(result, plan.loop_kind)
    except BaseException as exc:
        return _protocol.encode_error(exc, plan.codec)
    try:
        return _protocol.encode_result(result, plan.codec, plan.spill_fd, plan.result_limit)
    except Exception as exc:
        return _protocol.encode_unpicklable_result(result, exc)


def _is_awaitable(value: object) -> bool:
    # What inspect.isawaitable says, without its ABC check: every object the child touches is
    # a page copied, and the ABC machinery touches many (0.1 ms a call).
    if isinstance(value, types.CoroutineType):
        return True
    for cls in type(value).__mro__:  # as collections.abc.Awaitable looks for __await__
        if "__await__" in vars(cls):
            return vars(cls)["__await__"] is not None
    return isinstance(value, types.GeneratorType) and bool(
        value.gi_code.co_flags & _CO_ITERABLE_COROUTINE
    )


_CO_ITERABLE_COROUTINE: Final = 0x100  # inspect.CO_ITERABLE_COROUTINE, without importing inspect


def _send_items(items: Any, plan: Plan) -> list[bytes]:
    """Write each item as it is produced. The write blocks while the pipe is full, which is
    what pauses this generator while the consumer in the parent is slow."""

    def send(item: object) -> list[bytes] | None:
        try:
            frame = _protocol.encode_item(item, plan.codec)
        except Exception as exc:
            return _protocol.encode_unpicklable_result(item, exc)
        _write_all(plan.write_fd, frame)
        return None

    if hasattr(items, "__anext__"):

        async def send_all() -> list[bytes] | None:
            async for item in items:
                stop = send(item)
                if stop is not None:
                    await items.aclose()
                    return stop
            return None

        stop = _run_on_new_loop(send_all(), plan.loop_kind)
    else:
        stop = None
        for item in items:
            stop = send(item)
            if stop is not None:
                close = getattr(items, "close", None)
                if close is not None:
                    close()
                break
    return stop if stop is not None else _protocol.encode_end()


def _run_on_new_loop(awaitable: Awaitable[Any], loop_kind: LoopKind) -> Any:
    # Imported here: a zygote helper imports this module, and its size is every fork's cost.
    import asyncio

    async def main() -> Any:
        return await awaitable

    if loop_kind == "trio":
        import trio

        return trio.run(main)
    if loop_kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main())
    with asyncio.Runner() as runner:
        return runner.run(main())


def _write_all(fd: int, buffers: list[bytes]) -> None:
    views = [memoryview(b) for b in buffers]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _print_exception() -> None:
    try:
        import traceback

        traceback.print_exc()
    except BaseException:
        pass


def _warm_up() -> None:
    # State built lazily on first use (caches, per-thread objects) is built here, once, in the
    # parent: a child that built it would pay for it in copied pages on every call.
    _protocol.encode_stats(0)
    _protocol.encode_result(None, PICKLE)
    _is_awaitable(None)
    _linux.peak_resident()


_warm_up()
