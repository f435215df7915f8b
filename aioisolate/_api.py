"""The public entry points: `isolated` and its configured form, `Isolator`."""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio
import anyio.lowlevel

from ._call import run_in_child
from ._errors import IsolationError
from ._map import MapProgress, MapResults
from ._options import DEFAULTS, CallOptions, Options
from ._report import CallReport
from ._zygote import Zygote

if TYPE_CHECKING:
    from typing import Self, TypeVarTuple, Unpack

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
        **options: see `CallOptions`: ``limiter``, ``timeout``, ``memory_limit``,
            ``cpu_limit``, ``kill_grace``, ``kill_descendants``, ``stdout``, ``stderr``,
            ``max_output``, ``codec``, ``max_result_size``, ``nice`` and the sandbox options.

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
    value, _ = await _run(func, args, DEFAULTS.merge(options))
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
    return await _run(func, args, DEFAULTS.merge(options))


async def _run(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    *,
    limit: bool = True,
    reports: list[CallReport] | None = None,
) -> tuple[Any, CallReport]:
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")
    if options.engine is not None:
        # The cluster bounds how many calls run at once; a limiter given bounds them too.
        if options.limiter is None or not limit:
            return await options.engine.run_call(func, args, options, reports)
        async with options.limiter:
            return await options.engine.run_call(func, args, options, reports)
    if not limit:  # the caller holds a token already (a fan-out)
        return await run_in_child(func, args, options, reports)
    async with default_limiter() if options.limiter is None else options.limiter:
        return await run_in_child(func, args, options, reports)


def _map_limiter(options: Options) -> anyio.CapacityLimiter:
    """What bounds a fan-out's running calls: the limiter given; else, for an engine, nothing
    but the fan-out's window (the cluster queues what it cannot run yet); else one per CPU."""
    if options.limiter is not None:
        return options.limiter
    if options.engine is not None:
        return anyio.CapacityLimiter(math.inf)
    return default_limiter()


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
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")
    checked = DEFAULTS.merge(options)

    async def call(item: Any) -> Any:
        value, _ = await _run(func, (item,), checked, limit=False)
        return value

    return MapResults(
        call,
        inputs,
        _map_limiter(checked),
        ordered=ordered,
        return_exceptions=return_exceptions,
        on_progress=on_progress,
    )


class Isolator:
    """Isolated calls with options set once, and a scope that ends every child it started.

    Use it as an async context manager::

        async with Isolator(limiter=anyio.CapacityLimiter(4), timeout=30) as iso:
            result = await iso.run(parse, blob)

    It takes the options of `isolated` (see `CallOptions`); ``run`` and ``run_with_report``
    take them too, and override the isolator's for that call. Leaving the ``async with`` block
    kills and reaps every child still running from it; those calls raise `IsolationError`.

    Args:
        mode: ``"fork"`` (the default): each child is forked from this process, and inherits
            the function and its arguments without pickling. ``"zygote"``: the isolator starts
            a `Zygote` helper when it opens (and ends it when it closes), and each child is
            forked from that small helper instead: the cost of a call no longer depends on this
            process's size or threads, and the function and arguments travel by pickle.
        preload: with ``mode="zygote"``, modules for the helper to import as it starts.
        **options: the options of `isolated`, for every call.
    """

    def __init__(
        self,
        *,
        mode: Literal["fork", "zygote"] = "fork",
        preload: Iterable[str] = (),
        **options: Unpack[CallOptions],
    ) -> None:
        if mode not in ("fork", "zygote"):
            raise ValueError(f"mode must be 'fork' or 'zygote', not {mode!r}")
        if mode == "zygote" and options.get("zygote") is not None:
            raise ValueError("mode='zygote' starts a zygote of its own: leave out zygote=")
        if mode == "zygote" and options.get("engine") is not None:
            raise ValueError(
                "mode='zygote' forks children on this machine and engine= on another: choose one"
            )
        if mode == "fork" and preload:
            raise ValueError("preload= is for mode='zygote' (a fork-mode child has it all)")
        self._options = DEFAULTS.merge(options)
        self._own_zygote = Zygote(preload=preload) if mode == "zygote" else None
        self._state = "new"
        self._running: set[anyio.CancelScope] = set()
        self._idle: anyio.Event | None = None

    @property
    def zygote(self) -> Zygote | None:
        """The isolator's own `Zygote` with ``mode="zygote"`` (open while the isolator is)."""
        return self._own_zygote

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("an Isolator can be entered only once")
        if self._own_zygote is not None:
            await self._own_zygote.__aenter__()
            self._options = self._options.merge({"zygote": self._own_zygote})
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = "closed"
        try:
            await self._end_calls()
        finally:
            if self._own_zygote is not None:
                await self._own_zygote.aclose()

    async def _end_calls(self) -> None:
        for scope in self._running:
            scope.cancel()
        if not self._running:
            return
        self._idle = idle = anyio.Event()
        pending: BaseException | None = None
        while not idle.is_set():
            try:
                with anyio.CancelScope(shield=True):
                    await idle.wait()
            except anyio.get_cancelled_exc_class() as exc:
                # asyncio's task.cancel() goes through shields; the children are being killed
                # and reaped, so wait on, and pass the cancellation on afterwards.
                pending = exc
        if pending is not None:
            raise pending

    @overload
    async def run(
        self,
        func: Callable[[Unpack[PosArgsT]], Awaitable[T]],
        *args: *PosArgsT,
        **options: Unpack[CallOptions],
    ) -> T: ...

    @overload
    async def run(
        self,
        func: Callable[[Unpack[PosArgsT]], T],
        *args: *PosArgsT,
        **options: Unpack[CallOptions],
    ) -> T: ...

    async def run(
        self,
        func: Callable[[Unpack[PosArgsT]], Any],
        *args: *PosArgsT,
        **options: Unpack[CallOptions],
    ) -> Any:
        """Like `isolated`, with this isolator's options as defaults."""
        value, _ = await self._run(func, args, self._options.merge(options))
        return value

    @overload
    async def run_with_report(
        self,
        func: Callable[[Unpack[PosArgsT]], Awaitable[T]],
        *args: *PosArgsT,
        **options: Unpack[CallOptions],
    ) -> tuple[T, CallReport]: ...

    @overload
    async def run_with_report(
        self,
        func: Callable[[Unpack[PosArgsT]], T],
        *args: *PosArgsT,
        **options: Unpack[CallOptions],
    ) -> tuple[T, CallReport]: ...

    async def run_with_report(
        self,
        func: Callable[[Unpack[PosArgsT]], Any],
        *args: *PosArgsT,
        **options: Unpack[CallOptions],
    ) -> tuple[Any, CallReport]:
        """Like `isolated_with_report`, with this isolator's options as defaults."""
        return await self._run(func, args, self._options.merge(options))

    @overload
    def map(
        self,
        func: Callable[[A], Awaitable[T]],
        inputs: Iterable[A] | AsyncIterable[A],
        *,
        ordered: bool = True,
        return_exceptions: Literal[False] = False,
        on_progress: Callable[[MapProgress], object] | None = None,
        **options: Unpack[CallOptions],
    ) -> MapResults[T]: ...

    @overload
    def map(
        self,
        func: Callable[[A], T],
        inputs: Iterable[A] | AsyncIterable[A],
        *,
        ordered: bool = True,
        return_exceptions: Literal[False] = False,
        on_progress: Callable[[MapProgress], object] | None = None,
        **options: Unpack[CallOptions],
    ) -> MapResults[T]: ...

    @overload
    def map(
        self,
        func: Callable[[A], Awaitable[T]],
        inputs: Iterable[A] | AsyncIterable[A],
        *,
        ordered: bool = True,
        return_exceptions: Literal[True],
        on_progress: Callable[[MapProgress], object] | None = None,
        **options: Unpack[CallOptions],
    ) -> MapResults[T | Exception]: ...

    @overload
    def map(
        self,
        func: Callable[[A], T],
        inputs: Iterable[A] | AsyncIterable[A],
        *,
        ordered: bool = True,
        return_exceptions: Literal[True],
        on_progress: Callable[[MapProgress], object] | None = None,
        **options: Unpack[CallOptions],
    ) -> MapResults[T | Exception]: ...

    def map(
        self,
        func: Callable[[A], Any],
        inputs: Iterable[A] | AsyncIterable[A],
        *,
        ordered: bool = True,
        return_exceptions: bool = False,
        on_progress: Callable[[MapProgress], object] | None = None,
        **options: Unpack[CallOptions],
    ) -> MapResults[Any]:
        """Like `isolated_map`, with this isolator's options as defaults.

        Closing the isolator also ends the fan-out's running calls.
        """
        if not callable(func):
            raise TypeError(f"func must be callable, not {type(func).__name__}")
        # Checked and merged once for the whole fan-out, not once per input (resolving a
        # user name, say, is a lookup in the user database).
        checked = self._options.merge(options)

        async def call(item: Any) -> Any:
            value, _ = await self._run(func, (item,), checked, limit=False)
            return value

        return MapResults(
            call,
            inputs,
            _map_limiter(checked),
            ordered=ordered,
            return_exceptions=return_exceptions,
            on_progress=on_progress,
        )

    async def _run(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        options: Options,
        *,
        limit: bool = True,
    ) -> tuple[Any, CallReport]:
        if self._state != "open":
            raise RuntimeError(
                "Isolator.run() needs an open isolator: use it inside 'async with Isolator()'"
                if self._state == "new"
                else "this Isolator is closed"
            )
        reports: list[CallReport] = []
        with anyio.CancelScope() as scope:
            self._running.add(scope)
            try:
                return await _run(func, args, options, limit=limit, reports=reports)
            finally:
                self._running.discard(scope)
                if not self._running and self._idle is not None:
                    self._idle.set()
        closed = IsolationError(
            "the Isolator was closed while this call was running"
            + ("; its child was killed" if reports else ", before it started a child")
        )
        closed.report = reports[-1] if reports else None
        raise closed
