"""Streaming: a generator in the child, its items in the parent as they come."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.lowlevel
import psutil
import pytest
from helpers import Gate, SharedCounter, is_gone

from aioisolate import (
    ChildCrashed,
    IsolationError,
    IsolationTimeout,
    Isolator,
    ItemStream,
    isolated_iter,
)

pytestmark = [pytest.mark.anyio, pytest.mark.both_modes]

MiB = 1 << 20


def count(n: int) -> Iterator[int]:
    yield from range(n)


async def async_count(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await anyio.lowlevel.checkpoint()
        yield i


# Framing does not depend on how the child's exit is watched: one watcher is enough here.
@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
async def test_100_000_small_items_in_order() -> None:
    received = [item async for item in isolated_iter(count, 100_000)]
    assert received == list(range(100_000))


async def test_async_generator_on_a_fresh_loop() -> None:
    assert [item async for item in isolated_iter(async_count, 50)] == list(range(50))


def big_items(n: int, size: int) -> Iterator[bytes]:
    for i in range(n):
        yield bytes([i]) * size


@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
async def test_50_items_of_10_mb() -> None:
    seen = 0
    async for item in isolated_iter(big_items, 50, 10 * MiB):
        assert len(item) == 10 * MiB
        assert item[0] == item[-1] == seen
        seen += 1
    assert seen == 50


def fail_after(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError(f"failed after {n}")


async def receive_into(items: AsyncIterator[object], received: list[object]) -> None:
    async for item in items:
        received.append(item)


async def test_generator_exception_comes_after_its_items() -> None:
    received: list[object] = []
    with pytest.raises(ValueError, match="failed after 3"):
        await receive_into(isolated_iter(fail_after, 3), received)
    assert received == [0, 1, 2]


def crash_after(n: int) -> Iterator[int]:
    yield from range(n)
    os._exit(7)


async def test_crash_mid_stream() -> None:
    received: list[object] = []
    with pytest.raises(ChildCrashed) as info:
        await receive_into(isolated_iter(crash_after, 2), received)
    assert received == [0, 1]
    assert info.value.exitcode == 7
    assert info.value.report is not None


def forever(counter: SharedCounter, size: int = 8) -> Iterator[object]:
    """First its pid, then numbered items of ``size`` bytes, for ever."""
    yield os.getpid()
    i = 1
    while True:
        yield (i, b"x" * size)
        counter.set(i)  # shared with the parent: how far it got
        i += 1


@pytest.fixture
def counter() -> Iterator[SharedCounter]:
    shared = SharedCounter()
    yield shared
    shared.close()


def produced(counter: SharedCounter) -> int:
    return counter.get()


async def test_break_inside_async_with_kills_the_child_at_once(counter: SharedCounter) -> None:
    async with isolated_iter(forever, counter) as items:
        child = psutil.Process(await anext(items))  # type: ignore[arg-type]
        async for item in items:
            if item[0] == 3:  # type: ignore[index]
                break
    assert not child.is_running()
    assert items.report is not None
    assert items.report.signal is not None  # killed, since it would never have ended


# trio warns, rightly, that a stream left without `async with` is closed only by its async
# generator finalizer; that finalizer still closes it, which is what this test checks.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_plain_async_for_break_kills_the_child_soon(counter: SharedCounter) -> None:
    child = None
    async for item in isolated_iter(forever, counter):
        if child is None:
            child = psutil.Process(item)  # type: ignore[arg-type]
        elif item[0] == 3:  # type: ignore[index]
            break
    assert child is not None
    # The loop's async-generator finalizer closes the stream on its next turns.
    await eventually(lambda: not child.is_running())


async def eventually(condition: object, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        for _ in range(int(timeout / 0.01)):
            if condition():  # type: ignore[operator]
                return
            await anyio.sleep(0.01)


async def test_cancelling_the_consumer_kills_the_child(counter: SharedCounter) -> None:
    with anyio.CancelScope() as scope:
        async with isolated_iter(forever, counter) as items:
            child = psutil.Process(await anext(items))  # type: ignore[arg-type]
            async for item in items:
                if item[0] == 2:  # type: ignore[index]
                    scope.cancel()
                    await anyio.sleep(1)  # cancelled here
    assert scope.cancelled_caught
    assert not child.is_running()


async def test_consumer_exception_kills_the_child(counter: SharedCounter) -> None:
    children: list[psutil.Process] = []

    async def consume() -> None:
        async with isolated_iter(forever, counter) as items:
            children.append(psutil.Process(await anext(items)))  # type: ignore[arg-type]
            async for _ in items:
                raise KeyError("consumer failed")

    with pytest.raises(KeyError):
        await consume()
    assert not children[0].is_running()


async def test_a_slow_consumer_pauses_the_child(counter: SharedCounter) -> None:
    # 10 MB items from a producer that would make a gigabyte, read slowly: neither process
    # may hold more than about one item beyond what was consumed.
    me = psutil.Process()
    start_rss = me.memory_info().rss
    async with isolated_iter(forever, counter, 10 * MiB) as items:
        child = psutil.Process(await anext(items))  # type: ignore[arg-type]
        for consumed in range(1, 6):
            item = await anext(items)
            assert item[0] == consumed  # type: ignore[index]
            del item
            await anyio.sleep(0.2)  # the slow consumer: time for an unpaused producer to run on
            assert produced(counter) <= consumed + 1
        assert child.memory_full_info().uss < 100 * MiB
    assert me.memory_info().rss - start_rss < 100 * MiB


def slow(n: int) -> Iterator[int]:
    for i in range(n):
        time.sleep(0.1)
        yield i


async def test_timeout_bounds_the_whole_stream() -> None:
    received: list[object] = []
    with pytest.raises(IsolationTimeout):
        await receive_into(isolated_iter(slow, 1000, timeout=0.5), received)
    assert 1 <= len(received) < 10


async def test_report_after_the_stream() -> None:
    items = isolated_iter(count, 10)
    assert items.report is None
    assert [i async for i in items] == list(range(10))
    assert items.report is not None
    assert items.report.exitcode == 0
    assert items.report.result_bytes > 0


async def test_options_are_checked_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="not a size"):
        isolated_iter(count, 3, memory_limit="lots")
    with pytest.raises(TypeError, match="callable"):
        isolated_iter(3)  # type: ignore[call-overload]


async def test_captured_output_while_streaming() -> None:
    def chatty(n: int) -> Iterator[int]:
        for i in range(n):
            print("x" * 10_000)  # more than a pipe holds, over the run
            yield i

    items = isolated_iter(chatty, 100, stdout="capture", max_output=100)
    assert [i async for i in items] == list(range(100))
    assert items.report is not None
    assert items.report.stdout == b"x" * 99 + b"\n"


def crash_leaving_a_grandchild() -> Iterator[int]:
    yield 1
    if os.fork() == 0:  # holds the pipe open, so no EOF will come
        time.sleep(600)
        os._exit(0)
    os._exit(3)


async def test_a_crash_is_seen_even_while_a_grandchild_holds_the_pipe() -> None:
    received: list[object] = []
    with anyio.fail_after(10), pytest.raises(ChildCrashed) as info:
        await receive_into(isolated_iter(crash_leaving_a_grandchild), received)
    assert received == [1]
    assert info.value.exitcode == 3


async def test_a_slow_consumer_does_not_time_out_a_finished_child() -> None:
    # The child is done in an instant; the consumer takes longer than the timeout.
    items = isolated_iter(count, 3, timeout=0.5)
    received = []
    async for item in items:
        received.append(item)
        await anyio.sleep(0.4)
    assert received == [0, 1, 2]
    assert items.report is not None
    assert items.report.exitcode == 0


# An Isolator's streams: its options, and its scope.


def shout(n: int) -> Iterator[int]:
    for i in range(n):
        print("item", i)
        yield i


async def test_an_isolators_stream_takes_its_options() -> None:
    async with Isolator(stdout="capture") as iso:
        items = iso.iter(shout, 2)
        assert [item async for item in items] == [0, 1]
    assert items.report is not None
    assert items.report.stdout == b"item 0\nitem 1\n"


async def test_closing_the_isolator_ends_a_stream_between_items(counter: SharedCounter) -> None:
    async with Isolator() as iso:
        items = iso.iter(forever, counter)
        child = psutil.Process(await anext(items))  # type: ignore[arg-type]
    # The block is left while nobody waits for an item: the stream is closed there.
    assert is_gone(child)
    with pytest.raises(IsolationError, match="closed while this stream was open") as info:
        await anext(items)
    assert info.value.report is not None
    assert info.value.report.signal is not None


def pid_then_wait(gate: Gate) -> Iterator[int]:
    yield os.getpid()
    gate.wait()  # never opened: the next item never comes
    yield 0


async def test_closing_the_isolator_ends_a_stream_waiting_for_an_item(gate: Gate) -> None:
    failures: list[BaseException] = []

    async def consume(items: ItemStream[int]) -> None:
        try:
            await anext(items)  # waits here until the isolator closes
        except IsolationError as exc:
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        async with Isolator() as iso:
            items = iso.iter(pid_then_wait, gate)
            child = psutil.Process(await anext(items))
            tg.start_soon(consume, items)
            await anyio.wait_all_tasks_blocked()  # the consumer waits for the second item
    (failure,) = failures
    assert "closed while this stream was open; its child was killed" in str(failure)
    assert is_gone(child)


async def test_an_isolators_stream_needs_it_open() -> None:
    iso = Isolator()
    with pytest.raises(RuntimeError, match="inside 'async with Isolator"):
        iso.iter(count, 1)
    async with iso:
        assert [item async for item in iso.iter(count, 3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        iso.iter(count, 1)


def term_ignored_then_wait(gate: Gate) -> Iterator[int]:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield os.getpid()
    gate.wait()
    yield 0


async def test_closing_the_isolator_while_a_stream_closes_waits_for_it(gate: Gate) -> None:
    async with anyio.create_task_group() as tg:
        async with Isolator(kill_grace=0.5) as iso:
            items = iso.iter(term_ignored_then_wait, gate)
            child = psutil.Process(await anext(items))
            tg.start_soon(items.aclose)  # SIGTERM, then a grace the child outlives
            await anyio.wait_all_tasks_blocked()
        # The isolator waited for that close (no "already running" error), and reaped.
        assert is_gone(child)
    assert items.report is not None
    assert items.report.signal is not None


async def test_a_stream_never_started_ends_with_its_isolator() -> None:
    async with Isolator() as iso:
        items = iso.iter(count, 3)
    with pytest.raises(IsolationError, match="closed while this stream was open"):
        await anext(items)
    assert items.report is None  # no child was ever started


# trio warns, rightly, that a stream left without `async with` is closed only by its async
# generator finalizer; that finalizer still closes it, which is what this test checks.
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_abandoned_isolator_stream_gives_its_token_back(counter: SharedCounter) -> None:
    async with Isolator(limiter=anyio.CapacityLimiter(1)) as iso:
        items = iso.iter(forever, counter)
        child = psutil.Process(await anext(items))  # type: ignore[arg-type]
        del items  # left without closing: the isolator holds no reference that keeps it open
        gc.collect()
        with anyio.fail_after(30):
            assert await iso.run(abs, -3) == 3  # the token came back once it was finalized
        assert is_gone(child)


def count_outside_a_loop() -> list[int]:
    stream = isolated_iter(count, 3)  # made before any event loop runs

    async def consume() -> list[int]:
        return [item async for item in stream]

    return anyio.run(consume)


def test_a_stream_can_be_made_before_the_loop_runs() -> None:
    assert count_outside_a_loop() == [0, 1, 2]
