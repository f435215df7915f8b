"""Cancellation and timeouts: the child's process group is killed and the child reaped first."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import anyio
import psutil
import pytest
from helpers import Channel, is_gone, isolated_children, wait_until

from aioisolate import IsolationError, IsolationTimeout, Isolator, isolated
from aioisolate._running import RunningChild
from aioisolate._spawn import fork as fork_spawn

pytestmark = pytest.mark.both_modes


def report_pids_then_hang(channel: Channel) -> None:
    """Start a grandchild, tell the test both pids, and never return."""
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    channel.send(os.getpid(), grandchild.pid)
    time.sleep(600)


async def started(channel: Channel) -> tuple[psutil.Process, psutil.Process]:
    pid, grandchild_pid = map(int, await channel.receive())
    return psutil.Process(pid), psutil.Process(grandchild_pid)


def assert_all_dead(child: psutil.Process, grandchild: psutil.Process) -> None:
    # The child is reaped before the cancellation reaches us: gone at once, not even a zombie.
    assert not child.is_running()
    # The grandchild belongs to init now; our SIGKILL reaches it a moment later.
    assert wait_until(lambda: is_gone(grandchild))


@pytest.mark.anyio
async def test_cancel_scope_kills_child_and_grandchildren(channel: Channel) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(isolated, report_pids_then_hang, channel)
        child, grandchild = await started(channel)
        tg.cancel_scope.cancel()
    assert_all_dead(child, grandchild)


@pytest.mark.anyio
async def test_fail_after_is_the_timeout_and_kills_the_child(channel: Channel) -> None:
    procs: list[psutil.Process] = []

    async def watch() -> None:
        procs.extend(await started(channel))

    async def call_and_watch() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await isolated(report_pids_then_hang, channel)

    with pytest.raises(TimeoutError) as info, anyio.fail_after(0.5):
        await call_and_watch()
    assert not isinstance(info.value, IsolationError)  # anyio's own, as for any cancellation
    assert_all_dead(*procs)


@pytest.mark.anyio
async def test_timeout_option_raises_isolation_timeout(channel: Channel) -> None:
    procs: list[psutil.Process] = []

    async def watch() -> None:
        procs.extend(await started(channel))

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with pytest.raises(IsolationTimeout) as info:
            await isolated(report_pids_then_hang, channel, timeout=0.5)
    assert info.value.timeout == 0.5
    assert info.value.pid == procs[0].pid
    assert "timeout=0.5" in str(info.value)
    assert_all_dead(*procs)


@pytest.mark.anyio
@pytest.mark.fork_only(
    reason="patches os.fork or the fork spawner in this process, where a zygote-mode call does not fork"
)
async def test_no_fork_when_cancelled_before_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    forks = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())
    with anyio.CancelScope() as scope:
        scope.cancel()
        await isolated(os.getpid)
    assert scope.cancelled_caught
    assert forks == []


@pytest.mark.anyio
@pytest.mark.fork_only(
    reason="patches os.fork or the fork spawner in this process, where a zygote-mode call does not fork"
)
async def test_no_fork_when_cancelled_waiting_for_the_limiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limiter = anyio.CapacityLimiter(1)
    holder = object()
    limiter.acquire_on_behalf_of_nowait(holder)  # the only token is taken
    forks = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())
    with anyio.move_on_after(0.2) as scope:
        await isolated(os.getpid, limiter=limiter)
    limiter.release_on_behalf_of(holder)
    assert scope.cancelled_caught
    assert forks == []


@pytest.mark.anyio
@pytest.mark.fork_only(
    reason="patches os.fork or the fork spawner in this process, where a zygote-mode call does not fork"
)
async def test_cancel_right_after_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    # Cancelled before the child has even set up its process group: still killed and reaped.
    pids = []
    real_spawn = fork_spawn._start

    def spawn_then_cancel(*args: object, **kwargs: object) -> RunningChild:
        child = real_spawn(*args, **kwargs)  # type: ignore[arg-type]
        pids.append(psutil.Process(child.pid))
        scope.cancel()
        return child

    monkeypatch.setattr(fork_spawn, "_start", spawn_then_cancel)
    with anyio.CancelScope() as scope:
        await isolated(time.sleep, 600)
    assert scope.cancelled_caught
    assert not pids[0].is_running()


@pytest.mark.anyio
async def test_leaving_an_isolator_kills_its_running_children(channel: Channel) -> None:
    errors: list[BaseException] = []

    async def call(iso: Isolator) -> None:
        try:
            await iso.run(report_pids_then_hang, channel)
        except IsolationError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        async with Isolator(limiter=anyio.CapacityLimiter(3)) as iso:
            for _ in range(3):
                tg.start_soon(call, iso)
            procs = [await started(channel) for _ in range(3)]
    assert len(errors) == 3
    assert all("Isolator was closed" in str(e) for e in errors)
    for child, grandchild in procs:
        assert_all_dead(child, grandchild)


# asyncio's own ways to cancel, through pytest-asyncio.


@pytest.mark.asyncio
async def test_asyncio_timeout_kills_the_child(channel: Channel) -> None:
    task = asyncio.ensure_future(isolated(report_pids_then_hang, channel))
    procs = await started(channel)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await task
    assert_all_dead(*procs)


@pytest.mark.asyncio
async def test_task_cancel_kills_the_child(channel: Channel) -> None:
    task = asyncio.ensure_future(isolated(report_pids_then_hang, channel))
    procs = await started(channel)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_all_dead(*procs)


@pytest.mark.asyncio
@pytest.mark.fork_only(
    reason="patches os.fork or the fork spawner in this process, where a zygote-mode call does not fork"
)
async def test_task_cancel_in_the_turn_after_fork_kills_the_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # task.cancel() goes through the shield of the turn the fork waits out: the child it just
    # made is killed and reaped there, before anything else runs.
    procs: list[psutil.Process] = []
    real_spawn = fork_spawn._start

    def spawn_then_cancel_task(*args: object, **kwargs: object) -> RunningChild:
        child = real_spawn(*args, **kwargs)  # type: ignore[arg-type]
        procs.append(psutil.Process(child.pid))
        task.cancel()
        return child

    monkeypatch.setattr(fork_spawn, "_start", spawn_then_cancel_task)
    task = asyncio.ensure_future(isolated(time.sleep, 600))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(procs) == 1
    assert not procs[0].is_running()  # reaped: no zombie either
    monkeypatch.undo()
    async with asyncio.timeout(30):
        assert await isolated(pow, 2, 3) == 8  # the next fork was let go


@pytest.mark.asyncio
async def test_cancel_again_during_cleanup_still_reaps(
    channel: Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # task.cancel() goes through anyio's shields. Cancel again at the worst moment, just as
    # the cleanup sends SIGKILL and before it has reaped the child, several times over.
    real_kill = RunningChild.kill
    kills = []

    def kill_and_cancel_again(self: RunningChild) -> None:
        real_kill(self)
        kills.append(1)
        task.cancel()
        asyncio.get_running_loop().call_soon(task.cancel)

    monkeypatch.setattr(RunningChild, "kill", kill_and_cancel_again)
    task = asyncio.ensure_future(isolated(report_pids_then_hang, channel))
    procs = await started(channel)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert kills
    assert_all_dead(*procs)


@pytest.mark.asyncio
async def test_gather_and_task_group_cancel_every_child(channel: Channel) -> None:
    tasks = [asyncio.ensure_future(isolated(report_pids_then_hang, channel)) for _ in range(2)]
    gathered = asyncio.gather(*tasks)
    procs = [await started(channel) for _ in range(2)]
    gathered.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gathered
    # gather() returns as soon as one task is done; each task reaps its own child before it is.
    await asyncio.wait(tasks)
    for p in procs:
        assert_all_dead(*p)

    async def fail_soon() -> None:
        await started(channel)
        await started(channel)
        raise RuntimeError("sibling failed")

    async def task_group() -> None:
        async with asyncio.TaskGroup() as tg:
            for _ in range(2):
                tg.create_task(isolated(report_pids_then_hang, channel))
            tg.create_task(fail_soon())

    with pytest.raises(ExceptionGroup):
        await task_group()
    assert isolated_children() == []
