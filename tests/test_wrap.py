"""The blocking entry point and the decorator."""

from __future__ import annotations

import inspect
import os
import signal
import time

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from aioisolate import ChildCrashed, IsolationTimeout, isolate, isolated, run_isolated


def square(x: int) -> int:
    return x * x


def test_run_isolated_from_plain_code() -> None:
    assert run_isolated(square, 7) == 49
    assert run_isolated(os.getpid) != os.getpid()


def test_run_isolated_has_the_same_errors() -> None:
    with pytest.raises(ZeroDivisionError):
        run_isolated(divmod, 1, 0)
    with pytest.raises(ChildCrashed) as info:
        run_isolated(os.kill, 0, signal.SIGKILL)  # its own process group: just the child
    assert info.value.signal is signal.SIGKILL
    with pytest.raises(IsolationTimeout):
        run_isolated(time.sleep, 60, timeout=0.2)
    with pytest.raises(MemoryError):
        run_isolated(bytearray, 1 << 30, memory_limit="100MiB")


def test_run_isolated_checks_options_first() -> None:
    with pytest.raises(ValueError, match="timeout must be a positive"):
        run_isolated(square, 2, timeout=-1)


@pytest.mark.anyio
async def test_run_isolated_refuses_to_block_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="'await isolated"):
        run_isolated(square, 2)


@pytest.mark.anyio
async def test_run_isolated_from_a_worker_thread_of_a_running_loop() -> None:
    assert await anyio.to_thread.run_sync(run_isolated, square, 5) == 25


@isolate
def parse(blob: bytes, *, strict: bool = False) -> tuple[int, bool, int]:
    """Parse a blob (in a child)."""
    return len(blob), strict, os.getpid()


@isolate(memory_limit="100MiB", timeout=5)
async def allocate(n: int) -> int:
    await anyio.lowlevel.checkpoint()
    return len(bytearray(n))


def test_decorator_keeps_name_docstring_and_signature() -> None:
    assert parse.__name__ == "parse"
    assert parse.__doc__ == "Parse a blob (in a child)."
    assert str(inspect.signature(parse)) == str(inspect.signature(parse.__wrapped__))  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(parse)
    assert allocate.__name__ == "allocate"


@pytest.mark.anyio
async def test_decorated_functions_run_isolated_with_their_options() -> None:
    length, strict, pid = await parse(b"abc", strict=True)
    assert (length, strict) == (3, True)
    assert pid != os.getpid()
    assert await allocate(1 << 20) == 1 << 20
    with pytest.raises(MemoryError):
        await allocate(1 << 30)


def test_decorator_checks_options_where_applied() -> None:
    with pytest.raises(ValueError, match="is not a size"):
        isolate(memory_limit="huge")


@pytest.mark.anyio
async def test_decorated_function_inside_isolated() -> None:
    # The decorated function is an ordinary async function: it nests.
    async def outer() -> int:
        length, _, _ = await parse(b"abcd")
        return length

    assert await isolated(outer) == 4
