"""The one fork primitive, and the one way a child is reaped: shared by the parent (fork mode)
and by the zygote helper.

`fork` blocks every signal across ``os.fork()`` (a signal arriving in the child before it has
reset the handlers would run the parent's, and wake the parent's loop through its wakeup fd),
runs the child's side, which never returns (``os._exit``), and in the parent puts the child in
a process group of its own before anyone can signal that group. `reap` collects a child's
status and resource usage; `kill_now` ends a child just forked when no event loop is there to
wait with.

The zygote helper imports this module, so it imports nothing but the standard library: no
anyio, no threads, no warning policy (every page the helper has makes each fork slower).
"""

from __future__ import annotations

import _signal
import os
import resource
import signal
from collections.abc import Callable
from typing import Final

# The exit code of a child that could not send its outcome (the parent went away, say).
EXIT_INTERNAL: Final = 120

# signal.pthread_sigmask() turns each signal number into an enum member, which for all of them
# costs a tenth of a millisecond on every call: the raw _signal functions do not.
_ALL_SIGNALS: Final = _signal.valid_signals()

Waited = tuple[int, resource.struct_rusage]


def fork(child: Callable[[set[int]], object], *, os_fork: Callable[[], int] | None = None) -> int:
    """Fork; run ``child(sigmask)`` in the child and end it with ``os._exit`` whatever happens.

    The child starts with every signal blocked: ``sigmask`` is the mask to restore once it has
    reset the handlers. In the parent the mask is restored, the child is put in a process group
    of its own (it does so itself too: whichever runs first, the group exists once this
    returns, so a kill sent right away still reaches what the child starts), and its pid is
    returned. ``os_fork`` forks instead of ``os.fork`` (the parent's applies its fork-with-threads
    policy).

    A signal that arrived during the fork (Ctrl-C, say) is delivered as the mask is restored;
    its exception kills and reaps the new child before it propagates.
    """
    sigmask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _ALL_SIGNALS)
    pid = -1
    try:
        try:
            pid = os.fork() if os_fork is None else os_fork()
            if pid == 0:
                try:
                    child(sigmask)
                finally:
                    os._exit(EXIT_INTERNAL)
        finally:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, sigmask)
    except BaseException:
        if pid > 0:
            kill_now(pid)
        raise
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # it has exec'd or exited already, or made the group itself
    return pid


def reap(pid: int, *, block: bool = False) -> Waited | None:
    """Collect an exited child's wait status and resource usage, or None when something else
    already reaped it.

    Call once the child is known to have exited, when it never blocks; ``block=True`` is for a
    child already sent SIGKILL where no event loop can be used to wait.
    """
    try:
        _, status, rusage = os.wait4(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        # A stray waitpid(-1) or SIGCHLD set to SIG_IGN took the status first: not a failure of
        # the call, only a status nobody can know any more.
        return None
    return status, rusage


def kill_now(pid: int, *, group: bool = True) -> Waited | None:
    """SIGKILL an unreaped child (and its process group) and reap it, blocking: for a child
    just started when something failed, where there is no event loop to wait with. Its pid,
    and so its group id, are still its own: it is not reaped yet."""
    for kill in (os.kill, os.killpg) if group else (os.kill,):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return reap(pid, block=True)
