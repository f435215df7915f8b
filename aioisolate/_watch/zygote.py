"""The watcher of a child a zygote helper forked: what the helper says on the call's status pipe.

The helper writes ``STARTED`` (the pid) once it has forked, ``EXITED`` (the wait status and
resource usage) once it has reaped the child, or ``FAILED`` (fork's errno), and closes the pipe.
A pipe closed without ``EXITED`` means the helper died. Kills go through the helper, which alone
reaps its children and so alone knows that a pid still names the child.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import time
from typing import TYPE_CHECKING, Final

import anyio

from .. import _fds
from .._errors import ZygoteDied
from .._forking import Waited
from .._zygote_main import EXITED, FAILED, STARTED

if TYPE_CHECKING:
    from .._zygote_helper import Helper

# How long a blocking reap (no event loop: an interrupt during cleanup) waits for the helper.
_BLOCKING_WAIT: Final = 5.0


class ZygoteWatcher:
    """The parent's view of a child a zygote forked, from the status pipe ``fd``."""

    pollable = True

    def __init__(self, helper: Helper, call_id: int, fd: int, arguments: int) -> None:
        self.pid = 0
        # The pickled size of the call's arguments: what the child starts with beyond the
        # helper's memory, about (it unpickles them before anything counts its growth).
        self._arguments = arguments
        self.anonymous_at_fork: int | None = None
        self._helper = helper
        self._call_id = call_id
        self._fd = fd
        self._buffer = b""
        self._status: Waited | None = None
        self._exited = False
        self._lost = False  # the pipe closed with no word of the child's end: the helper died
        self._fork_errno: int | None = None
        self._started: anyio.Event | None = None

    def fileno(self) -> int:
        return self._fd

    async def started(self) -> None:
        # Whoever waits for the child's exit reads the pipe (and so the pid): only wait here.
        if self.pid or self._exited:
            return
        if self._started is None:
            self._started = anyio.Event()
        await self._started.wait()

    async def wait_exited(self) -> None:
        while not self.has_exited():
            await anyio.wait_readable(self._fd)

    def has_exited(self) -> bool:
        if not self._exited:
            self._read()
        return self._exited

    def send_signal(self, sig: int) -> None:
        if not self.has_exited():
            self._helper.send_kill(self._call_id, sig, group=False)

    def signal_group(self, sig: int) -> None:
        if not self.has_exited():
            self._helper.send_kill(self._call_id, sig, group=True)
        elif self._lost and self.pid:
            # The helper died; the child was killed with it (and the helper never reaped it),
            # but what it started was not. Its group id cannot have been reused while anything
            # is left in the group, and once nothing is, this reaches no one.
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self, *, block: bool = False) -> Waited | None:
        if block:
            # No event loop to wait with (an interrupt during cleanup): poll, which, unlike
            # select, takes any fd number.
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            deadline = time.monotonic() + _BLOCKING_WAIT
            while not self.has_exited() and time.monotonic() < deadline:
                poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))
        return self._status

    def failure(self) -> Exception | None:
        if self._fork_errno is not None:
            return OSError(self._fork_errno, os.strerror(self._fork_errno))
        if not self._lost:
            return None
        helper = self._helper
        if not self.pid and helper.alive():
            # It lives on, yet dropped the request without a word: it could not even take the
            # request's fds, so could not say why on the status pipe it did not receive.
            return OSError(errno.EMFILE, "the zygote helper could not take the call's fds")
        child = f"child process {self.pid}" if self.pid else "the call's child (not yet forked)"
        if helper.closed_by_owner:
            why = "the Zygote was closed while the call ran; the helper killed its children"
        else:
            why = (
                f"the zygote helper process {helper.pid} died while the call ran (killed, "
                "or out of memory), and its children with it; the next call starts a new helper"
            )
        return ZygoteDied(
            f"{child} ended without sending a result: {why}",
            pid=self.pid,
            helper_pid=helper.pid,
        )

    def close(self) -> None:
        anyio.notify_closing(self._fd)
        _fds.close(self._fd)

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                # The end: the helper is done with the call (it closes the pipe right after
                # EXITED), or it died (no EXITED came).
                self._parse()
                self._lost = self._status is None and self._fork_errno is None
                self._exited = True
                break
            self._buffer += chunk
        self._parse()
        if (self.pid or self._exited) and self._started is not None:
            self._started.set()

    def _parse(self) -> None:
        while self._buffer:
            kind = self._buffer[:1]
            record = {b"s": STARTED, b"x": EXITED, b"f": FAILED}.get(kind)
            if record is None or len(self._buffer) < record.size:
                break
            fields = record.unpack_from(self._buffer)
            self._buffer = self._buffer[record.size :]
            if kind == b"s":
                self.pid, self.anonymous_at_fork = fields[1], fields[2] + self._arguments
            elif kind == b"x":
                self._status = fields[1], _rusage(fields[2:])
            else:
                self._fork_errno = fields[1] or errno.EAGAIN


def _rusage(fields: tuple[float, ...]) -> resource.struct_rusage:
    return resource.struct_rusage((fields[0], fields[1], *(int(f) for f in fields[2:])))
