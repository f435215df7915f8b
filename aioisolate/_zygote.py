"""Zygote mode, the parent's side: a small helper process forks the calls' children.

Forking copies the parent's page tables, so a call costs more the bigger the parent is; and a
child forked while other threads of the parent hold a lock (stdio, logging, the allocator's)
can hang on it. A `Zygote` starts a fresh interpreter early, small and single-threaded (the
code it runs is `_zygote_main`), and every call made with it is forked from there instead.

What changes for a call: its function, arguments and codec travel by pickle (`pack`), inline
in the request or, when large, in a memory file the child maps. The child's pipes are still
the parent's own, passed to the helper with the request, so results, output capture and the
spill file work as in fork mode, and so does everything in `_call` once the child runs: only
its watcher differs (`ZygoteWatcher`), which hears from the helper when the child started and
how it ended, and sends kills through it.
"""

from __future__ import annotations

import array
import collections
import errno
import itertools
import json
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel

from . import _fds, _platform, _spill
from ._codec import Codec
from ._errors import IsolationError, ZygoteDied
from ._zygote_main import (
    EXITED,
    FAILED,
    KILL,
    MAX_MESSAGE,
    READY,
    START,
    STARTED,
    Request,
)

if TYPE_CHECKING:
    import resource
    from typing import Self

# A payload up to this size goes inside the request; a larger one, or one with large buffers,
# in a memory file (the socket's messages must fit its buffer).
INLINE_MAX: Final = 64 << 10
# The file is written this much at a time, the event loop running in between (about a
# millisecond's worth of copying).
_SLICE: Final = 4 << 20
# How long closing waits for the helper to end by itself before it is killed.
_CLOSE_GRACE: Final = 5.0

# The helper runs this file as a script (see its docstring).
_BOOT: Final = os.path.join(os.path.dirname(__file__), "_zygote_boot.py")


class Zygote:
    """A helper process that forks the children of isolated calls: zygote mode.

    A fork copies the forking process's page tables (about 37 µs per resident MiB on 4 KiB
    pages), and a child forked while another thread holds a lock can hang on that lock. A
    zygote is a fresh interpreter started once, small and single-threaded; calls made with
    ``zygote=`` fork from it, so their cost does not depend on this process's size or threads::

        async with Zygote(preload=["numpy", "mylib.search"]) as zygote:
            result = await isolated(search, position, zygote=zygote)

    (``Isolator(mode="zygote")`` opens one of its own.) The price: the function, its arguments
    and the codec travel by pickle (cloudpickle), so they must be picklable, and the child sees
    the helper's world, not this process's: the modules imported and the environment as they
    were when the helper started, plus the working directory of the caller at each call.
    Functions from modules the helper has not imported are imported again in every child:
    name those modules in ``preload``.

    Everything else is as in fork mode: results, errors, limits, reports, cancellation, output
    capture, streaming. If the helper dies (killed, or out of memory), its running calls fail
    with `ZygoteDied` (their children die with it) and the next call starts a new helper.
    Leaving the ``async with`` block kills the children still running and ends the helper;
    so does the end of this process.

    Args:
        preload: modules for the helper to import when it starts, so that each child has them
            already. (The event loop library an async function needs is imported by the helper
            when the first one comes.)
    """

    def __init__(self, *, preload: Iterable[str] = ()) -> None:
        if isinstance(preload, str):
            raise TypeError("preload must be a list of module names, not one string")
        names = tuple(preload)
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"preload must name modules (strings), not {name!r}")
        self._preload = names
        self._state = "new"
        self._helper: _Helper | None = None
        self._retired: list[_Helper] = []  # dead or dying helpers, still to reap
        self._ids = itertools.count(1)
        self._owner = os.getpid()
        self._config: dict[str, Any] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<Zygote {self._state} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        """The current helper's process id; None when none runs (before start, after close)."""
        return self._helper.pid if self._helper is not None else None

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("a Zygote can be entered only once")
        self._state = "open"
        self._config = {"path": list(sys.path), "preload": list(self._preload)}
        try:
            helper = self._start_helper()
            await helper.ready()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the helper: it kills the children still running (their calls raise
        `ZygoteDied`) and exits, and it is reaped. Idempotent."""
        self._state = "closed"
        helpers = [h for h in (self._helper, *self._retired) if h is not None]
        self._helper, self._retired = None, []
        for helper in helpers:
            helper.hang_up()
        with anyio.CancelScope(shield=True):
            for helper in helpers:
                await helper.wait_gone(_CLOSE_GRACE)

    # The call's side (see _call.spawn): all synchronous, none of it waits.

    def start_call(self, request: Request, fds: dict[str, int], arguments: int) -> ZygoteWatcher:
        """Send a call's request with the fds its child needs; return its watcher.

        Raises `Busy` when the helper's socket is full (wait with `wait_writable`, retry).
        """
        helper = self._current()
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        _fds.library_fds.update((status_r, status_w))
        sent = False
        try:
            request.call_id = next(self._ids)
            request.fd_names = ("status", *fds)
            message = START + pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
            try:
                helper.send(message, [status_w, *fds.values()])
            except _Gone:
                # It died since the last call: that call's watcher says so; this one goes to a
                # new helper.
                with self._lock:
                    helper = self._replace(helper) if helper is self._helper else self._current()
                try:
                    helper.send(message, [status_w, *fds.values()])
                except _Gone:
                    raise IsolationError(
                        f"the zygote helper process {helper.pid} died as it started; its "
                        "stderr says why"
                    ) from None
            sent = True
            os.set_blocking(status_r, False)
        except BaseException:
            if sent:  # interrupted after all (a KeyboardInterrupt): nobody will watch the child
                helper.kill(KILL.pack(request.call_id, signal.SIGKILL, request.kill_descendants))
            _fds.close(status_r)
            raise
        finally:
            _fds.close(status_w)
        return ZygoteWatcher(self, helper, request.call_id, status_r, arguments)

    async def wait_writable(self) -> None:
        """Wait until the helper can take another request (after `Busy`)."""
        await self._current().wait_writable()

    def send_kill(self, helper: _Helper, call_id: int, sig: int, *, group: bool) -> None:
        """Have the helper signal a call's child (and its group); never blocks."""
        helper.kill(KILL.pack(call_id, sig, group))

    def closed_by_owner(self, helper: _Helper) -> bool:
        """Whether ``helper`` was ended by `aclose` (not killed by something else)."""
        return self._state == "closed" and not helper.died_first

    def _current(self) -> _Helper:
        with self._lock:  # one replacement, if two threads find the helper dead together
            return self._current_locked()

    def _current_locked(self) -> _Helper:
        if self._state != "open":
            raise RuntimeError(
                "this Zygote is closed"
                if self._state == "closed"
                else "a Zygote must be open: use it inside 'async with Zygote()'"
            )
        if os.getpid() != self._owner:
            raise RuntimeError(
                "a Zygote belongs to the process that opened it; open another in this one"
            )
        helper = self._helper
        assert helper is not None
        if not helper.alive():
            helper = self._replace(helper)
        return helper

    def _replace(self, dead: _Helper) -> _Helper:
        dead.died_first = True
        dead.hang_up()
        self._retired.append(dead)
        self._reap_retired()
        return self._start_helper()

    def _reap_retired(self) -> None:
        for helper in list(self._retired):
            if helper.exited():
                helper.reap()
                self._retired.remove(helper)

    def _start_helper(self) -> _Helper:
        if not sys.executable:
            raise RuntimeError("zygote mode starts a Python interpreter: sys.executable is unknown")
        with _fds.lock:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            _fds.library_fds.update((ours.fileno(), theirs.fileno()))
            kill_r, kill_w = os.pipe2(os.O_CLOEXEC)
            _fds.library_fds.update((kill_r, kill_w))
            try:
                # The helper finds its two fds at 3 and 4 (the boot script closes any other).
                # Each goes first to a number above both, as dup2 onto itself would leave
                # close-on-exec set.
                high = max(5, theirs.fileno(), kill_r) + 1
                config = dict(self._config, fd=3, kill_fd=4)
                pid = os.posix_spawn(
                    sys.executable,
                    [sys.executable, _BOOT, json.dumps(config)],
                    os.environ,
                    file_actions=[
                        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                        (os.POSIX_SPAWN_DUP2, theirs.fileno(), high),
                        (os.POSIX_SPAWN_DUP2, kill_r, high + 1),
                        (os.POSIX_SPAWN_DUP2, high, 3),
                        (os.POSIX_SPAWN_DUP2, high + 1, 4),
                    ],
                    # Its own process group: Ctrl-C at the terminal is the parent's to handle.
                    setpgroup=0,
                    setsigmask=(),
                )
            except BaseException:
                _close_socket(ours)
                _fds.close(kill_w)
                raise
            finally:
                _close_socket(theirs)
                _fds.close(kill_r)
            ours.setblocking(False)
            os.set_blocking(kill_w, False)
            try:
                watcher = _platform.watch(pid, _platform.select_watcher(), _fds.library_fds)
            except BaseException:
                _close_socket(ours)
                _fds.close(kill_w)
                os.kill(pid, signal.SIGKILL)
                _platform.reap(pid, block=True)
                raise
        self._helper = helper = _Helper(pid, watcher, ours, kill_w)
        return helper


class Busy(Exception):
    """The helper's socket is full: it has not read the requests before this one yet."""


class TooBig(Exception):
    """The request is larger than the socket can carry in one message."""


class _Gone(Exception):
    """The helper's end of the socket is closed: it died."""


class _Helper:
    """One helper process: its socket and the watcher of its process."""

    def __init__(
        self, pid: int, watcher: _platform.ChildWatcher, sock: socket.socket, kills: int
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
        self._writable: anyio.Event | None = None  # set when a full socket has room again

    def alive(self) -> bool:
        return not self.closed and not self.exited()

    def exited(self) -> bool:
        """Whether the process has exited (it is a zombie until `reap`)."""
        poller = select.poll()
        poller.register(self.watcher.fileno(), select.POLLIN)
        return bool(poller.poll(0))

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
        cannot fit in it at all, `_Gone` when the helper's end is closed."""
        self.flush_kills()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.sock.sendmsg([message], ancillary)
        except BlockingIOError:
            raise Busy() from None
        except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as exc:
            raise _Gone() from exc
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

    def kill(self, record: bytes) -> None:
        """Queue a kill for the helper: in the kill pipe at once if it has room (thousands
        fit), else the next time anything is sent. Never blocks, never drops one."""
        self.unsent.append(record)
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
            _close_socket(self.sock)
            _fds.close(self.kills)

    async def wait_gone(self, grace: float) -> None:
        with anyio.move_on_after(grace):
            await self.watcher.wait_exited()
        if not self.exited():
            self.watcher.send_signal(signal.SIGKILL)  # hung, or stopped
            await self.watcher.wait_exited()
        self.reap()

    def reap(self) -> None:
        self.watcher.reap()
        with _fds.lock:
            self.watcher.close()


class ZygoteWatcher:
    """The parent's view of a child a zygote forked: what the helper says on the status pipe."""

    pollable = True

    def __init__(
        self, zygote: Zygote, helper: _Helper, call_id: int, fd: int, arguments: int
    ) -> None:
        self.pid = 0
        # The pickled size of the call's arguments: what the child starts with beyond the
        # helper's memory, about (it unpickles them before anything counts its growth).
        self._arguments = arguments
        self.anonymous_at_fork: int | None = None
        self._zygote = zygote
        self._helper = helper
        self._call_id = call_id
        self._fd = fd
        self._buffer = b""
        self._status: tuple[int, resource.struct_rusage] | None = None
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
            self._zygote.send_kill(self._helper, self._call_id, sig, group=False)

    def signal_group(self, sig: int) -> None:
        if not self.has_exited():
            self._zygote.send_kill(self._helper, self._call_id, sig, group=True)
        elif self._lost and self.pid:
            # The helper died; the child was killed with it (and the helper never reaped it),
            # but what it started was not. Its group id cannot have been reused while anything
            # is left in the group, and once nothing is, this reaches no one.
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def reap(self, *, block: bool = False) -> tuple[int, resource.struct_rusage] | None:
        if block:
            # No event loop to wait with (an interrupt during cleanup): poll, which, unlike
            # select, takes any fd number.
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            deadline = time.monotonic() + _CLOSE_GRACE
            while not self.has_exited() and time.monotonic() < deadline:
                poller.poll(max(0, int((deadline - time.monotonic()) * 1000)))
        return self._status

    def failure(self) -> Exception | None:
        if self._fork_errno is not None:
            return OSError(self._fork_errno, os.strerror(self._fork_errno))
        if not self._lost:
            return None
        if not self.pid and self._helper.alive():
            # It lives on, yet dropped the request without a word: it could not even take the
            # request's fds, so could not say why on the status pipe it did not receive.
            return OSError(errno.EMFILE, "the zygote helper could not take the call's fds")
        child = f"child process {self.pid}" if self.pid else "the call's child (not yet forked)"
        if self._zygote.closed_by_owner(self._helper):
            why = "the Zygote was closed while the call ran; the helper killed its children"
        else:
            why = (
                f"the zygote helper process {self._helper.pid} died while the call ran (killed, "
                "or out of memory), and its children with it; the next call starts a new helper"
            )
        return ZygoteDied(
            f"{child} ended without sending a result: {why}",
            pid=self.pid,
            helper_pid=self._helper.pid,
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
    import resource

    return resource.struct_rusage((fields[0], fields[1], *(int(f) for f in fields[2:])))


class Payload:
    """A call's function, arguments and codec, pickled, ready to go with its request: inline,
    or in a memory file (its large buffers each on pages of their own, which the child maps
    rather than copies; see `_spill`)."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], codec: Codec) -> None:
        value = (func, tuple(_spill.whole(arg) for arg in args), codec)
        try:
            data, buffers = _spill.split(value)
        except Exception as exc:
            raise TypeError(
                f"zygote mode pickles the function and its arguments to send them to the "
                f"helper, and {_describe(func)} or its arguments could not be pickled: "
                f"{type(exc).__name__}: {exc}. Make them picklable (functions defined at module "
                "level, plain data), or run this call in fork mode (without zygote=), which "
                "hands them to the child by fork and pickles nothing"
            ) from exc
        self.fd = -1
        self.inline: bytes | None = None
        self.at = self.size = 0
        self._writes: list[tuple[memoryview | bytes, int]] = []
        if not buffers and len(data) <= INLINE_MAX:
            self.inline = data
            return
        self._to_file(data, buffers)

    def to_file(self) -> None:
        """Go in the file after all (a request too large for the socket with it inline)."""
        if self.inline is not None:
            data, self.inline = self.inline, None
            self._to_file(data, [])

    def _to_file(self, data: bytes, buffers: list[memoryview]) -> None:
        table, offsets, end = _spill.layout(buffers)
        payload = table + data
        self.at = -(-end // 4096) * 4096
        self.size = len(payload)
        self._writes = [*zip(buffers, offsets, strict=True), (payload, self.at)]

    @property
    def nbytes(self) -> int:
        """The pickle's size, buffers included."""
        if self.inline is not None:
            return len(self.inline)
        return sum(memoryview(data).nbytes for data, _ in self._writes)

    def open(self) -> None:
        """Create the file (when one is needed)."""
        if self._writes:
            with _fds.lock:
                self.fd = _platform.payload_file(_fds.library_fds)

    def slices(self) -> Iterator[None]:
        """Fill the file a slice at a time, yielding after each: the caller lets the event
        loop run between slices (no thread: a thread would make the next fork-mode call's
        fork one from a threaded process)."""
        for data, offset in self._writes:
            view = memoryview(data)
            for start in range(0, len(view), _SLICE):
                _spill.write_at(self.fd, view[start : start + _SLICE], offset + start)
                yield

    def close(self) -> None:
        if self.fd >= 0:
            _fds.close(self.fd)
            self.fd = -1


def _describe(func: object) -> str:
    name = getattr(func, "__qualname__", None) or type(func).__name__
    return f"the function {name!r}"


def _close_socket(sock: socket.socket) -> None:
    with _fds.lock:
        fd = sock.fileno()
        if fd >= 0:
            anyio.notify_closing(sock)
            _fds.library_fds.discard(fd)
            sock.close()
