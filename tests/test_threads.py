"""The fork-with-threads policy: one warning of ours, at the user's line, for the threads that
count; never Python's own (3.12+), whatever the filters."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import io
import os
import sys
import threading
import warnings
from collections.abc import Awaitable, Callable, Iterator

import anyio
import pytest

from aioisolate import (
    Isolator,
    ThreadedForkWarning,
    Zygote,
    _threads,
    isolate,
    isolated,
    isolated_iter,
    isolated_map,
    isolated_with_report,
    run_isolated,
    tqdm_progress,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_threads, "_warned", False)  # as in a process that has not warned yet


@contextlib.contextmanager
def a_thread(name: str = "busy-worker") -> Iterator[threading.Thread]:
    """A thread of the user's, running (waiting on an event) for the block's duration."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name=name)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def seen_warnings(action: str = "always") -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter(action)  # type: ignore[arg-type]
        yield seen


def ours(seen: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in seen if issubclass(w.category, ThreadedForkWarning)]


def pythons(seen: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in seen if "multi-threaded, use of fork()" in str(w.message)]


def here() -> int:
    """The caller's line."""
    return sys._getframe(1).f_lineno


def count(n: int) -> Iterator[int]:
    yield from range(n)


# Python's own warning.


async def test_our_forks_never_bring_pythons_warning() -> None:
    with a_thread(), seen_warnings() as seen:
        for _ in range(3):
            assert await isolated(abs, -1) == 1
        assert [item async for item in isolated_iter(count, 2)] == [0, 1]
        async with isolated_map(abs, [-1, -2]) as results:
            assert [r async for r in results] == [1, 2]
    assert pythons(seen) == []
    assert len(ours(seen)) == 1


async def test_our_forks_work_under_a_suite_that_errors_on_warnings() -> None:
    # As under pytest with filterwarnings = error, which resets the filters for every test.
    with a_thread(), warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.filterwarnings("ignore", category=ThreadedForkWarning)
        for _ in range(3):
            assert await isolated(abs, -1) == 1


@pytest.mark.skipif(sys.version_info < (3, 12), reason="3.11 has no fork warning of its own")
def test_a_bare_fork_here_does_bring_it() -> None:
    # The control: the check above would see Python's warning if our forks let it through.
    with a_thread(), seen_warnings() as seen:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    assert len(pythons(seen)) == 1


def test_our_filter_goes_with_the_fork() -> None:
    filters = list(warnings.filters)
    assert run_isolated(abs, -1) == 1
    assert warnings.filters == filters


# Ours: once per process, at the user's line, whichever way the call came in.


async def via_isolated() -> int:
    line = here() + 1
    await isolated(abs, -1)
    return line


async def via_report() -> int:
    line = here() + 1
    await isolated_with_report(abs, -1)
    return line


async def via_a_stream() -> int:
    line = here() + 1
    stream = isolated_iter(count, 2)
    assert [item async for item in stream] == [0, 1]  # forked here, in the stream's task
    return line


async def via_a_fan_out() -> int:
    line = here() + 1
    results = isolated_map(abs, [-1, -2, -3])
    async with results:  # forked in tasks the fan-out started
        assert sorted([r async for r in results]) == [1, 2, 3]
    return line


async def via_an_isolator() -> int:
    async with Isolator() as iso:
        line = here() + 1
        await iso.run(abs, -1)
    return line


async def via_an_isolators_fan_out() -> int:
    async with Isolator() as iso:
        line = here() + 1
        results = iso.map(abs, [-1, -2])
        async with results:
            assert [r async for r in results] == [1, 2]
    return line


async def via_an_isolators_stream() -> int:
    async with Isolator() as iso:
        line = here() + 1
        stream = iso.iter(count, 2)
        assert [item async for item in stream] == [0, 1]
    return line


@isolate
def absolute(x: int) -> int:
    return abs(x)


async def via_the_decorator() -> int:
    line = here() + 1
    await absolute(-1)
    return line


@pytest.mark.parametrize(
    "way",
    [
        via_isolated,
        via_report,
        via_a_stream,
        via_a_fan_out,
        via_an_isolator,
        via_an_isolators_fan_out,
        via_an_isolators_stream,
        via_the_decorator,
    ],
)
async def test_one_warning_at_the_users_line(way: Callable[[], Awaitable[int]]) -> None:
    with a_thread(), seen_warnings() as seen:
        line = await way()
        await way()  # once per process: not again
    (warning,) = ours(seen)
    assert (warning.filename, warning.lineno) == (__file__, line)
    assert "busy-worker" in str(warning.message)
    assert "zygote=True" in str(warning.message)


def test_the_blocking_form_warns_at_the_users_line() -> None:
    with a_thread(), seen_warnings() as seen:
        line = here() + 1
        assert run_isolated(abs, -1) == 1
    (warning,) = ours(seen)
    assert (warning.filename, warning.lineno) == (__file__, line)


async def test_zygote_mode_never_warns() -> None:
    async with Zygote() as zygote:
        with a_thread(), seen_warnings() as seen:
            assert await isolated(abs, -1, zygote=zygote) == 1
    assert ours(seen) == pythons(seen) == []


# Which threads count.


async def waiting(threads: list[threading.Thread]) -> None:
    """Until each of ``threads`` sits blocked in a wait (a worker that has just handed its
    result back is on its way to the cache's queue)."""
    with anyio.fail_after(10):
        while True:
            frames = sys._current_frames()
            names = {frames[t.ident].f_code.co_name for t in threads if t.ident in frames}
            del frames
            if names <= {"wait", "get", "_work", "_worker", "_do_waitpid"}:
                return
            await anyio.sleep(0.001)


def not_named(threads: list[threading.Thread], seen: list[warnings.WarningMessage]) -> bool:
    """Whether our warning, if one came (for threads of other tests, say), names none of
    ``threads``, and the policy counts none of them."""
    counted = _threads.hazardous_threads()
    named = " ".join(str(w.message) for w in ours(seen))
    return not any(t in counted or f"({t.name}" in named or f" {t.name}," in named for t in threads)


async def test_idle_workers_of_anyio_and_trio_do_not_count() -> None:
    worker = await anyio.to_thread.run_sync(threading.current_thread)  # now idle in the cache
    await waiting([worker])
    with seen_warnings() as seen:
        assert await isolated(abs, -1) == 1
    assert not_named([worker], seen)


async def test_a_busy_worker_counts() -> None:
    started, release = threading.Event(), threading.Event()
    busy: list[str] = []

    def job() -> None:
        busy.append(threading.current_thread().name)  # trio names its workers for their job
        started.set()
        release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(anyio.to_thread.run_sync, job, abandon_on_cancel=True))
        await anyio.to_thread.run_sync(started.wait)
        try:
            with seen_warnings() as seen:
                assert await isolated(abs, -1) == 1
        finally:
            release.set()
    (warning,) = ours(seen)
    assert busy[0] in str(warning.message)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_idle_asyncio_executor_does_not_count(anyio_backend: str) -> None:
    loop = asyncio.get_running_loop()
    worker = await loop.run_in_executor(None, threading.current_thread)
    await waiting([worker])
    with seen_warnings() as seen:
        assert await isolated(abs, -1) == 1
    assert not_named([worker], seen)


async def test_a_thread_waiting_for_a_subprocess_does_not_count() -> None:
    # asyncio on 3.11 waits for subprocesses with a thread each (ThreadedChildWatcher); 3.12
    # watches them with a pidfd, and uvloop and trio need no thread (trio starts the process
    # from a worker thread of its cache).
    before = set(threading.enumerate())
    async with await anyio.open_process(["sleep", "30"]) as process:
        try:
            started = [t for t in threading.enumerate() if t not in before]
            await waiting(started)
            with seen_warnings() as seen:
                assert await isolated(abs, -1) == 1
            assert not_named(started, seen)
        finally:
            process.kill()


def monitors() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if type(t).__name__ == "TMonitor"]


def test_a_progress_bar_starts_no_thread() -> None:
    before = monitors()
    bar = tqdm_progress(file=io.StringIO(), mininterval=0)
    assert vars(type(bar.bar)).get("monitor") is None  # tqdm's monitor, for this bar's class
    with seen_warnings() as seen:

        async def fan_out() -> list[int]:
            async with isolated_map(abs, range(-4, 0), on_progress=bar) as results:
                return [r async for r in results]

        assert anyio.run(fan_out) == [4, 3, 2, 1]
    assert monitors() == before
    assert not any("TMonitor" in str(w.message) or "monitor" in str(w.message) for w in ours(seen))


async def test_looking_at_the_threads_keeps_no_call_alive() -> None:
    # Frames from sys._current_frames() must not hold the call (and its result's mapping) in
    # a reference cycle, which only a collection would break.
    def spill_files() -> int:
        found = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
                found += "aioisolate-result" in os.readlink(f"/proc/self/fd/{fd}")
        return found

    gc.collect()
    gc.disable()
    try:
        with a_thread(), seen_warnings():
            for _ in range(3):
                assert len(await isolated(bytes, 3 << 20)) == 3 << 20  # spilled: mapped
        assert spill_files() == 0
    finally:
        gc.enable()
