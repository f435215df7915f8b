"""Zygote mode: what differs from fork mode, and the helper's own robustness.

The behaviour zygote mode shares with fork mode (results, errors, limits, reports,
cancellation, output, streaming, fan-out) is tested by running those modules' tests in zygote
mode too (the "zygote" variant, see conftest.py).
"""

from __future__ import annotations

import errno
import functools
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import numpy as np
import psutil
import pytest
from helpers import Channel, is_gone, one_variant, wait_until

from aioisolate import (
    ChildCrashed,
    IsolationError,
    IsolationTimeout,
    Isolator,
    Zygote,
    ZygoteDied,
    isolated,
    isolated_iter,
    isolated_map,
    isolated_with_report,
    run_isolated,
)
from aioisolate._spawn import zygote as zygote_spawn
from aioisolate._zygote import close_shared

pytestmark = pytest.mark.anyio


@pytest.fixture
async def zygote() -> AsyncIterator[Zygote]:
    async with Zygote(preload=[__name__]) as z:
        yield z


async def test_children_are_forked_by_the_helper(zygote: Zygote) -> None:
    helper = zygote.pid
    assert helper is not None
    assert helper != os.getpid()
    assert psutil.Process(helper).ppid() == os.getpid()
    parent, report = await isolated_with_report(os.getppid, zygote=zygote)
    assert parent == helper
    assert report.pid not in (os.getpid(), helper)
    assert report.exitcode == 0


async def test_isolator_in_zygote_mode_owns_its_helper() -> None:
    async with Isolator(zygote=True) as iso:
        assert iso.zygote is not None
        helper = psutil.Process(iso.zygote.pid)
        assert await iso.run(os.getppid) == helper.pid
        assert await iso.run(os.getppid, zygote=None) == os.getpid()  # a call in fork mode
    assert iso.zygote.pid is None
    assert is_gone(helper)


def imported_by(module: str) -> int:
    return int(importlib.import_module(module).IMPORTED_BY)


async def test_preload_imports_modules_once_in_the_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "preload_probe.py").write_text("import os\nIMPORTED_BY = os.getpid()\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # before the helpers start: they take sys.path
    async with Zygote(preload=["preload_probe"]) as preloaded, Zygote() as plain:
        assert await isolated(imported_by, "preload_probe", zygote=preloaded) == preloaded.pid
        # Not preloaded: each child imports it for itself.
        child, report = await isolated_with_report(imported_by, "preload_probe", zygote=plain)
        assert child == report.pid


async def test_preload_failure_is_a_clear_error_when_the_zygote_opens() -> None:
    with pytest.raises(IsolationError, match="could not start(.|\n)*no_such_module_here"):
        async with Zygote(preload=["no_such_module_here"]):
            pass  # pragma: no cover


def locked(lock: threading.Lock) -> bool:
    return lock.locked()


async def test_unpicklable_function_or_argument_fails_before_anything_runs(
    zygote: Zygote,
) -> None:
    lock = threading.Lock()

    def uses_the_lock() -> bool:
        return lock.locked()

    helper = psutil.Process(zygote.pid)
    with pytest.raises(TypeError, match="uses_the_lock.*could not be pickled.*fork mode") as info:
        await isolated(uses_the_lock, zygote=zygote)
    assert info.value.__cause__ is not None
    with pytest.raises(TypeError, match="could not be pickled.*cannot pickle '_thread.lock'"):
        await isolated(locked, lock, zygote=zygote)
    assert helper.children() == []  # no child was started
    # Fork mode hands the same function its lock by fork.
    assert await isolated(uses_the_lock) is False


def block(channel: Channel, with_grandchild: bool = False) -> None:
    if with_grandchild:
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        channel.send(os.getpid(), grandchild.pid)
    else:
        channel.send(os.getpid())
    time.sleep(600)


async def test_helper_killed_mid_call_fails_the_calls_and_the_next_starts_a_new_helper(
    zygote: Zygote, channel: Channel
) -> None:
    old = zygote.pid
    assert old is not None
    errors: list[ZygoteDied] = []

    async def call(with_grandchild: bool) -> None:
        with pytest.raises(ZygoteDied) as info:
            await isolated(block, channel, with_grandchild, zygote=zygote)
        errors.append(info.value)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, False)
            tg.start_soon(call, True)
            pids = [await channel.receive(), await channel.receive()]
            os.kill(old, signal.SIGKILL)
    children = {int(p[0]) for p in pids}
    grandchild = next(int(p[1]) for p in pids if len(p) == 2)
    assert {e.pid for e in errors} == children
    assert all(e.helper_pid == old for e in errors)
    assert all(isinstance(e, ChildCrashed) for e in errors)
    assert "died while the call ran" in str(errors[0])
    # The children died with their helper, and what they started with them.
    for pid in (*children, grandchild):
        assert wait_until(lambda pid=pid: _gone(pid)), f"process {pid} outlived the helper"
    assert await isolated(os.getppid, zygote=zygote) == zygote.pid != old


def _gone(pid: int) -> bool:
    try:
        return is_gone(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True


async def test_closing_the_zygote_mid_call_kills_the_child(channel: Channel) -> None:
    async with Zygote(preload=[__name__]) as zygote:
        caught: list[ZygoteDied] = []

        async def call() -> None:
            with pytest.raises(ZygoteDied) as info:
                await isolated(block, channel, zygote=zygote)
            caught.append(info.value)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                (child,) = await channel.receive()
                await zygote.aclose()
    assert "the Zygote was closed" in str(caught[0])
    assert _gone(int(child))


_PARENT_SCRIPT = """
import os, time
import anyio
from aioisolate import Zygote, isolated

def block():
    print(os.getpid(), flush=True)  # the child writes to the parent's stdout
    time.sleep(600)

async def main():
    async with Zygote() as zygote:
        print(zygote.pid, flush=True)
        await isolated(block, zygote=zygote)

anyio.run(main)
"""


@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
def test_helper_and_its_children_die_with_the_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_PARENT_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    try:
        helper = int(parent.stdout.readline())
        child = int(parent.stdout.readline())
        assert psutil.Process(child).ppid() == helper
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
    assert wait_until(lambda: _gone(helper))
    assert wait_until(lambda: _gone(child))


async def test_cwd_is_the_callers_at_each_call(
    zygote: Zygote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert await isolated(os.getcwd, zygote=zygote) == str(tmp_path)


async def test_inherited_output_goes_where_the_parent_writes_now(
    zygote: Zygote, capfd: pytest.CaptureFixture[str]
) -> None:
    await isolated(print, "from the zygote's child", zygote=zygote)
    assert "from the zygote's child" in capfd.readouterr().out


def checksum(data: bytes) -> tuple[int, int]:
    return len(data), zlib.crc32(data)


def double_in_place(array: np.ndarray) -> float:
    array *= 2  # arguments are writable, as a forked child's are
    return float(array.sum())


async def test_large_arguments_arrive_whole(zygote: Zygote) -> None:
    one_mib = os.urandom(1 << 20)
    hundred_mib = one_mib * 100
    assert await isolated(checksum, one_mib, zygote=zygote) == checksum(one_mib)
    assert await isolated(checksum, hundred_mib, zygote=zygote) == checksum(hundred_mib)
    array = np.ones(4 << 20)  # 32 MiB, out of band
    assert await isolated(double_in_place, array, zygote=zygote) == 2.0 * array.size
    assert array.sum() == array.size  # the parent's copy is untouched
    many = list(range(200_000))  # a large pickle with no buffer in it: in the file too
    assert await isolated(sum, many, zygote=zygote) == sum(many)


async def test_a_large_argument_is_written_a_slice_at_a_time(
    zygote: Zygote, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.lowlevel.checkpoint()
            ticks += 1

    monkeypatch.setattr(zygote_spawn, "_SLICE", 1 << 20)
    data = bytes(64 << 20)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        assert await isolated(len, data, zygote=zygote) == len(data)
        tg.cancel_scope.cancel()
    # The event loop ran other tasks between the 64 slices.
    assert ticks >= 64


async def test_streaming_in_zygote_mode(zygote: Zygote) -> None:
    async with isolated_iter(range, 5, zygote=zygote) as items:
        assert [item async for item in items] == [0, 1, 2, 3, 4]


def nested_in_fork_mode() -> bool:
    # A call made in a zygote's child is a fork-mode call: forked from that child.
    return anyio.run(isolated, os.getppid) == os.getpid()


async def test_nested_calls_in_a_zygote_child_fork_from_the_child(zygote: Zygote) -> None:
    assert await isolated(nested_in_fork_mode, zygote=zygote) is True


async def test_a_zygote_belongs_to_the_process_that_opened_it(zygote: Zygote) -> None:
    def from_a_forked_child() -> int:
        return anyio.run(functools.partial(isolated, abs, -1, zygote=zygote))

    with pytest.raises(RuntimeError, match="belongs to the process that opened it"):
        await isolated(from_a_forked_child)


async def test_bad_uses_are_clear_errors(zygote: Zygote) -> None:
    fresh = Zygote()
    with pytest.raises(RuntimeError, match="async with Zygote"):
        await isolated(abs, -1, zygote=fresh)
    with pytest.raises(RuntimeError, match="entered only once"):
        async with zygote:
            pass  # pragma: no cover
    with pytest.raises(TypeError, match="list of module names"):
        Zygote(preload="numpy")
    with pytest.raises(TypeError, match="must be a Zygote"):
        await isolated(abs, -1, zygote="yes")  # type: ignore[typeddict-item]
    with pytest.raises(ValueError, match="pass_fds"):
        await isolated(abs, -1, zygote=zygote, close_fds=True, pass_fds=[0])
    with pytest.raises(ValueError, match="mode must be"):
        Isolator(mode="spawn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="leave out zygote="):
        Isolator(mode="zygote", zygote=zygote)
    with pytest.raises(ValueError, match="preload= is for zygote=True"):
        Isolator(preload=["json"])
    with pytest.raises(ValueError, match="preload= is for zygote=True"):
        Isolator(preload=["json"], zygote=zygote)
    closed = Zygote()
    async with closed:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        await isolated(abs, -1, zygote=closed)


def chatter(stop: threading.Event, log: logging.Logger) -> None:
    # Holds, over and over, the locks a forked child would need: stdout's and stderr's
    # buffers and the logging handler's.
    while not stop.is_set():
        print("thread", end="\r", flush=True)
        log.warning("thread")


def work(i: int) -> int:
    print("child", i, flush=True)
    logging.getLogger("aioisolate-test-busy").warning("child %d", i)
    return i


@one_variant
async def test_a_big_threaded_parent_runs_200_zygote_calls_without_deadlock() -> None:
    big = bytearray(2 << 30)
    big[::4096] = b"\x01" * len(range(0, len(big), 4096))  # every page resident
    assert psutil.Process().memory_info().rss > 2 << 30
    log = logging.getLogger("aioisolate-test-busy")
    handler = logging.StreamHandler(sys.stderr)
    log.addHandler(handler)
    stop = threading.Event()
    thread = threading.Thread(target=chatter, args=(stop, log))
    thread.start()
    try:
        async with Zygote(preload=[__name__]) as zygote:
            limiter = anyio.CapacityLimiter(4)
            done: list[int] = []

            async def call(i: int) -> None:
                done.append(await isolated(work, i, zygote=zygote, limiter=limiter))

            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    for i in range(200):
                        tg.start_soon(call, i)
        assert sorted(done) == list(range(200))
    finally:
        stop.set()
        thread.join()
        log.removeHandler(handler)
        del big


def sleep_long(padding: bytes) -> None:
    time.sleep(600)


async def test_many_calls_at_once_fill_the_socket_and_all_go_through(zygote: Zygote) -> None:
    # 150 requests of 2 KB and 32 of 16 KB do not fit in the socket at once: calls wait
    # their turn to send, together.
    limiter = anyio.CapacityLimiter(1000)
    results: list[int] = []

    async def call(size: int) -> None:
        results.append(await isolated(len, bytes(size), zygote=zygote, limiter=limiter))

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(150):
                tg.start_soon(call, 2_000)
            for _ in range(32):
                tg.start_soon(call, 16_000)
    assert sorted(results) == [2_000] * 150 + [16_000] * 32


async def test_kills_get_through_while_requests_queue_up(zygote: Zygote) -> None:
    # Each 60 KB request takes much of the socket; their timeouts' kills must not wait behind
    # the requests still queued, nor be dropped.
    limiter = anyio.CapacityLimiter(100)
    timed_out = 0

    async def call() -> None:
        nonlocal timed_out
        with pytest.raises(IsolationTimeout):
            await isolated(sleep_long, bytes(60_000), zygote=zygote, limiter=limiter, timeout=0.5)
        timed_out += 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(12):
                tg.start_soon(call)
    assert timed_out == 12


async def test_a_deleted_working_directory_is_not_an_error(
    zygote: Zygote, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    # The child stays in the helper's working directory, as it cannot enter the caller's.
    assert await isolated(abs, -3, zygote=zygote) == 3


async def test_a_request_the_helper_cannot_serve_fails_alone(zygote: Zygote) -> None:
    helper = psutil.Process(zygote.pid)
    limits = helper.rlimit(psutil.RLIMIT_NOFILE)
    helper.rlimit(psutil.RLIMIT_NOFILE, (helper.num_fds(), limits[1]))  # no fd to spare
    try:
        with pytest.raises(IsolationError, match="could not start a child process"):
            await isolated(abs, -1, zygote=zygote)
    finally:
        helper.rlimit(psutil.RLIMIT_NOFILE, limits)
    assert zygote.pid == helper.pid  # it went on serving
    assert await isolated(abs, -2, zygote=zygote) == 2


async def test_a_request_too_large_for_the_socket(zygote: Zygote) -> None:
    # With the payload inline the request would not fit: it goes in the file instead.
    env = {f"VARIABLE_{i}": f"{i:05d}" * 20 for i in range(1500)}  # about 170 KB
    assert await isolated(len, bytes(60_000), zygote=zygote, env=env) == 60_000
    # What cannot move to the file is a clear error.
    huge = {f"VARIABLE_{i}": f"{i:05d}" * 200 for i in range(2000)}  # about 2 MB
    with pytest.raises(IsolationError, match="more than its socket carries|Message too long"):
        await isolated(abs, -1, zygote=zygote, env=huge)


def length_under_limit(data: bytes) -> int:
    return len(data)


async def test_arguments_are_not_counted_against_the_memory_limit(zygote: Zygote) -> None:
    data = bytes(80 << 20)
    # As in fork mode, the child starts with its arguments: the limit is for what it adds.
    assert await isolated(length_under_limit, data, zygote=zygote, memory_limit="50MiB") == len(
        data
    )
    assert await isolated(length_under_limit, data, memory_limit="50MiB") == len(data)


class Interrupt(BaseException):
    """Stands in for KeyboardInterrupt, which would also stop pytest itself."""


async def test_an_interrupt_right_after_the_request_is_sent_kills_the_child(
    zygote: Zygote, monkeypatch: pytest.MonkeyPatch
) -> None:
    helper = psutil.Process(zygote.pid)
    real_set_blocking = os.set_blocking
    sent: list[int] = []

    def interrupted(fd: int, blocking: bool) -> None:
        real_set_blocking(fd, blocking)
        if not sent:
            sent.append(fd)
            raise Interrupt

    monkeypatch.setattr(os, "set_blocking", interrupted)
    with pytest.raises(Interrupt):
        await isolated(time.sleep, 600, zygote=zygote)
    monkeypatch.undo()
    assert sent
    # The helper serves requests in order: once this call is done, it has forked the first.
    assert await isolated(abs, -1, zygote=zygote) == 1
    # That child was killed at once, and reaped, not left to sleep.
    assert wait_until(lambda: helper.children() == [])


# One spelling for zygote mode: zygote= a Zygote, or True for the scope's own.


@pytest.fixture
async def shared_zygote() -> AsyncIterator[None]:
    """Calls with zygote=True outside an Isolator start this process's shared helper: end it
    after the test, as the process's exit would."""
    try:
        yield
    finally:
        await close_shared()


async def test_zygote_true_outside_an_isolator_shares_one_helper(shared_zygote: None) -> None:
    first = await isolated(os.getppid, zygote=True)
    assert first != os.getpid()
    helper = psutil.Process(first)
    assert helper.ppid() == os.getpid()
    assert await isolated(os.getppid, zygote=True) == first
    assert [item async for item in isolated_iter(parent_pids, 2, zygote=True)] == [first] * 2
    async with isolated_map(os_getppid_of, range(3), zygote=True) as results:
        assert [pid async for pid in results] == [first] * 3
    await close_shared()
    assert is_gone(helper)
    # The next call starts another.
    again = await isolated(os.getppid, zygote=True)
    assert again not in (first, os.getpid())


def parent_pids(n: int) -> Iterator[int]:
    for _ in range(n):
        yield os.getppid()


def os_getppid_of(_: int) -> int:
    return os.getppid()


async def test_zygote_true_in_an_isolator_is_its_own(shared_zygote: None) -> None:
    async with Isolator(zygote=True) as iso:
        assert iso.zygote is not None
        own = iso.zygote.pid
        assert await iso.run(os.getppid) == own
        assert await iso.run(os.getppid, zygote=True) == own
    async with Isolator() as iso:  # a fork-mode isolator: True is the process's shared helper
        assert iso.zygote is None
        shared = await iso.run(os.getppid, zygote=True)
        assert shared not in (own, os.getpid())
        assert await iso.run(os.getppid) == os.getpid()


async def test_zygote_false_is_fork_mode(zygote: Zygote) -> None:
    assert await isolated(os.getppid, zygote=False) == os.getpid()
    async with Isolator(zygote=zygote) as iso:
        assert await iso.run(os.getppid, zygote=False) == os.getpid()


async def test_mode_zygote_is_deprecated_and_still_works() -> None:
    with pytest.warns(DeprecationWarning, match=r"Isolator\(zygote=True\)"):
        iso = Isolator(mode="zygote")
    async with iso:
        assert iso.zygote is not None
        assert await iso.run(os.getppid) == iso.zygote.pid
    with pytest.warns(DeprecationWarning, match="fork mode"):
        Isolator(mode="fork")


async def test_a_shared_helper_that_cannot_start_is_tried_again(
    shared_zygote: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.socketpair

    def out_of_fds(*args: object) -> object:
        monkeypatch.setattr(socket, "socketpair", real)  # once
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "socketpair", out_of_fds)
    with pytest.raises(IsolationError, match="could not start a child process"):
        await isolated(abs, -1, zygote=True)
    assert await isolated(abs, -2, zygote=True) == 2


def fds_survive_a_nested_shared_call(count: int) -> bool:
    """In a fork-mode child of a parent with a shared zygote: open fds (taking the numbers the
    inherited zygote's sockets had), start the child's own shared zygote, and see that none
    of ours was closed by the inherited one going away."""
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]
    try:
        assert run_isolated(os.getppid, zygote=True) != os.getpid()
        anyio.run(close_shared)
        return all(os.fstat(fd) is not None for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
async def test_a_forked_child_leaves_its_parents_shared_helper_alone(shared_zygote: None) -> None:
    helper = await isolated(os.getppid, zygote=True)
    assert await isolated(fds_survive_a_nested_shared_call, 32) is True
    # The parent's shared helper serves on.
    assert await isolated(os.getppid, zygote=True) == helper


async def test_a_helper_that_cannot_be_replaced_is_retired_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with Zygote() as zygote:
        assert await isolated(abs, -1, zygote=zygote) == 1
        first = psutil.Process(zygote.pid)
        first.kill()
        assert wait_until(lambda: is_gone(first))  # dead, and left for the zygote to reap
        real = zygote._start_helper

        def fails_once() -> object:
            monkeypatch.setattr(zygote, "_start_helper", real)
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

        monkeypatch.setattr(zygote, "_start_helper", fails_once)
        with pytest.raises(IsolationError, match="could not start a child process"):
            await isolated(abs, -2, zygote=zygote)
        assert zygote.pid is None
        assert await isolated(abs, -3, zygote=zygote) == 3
        assert zygote.pid not in (None, first.pid)
