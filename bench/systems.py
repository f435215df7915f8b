"""The systems under test: one adapter each, all driven through the same small `Runner`.

Every adapter is awaited from the event loop named by its `System.loop`, except the floors,
which are plain blocking functions called from that loop without ever yielding to it. Peers
run with their own defaults, except the concurrency cap a scenario sets. A peer's module is
imported only when its adapter is opened, so a worker loads nothing it does not measure.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import pickle
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from . import tasks

if TYPE_CHECKING:
    import aioisolate

Loop = Literal["asyncio", "uvloop", "trio"]
Role = Literal["ours", "floor", "peer"]

# Where the orchestrator puts the compiled C floor (bench/floor.c).
FLOOR_BIN_ENV = "BENCH_FLOOR_BIN"


def cpus() -> int:
    """The CPUs this process may run on: the default concurrency of most systems."""
    return len(os.sched_getaffinity(0))


class Runner:
    """One system opened for one measurement: runs calls and fan-outs of `bench.tasks`."""

    # Calls kept in flight per unit of cap by the generic fan-out. Pools queue their work, so
    # they get two per worker: a worker never waits for the parent to hand it the next task.
    lanes_per_slot = 1

    def __init__(self, cap: int | None) -> None:
        self.cap = cap

    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args)`` through the system and return its result."""
        raise NotImplementedError

    async def map(self, func: Callable[[Any], Any], inputs: Iterator[Any]) -> list[Any]:
        """Run ``func(item)`` for every item, ``cap`` at a time; the results in any order.

        Lanes pull from the one shared iterator, so an iterator that stops early (at a
        deadline) ends the fan-out after the calls in flight.
        """
        results: list[Any] = []

        async def lane() -> None:
            for item in inputs:
                results.append(await self.call(func, item))

        async with anyio.create_task_group() as tg:
            for _ in range((self.cap or cpus()) * self.lanes_per_slot):
                tg.start_soon(lane)
        return results

    async def raw(self, nbytes: int) -> bytearray:
        """Receive ``nbytes`` raw bytes from a child (the raw pipe floor only)."""
        raise NotImplementedError

    def timed(self, calls: int, resident_mib: int, hugepages: bool) -> list[float]:
        """Per-call times in µs measured by the system itself (the C floor only)."""
        raise NotImplementedError


@dataclass(frozen=True)
class System:
    """A system under test, as the tables name it."""

    name: str
    title: str
    isolated: bool  # every call gets a process of its own, which ends with the call
    loop: Loop
    role: Role
    open: Callable[[int | None], AbstractAsyncContextManager[Runner]]
    # The call forks the measuring process itself, so its cost grows with the parent's size.
    forks_parent: bool = False
    # Kept in quick mode: cheap to start, or needed by the ratios.
    quick: bool = True
    note: str = ""


# --- aioisolate ------------------------------------------------------------------------------


class AioisolateRunner(Runner):
    def __init__(self, cap: int | None) -> None:
        super().__init__(cap)
        # No cap means default settings: no limiter argument at all (`default_limiter`).
        self.options: dict[str, Any] = (
            {} if cap is None else {"limiter": anyio.CapacityLimiter(cap)}
        )

    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        import aioisolate

        return await aioisolate.isolated(func, *args, **self.options)

    async def map(self, func: Callable[[Any], Any], inputs: Iterator[Any]) -> list[Any]:
        import aioisolate

        async with aioisolate.isolated_map(func, inputs, ordered=False, **self.options) as results:
            return [value async for value in results]


@asynccontextmanager
async def open_aioisolate(cap: int | None) -> AsyncIterator[Runner]:
    yield AioisolateRunner(cap)


class ZygoteRunner(AioisolateRunner):
    """aioisolate in zygote mode: every call forked by the one helper the runner opened."""

    def __init__(self, cap: int | None, zygote: aioisolate.Zygote) -> None:
        super().__init__(cap)
        self.options["zygote"] = zygote


@asynccontextmanager
async def open_aioisolate_zygote(cap: int | None) -> AsyncIterator[Runner]:
    import aioisolate

    # Opened once per worker, before anything is measured, as an application would at its
    # start. The helper imports the tasks' module first: a function from a module it lacks
    # would be imported again in every child, a cost no real use of preload= pays.
    async with aioisolate.Zygote(preload=[tasks.__name__]) as zygote:
        yield ZygoteRunner(cap, zygote)


# --- the floors ------------------------------------------------------------------------------


def _fork_child(produce: Callable[[], bytes]) -> tuple[int, int]:
    """Fork a child that writes what ``produce()`` returns to a pipe; its pid and read end."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_fd)
            _write_all(write_fd, produce())
            status = 0
        finally:
            os._exit(status)
    os.close(write_fd)
    return pid, read_fd


def _pickled(func: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[], bytes]:
    return lambda: pickle.dumps(func(*args), pickle.HIGHEST_PROTOCOL)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_result(read_fd: int) -> Any:
    chunks = []
    while chunk := os.read(read_fd, 1 << 16):
        chunks.append(chunk)
    os.close(read_fd)
    return pickle.loads(b"".join(chunks))


def _check_exit(pid: int, status: int) -> None:
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"floor child {pid} failed: status {status}")


def fork_call(func: Callable[..., Any], *args: Any) -> Any:
    """The Python floor: fork, the child pickles the result into a pipe, read, reap."""
    pid, read_fd = _fork_child(_pickled(func, args))
    value = _read_result(read_fd)
    _check_exit(*os.waitpid(pid, 0))
    return value


def fork_map(func: Callable[[Any], Any], inputs: Iterator[Any], cap: int) -> list[Any]:
    """The Python floor's fan-out: ``cap`` children alive, the next forked as one is reaped.

    It reaps with ``waitpid(-1)``: nothing else forks in a worker measuring the floor. The
    results are smaller than a pipe's buffer, so a child never blocks writing before it exits,
    and its pipe is read once it is reaped.
    """
    running: dict[int, int] = {}
    results = []
    for item in inputs:
        if len(running) == cap:
            pid, status = os.waitpid(-1, 0)
            _check_exit(pid, status)
            results.append(_read_result(running.pop(pid)))
        pid, read_fd = _fork_child(_pickled(func, (item,)))
        running[pid] = read_fd
    while running:
        pid, status = os.waitpid(-1, 0)
        _check_exit(pid, status)
        results.append(_read_result(running.pop(pid)))
    return results


def raw_pipe(nbytes: int) -> bytearray:
    """The raw pipe floor: the child writes ``nbytes`` to a pipe of the default size, and the
    parent reads them into a bytearray allocated before the fork; no pickle on either side."""
    buffer = bytearray(nbytes)
    pid, read_fd = _fork_child(lambda: tasks.payload("bytes", nbytes))
    view = memoryview(buffer)
    with open(read_fd, "rb", buffering=0) as pipe:
        got = 0
        while got < nbytes:
            n = pipe.readinto(view[got:])
            if not n:
                raise EOFError(f"the floor child sent {got} of {nbytes} bytes")
            got += n
    view.release()
    _check_exit(*os.waitpid(pid, 0))
    return buffer


class PythonFloorRunner(Runner):
    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        return fork_call(func, *args)

    async def map(self, func: Callable[[Any], Any], inputs: Iterator[Any]) -> list[Any]:
        return fork_map(func, inputs, self.cap or cpus())

    async def raw(self, nbytes: int) -> bytearray:
        return raw_pipe(nbytes)


@asynccontextmanager
async def open_python_floor(cap: int | None) -> AsyncIterator[Runner]:
    yield PythonFloorRunner(cap)


class CFloorRunner(Runner):
    def timed(self, calls: int, resident_mib: int, hugepages: bool) -> list[float]:
        binary = os.environ.get(FLOOR_BIN_ENV)
        if not binary or not Path(binary).is_file():
            raise RuntimeError(f"the C floor is not built (${FLOOR_BIN_ENV} unset or missing)")
        args = [binary, str(calls), str(resident_mib), "1" if hugepages else "0"]
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        return [ns / 1e3 for ns in json.loads(out)]


@asynccontextmanager
async def open_c_floor(cap: int | None) -> AsyncIterator[Runner]:
    yield CFloorRunner(cap)


# --- multiprocessing, concurrent.futures -----------------------------------------------------


async def _readable(fd: int) -> None:
    """Wait until ``fd`` is readable, through the asyncio loop's ``add_reader``."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _send_result(writer: Connection, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    writer.send(func(*args))
    writer.close()


class MultiprocessingRunner(Runner):
    """A fork-context ``Process`` per call with a ``Pipe``, both awaited with add_reader."""

    context = multiprocessing.get_context("fork")

    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        reader, writer = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_send_result, args=(writer, func, args))
        try:
            process.start()
            writer.close()
            await _readable(reader.fileno())
            # recv() reads the whole message at once: a large result blocks the loop here.
            value = reader.recv()
            await _readable(process.sentinel)
            process.join()
        finally:
            reader.close()
            if process.is_alive():
                process.kill()
                process.join()
        return value


@asynccontextmanager
async def open_multiprocessing(cap: int | None) -> AsyncIterator[Runner]:
    yield MultiprocessingRunner(cap)


class ExecutorRunner(Runner):
    """A ``concurrent.futures`` executor awaited with ``loop.run_in_executor``."""

    lanes_per_slot = 2

    def __init__(self, cap: int | None, executor: Any) -> None:
        super().__init__(cap)
        self.executor = executor

    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, func, *args)


@asynccontextmanager
async def open_pool_forkserver(cap: int | None) -> AsyncIterator[Runner]:
    from concurrent.futures import ProcessPoolExecutor

    # Fork is refused with max_tasks_per_child (a forked worker would inherit the pool's
    # threads); forkserver is the cheapest start method left.
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(cap, mp_context=context, max_tasks_per_child=1) as executor:
        yield ExecutorRunner(cap, executor)


@asynccontextmanager
async def open_pool_reused(cap: int | None) -> AsyncIterator[Runner]:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cap) as executor:
        yield ExecutorRunner(cap, executor)


@asynccontextmanager
async def open_loky(cap: int | None) -> AsyncIterator[Runner]:
    import loky

    executor = loky.get_reusable_executor(max_workers=cap or cpus())
    try:
        yield ExecutorRunner(cap, executor)
    finally:
        executor.shutdown(wait=True)


# --- pebble, aiomultiprocess -----------------------------------------------------------------


class PebbleRunner(Runner):
    """pebble's process decorators, applied once per function."""

    def __init__(self, cap: int | None, decorate: Callable[[Any], Any], wrap: bool) -> None:
        super().__init__(cap)
        self.decorate = decorate
        self.wrap = wrap  # concurrent.futures futures need wrapping for asyncio
        self.decorated: dict[Callable[..., Any], Any] = {}

    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        decorated = self.decorated.get(func)
        if decorated is None:
            decorated = self.decorated[func] = self.decorate(func)
        future = decorated(*args)
        return await (asyncio.wrap_future(future) if self.wrap else future)


@asynccontextmanager
async def open_pebble_concurrent(cap: int | None) -> AsyncIterator[Runner]:
    import pebble.concurrent

    yield PebbleRunner(cap, pebble.concurrent.process, wrap=True)


@asynccontextmanager
async def open_pebble_asynchronous(cap: int | None) -> AsyncIterator[Runner]:
    import pebble.asynchronous

    yield PebbleRunner(cap, pebble.asynchronous.process, wrap=False)


class AiomultiprocessRunner(Runner):
    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        import aiomultiprocess

        return await aiomultiprocess.Worker(target=tasks.call_async, args=(func, *args))


@asynccontextmanager
async def open_aiomultiprocess(cap: int | None) -> AsyncIterator[Runner]:
    yield AiomultiprocessRunner(cap)


# --- anyio, trio-parallel --------------------------------------------------------------------


class AnyioProcessRunner(Runner):
    lanes_per_slot = 2  # a pool: see Runner

    def __init__(self, cap: int | None) -> None:
        super().__init__(cap)
        self.limiter = None if cap is None else anyio.CapacityLimiter(cap)

    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        import anyio.to_process

        return await anyio.to_process.run_sync(func, *args, limiter=self.limiter)


@asynccontextmanager
async def open_anyio_process(cap: int | None) -> AsyncIterator[Runner]:
    yield AnyioProcessRunner(cap)


class TrioParallelRunner(Runner):
    lanes_per_slot = 2  # a pool, for the cached workers: see Runner

    def __init__(self, cap: int | None, run_sync: Callable[..., Any]) -> None:
        import trio

        super().__init__(cap)
        self.run_sync = run_sync
        self.limiter = trio.CapacityLimiter(cap or cpus())

    async def call(self, func: Callable[..., Any], *args: Any) -> Any:
        return await self.run_sync(func, *args, limiter=self.limiter)


@asynccontextmanager
async def open_trio_parallel(cap: int | None) -> AsyncIterator[Runner]:
    import trio_parallel

    yield TrioParallelRunner(cap, trio_parallel.run_sync)


@asynccontextmanager
async def open_trio_parallel_retire(cap: int | None) -> AsyncIterator[Runner]:
    import trio_parallel

    async with trio_parallel.open_worker_context(retire=tasks.retire_always) as context:
        yield TrioParallelRunner(cap, context.run_sync)


# --- the registry ----------------------------------------------------------------------------

_ALL = [
    # ours: forks the parent per call
    System("aioisolate", "aioisolate", True, "asyncio", "ours", open_aioisolate,
           forks_parent=True),
    System("aioisolate-uvloop", "aioisolate on uvloop", True, "uvloop", "ours", open_aioisolate,
           forks_parent=True),
    System("aioisolate-trio", "aioisolate on trio", True, "trio", "ours", open_aioisolate,
           forks_parent=True),
    # ours: a helper started once per worker forks the children
    System("aioisolate-zygote", "aioisolate, zygote mode", True, "asyncio", "ours",
           open_aioisolate_zygote,
           note="forked by a helper started once per worker; function and arguments pickled"),
    # the floors: blocking, no event loop work
    System("c-floor", "C floor: fork, _exit, waitpid", True, "asyncio", "floor", open_c_floor,
           forks_parent=True, note="times itself in C; returns nothing"),
    System("python-floor", "Python floor: fork, pipe, waitpid", True, "asyncio", "floor",
           open_python_floor, forks_parent=True),
    # isolated peers: a new process per call
    System("multiprocessing", "multiprocessing: fork Process + Pipe", True, "asyncio", "peer",
           open_multiprocessing, forks_parent=True),
    System("pool-forkserver", "ProcessPoolExecutor: forkserver, max_tasks_per_child=1", True,
           "asyncio", "peer", open_pool_forkserver, quick=False),
    System("pebble-concurrent", "pebble.concurrent.process", True, "asyncio", "peer",
           open_pebble_concurrent, forks_parent=True),
    System("pebble-asynchronous", "pebble.asynchronous.process", True, "asyncio", "peer",
           open_pebble_asynchronous, forks_parent=True, quick=False,
           note="polls for the result every 100 ms"),
    System("aiomultiprocess", "aiomultiprocess.Worker", True, "asyncio", "peer",
           open_aiomultiprocess, quick=False, note="spawn; the result goes through a manager"),
    System("trio-parallel-retire", "trio_parallel: a worker retired after each job", True,
           "trio", "peer", open_trio_parallel_retire, quick=False, note="spawn"),
    # reused workers: not isolated, a reference for lag and throughput
    System("pool-reused", "ProcessPoolExecutor: reused workers", False, "asyncio", "peer",
           open_pool_reused),
    System("loky", "loky reusable executor", False, "asyncio", "peer", open_loky),
    System("anyio-to-process", "anyio.to_process.run_sync", False, "asyncio", "peer",
           open_anyio_process),
    System("trio-parallel", "trio_parallel.run_sync: cached workers", False, "trio", "peer",
           open_trio_parallel),
]  # fmt: skip

SYSTEMS: dict[str, System] = {system.name: system for system in _ALL}
