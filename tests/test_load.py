"""Load and faults: many calls, exhausted resources, children killed from outside.

Bounded in time for CI. AIOISOLATE_SOAK=1 runs the longer soak (ten times the calls).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import time
from collections.abc import Iterator

import anyio
import psutil
import pytest
from helpers import Channel, is_gone, isolated_children, one_variant, wait_until

from aioisolate import ChildCrashed, IsolationError, _protocol, _spill, isolated

pytestmark = pytest.mark.anyio

SOAK = 10 if os.environ.get("AIOISOLATE_SOAK") else 1


def square(x: int) -> int:
    return x * x


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@one_variant
async def test_10_000_sequential_calls_leave_nothing_behind() -> None:
    me = psutil.Process()
    for i in range(200):  # warm up: buffers, caches, the loop's own structures
        await isolated(square, i)
    fds, start = me.num_fds(), rss()
    for i in range(10_000 * SOAK):
        assert await isolated(square, i) == i * i
    assert isolated_children() == []
    assert me.num_fds() == fds
    assert rss() - start < 10 << 20


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Room for a thousand children's pipes and pidfds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@one_variant
@pytest.mark.usefixtures("many_fds")
async def test_1_000_concurrent_calls() -> None:
    me = psutil.Process()
    fds = me.num_fds()
    limiter = anyio.CapacityLimiter(1000)
    results: dict[int, int] = {}
    start = rss()

    async def call(i: int) -> None:
        results[i] = await isolated(square, i, limiter=limiter)

    for _ in range(SOAK):
        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(call, i)
        assert results == {i: i * i for i in range(1000)}
    assert isolated_children() == []
    assert me.num_fds() == fds
    assert rss() - start < 20 << 20


@contextlib.contextmanager
def no_free_fds() -> Iterator[None]:
    """Every fd number the limit allows is taken: the next open fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    fillers = []
    try:
        while True:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        if exc.errno != errno.EMFILE:
            raise
    try:
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_fd_exhaustion_is_clear_and_recoverable() -> None:
    fds = sorted(os.listdir("/proc/self/fd"))
    with no_free_fds(), pytest.raises(IsolationError, match="could not start a child") as info:
        await isolated(square, 3)
    assert sorted(os.listdir("/proc/self/fd")) == fds  # nothing of the failed call is left
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EMFILE
    assert await isolated(square, 3) == 9


@pytest.mark.parametrize("error", [errno.EAGAIN, errno.ENOMEM])
async def test_fork_failing_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    fds = psutil.Process().num_fds()

    def fail() -> int:
        raise OSError(error, os.strerror(error))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fork", fail)
        with pytest.raises(IsolationError, match="could not start a child"):
            await isolated(square, 3)
    assert psutil.Process().num_fds() == fds
    assert await isolated(square, 3) == 9


@one_variant
async def test_cancelled_in_the_middle_of_a_500_mb_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_read = _protocol.FrameReader.read_available
    seen = []

    def read_then_cancel(self: _protocol.FrameReader) -> None:
        real_read(self)
        if self.received > 50 << 20 and not seen:
            seen.append(self.received)
            scope.cancel()  # a quarter of the way in, at most

    monkeypatch.setattr(_protocol.FrameReader, "read_available", read_then_cancel)
    monkeypatch.delattr(os, "memfd_create")  # no spill file: all 500 MB through the pipe
    start = rss()
    with anyio.CancelScope() as scope:
        await isolated(bytes, 500 << 20)
    assert scope.cancelled_caught
    assert seen
    assert seen[0] < 500 << 20
    monkeypatch.undo()
    assert rss() - start < 100 << 20  # the half-read 500 MB buffer went with the call
    assert await isolated(square, 4) == 16


def leave_a_grandchild_holding_the_pipe(channel: Channel) -> str:
    grandchild = os.fork()
    if grandchild == 0:  # it has every fd we have, the result pipe included
        time.sleep(600)
        os._exit(0)
    channel.send(grandchild)
    return "done"


@pytest.mark.parametrize("kill_descendants", [True, False])
async def test_a_grandchild_holding_the_pipe_does_not_hold_up_the_call(
    channel: Channel, kill_descendants: bool
) -> None:
    try:
        with anyio.fail_after(20):  # waiting for EOF would wait for the grandchild: 600 s
            result = await isolated(
                leave_a_grandchild_holding_the_pipe, channel, kill_descendants=kill_descendants
            )
        assert result == "done"
    finally:
        grandchild = psutil.Process(int((await channel.receive())[0]))
        if kill_descendants:
            assert wait_until(lambda: is_gone(grandchild))
        else:
            assert grandchild.is_running()
            grandchild.kill()


def announce_then_hang(channel: Channel) -> None:
    channel.send(os.getpid())
    time.sleep(600)


@one_variant
@pytest.mark.usefixtures("many_fds")
async def test_100_children_killed_at_once_from_outside(channel: Channel) -> None:
    limiter = anyio.CapacityLimiter(100)
    crashes: list[ChildCrashed] = []

    async def call() -> None:
        try:
            await isolated(announce_then_hang, channel, limiter=limiter)
        except ChildCrashed as exc:
            crashes.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(call)
        pids = [int((await channel.receive())[0]) for _ in range(100)]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    assert len(crashes) == 100
    assert {c.signal for c in crashes} == {signal.SIGKILL}
    assert sorted(c.pid for c in crashes) == sorted(pids)


def shared_memory() -> int:
    """Bytes of shared memory (memory files included) in use on the machine."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise LookupError("no Shmem line in /proc/meminfo")


def spill_then_hang(channel: Channel) -> bytes:
    class SealThenHang:
        F_ADD_SEALS = 1033

        def fcntl(self, fd: int, *args: int) -> int:
            channel.send("spilled")  # 500 MB are in the spill file now
            time.sleep(600)
            return 0

    _spill.fcntl = SealThenHang()  # type: ignore[assignment]
    return bytes(500 << 20)


@one_variant
async def test_cancelled_with_a_500_mb_spill_file_written(channel: Channel) -> None:
    before = shared_memory()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(isolated, spill_then_hang, channel)
            await channel.receive()
            during = shared_memory()
            scope.cancel()
    # The child is gone (see no_leaks) and so is the file: its fds were all closed.
    assert during - before > 400 << 20
    assert shared_memory() - before < 100 << 20
