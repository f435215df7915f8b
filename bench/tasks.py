"""What the systems under test run in their children: small, module-level, importable by name.

Spawn-based peers import this module in a fresh interpreter, so it imports nothing heavy at
the top (numpy only where a result asks for it).
"""

from __future__ import annotations

from typing import Any

ONE = b"\x01"


def trivial() -> int:
    """The trivial call: returns a small int."""
    return 1


def length(data: bytes) -> int:
    """The large-argument call: takes the argument and returns a small result, its length."""
    return len(data)


def spin(iterations: int) -> int:
    """A pure-Python loop, the unit of CPU work of the fan-out and lag scenarios."""
    total = 0
    for i in range(iterations):
        total += i & 7
    return iterations


async def call_async(func: Any, *args: Any) -> Any:
    """For peers whose target must be a coroutine function (aiomultiprocess)."""
    return func(*args)


def retire_always() -> bool:
    """A trio-parallel worker context that retires each worker after one job."""
    return True


def payload(kind: str, nbytes: int) -> Any:
    """A result of ``nbytes`` bytes, every one of them written (no lazily zeroed pages)."""
    if kind == "bytes":
        return ONE * nbytes
    if kind == "bytearray":
        return bytearray(ONE) * nbytes
    if kind == "numpy":
        import numpy as np

        return np.ones(nbytes, dtype=np.uint8)
    raise ValueError(f"unknown payload kind {kind!r}")


def check_payload(value: Any, kind: str, nbytes: int) -> None:
    """Fail unless ``value`` is the payload asked for: its type, length and ends."""
    if kind == "numpy":
        import numpy as np

        ok = type(value) is np.ndarray and value.dtype == np.uint8 and value.nbytes == nbytes
    else:
        expected = bytearray if kind in ("bytearray", "raw") else bytes
        ok = type(value) is expected and len(value) == nbytes
    if not ok or value[0] != 1 or value[-1] != 1:
        raise AssertionError(f"wrong result for {kind} of {nbytes} bytes: {type(value)!r}")
