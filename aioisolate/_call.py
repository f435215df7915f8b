"""The one lifecycle of an isolated call, for single calls, streams and fan-out alike.

A `Call` goes through these steps, and every path out of it ends with the child reaped and the
call's fds closed:

1. ``async with call``: the spawner the options choose (`_spawn.spawner_for`) starts the child
   and hands back its `RunningChild`. Nothing is left behind if that fails.
2. Inside the block, `Call.wait` (a call) or ``async for`` over the call (a stream) reads what the child
   sends while waiting for it to exit, within the call's ``timeout``, counted from the start.
3. Leaving the block, by any path: a child still running is killed and reaped (SIGTERM and a
   grace period if asked for, then SIGKILL), however often the caller is cancelled meanwhile;
   then the fds close and the `CallReport` is made.
4. After the block, `Call.outcome`: the value, or the error with the report on it.

The caller holds the limiter's token around all of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from . import _outcome, _protocol
from ._errors import IsolationError
from ._options import Options
from ._report import CallReport
from ._running import RunningChild
from ._spawn import spawner_for
from ._threads import Site

if TYPE_CHECKING:
    from typing import Self


class Call:
    """One isolated call: ``func(*args)`` in a child, from its start to its outcome.

    With ``stream``, ``func`` is a generator function whose items come one by one: iterate
    the call with ``async for``.
    The report is appended to ``reports`` on every path out of the block, cancellation
    included.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        options: Options,
        *,
        stream: bool = False,
        reports: list[CallReport] | None = None,
        site: Site | None = None,
    ) -> None:
        self._func = func
        self._site = site
        self._args = args
        self._options = options
        self._stream = stream
        self._reports = reports
        self._child: RunningChild | None = None
        self._deadline = math.inf
        self._ending: _outcome.Ending | None = None
        self.report: CallReport | None = None  # once the block is left

    async def __aenter__(self) -> Self:
        spawner = spawner_for(self._options)
        self._child = await spawner.spawn(
            self._func, self._args, self._options, stream=self._stream, site=self._site
        )
        # On the event loop's clock (trio's is not time.monotonic()), counted from the start.
        if self._options.timeout is not None:
            self._deadline = anyio.current_time() + self._options.timeout
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        child = self._child
        assert child is not None
        try:
            if not child.reaped:
                # Cancelled, failed, or a stream left early (GeneratorExit from aclose).
                await child.kill_and_reap()
        finally:
            child.close()
            self._ending = ending = child.ending()
            self.report = report = _outcome.report(ending)
            if self._reports is not None:
                self._reports.append(report)

    async def wait(self) -> None:
        """Read the result while the child runs; return once it is reaped, or killed for
        outliving its timeout."""
        child = self._running()
        if self._deadline == math.inf:
            await child.collect()
            return
        with anyio.move_on_at(self._deadline) as deadline:
            await child.collect()
        if deadline.cancelled_caught:
            await child.time_out()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        """A stream's next item, as the child yields it; once they end, wait for the child to
        exit. The deadline holds for the waits, not for what the pipe holds already."""
        child = self._running()
        payload = await child.next_item(self._deadline)
        if payload is not None:
            return _protocol.decode(_protocol.ITEM, payload, self._options.codec)
        if not child.reaped:
            # It has ended its stream (or died): no deadline for the last few steps.
            await child.collect()
        raise StopAsyncIteration

    def outcome(self) -> Any:
        """After the block: what the call returned (None for a stream that ended), or raise
        what ended it, with the call's report on the error."""
        assert self._ending is not None
        try:
            return _outcome.outcome(self._ending)
        except IsolationError as exc:
            # Not one raised by the function itself: an error from a nested call keeps its own.
            if exc.report is None:
                exc.report = self.report
            raise

    def _running(self) -> RunningChild:
        if self._child is None:
            raise RuntimeError("a Call is used inside 'async with call:'")
        return self._child


async def run_call(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Options,
    reports: list[CallReport] | None = None,
    site: Site | None = None,
) -> tuple[Any, CallReport]:
    """Run ``func(*args)`` in a child; return its value and report, or raise."""
    call = Call(func, args, options, reports=reports, site=site)
    async with call:
        await call.wait()
    assert call.report is not None
    return call.outcome(), call.report
