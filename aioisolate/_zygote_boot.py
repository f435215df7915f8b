"""The zygote helper's first lines: run as a script (``python _zygote_boot.py CONFIG``).

It puts the ``aioisolate`` package in place without running its ``__init__``, which imports the
whole public API and what that needs (anyio among others), and then starts `_zygote_main`. The
helper imports only what its children use: every page it has makes each fork from it slower.
Code that imports the package for real (a preloaded module, or a function the child runs that
does ``from aioisolate import isolated``) gets all of it then, through the package's
``__getattr__`` below.
"""

import importlib.util
import json
import os
import sys
import types
from typing import Any


def main() -> None:
    # Only stdin, stdout, stderr, the socket (3) and the kill pipe (4) are ours: an fd the
    # parent had left inheritable would otherwise stay open here for the helper's whole life.
    os.closerange(5, os.sysconf("SC_OPEN_MAX"))
    config = json.loads(sys.argv[1])
    sys.path[:] = config["path"]
    spec = importlib.util.find_spec("aioisolate")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        sys.exit(f"aioisolate is not importable from {sys.path}")
    package = types.ModuleType("aioisolate")
    package.__spec__ = spec
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "aioisolate"
    package.__file__ = spec.origin

    def load_everything(name: str) -> Any:
        if name.startswith("_"):
            # A submodule not imported yet (``from . import _child`` asks first): the import
            # system then imports it.
            raise AttributeError(name)
        # The first public name asked for: run the real __init__ now.
        del package.__getattr__
        spec.loader.exec_module(package)  # type: ignore[union-attr]
        return getattr(package, name)

    package.__getattr__ = load_everything  # type: ignore[method-assign]
    sys.modules["aioisolate"] = package

    from aioisolate._zygote_main import main as serve

    serve(config)


main()
