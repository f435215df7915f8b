"""Two more ways in: a blocking call for code without an event loop, and a decorator."""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

import anyio

from . import _threads
from ._api import run
from ._options import DEFAULTS, CallOptions, Options

if TYPE_CHECKING:
    from typing import TypeVarTuple, Unpack

    PosArgsT = TypeVarTuple("PosArgsT")

T = TypeVar("T")
P = ParamSpec("P")


@overload
def run_isolated(
    func: Callable[[Unpack[PosArgsT]], Awaitable[T]],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> T: ...


@overload
def run_isolated(
    func: Callable[[Unpack[PosArgsT]], T],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> T: ...


def run_isolated(
    func: Callable[[Unpack[PosArgsT]], Any],
    *args: *PosArgsT,
    **options: Unpack[CallOptions],
) -> Any:
    """The blocking form of `isolated`, for scripts and other code with no event loop.

    Same arguments, options, results and errors. It runs its own short-lived event loop, so it
    refuses to run where one is already running (it would block that loop): there, use
    ``await isolated(...)``, or ``anyio.to_thread.run_sync(run_isolated, ...)``.
    """
    checked = DEFAULTS.merge(options)  # bad options fail here, before a loop is even started
    if _event_loop_running():
        raise RuntimeError(
            "run_isolated() blocks, and an event loop is running in this thread: use "
            "'await isolated(...)' there instead"
        )
    return anyio.run(_value_of, func, args, checked, _threads.caller())


async def _value_of(
    func: Callable[..., Any], args: tuple[Any, ...], options: Options, site: _threads.Site
) -> Any:
    value, _ = await run(func, args, options, site=site)
    return value


def _event_loop_running() -> bool:
    if asyncio.events._get_running_loop() is not None:
        return True
    trio = sys.modules.get("trio")
    return trio is not None and bool(trio.lowlevel.in_trio_run())


class _Isolate:
    """The decorator `isolate` returns when given options."""

    def __init__(self, options: CallOptions) -> None:
        self._options = DEFAULTS.merge(options)  # checked where the decorator is applied

    @overload
    def __call__(self, func: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, func: Callable[P, T]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __call__(self, func: Callable[P, Any]) -> Callable[P, Coroutine[Any, Any, Any]]:
        options = self._options

        @functools.wraps(func)
        async def run_in_a_child(*args: P.args, **kwargs: P.kwargs) -> Any:
            call = functools.partial(func, *args, **kwargs)
            value, _ = await run(call, (), options, site=_threads.caller())
            return value

        return run_in_a_child


@overload
def isolate(func: Callable[P, Awaitable[T]], /) -> Callable[P, Coroutine[Any, Any, T]]: ...


@overload
def isolate(func: Callable[P, T], /) -> Callable[P, Coroutine[Any, Any, T]]: ...


@overload
def isolate(**options: Unpack[CallOptions]) -> _Isolate: ...


def isolate(
    func: Callable[P, Any] | None = None, /, **options: Unpack[CallOptions]
) -> Callable[P, Coroutine[Any, Any, Any]] | _Isolate:
    """Turn a function into an async function that runs each call in a forked child.

    Use it bare or with the options of `isolated`::

        @isolate
        def parse(blob: bytes) -> Document: ...

        @isolate(memory_limit="1GiB", timeout=30)
        def render(page: Page, *, dpi: int = 300) -> bytes: ...

        document = await parse(blob)
        image = await render(page, dpi=150)  # keyword arguments work: nothing is pickled

    The result keeps the function's name, docstring and signature (for type checkers too, with
    the return type made awaitable). The original stays reachable as ``__wrapped__``.
    """
    decorator = _Isolate(options)
    if func is None:
        return decorator
    return decorator(func)
