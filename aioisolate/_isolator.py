"""`Isolator`: the options of many calls set once, and a scope that ends every child it
started. Each of its methods is a module-level entry point (see `_api`) with these options as
defaults, run inside the scope."""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import anyio

from . import _api, _threads
from ._errors import IsolationError
from ._map import MapProgress, MapResults
from ._options import DEFAULTS, CallOptions, Options
from ._report import CallReport
from ._shield import to_the_end
from ._stream import ItemStream
from ._zygote import Zygote

if TYPE_CHECKING:
    from typing import Self, TypeVarTuple, Unpack

    PosArgsT = TypeVarTuple("PosArgsT")

T = TypeVar("T")
A = TypeVar("A")


class Isolator:
    """Isolated calls with options set once, and a scope that ends every child it started.

    Use it as an async context manager::

        async with Isolator(limiter=anyio.CapacityLimiter(4), timeout=30) as iso:
            result = await iso.run(parse, blob)

    It takes the options of `isolated` (see `CallOptions`); its methods, the counterparts of
    `isolated`, `isolated_with_report`, `isolated_iter` and `isolated_map`, take them too, and
    override the isolator's for that call. Leaving the ``async with`` block kills and reaps
    every child still running from it; those calls (and open streams) raise `IsolationError`.

    With ``zygote=True`` the isolator starts a `Zygote` helper of its own when it opens (and
    ends it when it closes), and each child is forked from that small helper instead of from
    this process: the cost of a call no longer depends on this process's size or threads, and
    the function and arguments travel by pickle. ``zygote=`` an open `Zygote` shares that one.

    Args:
        preload: with ``zygote=True``, modules for the helper to import as it starts.
        mode: deprecated: ``mode="zygote"`` is ``zygote=True``, ``mode="fork"`` the default.
        **options: the options of `isolated`, for every call.
    """

    def __init__(
        self,
        *,
        preload: Iterable[str] = (),
        mode: Literal["fork", "zygote"] | None = None,
        **options: Unpack[CallOptions],
    ) -> None:
        if mode is not None:
            if mode not in ("fork", "zygote"):
                raise ValueError(f"mode must be 'fork' or 'zygote', not {mode!r}")
            if mode == "zygote" and options.get("zygote") is not None:
                raise ValueError("mode='zygote' starts a zygote of its own: leave out zygote=")
            warnings.warn(
                f"Isolator(mode={mode!r}) is deprecated: use "
                + ("Isolator(zygote=True)" if mode == "zygote" else "Isolator() (fork mode)"),
                DeprecationWarning,
                stacklevel=2,
            )
            if mode == "zygote":
                options["zygote"] = True
        self._options = DEFAULTS.merge(options)
        own = self._options.zygote is True
        if preload and not own:
            raise ValueError(
                "preload= is for zygote=True, whose helper the isolator starts (a fork-mode "
                "child has it all; a shared Zygote has its own preload=)"
            )
        self._own_zygote = Zygote(preload=preload) if own else None
        self._state = "new"
        self._running: set[anyio.CancelScope] = set()
        # Weakly: a stream dropped unfinished is closed by the loop's finalizer, as any is.
        self._streams: weakref.WeakSet[ItemStream[Any]] = weakref.WeakSet()
        self._idle: anyio.Event | None = None

    @property
    def zygote(self) -> Zygote | None:
        """The isolator's own `Zygote` with ``zygote=True`` (open while the isolator is)."""
        return self._own_zygote

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("an Isolator can be entered only once")
        if self._own_zygote is not None:
            await self._own_zygote.__aenter__()
            self._options = dataclasses.replace(self._options, zygote=self._own_zygote)
        self._state = "open"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._state = "closed"
        try:
            await self._end_calls()
        finally:
            if self._own_zygote is not None:
                await self._own_zygote.aclose()

    async def _end_calls(self) -> None:
        for scope in self._running:
            scope.cancel()
        # Streams between two items run nowhere: they are closed here, together. One waiting
        # for an item, or closing, was cancelled above and ends in its own task.
        idle = [s for s in self._streams if not s._busy and not s._finished]
        failures: list[BaseException] = []

        async def close(stream: ItemStream[Any]) -> None:
            try:
                await stream._close_for_owner()
            except Exception as exc:
                failures.append(exc)

        if idle:
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    for stream in idle:
                        tg.start_soon(close, stream)
        if self._running:
            self._idle = done = anyio.Event()
            # The children are being killed and reaped: wait for that, whatever cancels us.
            await to_the_end(done.wait, done.is_set)
        if failures:
            raise failures[0]

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
        value, _ = await self._run(func, args, self._merge(options), site=_threads.caller())
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
        return await self._run(func, args, self._merge(options), site=_threads.caller())

    @overload
    def iter(
        self,
        func: Callable[[Unpack[PosArgsT]], AsyncIterable[T]],
        *args: *PosArgsT,
        **options: Unpack[CallOptions],
    ) -> ItemStream[T]: ...

    @overload
    def iter(
        self,
        func: Callable[[Unpack[PosArgsT]], Iterable[T]],
        *args: *PosArgsT,
        **options: Unpack[CallOptions],
    ) -> ItemStream[T]: ...

    def iter(
        self,
        func: Callable[[Unpack[PosArgsT]], Any],
        *args: *PosArgsT,
        **options: Unpack[CallOptions],
    ) -> ItemStream[Any]:
        """Like `isolated_iter`, with this isolator's options as defaults.

        Closing the isolator ends the stream: its child is killed, and the next item raises
        `IsolationError`.
        """
        self._check_open()
        site = _threads.caller()
        stream = _api.open_stream(func, args, self._merge(options), owner=self, site=site)
        self._streams.add(stream)
        return stream

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
        return _api.fan_out(
            func,
            inputs,
            self._merge(options),
            ordered=ordered,
            return_exceptions=return_exceptions,
            on_progress=on_progress,
            run_one=self._run,
            site=_threads.caller(),
        )

    def _merge(self, options: CallOptions) -> Options:
        merged = self._options.merge(options)
        if merged.zygote is True and self._own_zygote is not None:
            merged = dataclasses.replace(merged, zygote=self._own_zygote)  # True: the scope's
        return merged

    def _check_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(
                "an Isolator's calls need it open: use it inside 'async with Isolator()'"
                if self._state == "new"
                else "this Isolator is closed"
            )

    async def _run(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        options: Options,
        *,
        limit: bool = True,
        site: _threads.Site | None = None,
    ) -> tuple[Any, CallReport]:
        self._check_open()
        reports: list[CallReport] = []
        with self._track() as scope:
            try:
                return await _api.run(func, args, options, limit=limit, reports=reports, site=site)
            finally:
                self._untrack(scope)
        closed = IsolationError(
            "the Isolator was closed while this call was running"
            + ("; its child was killed" if reports else ", before it started a child")
        )
        closed.report = reports[-1] if reports else None
        raise closed

    # What its calls and streams run under (see `_stream.Owner`).

    def _track(self) -> anyio.CancelScope:
        scope = anyio.CancelScope()
        if self._state == "closed":
            scope.cancel()  # a stream used after (or while) the isolator closes ends at once
        self._running.add(scope)
        return scope

    def _untrack(self, scope: anyio.CancelScope) -> None:
        self._running.discard(scope)
        if not self._running and self._idle is not None:
            self._idle.set()
