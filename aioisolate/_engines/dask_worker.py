"""The worker's side of `DaskEngine`: a plugin on every worker, and the task that runs a call.

Imported on the workers (and by the engine when it registers the plugin), never by
``import aioisolate``: distributed is an optional dependency.

Each worker gets a zygote helper of its own (started by the plugin): a worker runs threads
and an event loop, which a fork from it would copy mid-flight, and it is a daemonic process,
whose children multiprocessing refuses to start. The helper is neither, and its forks cost
the same whatever the worker's size. The call's task runs on the worker's event loop and
awaits an ordinary zygote-mode call; a crash, a leak or a blow-up is the child's alone.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import anyio
import cloudpickle
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from .. import _api
from .._errors import IsolationError, RemoteTraceback
from .._options import Options
from .._zygote import Zygote

PLUGIN_NAME = "aioisolate"
# Keys cancelled before their call began (the task had started, the call not yet): remembered
# for that call to see, up to this many.
_EARLY_CANCELS = 10_000


def plugin_name(preload: tuple[str, ...]) -> str:
    """One plugin (and zygote) per set of preloaded modules: engines that preload the same
    share it, and one that preloads others gets its own."""
    return PLUGIN_NAME if not preload else f"{PLUGIN_NAME}[{','.join(preload)}]"


class IsolationPlugin(WorkerPlugin):
    """On each worker: the zygote its calls fork from, and the calls running, by task key, so
    that a task the scheduler cancels or releases kills its child at once."""

    # Registered by every engine that connects; one per worker and preload is enough, and
    # replacing it would end the calls of the engines already there.
    idempotent = True

    def __init__(self, preload: Iterable[str] = ()) -> None:
        self.preload = tuple(preload)
        self.running: dict[str, anyio.CancelScope] = {}
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        self.zygote: Zygote | None = None
        self.failure: BaseException | None = None

    async def setup(self, worker: Any) -> None:
        self.running = {}
        self.cancelled = OrderedDict()
        zygote = Zygote(preload=self.preload)
        try:
            await zygote.__aenter__()
        except BaseException as exc:
            self.failure = exc  # each call says why, rather than "no plugin"
            raise
        self.zygote = zygote

    async def teardown(self, worker: Any) -> None:
        for scope in self.running.values():
            scope.cancel()
        if self.zygote is not None:
            await self.zygote.aclose()

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        # A running task that the scheduler gives up on (the caller cancelled it, or forgot
        # it) is cancelled here; the running call then kills and reaps its child. One that
        # has started but not yet reached its call is remembered, for the call to see.
        if start == "executing" and finish in ("cancelled", "released"):
            scope = self.running.get(str(key))
            if scope is not None:
                scope.cancel()
            else:
                self.cancelled[str(key)] = None
                if len(self.cancelled) > _EARLY_CANCELS:
                    self.cancelled.popitem(last=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"preload": self.preload}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["preload"])  # type: ignore[misc]


def check(plugin: str, dask_worker: Any) -> IsolationPlugin:
    """The worker's plugin, ready to serve; else an error that says why (run on every worker
    as an engine opens, and by each call)."""
    found = dask_worker.plugins.get(plugin)
    if not isinstance(found, IsolationPlugin):
        raise IsolationError(
            f"the Dask worker {dask_worker.address} has no aioisolate plugin: it is registered "
            "when a DaskEngine opens, and a worker that joined since gets it from the scheduler"
        )
    if found.zygote is None:
        raise IsolationError(
            f"the zygote helper of the Dask worker {dask_worker.address} could not start: "
            f"{found.failure} (the workers must be able to import the engine's preload= modules)"
        )
    return found


async def run_call(payload: bytes, options: Options, key: str, plugin: str) -> tuple[Any, ...]:
    """The task: run the call in a child of this worker's zygote; return what came of it.

    ``payload`` is the function and its arguments, pickled by the caller (so that Dask neither
    walks nor rewrites the arguments). Returns ``("ok", value, report)``, ``("raised",
    exception, child_traceback, report)`` or ``("cancelled",)``. The exception travels as a
    value, so that Dask neither retries the task nor counts it as the worker's failure, and
    the child's traceback travels as text.
    """
    found = check(plugin, get_worker())
    assert found.zygote is not None
    if key in found.cancelled:  # cancelled between the task's start and here
        del found.cancelled[key]
        return ("cancelled",)
    func, args = cloudpickle.loads(payload)
    options = dataclasses.replace(options, zygote=found.zygote)
    with anyio.CancelScope() as scope:
        found.running[key] = scope
        try:
            # No limiter: the worker runs as many tasks as it has threads.
            value, report = await _api.run(func, args, options, limit=False)
        except Exception as exc:
            cause = exc.__cause__
            text = cause.args[0] if isinstance(cause, RemoteTraceback) else None
            exc.__cause__ = None
            return ("raised", exc, text, getattr(exc, "report", None))
        finally:
            del found.running[key]
    if scope.cancelled_caught:
        return ("cancelled",)
    return ("ok", value, report)
