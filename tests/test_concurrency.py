"""Many calls at once: the limiter, a free event loop, and nothing left behind."""

from __future__ import annotations

import itertools
import os
import signal
import time
from functools import partial

import anyio
import anyio.lowlevel
import psutil
import pytest
from helpers import Channel, Gate, isolated_children

from aioisolate import ChildCrashed, Isolator, default_limiter, isolated
from aioisolate._running import RunningChild
from aioisolate._spawn import fork as fork_spawn

pytestmark = [pytest.mark.anyio, pytest.mark.both_modes]


def announce_then_wait(channel: Channel, gate: Gate) -> int:
    channel.send(os.getpid())
    gate.wait()
    return os.getpid()


async def test_default_limiter_is_one_per_loop_sized_to_usable_cpus() -> None:
    limiter = default_limiter()
    assert limiter.total_tokens == len(os.sched_getaffinity(0))
    assert default_limiter() is limiter


async def test_default_limiter_bounds_concurrency(channel: Channel, gate: Gate) -> None:
    limiter = default_limiter()
    calls = limiter.total_tokens + 2
    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(isolated, announce_then_wait, channel, gate)
        for _ in range(int(limiter.total_tokens)):
            await channel.receive()
        # The rest wait for a token, before forking: exactly as many children as tokens.
        assert limiter.borrowed_tokens == limiter.total_tokens
        assert len(isolated_children()) == limiter.total_tokens
        gate.open(calls)


async def test_own_limiter_bounds_concurrency(channel: Channel, gate: Gate) -> None:
    limiter = anyio.CapacityLimiter(3)
    results = []

    async def call() -> None:
        results.append(await isolated(announce_then_wait, channel, gate, limiter=limiter))

    async with anyio.create_task_group() as tg:
        for _ in range(7):
            tg.start_soon(call)
        for _ in range(3):
            await channel.receive()
        assert len(isolated_children()) == 3
        assert limiter.statistics().tasks_waiting == 4
        gate.open(7)
    assert len(set(results)) == 7


async def test_isolator_limiter_and_per_call_override(channel: Channel, gate: Gate) -> None:
    shared = anyio.CapacityLimiter(1)
    other = anyio.CapacityLimiter(5)
    async with Isolator(limiter=shared) as iso, anyio.create_task_group() as tg:
        tg.start_soon(iso.run, announce_then_wait, channel, gate)
        await channel.receive()
        assert shared.borrowed_tokens == 1
        # The isolator's only token is taken, and a per-call limiter still lets this one run.
        tg.start_soon(lambda: iso.run(announce_then_wait, channel, gate, limiter=other))
        await channel.receive()
        assert other.borrowed_tokens == 1
        gate.open(2)


async def test_event_loop_keeps_ticking_while_20_children_run() -> None:
    gaps: list[float] = []
    done = anyio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await anyio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def calls() -> None:
        limiter = anyio.CapacityLimiter(20)
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(lambda: isolated(time.sleep, 1.0, limiter=limiter))
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        tg.start_soon(calls)
    # Any wait on a child that blocked the loop would show as a gap of a second.
    assert len(gaps) > 20
    assert max(gaps) < 0.5, f"the loop stalled for {max(gaps):.3f} s"


def misbehave(i: int) -> int:
    kind = i % 5
    if kind == 1:
        raise ValueError(i)
    if kind == 2:
        os._exit(3)
    if kind == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == 4:
        time.sleep(600)  # cancelled
    return i


async def test_500_mixed_calls_leave_nothing_behind() -> None:
    me = psutil.Process()
    fds_before = me.num_fds()
    outcomes: dict[str, int] = {"ok": 0, "error": 0, "crash": 0, "cancelled": 0}
    limiter = anyio.CapacityLimiter(16)
    # The calls to cancel fork at once, so that every cancellation meets a running child.
    unbounded = anyio.CapacityLimiter(500)

    async def call(i: int) -> None:
        cancel = i % 5 == 4
        with anyio.move_on_after(0.05 if cancel else 60) as scope:
            try:
                result = await isolated(misbehave, i, limiter=unbounded if cancel else limiter)
                assert result == i
                outcomes["ok"] += 1
            except ValueError:
                outcomes["error"] += 1
            except ChildCrashed:
                outcomes["crash"] += 1
        if scope.cancelled_caught:
            outcomes["cancelled"] += 1

    async with anyio.create_task_group() as tg:
        for i in range(500):
            tg.start_soon(call, i)
    assert outcomes == {"ok": 100, "error": 100, "crash": 200, "cancelled": 100}
    assert isolated_children() == []
    assert me.num_fds() == fds_before


@pytest.mark.fork_only(reason="a zygote forks in its own process: there is no fork here to pace")
async def test_a_burst_of_forks_is_paced_one_per_turn_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    turns = 0
    seen_at_fork: list[int] = []
    real_spawn = fork_spawn._start

    def spawn(*args: object, **kwargs: object) -> RunningChild:
        seen_at_fork.append(turns)
        return real_spawn(*args, **kwargs)  # type: ignore[arg-type]

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(fork_spawn, "_start", spawn)
    async with anyio.create_task_group() as ticking:
        ticking.start_soon(count_turns)
        await anyio.lowlevel.checkpoint()
        async with anyio.create_task_group() as tg:
            for _ in range(6):  # all six reach the fork in the same turn
                tg.start_soon(partial(isolated, pow, 2, 2, limiter=anyio.CapacityLimiter(6)))
        ticking.cancel_scope.cancel()
    # Between two forks, the loop's other tasks had turns: never two forks back to back.
    assert len(seen_at_fork) == 6
    assert all(b - a >= 1 for a, b in itertools.pairwise(seen_at_fork)), seen_at_fork
