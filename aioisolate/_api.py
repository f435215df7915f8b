"""The public entry points: `isolated`, `isolated_with_report`, `isolated_iter` and
`isolated_map`, and the one place a call's limiter is chosen. `Isolator` (`_isolator`) calls
the same internals with its own options and scope."""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
import anyio.lowlevel

from . import _threads
from ._call import run_call
from ._map import MapProgress, MapResults
from ._options import DEFAULTS, CallOptions, Options
from ._report import CallReport
from ._stream import ItemStream, Owner

if TYPE_CHECKING:
    from typing import TypeVarTuple, Unpack

    PosArgsT = TypeVarTuple("PosArgsT")

T = TypeVar("T")
A = TypeVar("A")

_default_limiter_var: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "aioisolate.default_limiter"
)


def default_limiter() -> anyio.CapacityLimiter:
    """The limiter shared by calls that name none: one per event loop, one token per CPU.

    The CPUs are those this process may run on (``os.sched_getaffinity``), which inside a
    container or under ``taskset`` can be fewer than the machine has. Change its
    ``total_tokens`` to allow more or fewer children at once.
    """
    try:
        return _default_limiter_var.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(_usable_cpus())
        _default_limiter_var.set(limiter)
        return limiter


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def limiter_for(options: Options) -> anyio.CapacityLimiter | None:
    """What bounds how many of these calls run at once: the limiter given; else, for an engine,
    nothing (the cluster queues what it cannot run yet); else `default_limiter`."""
    if options.limiter is not None:
        return options.limiter
    if options.engine is not None:
        return None
    return default_limiter()


@overload
async def isolated(
    func: Callable[[Unpack[PosArgsT]], Awaitable[T]],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> T: ...


@overload
async def isolated(
    func: Callable[[Unpack[PosArgsT]], T],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> T: ...


async def isolated(
    func: Callable[[Unpack[PosArgsT]], Any],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> Any:
    """Run ``func(*args)`` in a forked child process and return its result.

    The child inherits ``func`` and ``args`` through fork (nothing is pickled on the way in),
    runs the function, sends the result back pickled with cloudpickle, and exits; whatever the
    function allocated, leaked or broke dies with it. An ``async def`` function runs on a new
    event loop of the caller's kind (asyncio, uvloop or trio) in the child.

    Pass keyword arguments with `functools.partial`. To bound the whole call (time spent
    waiting for the limiter included), cancel it: ``with anyio.fail_after(5): await
    isolated(...)``. Cancellation kills the child's process group and reaps the child before
    it propagates.

    Args:
        func: the function to run, sync or async.
        *args: its positional arguments.
        **options: the call's options (see `CallOptions`).

    Returns:
        What ``func`` returned (or, for an async function, what its coroutine returned).

    Raises:
        Exception: whatever ``func`` raised, as itself, with the child's traceback as
            ``__cause__``.
        RemoteError: ``func`` raised something that cannot be re-raised as itself.
        ChildCrashed: the child died without a result (a signal, or ``os._exit``);
            `MemoryLimitExceeded` and `CPULimitExceeded` when a limit killed it.
        IsolationTimeout: the child outlived ``timeout``.
        IsolationError: the result could not be pickled, or the child could not be started.
        TypeError, ValueError: an option is invalid (raised before anything is started).
    """
    value, _ = await run(func, args, DEFAULTS.merge(options), site=_threads.caller())
    return value


@overload
async def isolated_with_report(
    func: Callable[[Unpack[PosArgsT]], Awaitable[T]],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> tuple[T, CallReport]: ...


@overload
async def isolated_with_report(
    func: Callable[[Unpack[PosArgsT]], T],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> tuple[T, CallReport]: ...


async def isolated_with_report(
    func: Callable[[Unpack[PosArgsT]], Any],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> tuple[Any, CallReport]:
    """Like `isolated`, and return the call's `CallReport` with the value.

    A call that fails raises as `isolated` does; the report is then on the error, as
    ``error.report``, for every `IsolationError`.
    """
    return await run(func, args, DEFAULTS.merge(options), site=_threads.caller())


@overload
def isolated_iter(
    func: Callable[[Unpack[PosArgsT]], AsyncIterable[T]],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> ItemStream[T]: ...


@overload
def isolated_iter(
    func: Callable[[Unpack[PosArgsT]], Iterable[T]],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> ItemStream[T]: ...


def isolated_iter(
    func: Callable[[Unpack[PosArgsT]], Any],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> ItemStream[Any]:
    """Run a generator function (sync or async) in a forked child and stream its items.

    Takes the options of `isolated`; ``timeout`` bounds the child's whole run, however slowly
    the items are consumed. Nothing starts until the first item is asked for.
    """
    return open_stream(func, args, DEFAULTS.merge(options), site=_threads.caller())


@overload
def isolated_map(
    func: Callable[[A], Awaitable[T]],
    inputs: Iterable[A] | AsyncIterable[A],
    *,
    ordered: bool = True,
    return_exceptions: Literal[False] = False,
    on_progress: Callable[[MapProgress], object] | None = None,
    **options: Unpack[CallOptions],
) -> MapResults[T]: ...


@overload
def isolated_map(
    func: Callable[[A], T],
    inputs: Iterable[A] | AsyncIterable[A],
    *,
    ordered: bool = True,
    return_exceptions: Literal[False] = False,
    on_progress: Callable[[MapProgress], object] | None = None,
    **options: Unpack[CallOptions],
) -> MapResults[T]: ...


@overload
def isolated_map(
    func: Callable[[A], Awaitable[T]],
    inputs: Iterable[A] | AsyncIterable[A],
    *,
    ordered: bool = True,
    return_exceptions: Literal[True],
    on_progress: Callable[[MapProgress], object] | None = None,
    **options: Unpack[CallOptions],
) -> MapResults[T | Exception]: ...


@overload
def isolated_map(
    func: Callable[[A], T],
    inputs: Iterable[A] | AsyncIterable[A],
    *,
    ordered: bool = True,
    return_exceptions: Literal[True],
    on_progress: Callable[[MapProgress], object] | None = None,
    **options: Unpack[CallOptions],
) -> MapResults[T | Exception]: ...


def isolated_map(
    func: Callable[[A], Any],
    inputs: Iterable[A] | AsyncIterable[A],
    *,
    ordered: bool = True,
    return_exceptions: bool = False,
    on_progress: Callable[[MapProgress], object] | None = None,
    **options: Unpack[CallOptions],
) -> MapResults[Any]:
    """Run ``func(item)`` in its own child for every item of ``inputs``; see `MapResults`.

    Use it as ``async with isolated_map(func, inputs) as results: async for r in results``.
    The limiter (``limiter=``, else `default_limiter`) bounds how many children run at once,
    and the other options apply to every call.

    Args:
        func: the function to run on each item, sync or async.
        inputs: an iterable or async iterable, pulled only as capacity frees.
        ordered: results in input order (the default), or as they complete.
        return_exceptions: yield an exception in place of its result instead of raising it
            (and cancelling the rest).
        on_progress: called with a `MapProgress` whenever a call starts or ends, and once
            more at the end; `tqdm_progress` gives one that draws a progress bar.
    """
    return fan_out(
        func,
        inputs,
        DEFAULTS.merge(options),
        ordered=ordered,
        return_exceptions=return_exceptions,
        on_progress=on_progress,
        site=_threads.caller(),
    )


async def run(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    *,
    limit: bool = True,
    reports: list[CallReport] | None = None,
    site: _threads.Site | None = None,
) -> tuple[Any, CallReport]:
    """One call with checked options: its value and report, or raise. With ``limit=False``
    the caller holds a token already (a fan-out). ``site`` is where the user called."""
    _check_callable(func)
    limiter = limiter_for(options) if limit else None
    if limiter is None:
        return await _dispatch(func, args, options, reports, site)
    async with limiter:
        return await _dispatch(func, args, options, reports, site)


async def _dispatch(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    reports: list[CallReport] | None,
    site: _threads.Site | None,
) -> tuple[Any, CallReport]:
    if options.engine is not None:
        return await options.engine._run_call(func, args, options, reports)
    return await run_call(func, args, options, reports, site)


def open_stream(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    owner: Owner | None = None,
    site: _threads.Site | None = None,
) -> ItemStream[Any]:
    """A stream with checked options; nothing starts until its first item is asked for."""
    _check_callable(func)
    if options.engine is not None:
        raise TypeError("isolated_iter runs its generator here: an engine= takes whole calls only")
    # The limiter is chosen as the stream starts, on its loop (an engine was refused above:
    # limiter_for always names one here).
    choose = lambda: limiter_for(options) or default_limiter()  # noqa: E731
    return ItemStream(func, args, options, choose, owner, site)


def fan_out(
    func: Callable[[Any], Any],
    inputs: Iterable[Any] | AsyncIterable[Any],
    options: Options,
    *,
    ordered: bool,
    return_exceptions: bool,
    on_progress: Callable[[MapProgress], object] | None,
    run_one: Callable[..., Awaitable[tuple[Any, CallReport]]] = run,
    site: _threads.Site | None = None,
) -> MapResults[Any]:
    """A fan-out with checked options (checked once for all its calls: resolving a user name,
    say, is a lookup in the user database). ``run_one`` runs each call without the limiter,
    which the fan-out takes for it."""
    _check_callable(func)

    async def call(item: Any) -> Any:
        value, _ = await run_one(func, (item,), options, limit=False, site=site)
        return value

    # Without a limiter, only the fan-out's window bounds an engine's calls.
    limiter = limiter_for(options) or anyio.CapacityLimiter(math.inf)
    return MapResults(
        call,
        inputs,
        limiter,
        ordered=ordered,
        return_exceptions=return_exceptions,
        on_progress=on_progress,
    )


def _check_callable(func: object) -> None:
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")
