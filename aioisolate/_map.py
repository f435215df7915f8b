"""Fan-out: one isolated call per input, results as an async iterator, inputs pulled lazily."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import anyio.abc

if TYPE_CHECKING:
    from typing import Self

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class MapProgress:
    """Where a fan-out stands, as passed to its ``on_progress`` callback.

    Attributes:
        done: calls that returned a value.
        failed: calls that raised.
        running: calls started and not finished.
        total: the number of inputs, once known (at once for a sized input such as a list;
            for an iterator, when it is exhausted), else None.
        finished: True on the last report, when the fan-out ends for whatever reason.
    """

    done: int
    failed: int
    running: int
    total: int | None
    finished: bool = False


@dataclasses.dataclass(slots=True)
class _Outcome:
    index: int
    value: Any = None
    error: BaseException | None = None


class MapResults(AsyncIterator[T], Generic[T]):
    """The results of a fan-out, as an async iterator inside an ``async with`` block.

    The block owns the calls: they run in a task group it opens, and leaving it (at the end,
    by ``break``, an exception or cancellation) kills and reaps every child still running::

        async with isolated_map(search, positions) as results:
            async for score in results:
                ...

    Results come in input order, or as they complete with ``ordered=False``. Inputs are pulled
    from the iterable only as capacity frees, so a generator of a million inputs is never
    listed. By default the first error cancels the remaining calls and is raised; with
    ``return_exceptions=True`` errors are yielded in their place instead.
    """

    def __init__(
        self,
        call: Callable[[Any], Awaitable[T]],  # one call, without taking the limiter
        inputs: Iterable[Any] | AsyncIterable[Any],
        limiter: anyio.CapacityLimiter,
        *,
        ordered: bool,
        return_exceptions: bool,
        on_progress: Callable[[MapProgress], object] | None,
    ) -> None:
        self._call = call
        self._inputs = inputs
        self._ordered = ordered
        self._return_exceptions = return_exceptions
        self._on_progress = on_progress
        self._limiter = limiter
        self._tg: anyio.abc.TaskGroup | None = None
        # The calls run in a scope of their own inside the task group, whose scope also holds
        # the caller's block: stopping the calls must not cancel what the caller does next.
        self._work = anyio.CancelScope()
        self._pending: dict[int, _Outcome] = {}
        self._next = 0
        self._delivered = 0
        self._expected: int | None = None  # how many calls were started, once all were
        self._input_error: Exception | None = None
        self._size_hint = _size_hint(inputs)
        self._done = self._failed = self._running = 0
        self._closed = False

    async def __aenter__(self) -> Self:
        if self._tg is not None:
            raise RuntimeError("these results are already being iterated")
        # Results a consumer has not taken yet count against the window, so that in input
        # order a slow first call cannot make the others pile up without bound.
        tokens = self._limiter.total_tokens
        self._window = anyio.Semaphore(2 * int(tokens) if tokens != math.inf else 256)
        # Unbounded, but the window bounds what can be in it.
        self._send, self._receive = anyio.create_memory_object_stream[_Outcome](math.inf)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run_calls)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._work.cancel()  # the calls still running are killed and reaped
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The task group is ours: the caller's own exception (the first error, re-raised
            # by __anext__, or one from the loop body) leaves as itself, not in a group.
            if len(group.exceptions) == 1:
                if group.exceptions[0] is exc:
                    return None
                raise group.exceptions[0] from None
            raise
        finally:
            self._send.close()
            self._receive.close()
            self._report(finished=True)

    def __aiter__(self) -> Self:
        if self._tg is None:
            raise RuntimeError(
                "a fan-out's results are read inside 'async with': "
                "async with isolated_map(func, inputs) as results: async for r in results: ..."
            )
        return self

    async def __anext__(self) -> T:
        if self._tg is None:
            self.__aiter__()  # raises the explanation
        while True:
            if self._ordered and self._next in self._pending:
                outcome = self._pending.pop(self._next)
                self._next += 1
                return self._deliver(outcome)
            if self._delivered == self._expected:
                if self._input_error is not None:
                    # Raised after the results of the inputs it did give.
                    error, self._input_error = self._input_error, None
                    raise error
                raise StopAsyncIteration
            outcome = await self._receive.receive()
            if outcome.index < 0:
                continue  # the feeder's wake-up call: look at the end again
            if outcome.error is not None and not self._return_exceptions:
                self._delivered += 1
                self._work.cancel()
                raise outcome.error
            if not self._ordered:
                return self._deliver(outcome)
            self._pending[outcome.index] = outcome

    def _deliver(self, outcome: _Outcome) -> T:
        self._delivered += 1
        self._window.release()
        if outcome.error is not None:
            return outcome.error  # type: ignore[return-value]  # return_exceptions=True
        result: T = outcome.value
        return result

    async def _run_calls(self) -> None:
        with self._work:
            async with anyio.create_task_group() as calls:
                self._calls = calls
                calls.start_soon(self._feed)

    async def _feed(self) -> None:
        """Start one call per input, pulling the next input only when the window has room."""
        index = 0
        try:
            if isinstance(self._inputs, AsyncIterable):
                async for item in self._inputs:
                    await self._start(index, item)
                    index += 1
            else:
                # Pulled on the event loop's thread: an input that blocks stops the loop, so a
                # slow source should be an async iterable.
                for item in self._inputs:
                    await self._start(index, item)
                    index += 1
        except Exception as exc:
            self._input_error = exc
        self._expected = index
        self._report()
        await self._send.send(_Outcome(-1))  # wakes a consumer waiting for more

    async def _start(self, index: int, item: Any) -> None:
        await self._window.acquire()
        self._calls.start_soon(self._run_one, index, item)

    async def _run_one(self, index: int, item: Any) -> None:
        # The limiter is taken here rather than by the call, so that "running" counts the
        # children that run, not the calls waiting for their turn.
        async with self._limiter:
            self._running += 1
            self._report()
            try:
                value = await self._call(item)
            except Exception as exc:
                outcome = _Outcome(index, error=exc)
                self._failed += 1
            else:
                outcome = _Outcome(index, value=value)
                self._done += 1
            finally:
                self._running -= 1
        self._report()
        await self._send.send(outcome)

    def _report(self, finished: bool = False) -> None:
        if self._on_progress is None or self._closed:
            return
        self._closed = finished
        total = self._expected if self._expected is not None else self._size_hint
        self._on_progress(MapProgress(self._done, self._failed, self._running, total, finished))


def _size_hint(inputs: object) -> int | None:
    """How many inputs there will be, if the input says (for progress only: a list can still
    grow while it is iterated, so the end is where iteration stops)."""
    try:
        return len(inputs)  # type: ignore[arg-type]
    except (TypeError, OverflowError):
        return None
