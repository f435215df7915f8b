"""The exceptions this library raises about an isolated call.

An exception raised by the isolated function itself is not one of these: it is re-raised in the
parent as itself, with the child's traceback attached as ``__cause__`` (a `RemoteTraceback`).
Everything here can be pickled, so an isolated call made inside another isolated call reports
its failure through both levels intact.
"""

from __future__ import annotations

import signal as _signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._report import CallReport


class IsolationError(Exception):
    """Base class of every error about an isolated call rather than from it.

    Raised as itself when the call could not be carried out: the result could not be encoded
    in the child or decoded in the parent, the child could not be started, or the `Isolator`
    was closed while the call ran. The subclasses below cover the other ways a call ends
    without a value.

    Attributes:
        report: the `CallReport` of the call, when it got as far as forking; else None.
    """

    report: CallReport | None = None

    def __reduce__(self) -> tuple[object, ...]:
        # Our exceptions take keyword-only arguments, which the default exception pickling
        # (cls(*args)) cannot supply: they are rebuilt from args and __dict__ instead.
        return (_rebuild, (type(self), self.args, self.__dict__))


class ProtocolError(IsolationError):
    """The parent refused what the child sent: its result never reaches the caller.

    Raised for data on the result pipe that is not a frame of ours (or is cut short, or
    followed by more), a result larger than ``max_result_size``, safe-codec data that is
    malformed or would build more than its bound, and a spilled result whose file is not
    sealed or does not match its table. The child is killed if it still runs. A child that
    runs code you do not trust (``codec="safe"``) can cause it: catch it to refuse that input.
    """


class ChildCrashed(IsolationError):
    """The child process ended without sending a result.

    Raised when the child was killed by a signal (a segfault, an abort, SIGKILL from the OOM
    killer or from another process) or left through ``os._exit(n)`` before its result was
    sent.

    Attributes:
        pid: the child's process id.
        exitcode: the exit code, or None when a signal ended the child or the status is unknown.
        signal: the signal that ended the child, or None.

    Both ``exitcode`` and ``signal`` are None when something else in this process reaped the
    child before the library could (a stray ``waitpid(-1)``, or ``SIGCHLD`` set to ``SIG_IGN``).
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int,
        exitcode: int | None,
        signal: _signal.Signals | None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal


class MemoryLimitExceeded(ChildCrashed):
    """The child grew past its ``memory_limit`` and was killed.

    An allocation past the limit normally fails inside the child, where Python raises
    ``MemoryError`` (re-raised in the parent as itself). This is raised when the parent's
    watchdog caught what the child's own limit did not, such as native code that lifted it.

    Attributes:
        limit: the limit, in bytes.
        observed: how much the child had grown beyond what it inherited, in bytes.
    """

    def __init__(self, message: str, *, pid: int, limit: int, observed: int) -> None:
        super().__init__(message, pid=pid, exitcode=None, signal=_signal.SIGKILL)
        self.limit = limit
        self.observed = observed


class CPULimitExceeded(ChildCrashed):
    """The child used up its ``cpu_limit`` seconds of CPU time and was stopped by the kernel.

    Attributes:
        limit: the limit, in CPU seconds.
    """

    def __init__(
        self, message: str, *, pid: int, signal: _signal.Signals | None, limit: float
    ) -> None:
        super().__init__(message, pid=pid, exitcode=None, signal=signal)
        self.limit = limit


class ZygoteDied(ChildCrashed):
    """The zygote helper that forked the child died (or was closed) while the call ran.

    Only calls made in zygote mode raise it. The child dies with its helper, so the call has no
    result; the function may not even have started. Retrying is safe in that sense: the next
    call starts a new helper.

    Attributes:
        pid: the child's process id, or 0 if the helper died before forking it.
        helper_pid: the helper's process id.
    """

    def __init__(self, message: str, *, pid: int, helper_pid: int) -> None:
        super().__init__(message, pid=pid, exitcode=None, signal=None)
        self.helper_pid = helper_pid


class WorkerLost(IsolationError):
    """The remote worker that ran the call (on an engine such as `DaskEngine`) died or left
    the cluster while the call ran.

    The child died with its worker, so the call has no result. It is not run again elsewhere:
    retry it if that is safe for your function.

    Attributes:
        worker: the worker's address.
        key: the call's task key on the cluster.
    """

    def __init__(self, message: str, *, worker: str, key: str) -> None:
        super().__init__(message)
        self.worker = worker
        self.key = key


class IsolationTimeout(IsolationError, TimeoutError):
    """The child ran longer than the call's ``timeout=``; it was killed and reaped.

    Only the ``timeout=`` option raises this. A cancel scope around the call (for example
    ``anyio.fail_after``) raises its own exception, as any cancellation does.

    Attributes:
        pid: the child's process id.
        timeout: the limit, in seconds, that the child exceeded.
    """

    def __init__(self, message: str, *, pid: int, timeout: float) -> None:
        super().__init__(message)
        self.pid = pid
        self.timeout = timeout


class RemoteError(IsolationError):
    """An exception raised in the child that cannot be re-raised in the parent as itself.

    Raised when the exception could not be pickled in the child or unpickled in the parent, and
    for ``SystemExit``, ``KeyboardInterrupt`` and other exceptions that do not derive from
    `Exception`: raising those in the parent would end the parent. The child's traceback is
    also attached as ``__cause__``.

    Attributes:
        type_name: the qualified name of the exception's type, e.g. ``"mymodule.ParseError"``.
        message: ``str()`` of the exception.
        traceback: the child's formatted traceback.
    """

    def __init__(self, message: str, *, type_name: str, remote_message: str, traceback: str):
        super().__init__(message)
        self.type_name = type_name
        self.message = remote_message
        self.traceback = traceback


class RemoteTraceback(Exception):
    """Carries the child's formatted traceback, as the ``__cause__`` of a re-raised exception.

    Never raised on its own; it exists so that the traceback printed in the parent shows where
    in the child the exception started.
    """

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    def __str__(self) -> str:
        return f"\n\nTraceback from the child process:\n{self.traceback}"


def _rebuild(
    cls: type[BaseException], args: tuple[object, ...], state: dict[str, object]
) -> object:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ThreadedForkWarning(RuntimeWarning):
    """A fork-mode call forked its child while other threads of the process were running.

    A lock one of those threads held at that moment (stdio's, logging's, one inside a C
    library) stays locked in the child, which hangs if it needs it. Issued once per process,
    at the first such fork (our own watcher threads do not count); zygote mode, whose children
    are forked from a helper that runs no thread, avoids the hazard.
    """
