"""Ways for tests to talk to a child while it runs, without sleeps."""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import time
from collections.abc import Callable

import anyio
import psutil
import pytest


class _Fifo:
    """A named pipe, so that a child forked by a zygote (which inherits none of our fds) can
    open it by name: pickled, it carries its path, and opens the pipe where it is unpickled."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="aioisolate-test-")
        self.path = os.path.join(self._dir, "fifo")
        os.mkfifo(self.path)
        # Read end first (a writer cannot open a FIFO nobody reads), then the write end.
        self.read_fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self.write_fd = os.open(self.path, os.O_WRONLY)
        self._owner = os.getpid()

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path, "_buffer": b""}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._owner = -1
        self.read_fd = self.write_fd = -1  # opened when first used, in the process using it

    def _writer(self) -> int:
        if self.write_fd < 0:
            self.write_fd = os.open(self.path, os.O_WRONLY)
        return self.write_fd

    def _reader(self) -> int:
        if self.read_fd < 0:
            self.read_fd = os.open(self.path, os.O_RDONLY)
        return self.read_fd

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)
        os.unlink(self.path)
        os.rmdir(self._dir)


class Channel(_Fifo):
    """A pipe from a child to the test: the child sends lines, the test awaits them."""

    def __init__(self) -> None:
        super().__init__()
        self._buffer = b""

    def send(self, *values: object) -> None:
        """In the child: send one line."""
        os.write(self._writer(), (" ".join(map(str, values)) + "\n").encode())

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


class Gate(_Fifo):
    """A pipe from the test to its children: each child blocks in wait() until opened."""

    def __init__(self) -> None:
        super().__init__()
        os.set_blocking(self.read_fd, True)  # children forked from here block on it

    def wait(self) -> None:
        """In the child: block until the test opens the gate."""
        os.read(self._reader(), 1)

    def open(self, count: int = 1) -> None:
        os.write(self.write_fd, b"x" * count)


class SharedCounter:
    """A number the children write and the test reads: a small file mapped shared, which a
    child forked by a zygote maps again when it unpickles the counter."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="aioisolate-test-")
        os.ftruncate(fd, 8)
        self._map = mmap.mmap(fd, 8)
        os.close(fd)

    def __getstate__(self) -> dict[str, object]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.path = state["path"]
        fd = os.open(self.path, os.O_RDWR)
        self._map = mmap.mmap(fd, 8)
        os.close(fd)

    def set(self, value: int) -> None:
        struct.pack_into("q", self._map, 0, value)

    def get(self) -> int:
        return int(struct.unpack_from("q", self._map, 0)[0])

    def close(self) -> None:
        self._map.close()
        os.unlink(self.path)


def isolated_children() -> list[psutil.Process]:
    """The children of isolated calls alive now (zombies too): this process's own, and a zygote
    helper's (the helper itself is not one)."""
    found = []
    for proc in psutil.Process().children():
        if is_zygote(proc):
            found.extend(proc.children())
        else:
            found.append(proc)
    return found


def is_zygote(proc: psutil.Process) -> bool:
    try:
        return any(part.endswith("_zygote_boot.py") for part in proc.cmdline())
    except psutil.Error:
        return False


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


# Interpreter options for a program that must fork without either warning about threads: ours
# shows by default, and this shows Python's own (3.12+; a DeprecationWarning, hidden by
# default). (-W cannot name our category: it is read before the package can be imported.)
FORK_WARNINGS = ["-W", "always::DeprecationWarning"]


def assert_no_fork_warning(stderr: str) -> None:
    assert "ThreadedForkWarning" not in stderr, stderr
    assert "multi-threaded, use of fork()" not in stderr, stderr
    assert "Invalid -W option" not in stderr, stderr
