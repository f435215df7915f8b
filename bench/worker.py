"""One measurement in a fresh interpreter: ``python -m bench.worker SPEC``.

SPEC is a JSON object naming the scenario, the system, the parameter and the settings. The
worker prints one JSON object on stdout, ``{"samples": ..., "info": ...}``; a failure exits
non-zero with its traceback on stderr. Anything else written to stdout while measuring (by a
peer, or a child) goes to stderr instead, so it cannot spoil the JSON.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio

# Absolute imports: spawn-based peers (anyio.to_process) load this file as a plain module.
from bench.scenarios import SCENARIOS, Measured
from bench.systems import SYSTEMS


def measure(spec: dict[str, Any]) -> Measured:
    """Run one scenario for one system and parameter on the system's event loop."""
    system = SYSTEMS[spec["system"]]
    scenario = SCENARIOS[spec["scenario"]]

    async def main() -> Measured:
        return await scenario(system, spec["param"], spec["settings"])

    if system.loop == "trio":
        return anyio.run(main, backend="trio")
    options = {"use_uvloop": system.loop == "uvloop"}
    return anyio.run(main, backend="asyncio", backend_options=options)


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    measured = measure(spec)
    json.dump(measured, out)
    out.write("\n")
    out.close()


if __name__ == "__main__":
    main()
