"""Fan-out: isolated_map and Isolator.map."""

from __future__ import annotations

import io
import os
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.lowlevel
import psutil
import pytest
from helpers import Channel, Gate, isolated_children

from aioisolate import IsolationError, Isolator, MapProgress, isolated_map, tqdm_progress

pytestmark = [pytest.mark.anyio, pytest.mark.both_modes]


def square(x: int) -> int:
    return x * x


async def test_results_in_input_order() -> None:
    async with isolated_map(square, range(20)) as results:
        assert [r async for r in results] == [x * x for x in range(20)]


@pytest.fixture
def gates() -> Iterator[list[Gate]]:
    opened = [Gate() for _ in range(4)]
    yield opened
    for gate in opened:
        gate.close()


def wait_for_gate(item: tuple[int, Gate]) -> int:
    index, gate = item
    gate.wait()
    return index


async def test_completion_order_on_request(gates: list[Gate]) -> None:
    inputs = list(enumerate(gates))
    limiter = anyio.CapacityLimiter(4)
    async with isolated_map(wait_for_gate, inputs, ordered=False, limiter=limiter) as results:
        received = []
        for index in (3, 1, 2, 0):
            gates[index].open()
            received.append(await anext(results))
    assert received == [3, 1, 2, 0]


async def test_input_order_waits_for_the_earlier_ones(gates: list[Gate]) -> None:
    limiter = anyio.CapacityLimiter(4)
    async with isolated_map(wait_for_gate, list(enumerate(gates)), limiter=limiter) as results:
        for index in (3, 1, 2, 0):
            gates[index].open()
        assert [r async for r in results] == [0, 1, 2, 3]


async def test_a_million_lazy_inputs_are_pulled_not_listed() -> None:
    pulled = 0

    def inputs() -> Iterator[int]:
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield i

    limiter = anyio.CapacityLimiter(2)
    async with isolated_map(square, inputs(), limiter=limiter) as results:
        async for r in results:
            if r == 99 * 99:
                break
    # 100 consumed, plus at most the window (twice the limiter's tokens) in flight.
    assert 100 <= pulled <= 100 + 2 * 2 + 1


async def test_async_iterable_input() -> None:
    async def inputs() -> AsyncIterator[int]:
        for i in range(5):
            await anyio.lowlevel.checkpoint()
            yield i

    async with isolated_map(square, inputs()) as results:
        assert [r async for r in results] == [0, 1, 4, 9, 16]


def first_fails(item: tuple[int, Channel]) -> int:
    index, channel = item
    channel.send(os.getpid())
    if index == 0:
        raise ValueError("the first one failed")
    time.sleep(600)
    return index


async def test_first_error_cancels_the_rest(channel: Channel) -> None:
    limiter = anyio.CapacityLimiter(4)

    async def run() -> None:
        async with isolated_map(
            first_fails, [(i, channel) for i in range(4)], limiter=limiter
        ) as results:
            async for _ in results:
                pass

    with pytest.raises(ValueError, match="the first one failed"):
        await run()
    # Every child the fan-out started is dead and reaped by now.
    assert isolated_children() == []


def fail_on_odd(x: int) -> int:
    if x % 2:
        raise ValueError(x)
    return x


async def test_return_exceptions_yields_errors_in_place() -> None:
    async with isolated_map(fail_on_odd, range(6), return_exceptions=True) as results:
        received = [r async for r in results]
    assert received[0::2] == [0, 2, 4]
    assert [type(e) for e in received[1::2]] == [ValueError] * 3
    assert [e.args for e in received[1::2]] == [(1,), (3,), (5,)]  # type: ignore[union-attr]


async def test_a_failing_input_iterable_is_raised() -> None:
    def inputs() -> Iterator[int]:
        yield 1
        raise LookupError("the input ran dry")

    async def run() -> None:
        async with isolated_map(square, inputs()) as results:
            async for _ in results:
                pass

    with pytest.raises(LookupError, match="ran dry"):
        await run()


async def test_break_kills_the_running_children(channel: Channel) -> None:
    def hang_after_first(item: tuple[int, Channel]) -> int:
        index, ch = item
        if index:
            ch.send(os.getpid())
            time.sleep(600)
        return index

    limiter = anyio.CapacityLimiter(3)
    async with isolated_map(
        hang_after_first, [(i, channel) for i in range(3)], limiter=limiter
    ) as results:
        assert await anext(results) == 0
        children = [psutil.Process(int((await channel.receive())[0])) for _ in range(2)]
    assert not any(child.is_running() for child in children)


async def test_progress_reports() -> None:
    reports: list[MapProgress] = []
    limiter = anyio.CapacityLimiter(2)
    async with isolated_map(
        fail_on_odd, range(6), limiter=limiter, return_exceptions=True, on_progress=reports.append
    ) as results:
        async for _ in results:
            pass
    assert reports[-1] == MapProgress(done=3, failed=3, running=0, total=6, finished=True)
    assert [r.finished for r in reports].count(True) == 1
    assert max(r.running for r in reports) <= 2


async def test_tqdm_progress_bar() -> None:
    output = io.StringIO()
    async with isolated_map(
        fail_on_odd,
        range(4),
        return_exceptions=True,
        on_progress=tqdm_progress(file=output, desc="searching"),
    ) as results:
        async for _ in results:
            pass
    text = output.getvalue()
    assert "searching" in text
    assert "4/4" in text
    assert "failed=2" in text


async def test_isolator_map_uses_its_options() -> None:
    async with Isolator(memory_limit="64MiB", limiter=anyio.CapacityLimiter(2)) as iso:
        async with iso.map(bytearray, [1, 1 << 30, 2], return_exceptions=True) as results:
            received = [r async for r in results]
    assert received[0] == bytearray(1)
    assert isinstance(received[1], MemoryError)
    assert received[2] == bytearray(2)


async def test_results_need_async_with() -> None:
    with pytest.raises(RuntimeError, match="inside 'async with'"):
        async for _ in isolated_map(square, range(3)):
            pass


async def test_bad_options_fail_at_once() -> None:
    with pytest.raises(ValueError, match="timeout"):
        isolated_map(square, range(3), timeout=-1)


async def test_first_error_survives_an_await_in_the_callers_finally() -> None:
    cleaned = []

    async def run() -> None:
        async with isolated_map(fail_on_odd, range(4)) as results:
            try:
                async for _ in results:
                    pass
            finally:
                await anyio.lowlevel.checkpoint()  # the caller's own cleanup must not be cancelled
                cleaned.append(True)

    with pytest.raises(ValueError, match="^[13]$"):  # whichever failed first
        await run()
    assert cleaned == [True]


async def test_an_input_error_comes_after_the_results_of_the_inputs_before_it() -> None:
    def inputs() -> Iterator[int]:
        yield from (0, 1, 2)
        raise LookupError("the input ran dry")

    received: list[object] = []

    async def run() -> None:
        async with isolated_map(square, inputs(), return_exceptions=True) as results:
            async for r in results:
                received.append(r)

    with pytest.raises(LookupError):
        await run()
    assert received == [0, 1, 4]


async def test_an_input_too_large_for_len() -> None:
    # len(range(10**19)) overflows: the size is only a hint for progress, never required.
    async with isolated_map(square, range(10**19)) as results:
        assert [await anext(results) for _ in range(3)] == [0, 1, 4]


async def test_cancelling_the_map_kills_its_children(channel: Channel) -> None:
    limiter = anyio.CapacityLimiter(3)
    with anyio.CancelScope() as scope:
        async with isolated_map(
            first_fails, [(i + 1, channel) for i in range(3)], limiter=limiter
        ) as results:
            children = [psutil.Process(int((await channel.receive())[0])) for _ in range(3)]
            scope.cancel()
            async for _ in results:
                pass
    assert scope.cancelled_caught
    assert not any(child.is_running() for child in children)


async def test_an_exception_in_the_consumer_kills_the_children(channel: Channel) -> None:
    limiter = anyio.CapacityLimiter(2)
    children: list[psutil.Process] = []

    async def run() -> None:
        async with isolated_map(first_fails, [(i + 1, channel) for i in range(2)], limiter=limiter):
            children.extend([psutil.Process(int((await channel.receive())[0])) for _ in range(2)])
            raise KeyError("the consumer failed")

    with pytest.raises(KeyError):
        await run()
    assert not any(child.is_running() for child in children)


async def test_closing_the_isolator_ends_its_fan_out(channel: Channel) -> None:
    received: list[object] = []
    async with anyio.create_task_group() as tg:
        async with Isolator(limiter=anyio.CapacityLimiter(2)) as iso:

            async def consume() -> None:
                async with iso.map(
                    first_fails, [(i + 1, channel) for i in range(2)], return_exceptions=True
                ) as results:
                    async for r in results:
                        received.append(r)

            tg.start_soon(consume)
            for _ in range(2):
                await channel.receive()
    assert len(received) == 2
    assert all(isinstance(r, IsolationError) and "Isolator was closed" in str(r) for r in received)


async def test_isolator_map_checks_its_options_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from aioisolate._options import Options

    merges = []
    real_merge = Options.merge

    def merge(self: Options, overrides: object) -> Options:
        merges.append(overrides)
        return real_merge(self, overrides)  # type: ignore[arg-type]

    async with Isolator() as iso:
        monkeypatch.setattr(Options, "merge", merge)
        async with iso.map(square, range(8), timeout=30) as results:
            assert [r async for r in results] == [x * x for x in range(8)]
    # Once for the fan-out, not once per input (a user name would be looked up each time).
    assert merges == [{"timeout": 30}]
