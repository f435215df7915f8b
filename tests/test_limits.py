"""Limits and the kill policy: contain a child that misbehaves, and keep serving."""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import psutil
import pytest
from helpers import Channel, Gate, is_gone, one_variant, wait_until

from aioisolate import (
    ChildCrashed,
    CPULimitExceeded,
    IsolationTimeout,
    Isolator,
    MemoryLimitExceeded,
    isolated,
    isolated_with_report,
)
from aioisolate._limits import WATCH_INTERVAL

pytestmark = [pytest.mark.anyio, pytest.mark.both_modes]

MiB = 1 << 20


def allocate(n: int) -> int:
    data = bytearray(b"\x01") * n  # written, so it is resident
    return len(data)


@pytest.fixture(scope="module")
def big_parent() -> bytes:
    """A gigabyte held by the parent, resident."""
    return b"\x02" * (1024 * MiB)


async def test_python_allocation_past_the_limit_is_a_memory_error() -> None:
    with pytest.raises(MemoryError):
        await isolated(allocate, 1024 * MiB, memory_limit="200MiB")
    # The parent lives on and serves the next call.
    assert await isolated(allocate, 10 * MiB, memory_limit="200MiB") == 10 * MiB


async def test_limit_is_relative_to_what_the_child_inherited(big_parent: bytes) -> None:
    # An absolute address-space limit of 200 MiB would fail at once inside this parent.
    assert await isolated(allocate, 100 * MiB, memory_limit="200MiB") == 100 * MiB
    with pytest.raises(MemoryError):
        await isolated(allocate, 300 * MiB, memory_limit="200MiB")


def native_allocation(n: int) -> None:
    # Native code that lifts the rlimit and then allocates: only the watchdog can stop it.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    buffer = ctypes.create_string_buffer(n)
    ctypes.memset(buffer, 1, n)
    time.sleep(600)


async def test_watchdog_kills_a_native_allocation_past_the_limit() -> None:
    with pytest.raises(MemoryLimitExceeded) as info:
        await isolated(native_allocation, 600 * MiB, memory_limit="200MiB")
    err = info.value
    assert err.limit == 200 * MiB
    assert err.observed > err.limit
    assert err.signal is signal.SIGKILL
    assert "memory_limit of 200.0 MiB" in str(err)
    assert err.report is not None
    assert err.report.signal is signal.SIGKILL
    assert await isolated(pow, 2, 3) == 8


def spin() -> None:
    while True:
        pass


@one_variant
async def test_cpu_limit_stops_a_busy_loop() -> None:
    with pytest.raises(CPULimitExceeded) as info:
        await isolated(spin, cpu_limit=1)
    err = info.value
    assert err.limit == 1
    assert err.signal is signal.SIGXCPU
    assert err.report is not None
    used = err.report.user_time + err.report.system_time
    assert 0.9 <= used < 2.5, used


def spin_ignoring_sigxcpu() -> None:
    signal.signal(signal.SIGXCPU, signal.SIG_IGN)
    spin()


@one_variant
async def test_cpu_limit_holds_when_the_child_ignores_sigxcpu() -> None:
    with pytest.raises(CPULimitExceeded) as info:
        await isolated(spin_ignoring_sigxcpu, cpu_limit=1)
    assert info.value.signal is signal.SIGKILL  # the hard limit, a second later


@one_variant
async def test_cpu_limit_is_not_wall_time() -> None:
    # Sleeping uses no CPU: a 1 s CPU limit does not stop a 1.2 s sleep.
    assert await isolated(time.sleep, 1.2, cpu_limit=1) is None


def ignore_sigterm_then_hang(channel: Channel) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel.send(os.getpid())
    time.sleep(600)


def exit_on_sigterm(channel: Channel) -> None:
    def on_term(*_: object) -> None:
        channel.send("terminated")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    channel.send(os.getpid())
    time.sleep(600)


async def test_kill_grace_sends_sigterm_first(channel: Channel) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: isolated(exit_on_sigterm, channel, kill_grace=30))
        await channel.receive()
        start = time.monotonic()
        tg.cancel_scope.cancel()
    # It exited on SIGTERM, well before the 30 s grace: the call did not wait the grace out.
    assert time.monotonic() - start < 10
    assert await channel.receive() == ["terminated"]


async def test_kill_grace_ends_in_sigkill(channel: Channel) -> None:
    grace = 0.5
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: isolated(ignore_sigterm_then_hang, channel, kill_grace=grace))
        child = psutil.Process(int((await channel.receive())[0]))
        start = time.monotonic()
        tg.cancel_scope.cancel()
    elapsed = time.monotonic() - start
    assert not child.is_running()
    assert grace <= elapsed < grace + 2


async def test_kill_grace_applies_to_timeouts(channel: Channel) -> None:
    start = time.monotonic()
    with pytest.raises(IsolationTimeout):
        await isolated(exit_on_sigterm, channel, timeout=0.5, kill_grace=30)
    assert time.monotonic() - start < 10
    await channel.receive()  # its pid
    assert await channel.receive() == ["terminated"]


def start_grandchild(channel: Channel, then: str) -> None:
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    channel.send(grandchild.pid)
    if then == "raise":
        raise ValueError("after starting a grandchild")
    if then == "hang":
        time.sleep(600)


@pytest.mark.parametrize("outcome", ["success", "raise", "timeout", "cancel"])
async def test_grandchildren_die_with_the_child(channel: Channel, outcome: str) -> None:
    async def call() -> None:
        if outcome == "success":
            await isolated(start_grandchild, channel, "return")
        elif outcome == "raise":
            with pytest.raises(ValueError, match="grandchild"):
                await isolated(start_grandchild, channel, "raise")
        elif outcome == "timeout":
            with pytest.raises(IsolationTimeout):
                await isolated(start_grandchild, channel, "hang", timeout=0.5)
        else:
            await isolated(start_grandchild, channel, "hang")

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        grandchild = psutil.Process(int((await channel.receive())[0]))
        if outcome == "cancel":
            tg.cancel_scope.cancel()
    assert wait_until(lambda: is_gone(grandchild))


async def test_kill_descendants_false_spares_them(channel: Channel) -> None:
    await isolated(start_grandchild, channel, "return", kill_descendants=False)
    grandchild = psutil.Process(int((await channel.receive())[0]))
    try:
        assert grandchild.is_running()
        assert grandchild.status() != psutil.STATUS_ZOMBIE
    finally:
        grandchild.kill()


@pytest.mark.parametrize("size", [10 * MiB, 100 * MiB])
async def test_peak_memory_is_the_childs_own(big_parent: bytes, size: int) -> None:
    # The child inherits 1 GiB resident; it allocates 10 or 100 MiB of its own.
    _, report = await isolated_with_report(allocate, size)
    assert 0.7 * size <= report.peak_memory <= 1.3 * size, report


@pytest.fixture
def mapped_file(tmp_path: Path) -> Iterator[mmap.mmap]:
    """256 MiB of a file, mapped and read, so that it counts in the parent's RSS."""
    path = tmp_path / "data"
    with path.open("wb") as f:
        f.truncate(256 * MiB)
    with path.open("r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        mapped[:] = b"\x03" * len(mapped)
        yield mapped


async def test_peak_memory_with_file_pages_in_the_parent(mapped_file: mmap.mmap) -> None:
    _, report = await isolated_with_report(allocate, 100 * MiB)
    assert 70 * MiB <= report.peak_memory <= 130 * MiB, report


def sleep_then(channel: Channel, gate: Gate) -> str:
    channel.send("started")
    gate.wait()
    return "not killed"


async def test_parent_writing_to_shared_memory_does_not_count_against_the_child(
    channel: Channel, gate: Gate
) -> None:
    # After fork the child shares this buffer. When the parent writes to it, the parent gets
    # new copies and the child's pages become its alone: not memory the child grew by.
    shared = bytearray(b"\x01") * (300 * MiB)
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            assert await isolated(sleep_then, channel, gate, memory_limit="100MiB") == (
                "not killed"
            )

        tg.start_soon(call)
        await channel.receive()
        shared[:] = b"\x02" * len(shared)
        await anyio.sleep(3 * WATCH_INTERVAL)  # the watchdog has looked a few times
        gate.open()


async def test_watchdog_needs_no_worker_thread() -> None:
    # Every worker thread of anyio's default pool is busy: the watchdog must still act.
    release = threading.Event()
    async with anyio.create_task_group() as tg:
        for _ in range(int(anyio.to_thread.current_default_thread_limiter().total_tokens)):
            tg.start_soon(anyio.to_thread.run_sync, release.wait)
        try:
            with anyio.fail_after(5), pytest.raises(MemoryLimitExceeded):
                await isolated(native_allocation, 600 * MiB, memory_limit="200MiB")
        finally:
            release.set()


def spin_then_die(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    os.kill(os.getpid(), signal.SIGKILL)  # from "elsewhere", under the CPU limit


@one_variant
async def test_a_kill_from_elsewhere_is_not_a_cpu_limit() -> None:
    with pytest.raises(ChildCrashed) as info:
        await isolated(spin_then_die, 0.7, cpu_limit=0.5)
    assert not isinstance(info.value, CPULimitExceeded)
    assert info.value.signal is signal.SIGKILL


def term_handler_that_writes(channel: Channel) -> None:
    def on_term(*_: object) -> None:
        os.write(2, b"e" * 200_000 + b"\ngoodbye\n")  # more than a pipe holds
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    os.write(2, b"started\n")
    channel.send("started")
    time.sleep(600)


async def test_output_is_drained_while_the_child_stops(channel: Channel) -> None:
    start = 0.0

    async def call() -> None:
        with pytest.raises(IsolationTimeout) as info:
            await isolated(
                term_handler_that_writes, channel, timeout=1, kill_grace=20, stderr="capture"
            )
        assert info.value.report is not None
        assert info.value.report.stderr is not None
        assert info.value.report.stderr.endswith(b"goodbye\n")

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await channel.receive()
        start = time.monotonic()
    # It left on SIGTERM: the grace of 20 s was not waited out.
    assert time.monotonic() - start < 10


async def test_kill_grace_does_not_block_the_loop(channel: Channel) -> None:
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with anyio.create_task_group() as outer:
        outer.start_soon(ticker)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: isolated(ignore_sigterm_then_hang, channel, kill_grace=0.5))
            await channel.receive()
            tg.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    assert len(gaps) > 20  # it ticked all through the grace
    assert max(gaps) < 0.25


def niceness() -> int:
    return os.nice(0)


async def test_children_run_below_the_parents_priority() -> None:
    mine = os.nice(0)
    assert await isolated(niceness) == min(mine + 10, 19)  # the default
    assert await isolated(niceness, nice=3) == min(mine + 3, 19)
    assert await isolated(niceness, nice=0) == mine
    async with Isolator(nice=0) as iso:
        assert await iso.run(niceness) == mine


@pytest.mark.parametrize(
    ("nice", "error"),
    [(-1, ValueError), (20, ValueError), (1.5, TypeError), (True, TypeError), ("5", TypeError)],
)
async def test_bad_nice_is_refused_before_fork(nice: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="nice must be"):
        await isolated(niceness, nice=nice)  # type: ignore[arg-type]
