"""What a call's outcome and report are, from the facts of its end: without forking.

`_outcome` is pure: these tests build the facts (`Ending`) and check what they mean. The last
ones drive a `RunningChild` whose watcher is a fake (a pipe stands for the pidfd, and the test
says when and how the "child" exited), so that reading, killing and reaping are checked
against exact exit statuses.
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
from typing import Any

import anyio
import pytest

from aioisolate import (
    ChildCrashed,
    CPULimitExceeded,
    IsolationError,
    IsolationTimeout,
    MemoryLimitExceeded,
    ProtocolError,
    ZygoteDied,
)
from aioisolate._codec import PICKLE
from aioisolate._forking import EXIT_INTERNAL
from aioisolate._options import DEFAULTS, CallOptions, Options
from aioisolate._outcome import Captured, Ending, outcome, report
from aioisolate._output import Tail
from aioisolate._protocol import END, ERROR, RESULT, FrameReader, encode_error, encode_result
from aioisolate._running import RunningChild

# One test per fact, run once: there is no child, so no watcher to vary.
pytestmark = pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)


def rusage(user: float = 0.0, system: float = 0.0, maxrss_kib: int = 0) -> Any:
    fields = [0.0, 0.0, *([0] * 14)]
    fields[0], fields[1], fields[2] = user, system, maxrss_kib
    return resource.struct_rusage(fields)


def exited(code: int, **usage: Any) -> tuple[int, Any]:
    return code << 8, rusage(**usage)


def killed_by(sig: int, **usage: Any) -> tuple[int, Any]:
    return int(sig), rusage(**usage)


def ending(options: CallOptions | None = None, **facts: Any) -> Ending:
    values: dict[str, Any] = {
        "options": DEFAULTS.merge(options or {}),
        "stream": False,
        "pid": 4242,
        "waited": exited(0),
        "wall_time": 0.5,
    }
    values.update(facts)
    return Ending(**values)


def payload_of(frame: list[bytes]) -> bytes:
    return b"".join(frame[1:])  # after the header


def test_a_result_frame_is_the_value() -> None:
    frame = encode_result({"a": [1, 2]}, PICKLE)
    assert outcome(ending(kind=RESULT, payload=payload_of(frame))) == {"a": [1, 2]}


def test_an_error_frame_raises_the_functions_exception() -> None:
    frame = encode_error(KeyError("missing"), PICKLE)
    with pytest.raises(KeyError, match="missing") as info:
        outcome(ending(kind=ERROR, payload=payload_of(frame)))
    assert "KeyError" in str(info.value.__cause__)  # the child's traceback


def test_a_timeout_comes_before_anything_the_child_sent() -> None:
    frame = encode_result(1, PICKLE)
    facts = ending({"timeout": 3}, kind=RESULT, payload=payload_of(frame), timed_out=True)
    with pytest.raises(IsolationTimeout) as info:
        outcome(facts)
    assert (info.value.pid, info.value.timeout) == (4242, 3.0)


def test_a_refusal_is_raised_as_it_is() -> None:
    refused = ProtocolError("the child wrote more after its result; it was killed")
    with pytest.raises(ProtocolError) as info:
        outcome(ending(protocol_error=refused, kind=RESULT, payload=b""))
    assert info.value is refused


def test_the_watchdogs_kill_is_a_memory_limit() -> None:
    facts = ending({"memory_limit": 1 << 20}, waited=killed_by(signal.SIGKILL), memory_seen=3 << 20)
    with pytest.raises(MemoryLimitExceeded) as info:
        outcome(facts)
    assert (info.value.limit, info.value.observed) == (1 << 20, 3 << 20)
    assert "grew by 3.0 MiB" in str(info.value)


def test_sigxcpu_is_the_cpu_limit() -> None:
    with pytest.raises(CPULimitExceeded) as info:
        outcome(ending({"cpu_limit": 1}, waited=killed_by(signal.SIGXCPU, user=1.0)))
    assert info.value.signal == signal.SIGXCPU


def test_the_hard_limits_sigkill_is_the_cpu_limit_when_we_sent_none() -> None:
    # cpu_limit=1: SIGXCPU at 1 s, SIGKILL at 2 s from the kernel (a child that handles SIGXCPU)
    facts = ending({"cpu_limit": 1}, waited=killed_by(signal.SIGKILL, user=1.5, system=0.5))
    with pytest.raises(CPULimitExceeded):
        outcome(facts)


def test_our_own_sigkill_is_not_the_cpu_limit() -> None:
    facts = ending(
        {"cpu_limit": 1}, waited=killed_by(signal.SIGKILL, user=1.5, system=0.5), killed=True
    )
    with pytest.raises(ChildCrashed) as info:
        outcome(facts)
    assert type(info.value) is ChildCrashed
    assert info.value.signal == signal.SIGKILL


def test_a_sigkill_below_the_hard_limit_is_a_crash() -> None:
    facts = ending({"cpu_limit": 1}, waited=killed_by(signal.SIGKILL, user=0.5))
    with pytest.raises(ChildCrashed) as info:
        outcome(facts)
    assert type(info.value) is ChildCrashed


def test_a_signal_says_which_and_how_much_was_sent() -> None:
    with pytest.raises(ChildCrashed) as info:
        outcome(ending(waited=killed_by(signal.SIGSEGV), received=5))
    assert (info.value.signal, info.value.exitcode) == (signal.SIGSEGV, None)
    assert "SIGSEGV" in str(info.value)
    assert "it had sent 5 bytes of it" in str(info.value)


def test_an_exit_code_says_so() -> None:
    with pytest.raises(ChildCrashed) as info:
        outcome(ending(waited=exited(3)))
    assert (info.value.signal, info.value.exitcode) == (None, 3)
    assert "exited with code 3" in str(info.value)


def test_the_internal_exit_code_points_at_stderr() -> None:
    with pytest.raises(ChildCrashed, match="could not send its outcome"):
        outcome(ending(waited=exited(EXIT_INTERNAL)))


def test_an_unknown_status_says_who_may_have_reaped_it() -> None:
    with pytest.raises(ChildCrashed, match="waitpid") as info:
        outcome(ending(waited=None))
    assert (info.value.signal, info.value.exitcode) == (None, None)


def test_what_the_watcher_knows_comes_first() -> None:
    died = ZygoteDied("the helper died", pid=4242, helper_pid=7)
    with pytest.raises(ZygoteDied) as info:
        outcome(ending(waited=None, watcher_failure=died))
    assert info.value is died
    with pytest.raises(IsolationError, match="could not start a child process"):
        outcome(ending(waited=None, watcher_failure=OSError(24, "Too many open files")))


def test_a_crash_shows_faulthandlers_report() -> None:
    stderr = b"noise\nFatal Python error: Segmentation fault\n\nCurrent thread:\n  File x\n"
    with pytest.raises(ChildCrashed) as info:
        outcome(ending(waited=killed_by(signal.SIGSEGV), stderr=Captured(stderr)))
    assert "crash report (faulthandler)" in str(info.value)
    assert "noise" not in str(info.value)


def test_a_stream_ends_with_end_and_a_call_does_not() -> None:
    assert outcome(ending(stream=True, kind=END, payload=b"")) is None
    with pytest.raises(ProtocolError, match="malformed error description"):
        outcome(ending(stream=False, kind=END, payload=b""))


def test_the_report_subtracts_what_the_child_started_with() -> None:
    facts = ending(
        waited=exited(0, user=0.25, system=0.125, maxrss_kib=30 * 1024),
        baseline=20 << 20,
        received=100,
        stdout=Captured(b"out", dropped=7),
    )
    made = report(facts)
    assert (made.pid, made.exitcode, made.signal) == (4242, 0, None)
    assert (made.user_time, made.system_time, made.wall_time) == (0.25, 0.125, 0.5)
    assert made.peak_memory == 10 << 20
    assert made.result_bytes == 100
    assert (made.stdout, made.stdout_dropped, made.stderr) == (b"out", 7, None)
    unknown = report(ending(waited=None))
    assert (unknown.exitcode, unknown.signal, unknown.peak_memory) == (None, None, 0)


def test_errors_pickle_with_their_fields_and_report() -> None:
    error = CPULimitExceeded("over", pid=1, signal=signal.SIGXCPU, limit=2.0)
    error.report = report(ending())
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.args, copy.pid, copy.limit) == (CPULimitExceeded, ("over",), 1, 2.0)
    assert copy.report == error.report
    refused = pickle.loads(pickle.dumps(ProtocolError("bad frame")))
    assert (type(refused), refused.args) == (ProtocolError, ("bad frame",))


class FakeWatcher:
    """A child that is not there: a pipe's read end stands for its pidfd, readable once the
    test says it exited (or once it is sent SIGKILL)."""

    pollable = True
    anonymous_at_fork = None

    def __init__(self) -> None:
        self.pid = 4242
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.signals: list[tuple[str, int]] = []
        self.status: tuple[int, Any] | None = None

    def exit(self, waited: tuple[int, Any]) -> None:
        self.status = waited
        os.write(self._w, b"x")

    async def started(self) -> None:
        pass

    async def wait_exited(self) -> None:
        await anyio.wait_readable(self._r)

    def fileno(self) -> int:
        return self._r

    def has_exited(self) -> bool:
        return self.status is not None

    def send_signal(self, sig: int) -> None:
        self.signals.append(("child", sig))
        if sig == signal.SIGKILL and self.status is None:
            self.exit(killed_by(signal.SIGKILL))

    def signal_group(self, sig: int) -> None:
        self.signals.append(("group", sig))

    def reap(self, *, block: bool = False) -> tuple[int, Any] | None:
        return self.status

    def failure(self) -> Exception | None:
        return None

    def close(self) -> None:
        anyio.notify_closing(self._r)
        os.close(self._r)
        os.close(self._w)


def fake_child(options: Options) -> tuple[RunningChild, FakeWatcher, int, int]:
    """A running child with a fake watcher; returns it, the watcher and the write ends of its
    result and stderr pipes."""
    result_r, result_w = os.pipe()
    err_r, err_w = os.pipe()
    for fd in (result_r, err_r):
        os.set_blocking(fd, False)
    watcher = FakeWatcher()
    child = RunningChild(
        watcher,
        FrameReader(result_r, max_size=options.result_limit),
        {"stderr": Tail(err_r, options.max_output)},
        options,
        started=0.0,
    )
    return child, watcher, result_w, err_w


@pytest.mark.anyio
async def test_a_fake_child_that_sends_its_result_and_exits() -> None:
    child, watcher, result_w, err_w = fake_child(DEFAULTS.merge({"stderr": "capture"}))
    try:
        os.write(result_w, b"".join(encode_result([1, 2, 3], PICKLE)))
        os.write(err_w, b"said something\n")
        for fd in (result_w, err_w):
            os.close(fd)
        watcher.exit(exited(0, maxrss_kib=1))
        await child.collect()
    finally:
        child.close()
    facts = child.ending()
    assert outcome(facts) == [1, 2, 3]
    assert report(facts).stderr == b"said something\n"
    # Reaped once it exited, and its group killed first (kill_descendants).
    assert child.reaped
    assert watcher.signals == [("group", signal.SIGKILL)]


@pytest.mark.anyio
async def test_a_fake_child_that_writes_garbage_is_refused_and_killed() -> None:
    child, watcher, result_w, err_w = fake_child(DEFAULTS)
    try:
        os.write(result_w, b"GARBAGE-NOT-A-FRAME")
        with anyio.fail_after(10):
            await child.collect()
    finally:
        for fd in (result_w, err_w):
            os.close(fd)
        child.close()
    with pytest.raises(ProtocolError, match="not a result frame"):
        outcome(child.ending())
    assert ("child", signal.SIGKILL) in watcher.signals


@pytest.mark.anyio
async def test_a_fake_child_killed_on_cancel_with_a_grace() -> None:
    child, watcher, result_w, err_w = fake_child(DEFAULTS.merge({"kill_grace": 0.01}))
    try:
        with anyio.move_on_after(0.01):
            await child.collect()  # the child never writes nor exits
        await child.kill_and_reap()
    finally:
        for fd in (result_w, err_w):
            os.close(fd)
        child.close()
    # SIGTERM first, the grace ran out, then SIGKILL, which the fake dies of.
    assert [sig for who, sig in watcher.signals if who == "child"] == [
        signal.SIGTERM,
        signal.SIGKILL,
    ]
    with pytest.raises(ChildCrashed) as info:
        outcome(child.ending())
    assert info.value.signal == signal.SIGKILL
