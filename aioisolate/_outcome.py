"""What came of a call, from what is known once its child is gone: pure functions of the facts.

`Ending` holds the facts: the wait status and resource usage, what the child sent, and what the
parent did (killed it, timed it out, refused its data, saw it outgrow its memory limit).
`outcome` turns them into the value or the error, `report` into the `CallReport`. Nothing here
reads a pipe, waits or signals: tests build an `Ending` and check what it means.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import signal
from typing import Any

from . import _limits, _protocol
from ._errors import (
    ChildCrashed,
    CPULimitExceeded,
    IsolationError,
    IsolationTimeout,
    MemoryLimitExceeded,
)
from ._forking import EXIT_INTERNAL, Waited
from ._linux import maxrss_bytes
from ._options import Options
from ._report import CallReport


@dataclasses.dataclass(frozen=True, slots=True)
class Captured:
    """The kept tail of one captured output, and how much was dropped before it."""

    data: bytes
    dropped: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Ending:
    """The facts of a call once its child is reaped (or given up on)."""

    options: Options
    stream: bool  # a stream's last frame is END (or ERROR)
    pid: int
    waited: Waited | None  # (wait status, rusage); None when something else reaped it
    wall_time: float  # from fork to reaping
    killed: bool = False  # the parent signalled the child
    timed_out: bool = False  # ... because its timeout= fired
    memory_seen: int | None = None  # the growth at which the watchdog killed it
    protocol_error: IsolationError | None = None  # what the parent refused of its data
    watcher_failure: Exception | None = None  # what the watcher knows better (a zygote's)
    kind: int | None = None  # the kind of the last frame, when it came whole
    payload: bytes | bytearray | None = None  # ... and its payload
    spilled: mmap.mmap | None = None  # the spill file, mapped, for a SPILLED result
    received: int = 0  # bytes read from the result pipe
    baseline: int = 0  # the resident memory the child started with (see `report`)
    stdout: Captured | None = None
    stderr: Captured | None = None


def report(ending: Ending) -> CallReport:
    """The call's `CallReport`."""
    exitcode, sig = exit_fields(ending.waited)
    rusage = ending.waited[1] if ending.waited else None
    peak = 0
    if rusage is not None:
        # ru_maxrss counts what the child had resident from the start, shared with the parent:
        # the baseline is that much (what the child said, else what it inherited).
        peak = max(0, maxrss_bytes(rusage) - ending.baseline)
    stdout, stderr = ending.stdout, ending.stderr
    return CallReport(
        pid=ending.pid,
        exitcode=exitcode,
        signal=sig,
        wall_time=ending.wall_time,
        user_time=rusage.ru_utime if rusage else 0.0,
        system_time=rusage.ru_stime if rusage else 0.0,
        peak_memory=peak,
        result_bytes=ending.received + (len(ending.spilled) if ending.spilled else 0),
        stdout=stdout.data if stdout else None,
        stderr=stderr.data if stderr else None,
        stdout_dropped=stdout.dropped if stdout else 0,
        stderr_dropped=stderr.dropped if stderr else 0,
    )


def outcome(ending: Ending) -> Any:
    """The value the call returned, or raise what ended it: the function's own exception, a
    timeout, a refusal of the child's data, or the crash."""
    if ending.timed_out:
        raise IsolationTimeout(
            f"child process {ending.pid} ran for longer than timeout={ending.options.timeout} "
            "seconds; it was killed",
            pid=ending.pid,
            timeout=ending.options.timeout,  # type: ignore[arg-type]  # set, as it fired
        )
    if ending.protocol_error is not None:
        raise ending.protocol_error
    if ending.kind is None:
        raise crash(ending)
    if ending.stream and ending.kind == _protocol.END:
        return None  # the generator finished
    assert ending.payload is not None
    return _protocol.decode(ending.kind, ending.payload, ending.options.codec, ending.spilled)


def crash(ending: Ending) -> IsolationError:
    """The error for a child that ended without sending its outcome."""
    options, pid = ending.options, ending.pid
    exitcode, sig = exit_fields(ending.waited)
    where = stderr_tail(ending.stderr.data if ending.stderr else b"")
    failure = ending.watcher_failure
    if isinstance(failure, IsolationError):
        return failure
    if isinstance(failure, OSError):
        return cannot_start(failure)
    if ending.memory_seen is not None:
        limit = options.memory_limit
        assert limit is not None
        return MemoryLimitExceeded(
            f"child process {pid} grew by {_mib(ending.memory_seen)} of memory beyond "
            f"what it inherited, over its memory_limit of {_mib(limit)}, and was killed{where}",
            pid=pid,
            limit=limit,
            observed=ending.memory_seen,
        )
    if options.cpu_limit is not None and _cpu_limit_hit(ending, sig):
        return CPULimitExceeded(
            f"child process {pid} used up its cpu_limit of {options.cpu_limit:g} CPU seconds "
            f"and was stopped by {sig.name if sig else 'the kernel'}{where}",
            pid=pid,
            signal=sig,
            limit=options.cpu_limit,
        )
    if ending.waited is None:
        return ChildCrashed(
            f"child process {pid} ended without sending a result, and its exit status is "
            "unknown: something else in this process reaped it (a waitpid(-1), or SIGCHLD "
            f"set to SIG_IGN){where}",
            pid=pid,
            exitcode=None,
            signal=None,
        )
    sent = f" (it had sent {ending.received} bytes of it)" if ending.received else ""
    if sig is not None:
        return ChildCrashed(
            f"child process {pid} was killed by {sig.name} ({signal.strsignal(sig)}) before "
            f"sending its result{sent}{where}",
            pid=pid,
            exitcode=None,
            signal=sig,
        )
    why = ""
    if exitcode == EXIT_INTERNAL:
        why = (
            "; unless the function chose that code, the child could not send its outcome "
            "(its stderr says why)"
        )
    return ChildCrashed(
        f"child process {pid} exited with code {exitcode} before sending its result"
        f"{sent}{why}{where}",
        pid=pid,
        exitcode=exitcode,
        signal=None,
    )


def _cpu_limit_hit(ending: Ending, sig: signal.Signals | None) -> bool:
    if sig == signal.SIGXCPU:
        return True
    # A child that handles SIGXCPU gets SIGKILL at the hard limit, a second later. A SIGKILL
    # from us (a timeout, say) or below that much CPU time came from elsewhere.
    if sig == signal.SIGKILL and not ending.killed and ending.waited is not None:
        used: float = ending.waited[1].ru_utime + ending.waited[1].ru_stime
        return used >= _limits.cpu_hard_limit(ending.options.cpu_limit or 0) - 0.05
    return False


def exit_fields(waited: Waited | None) -> tuple[int | None, signal.Signals | None]:
    """The exit code, or the signal that ended the child; both None when unknown."""
    if waited is None:
        return None, None
    code = os.waitstatus_to_exitcode(waited[0])
    if code < 0:
        return None, signal.Signals(-code)
    return code, None


def stderr_tail(data: bytes, lines: int = 40) -> str:
    """What to show of a crashed child's captured stderr (empty when it has nothing)."""
    if not data.strip():
        return ""
    text = data.decode(errors="replace").rstrip()
    # faulthandler's report of a crash starts with this line and lists the innermost frame
    # first: show its beginning, which says where the crash happened.
    start = text.rfind("Fatal Python error")
    if start >= 0:
        shown = text[start:].splitlines()
        cut = shown[:lines] + (["  ..."] if len(shown) > lines else [])
        return "\nThe child's crash report (faulthandler):\n" + "\n".join(cut)
    shown = text.splitlines()[-lines:]
    return "\nThe end of the child's stderr:\n" + "\n".join(shown)


def cannot_start(exc: OSError) -> IsolationError:
    """The error for a child that could not be started (out of processes, memory or fds)."""
    return IsolationError(
        f"could not start a child process: {exc}. The system is short of processes, memory or "
        "file descriptors; retry later or lower the number of concurrent calls (limiter=)"
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
