"""Streaming: a generator runs in the child and the parent receives its items as they come."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

import anyio
import anyio.lowlevel

from . import _platform, _protocol
from ._api import default_limiter
from ._call import spawn
from ._errors import IsolationError
from ._options import DEFAULTS, CallOptions, Options
from ._report import CallReport

if TYPE_CHECKING:
    from typing import Self, TypeVarTuple, Unpack

    PosArgsT = TypeVarTuple("PosArgsT")

T = TypeVar("T")


class ItemStream(AsyncIterator[T], Generic[T]):
    """The items a generator yields in a child, received as it yields them.

    Iterate it with ``async for``. The child is paused while the consumer is slow: it blocks
    writing to a full pipe, so neither process buffers more than a pipe's worth of items.

    Use it as an async context manager to stop the child the moment the block is left, by
    ``break``, an exception or cancellation::

        async with isolated_iter(search, position) as moves:
            async for move in moves:
                if good_enough(move):
                    break  # the child is killed and reaped here

    Without the ``async with``, a stream left early is closed when the event loop finalizes
    it, soon but not at once. An exception raised by the generator is raised after the items
    it yielded before it.

    An open stream holds one token of its limiter (its child is running): isolated calls made
    from the loop body need a token more, so give them a limiter of their own if the stream's
    has only one.
    """

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], options: Options) -> None:
        # The generator gets a holder for the report, not this object: a reference back would
        # make a cycle, and a stream dropped in a cycle is closed only by a full GC pass.
        self._reports: list[CallReport] = []
        self._items: AsyncGenerator[T, None] = _items(func, args, options, self._reports)

    @property
    def report(self) -> CallReport | None:
        """The call's `CallReport`, once the stream has ended (or been closed)."""
        return self._reports[-1] if self._reports else None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        """Stop the child (if it still runs), reap it, and release its limiter token."""
        await self._items.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


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
    if not callable(func):
        raise TypeError(f"func must be callable, not {type(func).__name__}")
    checked = DEFAULTS.merge(options)
    if checked.engine is not None:
        raise TypeError("isolated_iter runs its generator here: an engine= takes whole calls only")
    return ItemStream(func, args, checked)


async def _items(
    func: Callable[..., Any], args: tuple[Any, ...], options: Options, reports: list[CallReport]
) -> AsyncGenerator[Any, None]:
    mechanism = _platform.select_watcher()
    limiter = default_limiter() if options.limiter is None else options.limiter
    # The token is held across yields, and the generator may be closed from another task (the
    # loop's finalizer), so it is borrowed on behalf of this stream rather than of a task.
    borrower = object()
    await limiter.acquire_on_behalf_of(borrower)
    try:
        child = await spawn(func, args, options, mechanism, stream=True)
        # On the event loop's clock (trio's is not time.monotonic()), counted from fork.
        deadline = anyio.current_time() + (math.inf if options.timeout is None else options.timeout)
        try:
            await child.pace()
            while True:
                if not child.frame_ready():
                    with anyio.move_on_at(deadline) as waiting:
                        await child.next_frame()
                    if waiting.cancelled_caught and not child.frame_ready():
                        child.timed_out = True
                        await child.kill_and_reap()
                        break
                else:
                    # Already in the pipe: no deadline applies to what the child has done.
                    await anyio.lowlevel.checkpoint()
                if child.protocol_error is not None:
                    break
                if not child.reader.complete or child.reader.kind != _protocol.ITEM:
                    break  # EOF (a crash), END or ERROR: the child is about to exit
                payload = child.reader.payload
                assert payload is not None
                child.reader.reset()
                yield _protocol.decode(_protocol.ITEM, payload, options.codec)
            if not child.reaped:
                # It has ended its stream (or died): no deadline for the last few steps.
                await child.collect()
        except BaseException:
            # The consumer stopped early (GeneratorExit from aclose), was cancelled, or failed.
            await child.kill_and_reap()
            raise
        finally:
            child.close()
            reports.append(child.report())
    finally:
        limiter.release_on_behalf_of(borrower)
    report = reports[-1]
    try:
        if child.reader.complete and child.reader.kind == _protocol.END:
            return
        child.outcome()  # raises the generator's exception, the crash or the timeout
    except IsolationError as exc:
        exc.report = report
        raise
