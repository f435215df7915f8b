"""The zygote helper, from the parent's side: starting it, talking to it, replacing it.

Forking copies the parent's page tables, so a call costs more the bigger the parent is; and a
child forked while other threads of the parent hold a lock (stdio, logging, the allocator's)
can hang on it. A `Zygote` starts a fresh interpreter early, small and single-threaded (the
code it runs is `_zygote_main`), and every call made with it is forked from there instead.

This module owns which helper serves a zygote (one at a time; a dead one is replaced at the
next call), its start and its end, and the zygote this process shares for ``zygote=True``. The
channel to one helper is `_zygote_helper.Helper`; how a call goes through it is the zygote
spawner's (`_spawn.zygote`), and how the call hears from its child the `ZygoteWatcher`'s.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.lowlevel

from . import _fds, _forking, _watch
from ._errors import IsolationError
from ._watch.zygote import ZygoteWatcher
from ._zygote_helper import Gone, Helper, close_socket
from ._zygote_main import START, Request

if TYPE_CHECKING:
    from typing import Self

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

    (``Isolator(zygote=True)`` opens one of its own, and ``zygote=True`` on a call outside
    one uses a helper this process shares.) The price: the function, its arguments
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
        self._helper: Helper | None = None
        self._retired: list[Helper] = []  # dead or dying helpers, still to reap
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
        try:
            await self._open().confirm_ready()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            raise
        return self

    def _open(self) -> Helper:
        """Start the helper, without waiting for it: requests sent meanwhile wait in its
        socket (see `Helper.confirm_ready`)."""
        if self._state != "new":
            raise RuntimeError("a Zygote can be entered only once")
        self._config = {"path": list(sys.path), "preload": list(self._preload)}
        helper = self._start_helper()
        self._state = "open"
        return helper

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the helper: it kills the children still running (their calls raise
        `ZygoteDied`) and exits, and it is reaped. Idempotent."""
        self._state = "closed"
        helpers = [h for h in (self._helper, *self._retired) if h is not None]
        self._helper, self._retired = None, []
        for helper in helpers:
            # Its calls' children die with it: they say the Zygote was closed, unless the
            # helper had died first.
            helper.closed_by_owner = not helper.died_first
            helper.hang_up()
        with anyio.CancelScope(shield=True):
            for helper in helpers:
                await helper.wait_gone(_CLOSE_GRACE)

    # The zygote spawner's side (see _spawn.zygote): all synchronous, none of it waits.

    def _start_call(self, request: Request, fds: dict[str, int], arguments: int) -> ZygoteWatcher:
        """Send a call's request with the fds its child needs; return its watcher.

        Raises `Busy` when the helper's socket is full (wait with `_wait_writable`, retry).
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
            except Gone:
                # It died since the last call: that call's watcher says so; this one goes to a
                # new helper.
                with self._lock:
                    helper = self._replace(helper) if helper is self._helper else self._current()
                try:
                    helper.send(message, [status_w, *fds.values()])
                except Gone:
                    raise IsolationError(
                        f"the zygote helper process {helper.pid} died as it started; its "
                        "stderr says why"
                    ) from None
            sent = True
            os.set_blocking(status_r, False)
        except BaseException:
            if sent:  # interrupted after all (a KeyboardInterrupt): nobody will watch the child
                helper.send_kill(request.call_id, signal.SIGKILL, group=request.kill_descendants)
            _fds.close(status_r)
            raise
        finally:
            _fds.close(status_w)
        return ZygoteWatcher(helper, request.call_id, status_r, arguments)

    async def _wait_writable(self) -> None:
        """Wait until the helper can take another request (after `Busy`)."""
        await self._current().wait_writable()

    def _current(self) -> Helper:
        if os.getpid() != self._owner:
            # Before the lock, which a thread of the parent may have held as it forked us.
            raise RuntimeError(
                "a Zygote belongs to the process that opened it; open another in this one"
            )
        with self._lock:  # one replacement, if two threads find the helper dead together
            return self._current_locked()

    def _current_locked(self) -> Helper:
        if self._state != "open":
            raise RuntimeError(
                "this Zygote is closed"
                if self._state == "closed"
                else "a Zygote must be open: use it inside 'async with Zygote()'"
            )
        helper = self._helper
        if helper is None or not helper.alive():
            helper = self._replace(helper)
        return helper

    def _replace(self, dead: Helper | None) -> Helper:
        """A new helper in place of ``dead`` (None: a replacement that failed to start)."""
        if dead is not None:
            dead.died_first = True
            dead.hang_up()
            self._retired.append(dead)
            self._helper = None  # retired once, whether or not the new one starts
        self._reap_retired()
        return self._start_helper()

    def _reap_retired(self) -> None:
        for helper in list(self._retired):
            if helper.exited():
                helper.reap()
                self._retired.remove(helper)

    def _start_helper(self) -> Helper:
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
                close_socket(ours)
                _fds.close(kill_w)
                raise
            finally:
                close_socket(theirs)
                _fds.close(kill_r)
            ours.setblocking(False)
            os.set_blocking(kill_w, False)
            try:
                watcher = _watch.watch(pid, _watch.select_watcher(), _fds.library_fds)
            except BaseException:
                close_socket(ours)
                _fds.close(kill_w)
                _forking.kill_now(pid, group=False)
                raise
        self._helper = helper = Helper(pid, watcher, ours, kill_w)
        return helper


# The zygote of calls made with zygote=True outside an Isolator, this process's (see `shared`).
_shared: Zygote | None = None
_shared_lock = threading.Lock()


async def shared() -> Zygote:
    """The zygote this process shares among calls made with ``zygote=True`` outside an
    `Isolator`: started by the first such call, and kept until this process exits (the helper
    ends with it). One that could not start is dropped, so the next call tries again."""
    global _shared
    with _shared_lock:
        zygote = _shared
        if zygote is None or zygote._state != "open":
            # None yet, or closed: a new one (kept only once its helper is started).
            zygote = Zygote()
            helper = zygote._open()
            _shared = zygote
        else:
            helper = zygote._current()
    try:
        await helper.confirm_ready()
    except IsolationError:
        with _shared_lock:
            if _shared is zygote:
                _shared = None
        with anyio.CancelScope(shield=True):
            await zygote.aclose()
        raise
    return zygote


async def close_shared() -> None:
    """End the shared zygote, if one runs (the next ``zygote=True`` call starts another)."""
    global _shared
    with _shared_lock:
        zygote, _shared = _shared, None
    if zygote is not None:
        await zygote.aclose()


def _after_fork_in_child() -> None:
    # The shared zygote of the process this child was forked from is not the child's: its
    # sockets are closed among the inherited fds (see _fds), and must never be closed again
    # when it is dropped (the numbers may be reused here); and another thread may have held
    # the lock. A call with zygote=True in the child starts a shared zygote of its own.
    global _shared, _shared_lock
    if _shared is not None:
        for helper in (_shared._helper, *_shared._retired):
            if helper is not None:
                helper.forget()
        _shared = None
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
