"""Streaming: a generator runs in the child and the parent receives its items as they come."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import anyio

from ._call import Call
from ._errors import IsolationError
from ._options import Options
from ._report import CallReport
from ._threads import Site

if TYPE_CHECKING:
    from typing import Self

T = TypeVar("T")


class Owner(Protocol):
    """What a stream opened from an `Isolator` reports to, so that closing the isolator ends
    it: each wait for an item, and a close, runs in a cancel scope the owner tracks (and has
    cancelled already once it is closed)."""

    def _track(self) -> anyio.CancelScope: ...

    def _untrack(self, scope: anyio.CancelScope) -> None: ...


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
    has only one. A stream opened from an `Isolator` ends when the isolator closes: the next
    item raises `IsolationError`.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        options: Options,
        limiter: Callable[[], anyio.CapacityLimiter],
        owner: Owner | None = None,
        site: Site | None = None,
    ) -> None:
        # The generator gets a holder for the report, not this object: a reference back would
        # make a cycle, and a stream dropped in a cycle is closed only by a full GC pass.
        self._reports: list[CallReport] = []
        self._items: AsyncGenerator[T, None] = _items(
            func, args, options, limiter, self._reports, site
        )
        self._owner = owner
        self._busy = False  # waiting for an item, or closing: in a scope the owner tracks
        self._finished = False  # the generator ended (or was closed)
        self._closed_by_owner = False

    @property
    def report(self) -> CallReport | None:
        """The call's `CallReport`, once the stream has ended (or been closed)."""
        return self._reports[-1] if self._reports else None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if self._owner is None:
            return await self._items.__anext__()
        if self._closed_by_owner:
            raise self._closed()
        with self._in_use():
            try:
                return await self._items.__anext__()
            except BaseException:
                self._finished = True  # whatever left the generator ended it
                raise
        # The owner cancelled the wait as it closed: the child is killed and reaped.
        self._finished = self._closed_by_owner = True
        raise self._closed()

    async def aclose(self) -> None:
        """Stop the child (if it still runs), reap it, and release its limiter token."""
        if self._owner is None or self._finished:
            await self._items.aclose()
            return
        with self._in_use():  # an owner closing meanwhile waits for this
            await self._items.aclose()
        self._finished = True

    @contextlib.contextmanager
    def _in_use(self) -> Iterator[None]:
        """Around a wait for an item, or a close: in a scope the owner tracks, and cancels as
        it closes (the cancellation is caught here)."""
        assert self._owner is not None
        scope = self._owner._track()
        self._busy = True
        try:
            with scope:
                yield
        finally:
            self._busy = False
            self._owner._untrack(scope)

    async def _close_for_owner(self) -> None:
        """Called by the owner as it closes, while nothing waits for an item (not `_busy`)."""
        self._closed_by_owner = True
        self._finished = True
        await self._items.aclose()

    def _closed(self) -> IsolationError:
        closed = IsolationError(
            "the Isolator was closed while this stream was open"
            + ("; its child was killed" if self._reports else "")
        )
        closed.report = self.report
        return closed

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def _items(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    choose_limiter: Callable[[], anyio.CapacityLimiter],
    reports: list[CallReport],
    site: Site | None,
) -> AsyncGenerator[Any, None]:
    # Chosen here, not when the stream is made: the default limiter is the running loop's.
    limiter = choose_limiter()
    # The token is held across yields, and the generator may be closed from another task (the
    # loop's finalizer), so it is borrowed on behalf of this stream rather than of a task.
    borrower = object()
    await limiter.acquire_on_behalf_of(borrower)
    try:
        call = Call(func, args, options, stream=True, reports=reports, site=site)
        async with call:
            async for item in call:
                yield item
    finally:
        limiter.release_on_behalf_of(borrower)
    call.outcome()  # None once the generator finished; else raises what ended it
