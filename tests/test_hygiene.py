"""The child starts clean: nothing of the parent's loop, signals, terminal or fds leaks in."""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator

import anyio
import psutil
import pytest
import sniffio
import trio
import trio.lowlevel
from helpers import Channel, Gate, is_gone, wait_until

from aioisolate import ThreadedForkWarning, _fds, _threads, _watch, isolated
from aioisolate._running import RunningChild
from aioisolate._spawn import fork as fork_spawn

BACKEND_ARGS = {"asyncio": "asyncio", "uvloop": "uvloop", "trio": "trio"}

# Runs a program in a fresh interpreter, on the backend named by its first argument.
PRELUDE = """
import sys, anyio
from aioisolate import isolated
def run(main):
    name = sys.argv[1]
    options = {"use_uvloop": True} if name == "uvloop" else {}
    anyio.run(main, backend="trio" if name == "trio" else "asyncio", backend_options=options)
"""


def run_program(body: str, backend: str) -> subprocess.CompletedProcess[str]:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code, backend],
        capture_output=True,  # stdout is a pipe, so the interpreter buffers it by blocks
        text=True,
        timeout=60,
        check=True,
    )


@pytest.mark.parametrize("backend", BACKEND_ARGS)
def test_buffered_output_atexit_and_finally_are_not_duplicated(backend: str) -> None:
    result = run_program(
        """
        import atexit
        atexit.register(print, "parent-atexit")
        print("parent-buffered-before-fork")  # still in the buffer when we fork

        def work():
            print("child-output")  # never flushed by the function: the runner must
            return 1

        async def main():
            try:
                for _ in range(3):
                    assert await isolated(work) == 1
            finally:
                print("parent-finally")

        run(main)
        """,
        backend,
    )
    lines = result.stdout.splitlines()
    assert lines.count("parent-buffered-before-fork") == 1
    assert lines.count("parent-atexit") == 1
    assert lines.count("parent-finally") == 1
    assert lines.count("child-output") == 3


@pytest.mark.parametrize("backend", BACKEND_ARGS)
def test_child_dies_when_its_parent_is_killed(backend: str) -> None:
    code = PRELUDE + textwrap.dedent(
        """
        import os, time
        def hang():
            print(os.getpid(), flush=True)
            time.sleep(600)
        async def main():
            await isolated(hang)
        run(main)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code, backend], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
        assert wait_until(lambda: is_gone(child))
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def parent_handlers() -> Iterator[None]:
    """Install handlers in the parent, as a server would, and put them back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def signal_state() -> dict[str, object]:
    return {
        "SIGUSR1": signal.getsignal(signal.SIGUSR1),
        "SIGTERM": signal.getsignal(signal.SIGTERM),
        "SIGINT": signal.getsignal(signal.SIGINT),
        "SIGPIPE": signal.getsignal(signal.SIGPIPE),
        "wakeup_fd": signal.set_wakeup_fd(-1),
        "blocked": signal.pthread_sigmask(signal.SIG_BLOCK, []),
    }


@pytest.mark.anyio
@pytest.mark.usefixtures("parent_handlers")
async def test_signal_handlers_reset_to_python_defaults() -> None:
    state = await isolated(signal_state)
    assert state == {
        "SIGUSR1": signal.SIG_DFL,
        "SIGTERM": signal.SIG_DFL,
        "SIGINT": signal.default_int_handler,
        "SIGPIPE": signal.SIG_IGN,
        "wakeup_fd": -1,
        "blocked": signal.pthread_sigmask(signal.SIG_BLOCK, []),  # the parent's own mask
    }


def own_signal_handler() -> bool:
    received = []
    signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    os.kill(os.getpid(), signal.SIGUSR1)
    return received == [1]


@pytest.mark.anyio
async def test_function_may_install_its_own_signal_handlers() -> None:
    assert await isolated(own_signal_handler) is True


@pytest.mark.asyncio
async def test_signal_in_the_child_never_runs_the_parents_loop_handler() -> None:
    loop = asyncio.get_running_loop()
    parent_calls = []
    loop.add_signal_handler(signal.SIGUSR1, parent_calls.append, 1)
    try:
        assert await isolated(own_signal_handler) is True
        # Had the child written to the loop's wakeup fd, the handler would run by now.
        for _ in range(3):
            await asyncio.sleep(0)
        assert parent_calls == []
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)


def process_facts() -> dict[str, object]:
    return {
        "own_group": os.getpgid(0) == os.getpid(),
        "stdin": os.readlink("/proc/self/fd/0"),
        "stdin_reads": os.read(0, 100),
    }


@pytest.mark.anyio
async def test_own_process_group_and_stdin_from_dev_null() -> None:
    assert await isolated(process_facts) == {
        "own_group": True,
        "stdin": "/dev/null",
        "stdin_reads": b"",
    }


def fd_identity(fd: int | str) -> str:
    """What an fd points at; pipes and memory files by inode too, since their names repeat."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    if target.startswith("anon_inode:"):
        return target  # one shared inode for all of a kind: told apart by count below
    return f"{target}#{os.stat(f'/proc/self/fd/{fd}').st_ino}"


def open_fd_targets() -> list[str]:
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(fd_identity(fd))
        except OSError:
            pass
    return targets


@pytest.mark.anyio
async def test_child_does_not_inherit_other_calls_pipes_or_pidfds(
    gate: Gate, channel: Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    own_pipe = []
    real_spawn = fork_spawn._start

    def spawn(*args: object, **kwargs: object) -> RunningChild:
        child = real_spawn(*args, **kwargs)  # type: ignore[arg-type]
        own_pipe.append(fd_identity(child._reader.fd))
        return child

    # epoll fds all read as the same link: the event loop's own are told apart by number.
    epoll = "anon_inode:[eventpoll]"
    loops_own = open_fd_targets().count(epoll)
    async with anyio.create_task_group() as tg:
        tg.start_soon(isolated, announce_then_wait, channel, gate)  # a sibling call, running
        await channel.receive()
        sibling_fds = {fd_identity(fd) for fd in _fds.library_fds}
        assert sibling_fds  # its read end, at least
        monkeypatch.setattr(fork_spawn, "_start", spawn)
        seen = await isolated(open_fd_targets)
        gate.open()
    assert not (sibling_fds - {epoll}) & set(seen)
    assert seen.count(epoll) == loops_own  # none of the sibling call's
    assert "anon_inode:[pidfd]" not in seen
    # Of its own result pipe the child holds one end only, the write end.
    assert seen.count(own_pipe[0]) == 1


def announce_then_wait(channel: Channel, gate: Gate) -> None:
    channel.send("started")
    gate.wait()


def event_loop_state() -> dict[str, object]:
    async def on_asyncio() -> str:
        await asyncio.sleep(0)
        return "asyncio ran"

    async def on_trio() -> str:
        await trio.lowlevel.checkpoint()
        return "trio ran"

    try:
        sniffio.current_async_library()
        library = "still set"
    except sniffio.AsyncLibraryNotFoundError:
        library = "none"
    return {
        "library": library,
        "asyncio.run": asyncio.run(on_asyncio()),
        "trio.run": trio.run(on_trio),
    }


@pytest.mark.anyio
async def test_no_event_loop_state_is_inherited() -> None:
    assert await isolated(event_loop_state) == {
        "library": "none",
        "asyncio.run": "asyncio ran",
        "trio.run": "trio ran",
    }


@pytest.mark.anyio
async def test_user_context_variables_are_inherited() -> None:
    import contextvars

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    request_id.set("req-42")
    assert await isolated(request_id.get) == "req-42"


@pytest.mark.anyio
async def test_busy_background_thread_in_the_parent() -> None:
    stop = threading.Event()
    lock = threading.Lock()
    counter = [0]

    def churn() -> None:
        while not stop.is_set():
            with lock:
                counter[0] += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        results = [await isolated(pow, i, 2) for i in range(30)]
    finally:
        stop.set()
        thread.join()
    assert results == [i * i for i in range(30)]
    assert counter[0] > 0


def test_event_loop_in_a_non_main_thread() -> None:
    results: list[object] = []

    def run_loop() -> None:
        async def main() -> None:
            results.append(await isolated(own_signal_handler))
            results.append(await isolated(pow, 3, 2))

        anyio.run(main)

    thread = threading.Thread(target=run_loop)
    thread.start()
    thread.join()
    assert results == [True, 9]


@pytest.mark.asyncio
async def test_asyncio_current_loop_is_not_the_parents() -> None:
    def current_loop_id() -> int:
        with warnings.catch_warnings():
            # 3.12+ deprecates a current loop made on demand ("There is no current event
            # loop"): the child has none, which is the point.
            warnings.simplefilter("ignore", DeprecationWarning)
            loop = asyncio.get_event_loop()  # must not be the parent's: its selector is shared
        try:
            return id(loop)
        finally:
            loop.close()

    assert await isolated(current_loop_id) != id(asyncio.get_running_loop())


@pytest.mark.anyio
async def test_signals_are_blocked_across_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    masks = []
    real_fork = os.fork

    def fork() -> int:
        masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert await isolated(pow, 2, 2) == 4
    assert masks[0] == signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def faults_of_a_full_collection() -> tuple[int, int]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    gc.collect()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, gc.get_freeze_count()


@pytest.mark.anyio
async def test_a_collection_in_the_child_does_not_copy_the_parents_heap() -> None:
    # What the parent had is frozen in the child: a full collection there skips it, instead of
    # writing to (and so copying) every page of it. 200,000 lists are about 4,000 pages.
    heap = [[i] for i in range(200_000)]
    faults, frozen = await isolated(faults_of_a_full_collection)
    assert frozen >= len(heap)
    assert faults < 1_000


@pytest.mark.anyio
async def test_a_fork_while_another_thread_runs_warns_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_threads, "_warned", False)
    stop = threading.Event()
    busy = threading.Thread(target=stop.wait, name="busy-worker")
    busy.start()
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert await isolated(abs, -1) == 1
            assert await isolated(abs, -2) == 2
        # Once per process, not once per call.
        (warning,) = [w for w in record if issubclass(w.category, ThreadedForkWarning)]
        assert "busy-worker" in str(warning.message)
        assert "zygote mode" in str(warning.message)
    finally:
        stop.set()
        busy.join()


@pytest.mark.anyio
async def test_our_own_threads_do_not_count_as_other_threads(
    monkeypatch: pytest.MonkeyPatch, gate: Gate
) -> None:
    # With the thread watcher, a thread waits for each running child; forks made meanwhile
    # are not forks from a threaded process.
    monkeypatch.setattr(_threads, "_warned", False)

    def wait_at(gate: Gate) -> int:
        channel.send(os.getpid())
        gate.wait()
        return 1

    channel = Channel()
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            async with anyio.create_task_group() as tg:
                limiter = anyio.CapacityLimiter(3)
                for _ in range(3):
                    tg.start_soon(functools.partial(isolated, wait_at, gate, limiter=limiter))
                for _ in range(3):  # each fork after the first while the others run
                    await channel.receive()
                gate.open(3)
    finally:
        channel.close()
    # Other threads may run (an idle worker of trio's thread cache, say), and be named: ours
    # never are.
    named = [str(w.message) for w in record if issubclass(w.category, ThreadedForkWarning)]
    assert not any(_watch.THREAD_PREFIX in message for message in named)
