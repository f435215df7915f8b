"""Results: what goes in by fork and what comes back through the pipe."""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import anyio
import anyio.lowlevel
import pytest
import trio

from aioisolate import isolated

pytestmark = [pytest.mark.anyio, pytest.mark.both_modes]


def square(x: int) -> int:
    return x * x


async def async_square(x: int) -> int:
    await anyio.lowlevel.checkpoint()
    return x * x


def power(x: int, *, exponent: int) -> int:
    return x**exponent


async def test_sync_function_result() -> None:
    assert await isolated(square, 7) == 49


async def test_result_is_computed_in_another_process() -> None:
    assert await isolated(os.getpid) != os.getpid()


async def test_async_function_runs_on_a_new_loop_of_the_same_kind(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    def loop_kind() -> str:
        try:
            return type(asyncio.get_running_loop()).__module__.split(".")[0]
        except RuntimeError:
            return "trio" if trio.lowlevel.in_trio_run() else "none"

    async def report() -> tuple[str, int]:
        return loop_kind(), os.getpid()

    name, options = anyio_backend
    expected = "uvloop" if options.get("use_uvloop") else name
    kind, pid = await isolated(report)
    assert kind == expected
    assert pid != os.getpid()
    assert await isolated(async_square, 8) == 64


async def test_keyword_arguments_through_partial() -> None:
    assert await isolated(functools.partial(power, exponent=3), 2) == 8


async def test_async_partial() -> None:
    async def add(a: int, b: int, *, c: int) -> int:
        return a + b + c

    assert await isolated(functools.partial(add, c=3), 1, 2) == 6


@pytest.fixture
def open_file(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "f.txt").open("w+") as handle:
        handle.write("inherited")
        handle.flush()
        yield handle


@pytest.mark.fork_only(reason="what fork mode hands over without pickling")
async def test_unpicklable_inputs_travel_by_fork(open_file: TextIO) -> None:
    lock = threading.Lock()
    counter = [10]

    def uses_everything(offset: int) -> tuple[bool, int, str]:
        open_file.seek(0)
        with lock:
            return lock.locked(), counter[0] + offset, open_file.read()

    assert await isolated(lambda: 5) == 5
    assert await isolated(uses_everything, 1) == (True, 11, "inherited")


@pytest.mark.fork_only(reason="what fork mode hands over without pickling")
async def test_large_argument_is_inherited_not_copied() -> None:
    big = bytearray(b"\x01") * (256 << 20)
    # The child sees the very object, at the same address: nothing was serialized.
    assert await isolated(id, big) == id(big)
    assert await isolated(len, big) == len(big)


async def test_result_of_200_mb_larger_than_any_pipe_buffer() -> None:
    size = 200 << 20
    result = await isolated(lambda: b"\xab" * size)
    assert len(result) == size
    assert result[:3] == b"\xab\xab\xab"
    assert result[-1] == 0xAB


async def test_many_results_of_different_sizes_in_parallel() -> None:
    sizes = [0, 1, 100, 65_535, 65_536, 1 << 20, 3 << 20]
    async with anyio.create_task_group() as tg:
        results: dict[int, bytes] = {}

        async def fetch(n: int) -> None:
            results[n] = await isolated(os.urandom, n)

        for n in sizes:
            tg.start_soon(fetch, n)
    assert {n: len(r) for n, r in results.items()} == {n: n for n in sizes}


async def test_none_and_rich_results() -> None:
    assert await isolated(lambda: None) is None
    value = {"a": [1, 2.5, {3}], "b": (None, b"x")}
    assert await isolated(lambda: value) == value


@pytest.mark.fork_only(
    reason="the inner call uses the module's isolated, routed to a zygote its child cannot use"
)
async def test_nested_isolated_calls() -> None:
    async def outer(n: int) -> list[int]:
        return [await isolated(square, i) for i in range(n)]

    assert await isolated(outer, 4) == [0, 1, 4, 9]
