"""The public entry points: `isolated` and its configured form, `Isolator`."""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

import anyio
import anyio.lowlevel

from ._call import run_in_child
from ._errors import IsolationError

if TYPE_CHECKING:
    from typing import Self, TypeVarTuple, Unpack

    PosArgsT = TypeVarTuple("PosArgsT")

T = TypeVar("T")

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
    limiter: anyio.CapacityLimiter | None = None,
    timeout: float | None = None,
) -> T: ...


@overload
async def isolated(
    func: Callable[[Unpack[PosArgsT]], T],
    *args: *PosArgsT,
    limiter: anyio.CapacityLimiter | None = None,
    timeout: float | None = None,
) -> T: ...


async def isolated(
    func: Callable[[Unpack[PosArgsT]], Any],
    *args: *PosArgsT,
    limiter: anyio.CapacityLimiter | None = None,
    timeout: float | None = None,
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
        limiter: bounds how many children run at once; by default `default_limiter`.
        timeout: seconds the child may run, from fork; then it is killed and
            `IsolationTimeout` is raised.

    Returns:
        What ``func`` returned (or, for an async function, what its coroutine returned).

    Raises:
        Exception: whatever ``func`` raised, as itself, with the child's traceback as
            ``__cause__``.
        RemoteError: ``func`` raised something that cannot be re-raised as itself.
        ChildCrashed: the child died without a result (a signal, or ``os._exit``).
        IsolationTimeout: the child outlived ``timeout``.
        IsolationError: the result could not be pickled, or the child could not be started.
    """
    _check_call(func, limiter, timeout)
    async with default_limiter() if limiter is None else limiter:
        return await run_in_child(func, args, timeout=timeout)


class Isolator:
    """Isolated calls with options set once, and a scope that ends every child it started.

    Use it as an async context manager::

        async with Isolator(limiter=anyio.CapacityLimiter(4), timeout=30) as iso:
            result = await iso.run(parse, blob)

    Leaving the ``async with`` block kills and reaps every child still running from it; those
    calls raise `IsolationError`. ``run`` takes the same arguments as `isolated`, with the
    isolator's options as defaults; the per-call options override them.
    """

    def __init__(
        self, *, limiter: anyio.CapacityLimiter | None = None, timeout: float | None = None
    ) -> None:
        _check_options(limiter, timeout)
        self._limiter = limiter
        self._timeout = timeout
        self._state = "new"
        self._running: set[anyio.CancelScope] = set()
        self._idle: anyio.Event | None = None

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("an Isolator can be entered only once")
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = "closed"
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
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | None = None,
    ) -> T: ...

    @overload
    async def run(
        self,
        func: Callable[[Unpack[PosArgsT]], T],
        *args: *PosArgsT,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | None = None,
    ) -> T: ...

    async def run(
        self,
        func: Callable[[Unpack[PosArgsT]], Any],
        *args: *PosArgsT,
        limiter: anyio.CapacityLimiter | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Like `isolated`, with this isolator's options as defaults."""
        if self._state != "open":
            raise RuntimeError(
                "Isolator.run() needs an open isolator: use it inside 'async with Isolator()'"
                if self._state == "new"
                else "this Isolator is closed"
            )
        limiter = self._limiter if limiter is None else limiter
        timeout = self._timeout if timeout is None else timeout
        _check_call(func, limiter, timeout)
        with anyio.CancelScope() as scope:
            self._running.add(scope)
            try:
                async with default_limiter() if limiter is None else limiter:
                    return await run_in_child(func, args, timeout=timeout)
            finally:
                self._running.discard(scope)
                if not self._running and self._idle is not None:
                    self._idle.set()
        raise IsolationError(
            "the Isolator was closed while this call was running; its child was killed"
        )


def _check_call(func: object, limiter: anyio.CapacityLimiter | None, timeout: float | None) -> None:
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")
    _check_options(limiter, timeout)


def _check_options(limiter: object, timeout: object) -> None:
    if limiter is not None and not isinstance(limiter, anyio.CapacityLimiter):
        raise TypeError(f"limiter must be an anyio.CapacityLimiter, not {type(limiter).__name__}")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
        if math.isnan(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
