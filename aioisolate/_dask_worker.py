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
from collections.abc import Callable, Iterable
from typing import Any

import anyio
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from . import _api
from ._errors import IsolationError, RemoteTraceback
from ._options import Options
from ._zygote import Zygote

PLUGIN_NAME = "aioisolate"


class IsolationPlugin(WorkerPlugin):
    """On each worker: the zygote its calls fork from, and the calls running, by task key, so
    that a task the scheduler cancels or releases kills its child at once."""

    # Registered by every engine that connects; one per worker is enough, and replacing it
    # would end the calls of the engines already there.
    idempotent = True

    def __init__(self, preload: Iterable[str] = ()) -> None:
        self.preload = tuple(preload)
        self.running: dict[str, anyio.CancelScope] = {}
        self.zygote: Zygote | None = None

    async def setup(self, worker: Any) -> None:
        self.running = {}
        self.zygote = Zygote(preload=self.preload)
        await self.zygote.__aenter__()

    async def teardown(self, worker: Any) -> None:
        for scope in self.running.values():
            scope.cancel()
        if self.zygote is not None:
            await self.zygote.aclose()

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        # A running task that the scheduler gives up on (the caller cancelled it, or forgot
        # it) is cancelled here; the running call then kills and reaps its child.
        if finish in ("cancelled", "released", "forgotten"):
            scope = self.running.get(str(key))
            if scope is not None:
                scope.cancel()

    def __getstate__(self) -> dict[str, Any]:
        return {"preload": self.preload}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["preload"])  # type: ignore[misc]


async def run_call(
    func: Callable[..., Any], args: tuple[Any, ...], options: Options, key: str
) -> tuple[Any, ...]:
    """The task: run the call in a child of this worker's zygote; return what came of it.

    Returns ``("ok", value, report)``, ``("raised", exception, child_traceback, report)`` or
    ``("cancelled",)``. The exception travels as a value, so that Dask neither retries the
    task nor counts it as the worker's failure, and the child's traceback travels as text.
    """
    plugin = get_worker().plugins.get(PLUGIN_NAME)
    if not isinstance(plugin, IsolationPlugin) or plugin.zygote is None:
        raise IsolationError(
            "this Dask worker has no aioisolate plugin: it is registered when a DaskEngine "
            "opens, and a worker that joined since gets it from the scheduler"
        )
    options = dataclasses.replace(options, zygote=plugin.zygote)
    with anyio.CancelScope() as scope:
        plugin.running[key] = scope
        try:
            value, report = await _api._run(func, args, options)
        except Exception as exc:
            cause = exc.__cause__
            text = cause.args[0] if isinstance(cause, RemoteTraceback) else None
            exc.__cause__ = None
            return ("raised", exc, text, getattr(exc, "report", None))
        finally:
            del plugin.running[key]
    if scope.cancelled_caught:
        return ("cancelled",)
    return ("ok", value, report)
