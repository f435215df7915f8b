"""What one isolated call did: the figures every outcome carries."""

from __future__ import annotations

import dataclasses
import signal as _signal


@dataclasses.dataclass(frozen=True, slots=True)
class CallReport:
    """The figures of one isolated call, successful or not.

    Returned with the value by `isolated_with_report`, and attached as ``.report`` to every
    `IsolationError` raised about a call that forked.

    Attributes:
        pid: the child's process id.
        exitcode: its exit code, or None if a signal ended it or the status is unknown.
        signal: the signal that ended it, or None.
        wall_time: seconds from fork to reaping.
        user_time: CPU seconds the child spent in user mode (with the processes it started and
            waited for, as the kernel counts them).
        system_time: CPU seconds the child spent in the kernel (likewise).
        peak_memory: the child's own peak resident memory in bytes: its peak less what it
            held at fork, so a child of a 1 GB parent that allocates 10 MB reports about 10 MB.
        result_bytes: bytes the child sent back (the pickled result or error).
        stdout: the tail of the child's captured stdout, or None if it was not captured.
        stderr: the tail of the child's captured stderr, or None if it was not captured.
        stdout_dropped: bytes of captured stdout dropped before the kept tail.
        stderr_dropped: bytes of captured stderr dropped before the kept tail.
    """

    pid: int
    exitcode: int | None
    signal: _signal.Signals | None
    wall_time: float
    user_time: float
    system_time: float
    peak_memory: int
    result_bytes: int
    stdout: bytes | None = None
    stderr: bytes | None = None
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    def __repr__(self) -> str:
        ended = (
            f"signal={self.signal.name}" if self.signal is not None else f"exitcode={self.exitcode}"
        )
        parts = [
            f"pid={self.pid}",
            ended,
            f"wall={self.wall_time:.3f}s",
            f"user={self.user_time:.3f}s",
            f"sys={self.system_time:.3f}s",
            f"peak_memory={_size(self.peak_memory)}",
            f"result={_size(self.result_bytes)}",
        ]
        for name, data, dropped in (
            ("stdout", self.stdout, self.stdout_dropped),
            ("stderr", self.stderr, self.stderr_dropped),
        ):
            if data is not None:
                parts.append(
                    f"{name}={_size(len(data))}"
                    + (f"(+{_size(dropped)} dropped)" if dropped else "")
                )
        return f"CallReport({', '.join(parts)})"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"
