"""Watching and reaping: pidfd or the thread fallback, and never anyone else's children."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import anyio
import psutil
import pytest

from aioisolate import ChildCrashed, IsolationError, _watch, isolated, isolated_with_report

pytestmark = [pytest.mark.anyio, pytest.mark.both_modes]


@pytest.fixture
def watchers_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    used: list[str] = []
    real_watch = _watch.watch

    def watch(pid: int, mechanism: _watch.Mechanism, registry: set[int]) -> _watch.ChildWatcher:
        watcher = real_watch(pid, mechanism, registry)
        used.append(type(watcher).__name__)
        return watcher

    monkeypatch.setattr(_watch, "watch", watch)
    return used


@pytest.mark.fork_only(reason="about the watchers of children forked here")
async def test_the_forced_watcher_is_used(child_watcher: str, watchers_used: list[str]) -> None:
    assert await isolated(pow, 2, 5) == 32
    assert watchers_used == [{"pidfd": "PidfdWatcher", "thread": "ThreadWatcher"}[child_watcher]]


@pytest.mark.fork_only(reason="about the watchers of children forked here")
async def test_thread_watcher_when_pidfds_are_not_allowed(
    monkeypatch: pytest.MonkeyPatch, watchers_used: list[str]
) -> None:
    monkeypatch.delenv(_watch.ENV_VAR)
    monkeypatch.setattr(_watch, "pidfd_works", lambda: False)
    assert await isolated(pow, 2, 5) == 32
    assert watchers_used == ["ThreadWatcher"]


@pytest.mark.fork_only(reason="about the watchers of children forked here")
async def test_pidfd_open_failing_after_fork_kills_and_reaps_the_child(
    monkeypatch: pytest.MonkeyPatch, watchers_used: list[str]
) -> None:
    monkeypatch.delenv(_watch.ENV_VAR)
    forked = []
    real_fork = os.fork

    def fork() -> int:
        pid = real_fork()
        if pid:
            forked.append(psutil.Process(pid))
        return pid

    def out_of_fds(pid: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(os, "pidfd_open", out_of_fds)
    with pytest.raises(IsolationError, match="could not start a child.*Too many open files"):
        await isolated(pow, 2, 5)
    assert watchers_used == []
    assert not forked[0].is_running()  # killed and reaped without a watcher


async def test_bad_watcher_setting_fails_before_fork(
    monkeypatch: pytest.MonkeyPatch, watchers_used: list[str]
) -> None:
    monkeypatch.setenv(_watch.ENV_VAR, "kqueue")
    with pytest.raises(ValueError, match="AIOISOLATE_CHILD_WATCHER='kqueue'"):
        await isolated(pow, 2, 5)
    monkeypatch.setenv(_watch.ENV_VAR, "pidfd")
    monkeypatch.setattr(_watch, "pidfd_works", lambda: False)
    with pytest.raises(RuntimeError, match="does not allow pidfds"):
        await isolated(pow, 2, 5)
    assert watchers_used == []


def test_pidfd_probe_on_this_machine() -> None:
    # Linux 5.3+ is what we test on; the thread watcher is exercised by forcing it.
    assert _watch.pidfd_works()


@pytest.fixture
def sigchld_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGCHLD, previous)


@pytest.mark.usefixtures("sigchld_ignored")
async def test_result_survives_the_kernel_reaping_our_child() -> None:
    # With SIGCHLD ignored the kernel reaps children itself: the status is lost, the result
    # that already arrived is not.
    assert await isolated(pow, 3, 3) == 27


@pytest.mark.usefixtures("sigchld_ignored")
@pytest.mark.fork_only(reason="a stray waitpid(-1) here cannot reap a zygote's children")
async def test_crash_with_unknown_status() -> None:
    with pytest.raises(ChildCrashed, match="status is unknown") as info:
        await isolated(os._exit, 4)
    assert info.value.exitcode is None
    assert info.value.signal is None


async def test_a_stray_waitpid_minus_one_does_not_break_calls() -> None:
    stop = threading.Event()
    stolen = []

    def steal() -> None:
        while not stop.is_set():
            try:
                stolen.append(os.waitpid(-1, os.WNOHANG)[0])
            except ChildProcessError:
                pass
            stop.wait(0.0005)

    thief = threading.Thread(target=steal)
    thief.start()
    try:
        results = [await isolated(pow, i, 2) for i in range(40)]
    finally:
        stop.set()
        thief.join()
    assert results == [i * i for i in range(40)]


async def test_other_libraries_children_are_left_to_them() -> None:
    async def run_process(code: int) -> int:
        result = await anyio.run_process(
            [sys.executable, "-c", f"raise SystemExit({code})"], check=False
        )
        return result.returncode

    codes: dict[int, int] = {}
    squares: dict[int, int] = {}

    async def ours(i: int) -> None:
        squares[i] = await isolated(pow, i, 2)

    async def theirs(i: int) -> None:
        codes[i] = await run_process(i)

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(ours, i)
            tg.start_soon(theirs, i)
    assert codes == {i: i for i in range(6)}
    assert squares == {i: i * i for i in range(6)}


@pytest.mark.asyncio
async def test_asyncio_subprocesses_beside_isolated_calls() -> None:
    async def theirs(code: int) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", f"raise SystemExit({code})"
        )
        return await proc.wait()

    def blocking_subprocess(code: int) -> int:
        return subprocess.run([sys.executable, "-c", f"raise SystemExit({code})"]).returncode

    results = await asyncio.gather(
        *(theirs(i) for i in range(4)),
        *(isolated(pow, i, 2) for i in range(4)),
        *(asyncio.to_thread(blocking_subprocess, i + 10) for i in range(2)),
    )
    assert results == [0, 1, 2, 3, 0, 1, 4, 9, 10, 11]


@pytest.mark.fork_only(reason="about the watchers of children forked here")
async def test_a_child_reaped_by_someone_else_before_it_is_watched(
    monkeypatch: pytest.MonkeyPatch, child_watcher: str
) -> None:
    # The child exits at once and a stray waitpid(-1) takes it before the parent opens its
    # pidfd: the result is in the pipe all the same; the exit status is unknown.
    if child_watcher != "pidfd":
        pytest.skip("the thread watcher's waitid() takes a reaped child as exited already")
    real_open = os.pidfd_open

    def reaped_first(pid: int, flags: int = 0) -> int:
        os.waitpid(pid, 0)  # as a stray reaper would
        return real_open(pid, flags)  # ProcessLookupError: not even a zombie now

    monkeypatch.setattr(os, "pidfd_open", reaped_first)
    value, report = await isolated_with_report(pow, 3, 2)
    assert value == 9
    assert report.exitcode is None
