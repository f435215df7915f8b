"""DaskEngine on an in-process LocalCluster (loopback, no dashboard), from asyncio, uvloop and
trio callers."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import distributed
import psutil
import pytest
import remote
from helpers import FORK_WARNINGS, assert_no_fork_warning

from aioisolate import (
    ChildCrashed,
    DaskEngine,
    IsolationError,
    IsolationTimeout,
    Isolator,
    RemoteTraceback,
    WorkerLost,
    Zygote,
    isolated,
    isolated_iter,
    isolated_map,
    isolated_with_report,
)

# The calls run on the workers; the local watcher variants are tested elsewhere.
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True),
]


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A LocalCluster run by tests/dask_cluster.py: what DaskEngine takes as a cluster object."""

    scheduler_address: str
    process: subprocess.Popen[str]

    def workers(self) -> set[int]:
        """The worker processes (multiprocessing starts them with spawn_main)."""
        return {
            p.pid
            for p in psutil.Process(self.process.pid).children()
            if "spawn_main" in " ".join(p.cmdline())
        }

    def close(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.process.stdout.close()


def start_cluster(n_workers: int = 2) -> Cluster:
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("dask_cluster.py")), str(n_workers)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        # The workers import the tests' and the examples' modules, as this process does.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert process.stdout is not None
    address = process.stdout.readline().strip()  # once the cluster is up
    assert address.startswith("tcp://127.0.0.1:"), f"the cluster did not start ({address!r})"
    return Cluster(address, process)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    started = start_cluster()
    yield started
    started.close()


async def wait_for_pid(path: Path) -> int:
    """The pid a remote child wrote (atomically) once it runs."""
    with anyio.fail_after(60):
        while not await anyio.Path(path).exists():  # noqa: ASYNC110 (a remote child: no event)
            await anyio.sleep(0.02)
    return int(await anyio.Path(path).read_text())


async def wait_gone(pid: int, within: float) -> float:
    """Seconds until the process is gone (its helper reaped it), failing after ``within``."""
    start = time.monotonic()
    while psutil.pid_exists(pid):
        assert time.monotonic() - start < within, f"process {pid} still there after {within} s"
        await anyio.sleep(0.01)
    return time.monotonic() - start


async def test_results_come_back(cluster: Cluster) -> None:
    async with DaskEngine(cluster) as engine:
        assert await isolated(remote.square, 12, engine=engine) == 144
        value, report = await isolated_with_report(remote.pids, engine=engine)
    child, helper = value
    assert report.pid == child
    assert report.exitcode == 0
    # Forked on a worker, from the worker's zygote helper.
    assert psutil.Process(helper).ppid() in cluster.workers()


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"])
async def test_an_asynchronous_client_of_the_callers(cluster: Cluster) -> None:
    async with distributed.Client(cluster.scheduler_address, asynchronous=True) as client:
        async with DaskEngine(client) as engine:
            assert await isolated(remote.square, 6, engine=engine) == 36
        assert client.status == "running"  # the engine leaves it open


async def test_the_functions_exception_as_itself(cluster: Cluster) -> None:
    async with DaskEngine(cluster.scheduler_address) as engine:
        with pytest.raises(remote.ParseError, match="cannot parse 'x'") as info:
            await isolated(remote.fail_to_parse, "x", engine=engine)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fail_to_parse" in str(cause)  # the child's traceback, from the worker


async def test_a_crash_kills_only_the_child(cluster: Cluster) -> None:
    before = cluster.workers()
    async with DaskEngine(cluster) as engine:
        with pytest.raises(ChildCrashed) as info:
            await isolated(remote.segfault, engine=engine)
        assert info.value.signal == signal.SIGSEGV
        assert info.value.report is not None
        # The workers are the same processes, and go on serving.
        assert await isolated(remote.square, 3, engine=engine) == 9
    assert cluster.workers() == before


async def test_cancelling_the_caller_kills_the_remote_child(
    cluster: Cluster, tmp_path: Path
) -> None:
    pid_file = tmp_path / "child.pid"
    async with DaskEngine(cluster) as engine:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(
                    isolated, remote.announce_then_sleep, str(pid_file), engine=engine
                )
            )
            child = await wait_for_pid(pid_file)
            tg.cancel_scope.cancel()
        await wait_gone(child, within=1.0)
        # The slot it held is free again.
        assert await isolated(remote.square, 4, engine=engine) == 16


async def test_a_timeout_on_the_worker(cluster: Cluster, tmp_path: Path) -> None:
    async with DaskEngine(cluster) as engine:
        with pytest.raises(IsolationTimeout):
            await isolated(
                remote.announce_then_sleep, str(tmp_path / "child.pid"), engine=engine, timeout=0.5
            )


async def test_memory_limit_on_the_worker(cluster: Cluster) -> None:
    async with DaskEngine(cluster) as engine:
        with pytest.raises(MemoryError):
            await isolated(remote.allocate, 300, engine=engine, memory_limit="50MiB")
        assert await isolated(remote.allocate, 10, engine=engine, memory_limit="50MiB") == 10 << 20


async def test_multiprocessing_in_the_child_of_a_daemonic_worker(cluster: Cluster) -> None:
    async with DaskEngine(cluster) as engine:
        assert await isolated(remote.cube_in_a_pool, [1, 2, 3], engine=engine) == [1, 8, 27]


async def test_200_concurrent_calls_are_never_merged(cluster: Cluster) -> None:
    async with DaskEngine(cluster) as engine:
        reports = []

        async def call(n: int) -> None:
            value, report = await isolated_with_report(remote.slow_square, n % 10, engine=engine)
            assert value == (n % 10) ** 2
            reports.append(report)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for n in range(200):
                    tg.start_soon(call, n)
    # Equal arguments, distinct calls: 200 children.
    assert len({r.pid for r in reports}) == 200


async def test_a_fan_out_and_an_isolator_on_the_engine(cluster: Cluster) -> None:
    async with DaskEngine(cluster) as engine:
        async with isolated_map(remote.square, range(20), engine=engine) as results:
            assert [r async for r in results] == [n * n for n in range(20)]
        async with Isolator(engine=engine, timeout=60) as iso:
            assert await iso.run(remote.square, 5) == 25


async def test_a_worker_killed_mid_call_is_worker_lost(tmp_path: Path) -> None:
    own = await anyio.to_thread.run_sync(start_cluster, 1)
    try:
        pid_file = tmp_path / "child.pid"
        async with DaskEngine(own) as engine:
            failure: list[BaseException] = []

            async def call() -> None:
                with pytest.raises(WorkerLost) as info:
                    await isolated(remote.announce_then_sleep, str(pid_file), engine=engine)
                failure.append(info.value)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(call)
                    child = await wait_for_pid(pid_file)
                    worker = psutil.Process(psutil.Process(child).ppid()).ppid()
                    os.kill(worker, signal.SIGKILL)
            (error,) = failure
            assert isinstance(error, WorkerLost)
            assert error.worker in str(error)
            assert error.worker.startswith("tcp://127.0.0.1:")
            await wait_gone(child, within=5.0)  # its helper saw the worker go, and killed it
    finally:
        await anyio.to_thread.run_sync(own.close)


async def test_bad_uses(cluster: Cluster) -> None:
    engine = DaskEngine(cluster)
    with pytest.raises(RuntimeError, match="inside 'async with DaskEngine"):
        await isolated(remote.square, 2, engine=engine)
    with pytest.raises(TypeError, match="scheduler address, a distributed.Client"):
        DaskEngine(42)
    with pytest.raises(TypeError, match="engine must be an engine"):
        await isolated(remote.square, 2, engine="tcp://nowhere")  # type: ignore[arg-type]
    async with engine, Zygote() as zygote:
        with pytest.raises(ValueError, match="choose one"):
            await isolated(remote.square, 2, engine=engine, zygote=zygote)
        with pytest.raises(TypeError, match="an engine= takes whole calls only"):
            isolated_iter(remote.square, 2, engine=engine)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_engines_leave_no_fds_behind(cluster: Cluster) -> None:
    async def open_call_close() -> None:
        async with DaskEngine(cluster) as engine:
            assert await isolated(remote.square, 2, engine=engine) == 4

    for _ in range(2):  # the scheduler's pools to the workers fill
        await open_call_close()
    settled = open_fds()
    for _ in range(10):
        await open_call_close()
    # An fd kept by each engine would show ten times over.
    assert open_fds() <= settled + 2


def test_without_distributed_the_engine_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'aioisolate\[dask\]'"):
        DaskEngine("tcp://127.0.0.1:8786")


async def test_the_example_finds_what_a_local_search_finds(cluster: Cluster) -> None:
    import dask_tree_search as example
    import parallel_tree_search as c4

    boards = example.openings(2)
    async with DaskEngine(cluster) as engine:
        best = await example.search_all(engine, boards, 4, progress=False)
    for board, (column, value) in zip(boards, best, strict=True):
        scores = {c: c4.search_root_move((board, c, 4))[1] for c in c4.moves(board)}
        assert value == max(scores.values())
        assert scores[column] == value


def test_the_example_runs_on_a_cluster_of_its_own() -> None:
    example = Path(__file__).parents[1] / "examples" / "dask_tree_search.py"
    result = subprocess.run(
        [sys.executable, *FORK_WARNINGS, str(example), "--depth", "4", "--positions", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert_no_fork_warning(result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("opening (3, 3): best move column ")
    assert lines[1].startswith("opening (3, 2): best move column ")
    assert lines[2].startswith("14 searches at depth 4: ")


async def test_cancels_at_any_moment_leave_no_child_running(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Some cancels reach the worker before the call has begun, some while it runs.
    async with DaskEngine(cluster) as engine:
        for n in range(40):
            with anyio.move_on_after(0.005 * (n % 8)):
                await isolated(
                    remote.announce_then_sleep, str(tmp_path / f"{n}.pid"), engine=engine
                )
        started = [int(await p.read_text()) async for p in anyio.Path(tmp_path).glob("*.pid")]
        for pid in started:
            await wait_gone(pid, within=2.0)
        # None of them holds a worker's slot: calls go through at once.
        with anyio.fail_after(30):
            async with isolated_map(remote.square, range(8), engine=engine) as results:
                assert [r async for r in results] == [n * n for n in range(8)]


async def test_preloads_and_bad_preloads(cluster: Cluster) -> None:
    with pytest.raises(TypeError, match=r"as a list: \['json'\]"):
        DaskEngine(cluster, preload="json")  # type: ignore[arg-type]
    async with DaskEngine(cluster, preload=["json"]) as engine:
        assert await isolated(remote.square, 3, engine=engine) == 9
    # The workers' helpers cannot start: the engine does not open, and says why.
    with pytest.raises(IsolationError, match=r"(?s)could not start.*no_such_module_here"):
        async with DaskEngine(cluster, preload=["no_such_module_here"]):
            pass
    async with DaskEngine(cluster) as engine:  # the others are not affected
        assert await isolated(remote.square, 4, engine=engine) == 16


async def test_what_does_not_pickle_is_a_clear_error(cluster: Cluster) -> None:
    lock = threading.Lock()
    async with DaskEngine(cluster) as engine:
        with pytest.raises(TypeError, match="must pickle to go to the cluster"):
            await isolated(remote.square, lock, engine=engine)  # type: ignore[arg-type]


def test_zygote_mode_and_an_engine_are_refused_at_once(cluster: Cluster) -> None:
    engine = DaskEngine(cluster)
    with pytest.raises(ValueError, match="choose one"):
        Isolator(zygote=True, engine=engine)
