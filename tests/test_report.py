"""The per-call report, and the child's output: inherited, discarded or captured."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import anyio
import pytest

from aioisolate import (
    CallReport,
    ChildCrashed,
    IsolationTimeout,
    Isolator,
    isolated,
    isolated_with_report,
)

pytestmark = [pytest.mark.anyio, pytest.mark.both_modes]


async def test_report_of_a_successful_call() -> None:
    value, report = await isolated_with_report(sum, range(1_000_000))
    assert value == sum(range(1_000_000))
    assert isinstance(report, CallReport)
    assert report.pid != os.getpid()
    assert report.exitcode == 0
    assert report.signal is None
    assert report.wall_time > 0
    assert report.user_time + report.system_time > 0
    assert report.result_bytes > 0
    assert report.stdout is None
    assert report.stderr is None
    text = repr(report)
    assert f"pid={report.pid}" in text
    assert "exitcode=0" in text
    assert "wall=" in text
    assert "peak_memory=" in text


def segfault() -> None:
    ctypes.string_at(0)


async def test_every_isolation_error_carries_its_report() -> None:
    with pytest.raises(ChildCrashed) as crash:
        await isolated(segfault)
    assert crash.value.report is not None
    assert crash.value.report.pid == crash.value.pid
    assert crash.value.report.signal is signal.SIGSEGV
    assert "signal=SIGSEGV" in repr(crash.value.report)

    import time

    with pytest.raises(IsolationTimeout) as timeout:
        await isolated(time.sleep, 60, timeout=0.2)
    assert timeout.value.report is not None
    assert timeout.value.report.signal is signal.SIGKILL
    assert timeout.value.report.wall_time >= 0.2


def write_50_mb() -> str:
    line = b"x" * 1023 + b"\n"
    for _ in range(50 * 1024):
        os.write(1, line)  # at the fd level, as C code would
    print("python-level last line")
    return "done"


async def test_captured_stdout_keeps_the_tail_and_never_blocks() -> None:
    value, report = await isolated_with_report(write_50_mb, stdout="capture", max_output="64KiB")
    assert value == "done"
    assert report.stdout is not None
    assert len(report.stdout) == 64 * 1024
    assert report.stdout.endswith(b"python-level last line\n")
    assert report.stdout_dropped == 50 * 1024 * 1024 + len(b"python-level last line\n") - 64 * 1024
    assert "dropped" in repr(report)


def speak() -> None:
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr)
    os.system("echo from a subprocess")


async def test_capture_catches_subprocess_output_too() -> None:
    _, report = await isolated_with_report(speak, stdout="capture", stderr="capture")
    assert report.stdout == b"to stdout\nfrom a subprocess\n"
    assert report.stderr == b"to stderr\n"


async def test_discard_and_inherit(capfd: pytest.CaptureFixture[str]) -> None:
    await isolated(speak, stdout="discard", stderr="discard")
    assert capfd.readouterr() == ("", "")
    await isolated(speak)
    out, err = capfd.readouterr()
    assert out == "to stdout\nfrom a subprocess\n"
    assert err == "to stderr\n"


async def test_crash_shows_the_python_line_and_stderr_tail() -> None:
    def crash_after_logging() -> None:
        print("about to parse", file=sys.stderr)
        segfault()

    with pytest.raises(ChildCrashed) as info:
        await isolated(crash_after_logging, stderr="capture")
    message = str(info.value)
    assert "killed by SIGSEGV" in message
    assert "Fatal Python error: Segmentation fault" in message
    assert "in segfault" in message  # the Python frame that crashed
    assert info.value.report is not None
    assert info.value.report.stderr is not None
    assert b"about to parse" in info.value.report.stderr


async def test_isolator_defaults_and_per_call_overrides() -> None:
    async with Isolator(stdout="capture", memory_limit="256MiB") as iso:
        _, report = await iso.run_with_report(print, "captured")
        assert report.stdout == b"captured\n"
        _, report = await iso.run_with_report(print, "dropped", stdout="discard")
        assert report.stdout is None
        with pytest.raises(MemoryError):
            await iso.run(bytearray, 512 << 20)
        assert await iso.run(len, bytearray(10), memory_limit="1GiB") == 10


async def test_output_written_just_before_exit_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from aioisolate._output import Tail

    async def never_drain(self: Tail) -> None:
        await anyio.sleep_forever()

    # With the drains idle, only the final read after the child exits can see this.
    monkeypatch.setattr(Tail, "drain", never_drain)
    _, report = await isolated_with_report(os.write, 1, b"last words\n", stdout="capture")
    assert report.stdout == b"last words\n"
