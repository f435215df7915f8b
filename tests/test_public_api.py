"""The public face: names, where they say they live, and input checked before any fork."""

from __future__ import annotations

import dataclasses
import os

import pytest

import aioisolate
from aioisolate import Isolator, isolated


def test_public_names_show_the_public_module() -> None:
    for name in aioisolate.__all__:
        obj = getattr(aioisolate, name)
        assert obj.__module__ == "aioisolate", name
        assert "._" not in repr(obj), repr(obj)


def test_version() -> None:
    assert aioisolate.__version__


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real_fork = os.fork

    def fork() -> int:
        calls.append(1)
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    return calls


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout": -1}, ValueError, "positive number of seconds"),
        ({"timeout": 0}, ValueError, "positive number of seconds"),
        ({"timeout": float("nan")}, ValueError, "positive number of seconds"),
        ({"timeout": "5"}, TypeError, "timeout must be a number"),
        ({"timeout": True}, TypeError, "timeout must be a number"),
        ({"limiter": 3}, TypeError, "anyio.CapacityLimiter"),
        ({"memory_limit": "lots"}, ValueError, "'lots' is not a size"),
        ({"memory_limit": "5 parsecs"}, ValueError, "is not a size"),
        ({"memory_limit": -5}, ValueError, "memory_limit must be positive"),
        ({"memory_limit": 1.5}, TypeError, "memory_limit must be a number of bytes"),
        ({"cpu_limit": 0}, ValueError, "cpu_limit must be a positive number"),
        ({"kill_grace": -1}, ValueError, "kill_grace must be a positive number"),
        ({"kill_descendants": "yes"}, TypeError, "kill_descendants must be True or False"),
        ({"stdout": "tty"}, ValueError, "stdout must be one of"),
        ({"stderr": None}, ValueError, "stderr must be one of"),
        ({"max_output": 0}, ValueError, "max_output must be positive"),
        ({"memroy_limit": "1GiB"}, TypeError, "unknown option.*memroy_limit"),
        ({"cpu_limit": float("inf")}, ValueError, "cpu_limit must be finite"),
        ({"cpu_limit": 1e19}, ValueError, "more than the system can enforce"),
        ({"kill_grace": float("inf")}, ValueError, "kill_grace must be finite"),
        ({"memory_limit": "100000000TiB"}, ValueError, "more than any system has"),
    ],
)
async def test_bad_options_fail_before_fork(
    forks: list[int], kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await isolated(pow, 2, 2, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        Isolator(**kwargs)  # type: ignore[arg-type]
    assert forks == []


@pytest.mark.anyio
async def test_not_callable_fails_before_fork(forks: list[int]) -> None:
    with pytest.raises(TypeError, match="func must be callable, not int"):
        await isolated(5)  # type: ignore[call-overload]
    assert forks == []


@pytest.mark.anyio
async def test_isolator_lifecycle(forks: list[int]) -> None:
    iso = Isolator(timeout=30)
    with pytest.raises(RuntimeError, match="async with Isolator"):
        await iso.run(pow, 2, 2)
    async with iso:
        assert await iso.run(pow, 2, 3) == 8
    with pytest.raises(RuntimeError, match="closed"):
        await iso.run(pow, 2, 2)
    with pytest.raises(RuntimeError, match="only once"):
        async with iso:
            pass
    assert forks == [1]


@pytest.mark.anyio
async def test_isolator_timeout_default_and_override() -> None:
    import time

    async with Isolator(timeout=0.3) as iso:
        with pytest.raises(aioisolate.IsolationTimeout) as info:
            await iso.run(time.sleep, 30)
        assert info.value.timeout == 0.3
        with pytest.raises(aioisolate.IsolationTimeout) as info:
            await iso.run(time.sleep, 30, timeout=0.2)
        assert info.value.timeout == 0.2


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("512MiB", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("2 GB", 2_000_000_000),
        ("10kb", 10_000),
        (1234, 1234),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    from aioisolate._options import parse_size

    assert parse_size("memory_limit", text) == size


@pytest.mark.anyio
async def test_infinite_timeout_means_none() -> None:
    assert await isolated(pow, 2, 2, timeout=float("inf")) == 4


def test_one_table_names_every_option() -> None:
    from aioisolate._options import _CHECKS, _SANDBOX_OPTIONS, Options
    from aioisolate._sandbox import Sandbox

    assert set(_CHECKS) == set(aioisolate.CallOptions.__annotations__)
    fields = {f.name for f in dataclasses.fields(Options)} - {"sandbox"}
    assert {name for name, check in _CHECKS.items() if check is not None} == fields
    sandbox_fields = {f.name for f in dataclasses.fields(Sandbox)}
    # user= and group= become uid and gid; every other sandbox option is its own field.
    assert {n for n in _SANDBOX_OPTIONS} - {"user", "group"} == sandbox_fields - {"uid", "gid"}
