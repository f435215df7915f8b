"""The zygote helper process: forks the children of zygote-mode calls, reaps them, reports.

The parent starts it as a fresh interpreter (see `_zygote.Zygote`), so it is small and runs no
thread: a fork from it costs the same whatever the parent's size, and no lock can be held by
another thread at that moment. It talks with the parent over one Unix seqpacket socket:

* the parent sends ``START`` with a call's plan, the pickled function and arguments (inline or
  in a memory file), and the fds the child needs, among them the call's *status pipe*;
* the helper forks, and writes to the status pipe ``STARTED`` (the pid), later ``EXITED`` (the
  wait status and resource usage), or ``FAILED`` (fork's errno); then closes it. A status pipe
  closed with no ``EXITED`` means the helper died;
* the parent sends ``KILL`` to signal a call's child, and its process group. The helper alone
  reaps its children, so it alone knows that a pid still names the child: kills go through it.

End of file on the socket (the parent closed the zygote, or died) kills every child still
running, and their process groups, and ends the helper. Its children die with it (each asks
for SIGKILL when its parent dies).
"""

from __future__ import annotations

import _signal
import array
import dataclasses
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
from collections.abc import Callable
from typing import Any, Final, NoReturn

from . import _child, _platform, _spill

# Control messages, parent to helper (the first byte says which).
START: Final = b"S"
KILL: Final = b"K"
KILL_ARGS: Final = struct.Struct(">Qi?")  # call id, signal, whether to its process group too
# Helper to parent on the control socket, once: ready, or why it could not start.
READY: Final = b"R"
BROKEN: Final = b"E"

# Status pipe records, helper to parent (each far below PIPE_BUF: written at once).
STARTED: Final = struct.Struct(">ciQ")  # b"s", pid, the helper's anonymous memory at fork
EXITED: Final = struct.Struct(">ci16d")  # b"x", wait status, struct rusage's 16 fields
FAILED: Final = struct.Struct(">ci")  # b"f", fork's errno

# A START message is a small header and, for small payloads, the pickle itself.
# Below malloc's mmap threshold (128 KiB): the receive buffer then comes from the heap.
MAX_MESSAGE: Final = 96 << 10
MAX_FDS: Final = 8


@dataclasses.dataclass(slots=True)
class Request:
    """A START message, as the parent pickles it (plain pickle: plain fields only)."""

    plan: _child.Plan  # its fd fields are filled in by the helper
    cwd: str  # the parent's, for the child to work in (unless the call sets one)
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
    try:
        for name in config["preload"]:
            importlib.import_module(name)
    except BaseException:
        _send_quietly(sock, BROKEN + traceback.format_exc().encode(errors="replace"))
        os._exit(1)
    # What is here now lives as long as the helper: out of the collector's way, so that a
    # collection in the helper or in a child does not touch (and so copy) all of its pages.
    gc.freeze()
    _send_quietly(sock, READY)
    _Helper(sock).serve()


class _Helper:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.by_pid: dict[int, _Running] = {}
        self.by_call: dict[int, _Running] = {}
        # SIGCHLD wakes the poll below through this pipe. A handler, not SIG_IGN, which would
        # have the kernel reap children before we read their status.
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, _no_op)

    def serve(self) -> NoReturn:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self.wake_r:
                    _drain(self.wake_r)
                    self.reap()
                elif not self.receive():
                    self.shut_down()

    def receive(self) -> bool:
        """Handle one message; False at end of file (the parent closed us, or died)."""
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4)
            )
        except (BlockingIOError, InterruptedError):
            return True
        except ConnectionResetError:
            return False
        fds = array.array("i")
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
        if not data and not fds:
            return False
        if data[:1] == START and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self.start(pickle.loads(data[1:]), list(fds))
        else:
            for fd in fds:
                os.close(fd)
            if data[:1] == KILL:
                self.kill(*KILL_ARGS.unpack(data[1:]))
        return True

    def start(self, request: Request, fds: list[int]) -> None:
        for name in request.imports:
            if name not in sys.modules:
                try:
                    importlib.import_module(name)
                except Exception:
                    pass  # the child tries again, and reports why it cannot
        given = dict(zip(request.fd_names, fds, strict=True))
        status = given.pop("status")
        payload_fd = given.pop("payload", -1)
        plan = request.plan
        plan = dataclasses.replace(
            plan,
            write_fd=given["result"],
            stdout=given.get("stdout", plan.stdout),
            stderr=given.get("stderr", plan.stderr),
            spill_fd=given.get("spill", -1),
            parent_pid=os.getpid(),
            # Ours, and every other call's status pipe: not the child's business.
            inherited_fds=[
                self.sock.fileno(),
                self.wake_r,
                self.wake_w,
                status,
                *(running.status_fd for running in self.by_pid.values()),
            ],
        )
        _, anonymous = _platform.resident_memory()
        sigmask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
        try:
            pid = os.fork()
        except OSError as exc:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, sigmask)
            _write_quietly(status, FAILED.pack(b"f", exc.errno or 0))
            for fd in (status, payload_fd, *given.values()):
                if fd >= 0:
                    os.close(fd)
            return
        if pid == 0:
            try:
                load = _loader(request, payload_fd)
                _child.run(_unloaded, (), dataclasses.replace(plan, sigmask=sigmask), load)
            finally:
                os._exit(_child.EXIT_INTERNAL)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, sigmask)
        try:
            os.setpgid(pid, pid)  # as the child does itself: whichever runs first
        except OSError:
            pass
        for fd in (payload_fd, *given.values()):
            if fd >= 0:
                os.close(fd)
        running = _Running(request.call_id, pid, status, request.kill_descendants)
        self.by_pid[pid] = self.by_call[request.call_id] = running
        _write_quietly(status, STARTED.pack(b"s", pid, anonymous))

    def kill(self, call_id: int, sig: int, group: bool) -> None:
        running = self.by_call.get(call_id)
        if running is None:
            return  # reaped already, or never forked
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
            _, status, rusage = os.wait4(info.si_pid, 0)
            if running is not None:
                del self.by_call[running.call_id]
                _write_quietly(running.status_fd, EXITED.pack(b"x", status, *rusage))
                os.close(running.status_fd)

    def shut_down(self) -> NoReturn:
        for running in self.by_pid.values():
            self.kill(running.call_id, signal.SIGKILL, running.kill_descendants)
        for running in self.by_pid.values():
            try:
                os.waitpid(running.pid, 0)
            except ChildProcessError:
                pass
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
        if plan.sandbox.cwd is None:
            os.chdir(request.cwd)
        try:
            if mapping is None:
                assert request.payload is not None
                func, args, codec = pickle.loads(request.payload)
            else:
                start = request.payload_at
                view = memoryview(mapping)[start : start + request.payload_size]
                func, args, codec = _spill.load(view, mapping)
        except Exception as exc:
            raise RuntimeError(
                "the function and its arguments could not be unpickled in the zygote's child "
                f"({exc!r}); the helper must be able to import the modules they come from "
                "(name them in preload=, or use fork mode)"
            ) from exc
        return func, args, dataclasses.replace(plan, codec=codec)

    return load


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
