"""One zygote helper process, from the parent's side: the socket its requests go through, the
pipe its kills go through, its first word, and its end.

Which helper serves a `Zygote`, and its replacement when it dies, are the `Zygote`'s
(`_zygote`); what the helper does is `_zygote_main`'s.
"""

from __future__ import annotations

import array
import collections
import errno
import os
import select
import signal
import socket

import anyio

from . import _fds, _watch
from ._errors import IsolationError
from ._zygote_main import KILL, MAX_MESSAGE, READY


class Busy(Exception):
    """The helper's socket is full: it has not read the requests before this one yet."""


class TooBig(Exception):
    """The request is larger than the socket can carry in one message."""


class Gone(Exception):
    """The helper's end of the socket is closed: it died."""


class Helper:
    """One helper process: its socket and the watcher of its process."""

    def __init__(
        self, pid: int, watcher: _watch.ChildWatcher, sock: socket.socket, kills: int
    ) -> None:
        self.pid = pid
        self.watcher = watcher
        self.sock = sock
        self.kills = kills  # the kill pipe's write end
        self.unsent: collections.deque[bytes] = (
            collections.deque()
        )  # kills the pipe had no room for
        self.closed = False
        self.died_first = False  # it was gone before we hung up
        self.closed_by_owner = False  # ended by Zygote.aclose (not killed by something else)
        self.reaped = False
        self._writable: anyio.Event | None = None  # set when a full socket has room again
        self.ready_seen = False  # it said READY
        self.broken: IsolationError | None = None  # it said why it could not start
        self._ready: anyio.Event | None = None  # set when the task reading READY is done

    def alive(self) -> bool:
        return not self.closed and not self.exited()

    def exited(self) -> bool:
        """Whether the process has exited (it is a zombie until `reap`)."""
        poller = select.poll()
        poller.register(self.watcher.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    async def confirm_ready(self) -> None:
        """Return once the helper has said it is ready; raise why it could not start. One task
        reads the socket (anyio allows one per fd); the others wait for it to say so."""
        while self.broken is None and not self.ready_seen:
            if self._ready is not None:
                await self._ready.wait()
                continue
            self._ready = event = anyio.Event()
            try:
                await self.ready()
                self.ready_seen = True
            except IsolationError as exc:
                self.broken = exc
            finally:
                self._ready = None
                event.set()
        if self.broken is not None:
            raise self.broken

    async def ready(self) -> None:
        """Wait for the helper's first word: ready, or why it could not start."""
        while True:
            await anyio.wait_readable(self.sock)
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            break
        if data == READY:
            return
        why = data[1:].decode(errors="replace").strip() or "it exited without saying why"
        raise IsolationError(f"the zygote helper process {self.pid} could not start:\n{why}")

    def send(self, message: bytes, fds: list[int]) -> None:
        """Send a request; raises `Busy` when the socket is full, `TooBig` when the message
        cannot fit in it at all, `Gone` when the helper's end is closed."""
        self.flush_kills()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([message], ancillary)
        except BlockingIOError:
            raise Busy() from None
        except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as exc:
            raise Gone() from exc
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise TooBig(len(message)) from exc
            raise

    async def wait_writable(self) -> None:
        """Wait until the socket has room. One task waits on the fd (anyio allows one per
        fd); the others wait for it to say so."""
        if self._writable is not None:
            await self._writable.wait()
            return
        self._writable = event = anyio.Event()
        try:
            await anyio.wait_writable(self.sock)
        except anyio.ClosedResourceError:
            pass  # hung up meanwhile: the retry finds the zygote closed
        finally:
            self._writable = None
            event.set()

    def send_kill(self, call_id: int, sig: int, *, group: bool) -> None:
        """Have the helper signal a call's child (and its group): in the kill pipe at once if
        it has room (thousands fit), else the next time anything is sent. Never blocks, never
        drops one."""
        self.unsent.append(KILL.pack(call_id, sig, group))
        self.flush_kills()

    def flush_kills(self) -> None:
        while self.unsent and not self.closed:
            try:
                os.write(self.kills, self.unsent[0])
            except BlockingIOError:
                return  # a helper thousands of kills behind: they go with the next request
            except OSError:
                self.unsent.clear()  # the helper is gone, and its children with it
                return
            self.unsent.popleft()

    def hang_up(self) -> None:
        """Close our end: the helper kills its children and exits."""
        if not self.closed:
            self.closed = True
            close_socket(self.sock)
            _fds.close(self.kills)

    async def wait_gone(self, grace: float) -> None:
        with anyio.move_on_after(grace):
            await self.watcher.wait_exited()
        if not self.exited():
            self.watcher.send_signal(signal.SIGKILL)  # hung, or stopped
            await self.watcher.wait_exited()
        self.reap()

    def reap(self) -> None:
        if not self.reaped:  # once: its pid may be another child's afterwards
            self.reaped = True
            self.watcher.reap()
            with _fds.lock:
                self.watcher.close()

    def forget(self) -> None:
        """In a forked child: drop our end without closing it (the child's setup closes the
        inherited fds; a later close could hit a number reused meanwhile)."""
        self.closed = True
        self.sock.detach()


def close_socket(sock: socket.socket) -> None:
    with _fds.lock:
        fd = sock.fileno()
        if fd >= 0:
            anyio.notify_closing(sock)
            _fds.library_fds.discard(fd)
            sock.close()
