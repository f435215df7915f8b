"""Functions the Dask tests run on the workers: importable there by name, with light imports."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import time


class ParseError(Exception):
    pass


def square(x: int) -> int:
    return x * x


def fail_to_parse(text: str) -> None:
    raise ParseError(f"cannot parse {text!r}")


def segfault() -> None:
    ctypes.string_at(0)


def pids() -> tuple[int, int]:
    """This child's pid and its parent's (the worker's zygote helper)."""
    return os.getpid(), os.getppid()


def announce_then_sleep(path: str) -> None:
    """Write this child's pid to ``path`` (atomically), then wait to be killed."""
    with open(f"{path}.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(f"{path}.tmp", path)
    time.sleep(120)


def allocate(mib: int) -> int:
    return len(bytearray(mib << 20))


def cube_in_a_pool(values: list[int]) -> list[int]:
    # Dask workers are daemonic processes, whose children multiprocessing refuses to start.
    with multiprocessing.get_context("fork").Pool(2) as pool:
        return pool.map(_cube, values)


def _cube(x: int) -> int:
    return x**3


def slow_square(x: int) -> int:
    time.sleep(0.05)
    return x * x
