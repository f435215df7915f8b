"""Ways for tests to talk to a child while it runs, without sleeps."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import anyio
import psutil
import pytest


class Channel:
    """A pipe from a child to the test: the child sends lines, the test awaits them."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self._buffer = b""

    def send(self, *values: object) -> None:
        """In the child: send one line."""
        os.write(self.write_fd, (" ".join(map(str, values)) + "\n").encode())

    async def receive(self) -> list[str]:
        """In the test: the next line, split into words."""
        with anyio.fail_after(10):
            while b"\n" not in self._buffer:
                await anyio.wait_readable(self.read_fd)
                chunk = os.read(self.read_fd, 4096)
                assert chunk, "the child closed the channel without sending"
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode().split()

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class Gate:
    """A pipe from the test to its children: each child blocks in wait() until opened."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()

    def wait(self) -> None:
        """In the child: block until the test opens the gate."""
        os.read(self.read_fd, 1)

    def open(self, count: int = 1) -> None:
        os.write(self.write_fd, b"x" * count)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


def is_gone(proc: psutil.Process) -> bool:
    """True once the process no longer runs (exited, or a zombie nobody has reaped yet)."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; for effects that take a moment
    to land in the kernel (a SIGKILL sent to a process we cannot wait for)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# For slow tests whose subject does not depend on the backend or the watcher (CPU limits, say):
# run them once, on asyncio with pidfds, instead of six times.
ONE_VARIANT = [
    pytest.mark.parametrize("anyio_backend", [("asyncio", {})], ids=["asyncio"]),
    pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True),
]


def one_variant(test: object) -> object:
    for mark in ONE_VARIANT:
        test = mark(test)
    return test
