"""Run a function in a forked child process and await its result from async Python."""

from ._api import default_limiter as default_limiter
from ._api import isolated as isolated
from ._api import isolated_iter as isolated_iter
from ._api import isolated_map as isolated_map
from ._api import isolated_with_report as isolated_with_report
from ._engines.dask import DaskEngine as DaskEngine
from ._errors import ChildCrashed as ChildCrashed
from ._errors import CPULimitExceeded as CPULimitExceeded
from ._errors import IsolationError as IsolationError
from ._errors import IsolationTimeout as IsolationTimeout
from ._errors import MemoryLimitExceeded as MemoryLimitExceeded
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteError as RemoteError
from ._errors import RemoteTraceback as RemoteTraceback
from ._errors import ThreadedForkWarning as ThreadedForkWarning
from ._errors import WorkerLost as WorkerLost
from ._errors import ZygoteDied as ZygoteDied
from ._isolator import Isolator as Isolator
from ._map import MapProgress as MapProgress
from ._map import MapResults as MapResults
from ._options import CallOptions as CallOptions
from ._progress import tqdm_progress as tqdm_progress
from ._report import CallReport as CallReport
from ._stream import ItemStream as ItemStream
from ._wrap import isolate as isolate
from ._wrap import run_isolated as run_isolated
from ._zygote import Zygote as Zygote

__version__ = "0.1.0.dev0"

__all__ = [
    "CPULimitExceeded",
    "CallOptions",
    "CallReport",
    "ChildCrashed",
    "DaskEngine",
    "IsolationError",
    "ItemStream",
    "MapProgress",
    "MapResults",
    "IsolationTimeout",
    "Isolator",
    "MemoryLimitExceeded",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "ThreadedForkWarning",
    "WorkerLost",
    "Zygote",
    "ZygoteDied",
    "default_limiter",
    "isolate",
    "isolated",
    "isolated_iter",
    "isolated_map",
    "isolated_with_report",
    "run_isolated",
    "tqdm_progress",
]

# Public objects say they live here, so tracebacks, reprs and docs show the public path.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
