"""The zygote helper process: forks the children of zygote-mode calls, reaps them, reports.

The parent starts it as a fresh interpreter (see `_zygote.Zygote`), so it is small and runs no
thread: a fork from it costs the same whatever the parent's size, and no lock can be held by
another thread at that moment. It talks with the parent over one Unix seqpacket socket:

* the parent sends ``START`` with a call's plan, the pickled function and arguments (inline or
  in a memory file), and the fds the child needs, among them the call's *status pipe*;
* the helper forks, and writes to the status pipe ``STARTED`` (the pid), later ``EXITED`` (the
  wait status and resource usage), or ``FAILED`` (fork's errno); then closes it. A status pipe
  closed with no ``EXITED`` means the helper died;
* the parent writes ``KILL`` records to the *kill pipe* to signal a call's child, and its
  process group. The helper alone reaps its children, so it alone knows that a pid still names
  the child: kills go through it. They have a pipe of their own, read before the socket, so
  that a queue of requests never holds a kill back.

A request the helper cannot carry out (no fds left, no memory to fork, a message too large)
gets ``FAILED`` on its status pipe; the helper goes on serving the others.

End of file on the socket (the parent closed the zygote, or died) kills every child still
running, and their process groups, and ends the helper. Its children die with it (each asks
for SIGKILL when its parent dies).
"""

from __future__ import annotations

import array
import dataclasses
import errno
import gc
import importlib
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Final, NoReturn

from . import _child, _forking, _linux, _spill

# A request, parent to helper on the socket (the first byte says what it is).
START: Final = b"S"
# A kill, parent to helper on the kill pipe: call id, signal, whether to its process group too.
KILL: Final = struct.Struct(">Qi?")
# Helper to parent on the control socket, once: ready, or why it could not start.
READY: Final = b"R"
BROKEN: Final = b"E"

# Status pipe records, helper to parent (each far below PIPE_BUF: written at once).
STARTED: Final = struct.Struct(">ciQ")  # b"s", pid, the helper's anonymous memory at fork
EXITED: Final = struct.Struct(">ci16d")  # b"x", wait status, struct rusage's 16 fields
FAILED: Final = struct.Struct(">ci")  # b"f", fork's errno

# The largest message a Unix socket can carry here is its send buffer (net.core.wmem_max,
# 208 KiB by default): the helper's receive buffer is larger, so no message is ever cut.
MAX_MESSAGE: Final = 1 << 20
MAX_FDS: Final = 8


@dataclasses.dataclass(slots=True)
class Request:
    """A START message, as the parent pickles it (plain pickle: plain fields only)."""

    plan: _child.Plan  # its fd fields are filled in by the helper
    cwd: str | None  # the parent's, for the child to work in (unless the call sets one)
    payload: bytes | None  # the pickled function, arguments and codec; None: in the file
    payload_at: int = 0  # where the payload starts in the file "payload" (see _spill)
    payload_size: int = 0
    kill_descendants: bool = True  # kill the child's process group when it is reaped
    # Modules the child needs and the helper should import first, once: the event loop
    # library of an async function (asyncio, uvloop, trio).
    imports: tuple[str, ...] = ()
    call_id: int = 0  # set by the zygote as it sends the request
    fd_names: tuple[str, ...] = ()  # what each fd sent with the message is for, in order


@dataclasses.dataclass(slots=True)
class _Running:
    call_id: int
    pid: int
    status_fd: int
    kill_descendants: bool


def main(config: dict[str, Any]) -> NoReturn:
    """Run the helper; ``config`` comes from the parent (see `_zygote.Zygote`)."""
    sock = socket.socket(fileno=config["fd"])
    kills = config["kill_fd"]
    os.set_blocking(kills, False)
    try:
        for name in config["preload"]:
            importlib.import_module(name)
    except BaseException:
        _send_quietly(sock, BROKEN + traceback.format_exc().encode(errors="replace"))
        os._exit(1)
    # What is here now lives as long as the helper: out of the collector's way, so that a
    # collection in the helper or in a child does not touch (and so copy) all of its pages.
    gc.freeze()
    helper = _Helper(sock, kills)
    # Ready only once everything the loop needs is open: a caller may look at (or limit) the
    # helper's fds as soon as it hears this.
    _send_quietly(sock, READY)
    helper.serve()


class _Helper:
    def __init__(self, sock: socket.socket, kills: int) -> None:
        self.sock = sock
        self.kills = kills
        self.buffer = bytearray(MAX_MESSAGE)  # one, reused: no large allocation per request
        self.by_pid: dict[int, _Running] = {}
        self.by_call: dict[int, _Running] = {}
        # Kills read before their call's request (the kill pipe is read first): applied once
        # the child is forked. Call ids only grow, so those below the last request are stale.
        self.early: dict[int, list[tuple[int, bool]]] = {}
        self.last_call = 0
        # SIGCHLD wakes the poll below through this pipe. A handler, not SIG_IGN, which would
        # have the kernel reap children before we read their status.
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _no_op)

    def serve(self) -> NoReturn:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.kills, select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            # Kills first: they may be for children of requests still waiting in the socket.
            if self.kills in ready:
                self.read_kills()
            if self.wake_r in ready:
                _drain(self.wake_r)
                self.reap()
            if self.sock.fileno() in ready and not self.receive():
                self.shut_down()

    def read_kills(self) -> None:
        try:
            data = os.read(self.kills, KILL.size * 256)
        except BlockingIOError:
            return
        # Records are written whole (far below PIPE_BUF), so a read holds whole records.
        for offset in range(0, len(data) - KILL.size + 1, KILL.size):
            self.kill(*KILL.unpack_from(data, offset))

    def receive(self) -> bool:
        """Handle one message; False at end of file (the parent closed us, or died)."""
        try:
            size, ancillary, flags, _ = self.sock.recvmsg_into(
                [self.buffer], socket.CMSG_SPACE(MAX_FDS * 4)
            )
        except (BlockingIOError, InterruptedError):
            return True
        except ConnectionResetError:
            return False
        fds = array.array("i")
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        if not size and not fds:
            return False
        data = memoryview(self.buffer)[:size]
        problem = 0
        if flags & socket.MSG_CTRUNC:
            problem = errno.EMFILE  # we could not take all of its fds
        elif flags & socket.MSG_TRUNC or not size or data[0] != START[0]:
            problem = errno.EMSGSIZE
        if problem:
            # The status pipe comes first: say why there will be no child, on it.
            if fds:
                _write_quietly(fds[0], FAILED.pack(b"f", problem))
            _close_all(fds)
            return True
        self.start(data[1:], list(fds))
        return True

    def start(self, message: memoryview, fds: list[int]) -> None:
        try:
            request: Request = pickle.loads(message)
            for name in request.imports:
                if name not in sys.modules:
                    try:
                        importlib.import_module(name)
                    except Exception:
                        pass  # the child tries again, and reports why it cannot
            given = dict(zip(request.fd_names, fds, strict=True))
            status = given.pop("status")
            payload_fd = given.pop("payload", -1)
            plan = dataclasses.replace(
                request.plan,
                write_fd=given["result"],
                stdout=given.get("stdout", request.plan.stdout),
                stderr=given.get("stderr", request.plan.stderr),
                spill_fd=given.get("spill", -1),
                parent_pid=os.getpid(),
                # Ours, and every other call's status pipe: not the child's business.
                inherited_fds=[
                    self.sock.fileno(),
                    self.kills,
                    self.wake_r,
                    self.wake_w,
                    status,
                    *(running.status_fd for running in self.by_pid.values()),
                ],
            )
            _, anonymous = _linux.resident_memory()

            def child(sigmask: set[int]) -> None:
                load = _loader(request, payload_fd)
                _child.run(_unloaded, (), plan, sigmask, load)

            pid = _forking.fork(child)
        except Exception as exc:
            # Out of fds, memory or processes, or a request we cannot read: not a reason to
            # fail the other calls. This one fails, on its status pipe (the first fd).
            if fds:
                _write_quietly(fds[0], FAILED.pack(b"f", getattr(exc, "errno", 0) or errno.EIO))
            _close_all(fds)
            return
        # From here nothing may fail: the child runs, and its call must hear how it ends.
        _close_all(fd for fd in (payload_fd, *given.values()) if fd >= 0)
        running = _Running(request.call_id, pid, status, request.kill_descendants)
        self.by_pid[pid] = self.by_call[request.call_id] = running
        _write_quietly(status, STARTED.pack(b"s", pid, anonymous))
        self.last_call = request.call_id
        for sig, group in self.early.pop(request.call_id, ()):
            self.kill(request.call_id, sig, group)
        for stale in [call for call in self.early if call < request.call_id]:
            del self.early[stale]  # its request failed: there is nothing to kill

    def kill(self, call_id: int, sig: int, group: bool) -> None:
        running = self.by_call.get(call_id)
        if running is None:
            if call_id > self.last_call:
                self.early.setdefault(call_id, []).append((sig, group))  # not forked yet
            return  # else reaped already, or never forked
        # Not reaped yet: the pid, and the group id, are still the child's.
        try:
            os.kill(running.pid, sig)
            if group:
                os.killpg(running.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self) -> None:
        while True:
            try:
                # WNOWAIT: the child stays a zombie, so its group id is still its own for the
                # kill below.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            running = self.by_pid.pop(info.si_pid, None)
            if running is not None and running.kill_descendants:
                try:
                    os.killpg(info.si_pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            waited = _forking.reap(info.si_pid, block=True)  # exited: it does not block
            if running is not None:
                del self.by_call[running.call_id]
                if waited is not None:  # always: only the helper reaps its children
                    _write_quietly(running.status_fd, EXITED.pack(b"x", waited[0], *waited[1]))
                os.close(running.status_fd)

    def shut_down(self) -> NoReturn:
        for running in self.by_pid.values():
            self.kill(running.call_id, signal.SIGKILL, running.kill_descendants)
        for running in self.by_pid.values():
            _forking.reap(running.pid, block=True)
            # Closed without EXITED: the parent reads that its helper is gone.
            os.close(running.status_fd)
        os._exit(0)


def _loader(
    request: Request, payload_fd: int
) -> Callable[[_child.Plan], tuple[Callable[..., Any], tuple[Any, ...], _child.Plan]]:
    """In the child, before its setup: map the payload file now (its pages are then part of
    what the child started with, not growth counted against a memory limit), and return what
    unpickles it after setup."""
    mapping = None
    if payload_fd >= 0:
        # Private and writable, as the arguments a forked child inherits: a write copies a page.
        mapping = mmap.mmap(
            payload_fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        os.close(payload_fd)

    def load(plan: _child.Plan) -> tuple[Callable[..., Any], tuple[Any, ...], _child.Plan]:
        if plan.sandbox.cwd is None and request.cwd is not None:
            os.chdir(request.cwd)
        try:
            if mapping is None:
                assert request.payload is not None
                func, args, codec = pickle.loads(request.payload)
            else:
                start = request.payload_at
                view = memoryview(mapping)[start : start + request.payload_size]
                func, args, codec = _spill.load(view, mapping)
        except ImportError as exc:
            raise RuntimeError(
                "the function and its arguments could not be unpickled in the zygote's child "
                f"({exc!r}); the helper must be able to import the modules they come from "
                "(name them in preload=, or use fork mode)"
            ) from exc
        return func, args, dataclasses.replace(plan, codec=codec)

    return load


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _unloaded() -> None:
    raise AssertionError("replaced by the function the zygote's child loads")


def _no_op(signum: int, frame: object) -> None:
    pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _write_quietly(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass  # the parent gave up on the call (it is reading nothing more from this pipe)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass


if __name__ == "__main__":  # pragma: no cover - started by _zygote.Zygote with its config
    sys.exit("started by aioisolate only")
