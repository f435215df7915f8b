"""`DaskEngine`: the same isolated calls, each forked on a worker of a Dask cluster.

The caller's side. A call is a Dask task (a unique key, never merged with another) whose
function, `dask_worker.run_call`, makes an ordinary isolated call on the worker; what came of
it (value, error, report) travels back as the task's result (see `dask_worker`). Cancelling the caller cancels the
task, and the worker's plugin kills the child. A worker that leaves the cluster while it runs
a call fails that call with `WorkerLost`, from the scheduler's own "remove-worker" event.

Dask's client is asyncio-native. On asyncio the engine uses the caller's loop; elsewhere
(trio) it runs the client on an asyncio loop in a thread of its own, and bridges each call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import cloudpickle

from .._errors import IsolationError, RemoteTraceback, WorkerLost
from .._options import Options
from .._report import CallReport

if TYPE_CHECKING:
    from typing import Self

T = TypeVar("T")


class DaskEngine:
    """Runs isolated calls on a Dask cluster: each call's child is forked on a worker.

    Use it as an async context manager, and pass it as ``engine=``::

        async with DaskEngine("tcp://scheduler:8786") as engine:
            best = await isolated(search, position, engine=engine, timeout=600)

    Everything else is as for a local call: the value or the function's exception comes back,
    a crash is `ChildCrashed` (the worker lives on), limits and reports apply on the worker,
    and cancelling the caller kills the remote child. On each worker, children are forked
    from a zygote helper (see `Zygote`), so the function and its arguments must pickle; the
    workers need aioisolate installed (``pip install 'aioisolate[dask]'``).

    Args:
        cluster: the scheduler's address; a ``distributed.Client`` (the engine connects its
            own asynchronous client to the same scheduler, and leaves this one open); or a
            cluster object such as ``distributed.LocalCluster`` (its scheduler's address).
        preload: modules for each worker's zygote helper to import as it starts.
    """

    def __init__(self, cluster: Any, *, preload: Iterable[str] = ()) -> None:
        try:
            import distributed
        except ImportError as exc:  # an optional dependency
            raise ImportError(
                "DaskEngine needs Dask's distributed scheduler: pip install 'aioisolate[dask]'"
            ) from exc
        if isinstance(cluster, distributed.Client):
            # The engine connects a client of its own (its event handler is its own too).
            self._address: str = str(cluster.scheduler_info()["address"])
        elif isinstance(cluster, str):
            self._address = cluster
        elif isinstance(getattr(cluster, "scheduler_address", None), str):
            self._address = cluster.scheduler_address
        else:
            raise TypeError(
                "DaskEngine takes a scheduler address, a distributed.Client or a cluster "
                f"object, not {type(cluster).__name__}"
            )
        if isinstance(preload, str):
            raise TypeError(f"preload takes module names, as a list: [{preload!r}]")
        self._preload = tuple(preload)
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the client's
        self._thread: threading.Thread | None = None  # ours, if the client needs one
        self._waiting: dict[str, asyncio.Task[Any]] = {}  # by key; on the client's loop
        self._lost: dict[str, str] = {}  # key -> worker address
        self._idle: asyncio.Event | None = None
        self._state = "new"

    def __repr__(self) -> str:
        return f"<DaskEngine {self._state} {self._address}>"

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("a DaskEngine can be entered only once")
        self._state = "opening"
        here = _running_asyncio_loop()
        if here is not None:
            self._loop = here
        else:
            self._loop, self._thread = _start_loop_thread()
        try:
            await self._on_client_loop(self._open)
        except BaseException:
            await self._stop_thread()
            self._state = "closed"
            raise
        self._state = "open"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._state = "closed"
        # To the end, even under a cancelled scope: the remote calls are cancelled, the client
        # closed, and the thread and loop (if any) stopped.
        with anyio.CancelScope(shield=True):
            try:
                await self._on_client_loop(self._close)
            finally:
                await self._stop_thread()

    async def _run_call(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        options: Options,
        reports: list[CallReport] | None = None,
    ) -> tuple[Any, CallReport]:
        """Run one call on the cluster (what ``isolated(..., engine=self)`` does)."""
        if self._state != "open":
            raise RuntimeError(
                "DaskEngine needs to be open: use it inside 'async with DaskEngine(...)'"
            )
        outcome = await self._on_client_loop(self._submit, func, args, options)
        kind = outcome[0]
        if kind == "ok":
            _, value, report = outcome
            if reports is not None:
                reports.append(report)
            return value, report
        if kind == "raised":
            _, error, child_traceback, report = outcome
            if reports is not None and report is not None:
                reports.append(report)
            if child_traceback is not None:
                error.__cause__ = RemoteTraceback(child_traceback)
            raise error
        raise IsolationError(f"the call ended on its worker without a result ({kind})")

    # What follows runs on the client's loop.

    async def _open(self) -> None:
        import distributed

        from .dask_worker import IsolationPlugin, check, plugin_name

        connect: Any = distributed.Client
        self._client = await connect(self._address, asynchronous=True)
        try:
            self._client.subscribe_topic("all", self._on_event)
            # On every worker, and on those that join later.
            name = plugin_name(self._preload)
            await self._client.register_plugin(IsolationPlugin(self._preload), name=name)
            await self._client.run(check, name)  # every worker can serve, or the reason
        except BaseException:
            await _to_the_end(self._client.close())
            raise

    async def _close(self) -> None:
        for task in self._waiting.values():
            task.cancel()
        if self._waiting:
            self._idle = asyncio.Event()
            await _to_the_end(self._idle.wait())
        client = self._client
        if client is None:
            return
        client.unsubscribe_topic("all")
        await _to_the_end(client.close())

    async def _submit(
        self, func: Callable[..., Any], args: tuple[Any, ...], options: Options
    ) -> tuple[Any, ...]:
        from distributed.client import FutureCancelledError

        from .dask_worker import plugin_name, run_call

        # Pickled here, in a thread (a large argument would hold up the loop), and sent as one
        # opaque value: Dask would otherwise walk every nested argument on the loop, and put
        # the results of any Dask futures among them in their place.
        try:
            payload = await asyncio.to_thread(cloudpickle.dumps, (func, args))
        except Exception as exc:
            raise TypeError(
                f"{getattr(func, '__qualname__', func)!r} and its arguments must pickle to go to "
                f"the cluster, and could not: {exc}"
            ) from exc
        key = f"aioisolate-{uuid.uuid4().hex}"
        remote = dataclasses.replace(options, limiter=None, engine=None)
        # pure=False and a fresh key: two calls with equal arguments are two calls.
        future = self._client.submit(
            run_call, payload, remote, key, plugin_name(self._preload), key=key, pure=False
        )
        waiting = asyncio.ensure_future(_result(future))
        self._waiting[key] = waiting
        try:
            outcome: tuple[Any, ...] = await waiting
            return outcome
        except FutureCancelledError as exc:
            raise IsolationError(
                f"Dask cancelled the call {key} (the scheduler restarted or was lost?): {exc}"
            ) from exc
        except asyncio.CancelledError:
            if key in self._lost:
                worker = self._lost[key]
                raise WorkerLost(
                    f"the Dask worker {worker} left the cluster (it died, or was retired) while "
                    f"it held the call {key} (running, queued, or holding its result); if the "
                    "call had started, its child died with it. The engine cancelled the call "
                    "rather than let Dask run it again",
                    worker=worker,
                    key=key,
                ) from None
            if self._state == "closed":
                raise IsolationError(
                    "the DaskEngine was closed while the call ran; its child was killed"
                ) from None
            raise
        finally:
            del self._waiting[key]
            self._lost.pop(key, None)
            if not waiting.done() or waiting.cancelled():
                # Cancelled or lost: the scheduler must neither run the call on nor give it
                # to another worker, and the worker's plugin kills the child.
                await _to_the_end(self._client.cancel([future], force=True))
            if self._idle is not None and not self._waiting:
                self._idle.set()

    def _on_event(self, event: tuple[float, Any]) -> None:
        _, message = event
        if not isinstance(message, dict) or message.get("action") != "remove-worker":
            return
        worker = str(message.get("worker", "?"))
        # Running or queued there, or done there with the result not yet taken (which Dask
        # would compute again).
        held = [*message.get("processing-tasks", ()), *message.get("lost-computed-tasks", ())]
        for key in held:
            waiting = self._waiting.get(str(key))
            if waiting is not None:
                self._lost[str(key)] = worker
                waiting.cancel()

    # Crossing between the caller's loop and the client's.

    async def _on_client_loop(self, func: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        loop = self._loop
        assert loop is not None
        if loop is _running_asyncio_loop():
            return await func(*args)
        return await _bridge(func(*args), loop)

    async def _stop_thread(self) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self._thread = None
        loop.call_soon_threadsafe(loop.stop)
        await anyio.to_thread.run_sync(thread.join)
        loop.close()


async def _result(future: Any) -> Any:
    return await future


def _running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None  # trio


def _start_loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """An asyncio loop running in a thread of its own, for the client of a trio caller."""
    loop = asyncio.new_event_loop()
    # Not named as the library's own threads: it runs Dask's code, which takes locks, so the
    # fork-with-threads warning counts it.
    thread = threading.Thread(target=loop.run_forever, name="DaskEngine client", daemon=True)
    thread.start()
    return loop, thread


async def _bridge(coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop) -> T:
    """Run ``coro`` as a task on another thread's loop and wait here for it to end; if this is
    cancelled, cancel it there and wait until it has ended (it cleans up: the remote call is
    cancelled)."""
    done = anyio.Event()
    wake = _waker()
    tasks: list[asyncio.Task[T]] = []

    def start() -> None:
        task = loop.create_task(coro)
        task.add_done_callback(lambda _: wake(done.set))
        tasks.append(task)

    loop.call_soon_threadsafe(start)
    try:
        await done.wait()
    except BaseException:
        # After start(): the loop runs its callbacks in the order they came.
        loop.call_soon_threadsafe(lambda: tasks[0].cancel())
        with anyio.CancelScope(shield=True):
            await done.wait()
        raise
    return tasks[0].result()


def _waker() -> Callable[[Callable[[], object]], object]:
    """A thread-safe "call soon" into the running loop, asyncio's or trio's."""
    loop = _running_asyncio_loop()
    if loop is not None:
        return loop.call_soon_threadsafe
    import trio

    return trio.lowlevel.current_trio_token().run_sync_soon


async def _to_the_end(awaitable: Awaitable[T]) -> T | None:
    """Await to the end, whatever cancels this task meanwhile; then pass the cancellation on.

    asyncio's own form of `_shield.to_the_end`: it runs on the client's loop, which for a trio
    caller is a plain asyncio loop in a thread, where anyio would take the caller's context
    (copied with each call) for trio's."""
    task = asyncio.ensure_future(awaitable)
    cancelled: BaseException | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled
    return task.result() if not task.cancelled() else None
