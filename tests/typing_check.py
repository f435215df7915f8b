"""Checked by mypy (not run by pytest): the types a caller gets from the public API."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from typing import assert_type

from aioisolate import (
    CallReport,
    Isolator,
    isolate,
    isolated,
    isolated_iter,
    isolated_map,
    isolated_with_report,
    run_isolated,
)


def square(x: int) -> int:
    return x * x


async def greet(name: str, times: int) -> str:
    return name * times


def scale(x: float, *, factor: float) -> float:
    return x * factor


async def check() -> None:
    assert_type(await isolated(square, 7), int)
    assert_type(await isolated(greet, "a", 3), str)
    assert_type(await isolated(functools.partial(scale, factor=2.0), 1.5), float)
    async with Isolator() as iso:
        assert_type(await iso.run(square, 7), int)
        assert_type(await iso.run(greet, "a", 3), str)
    await isolated(square, "seven")  # type: ignore[arg-type]
    await isolated(greet, "a")  # type: ignore[arg-type]


async def check_options_and_report() -> None:
    value, report = await isolated_with_report(square, 7, memory_limit="1GiB", timeout=5)
    assert_type(value, int)
    assert_type(report, CallReport)
    async with Isolator(stdout="capture", kill_grace=1.0) as iso:
        assert_type(await iso.run_with_report(greet, "a", 2), tuple[str, CallReport])
    await isolated(square, 7, memory_limt="1GiB")  # type: ignore[call-overload]
    await isolated(square, 7, stdout="everywhere")  # type: ignore[call-overload]


@isolate
def decorated(x: int, *, scale: float = 1.0) -> float:
    return x * scale


@isolate(timeout=5)
async def decorated_async(name: str) -> str:
    return name


async def check_wrappers() -> None:
    assert_type(await decorated(2, scale=0.5), float)
    assert_type(await decorated_async("x"), str)
    assert_type(run_isolated(square, 3), int)
    assert_type(run_isolated(greet, "a", 2), str)
    await decorated("2")  # type: ignore[arg-type]


async def check_fan_out() -> None:
    async with isolated_map(square, range(3)) as results:
        async for value in results:
            assert_type(value, int)
    async with isolated_map(greet_once, ["a"], ordered=False) as names:
        async for name in names:
            assert_type(name, str)
    async for item in isolated_iter(count_up, 3):
        assert_type(item, int)
    async for text in isolated_iter(async_words):
        assert_type(text, str)


async def greet_once(name: str) -> str:
    return name


def count_up(n: int) -> Iterator[int]:
    yield from range(n)


async def async_words() -> AsyncIterator[str]:
    yield "word"


async def check_map_errors_in_place() -> None:
    async with isolated_map(square, range(3), return_exceptions=True) as results:
        async for outcome in results:
            assert_type(outcome, int | Exception)
    async with Isolator() as iso, iso.map(greet_once, ["a"], return_exceptions=True) as names:
        async for name in names:
            assert_type(name, str | Exception)
