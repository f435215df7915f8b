"""Failures: the function's exceptions, crashes of the child, and what cannot travel."""

from __future__ import annotations

import ctypes
import faulthandler
import os
import pickle
import signal
import sys
import threading
from pathlib import Path

import pytest

from aioisolate import (
    ChildCrashed,
    IsolationError,
    IsolationTimeout,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    _child,
    isolated,
)

pytestmark = [pytest.mark.anyio, pytest.mark.both_modes]


class ParseError(Exception):
    pass


class NeedsTwoArguments(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")  # args no longer match __init__: cannot unpickle


class CustomBaseException(BaseException):
    pass


def raise_parse_error() -> None:
    raise ParseError("bad token", 17)


async def test_exception_is_reraised_as_itself_with_the_child_traceback() -> None:
    with pytest.raises(ParseError) as info:
        await isolated(raise_parse_error)
    assert info.value.args == ("bad token", 17)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_parse_error" in cause.traceback
    assert 'raise ParseError("bad token", 17)' in cause.traceback


async def test_async_function_exception() -> None:
    async def fails() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        await isolated(fails)


@pytest.mark.fork_only(
    reason="needs the function's source lines in the child's traceback, which cloudpickle drops for a function pickled by value"
)
async def test_exception_that_cannot_be_unpickled_becomes_remote_error() -> None:
    def fails() -> None:
        raise NeedsTwoArguments(404, "not found")

    with pytest.raises(RemoteError) as info:
        await isolated(fails)
    err = info.value
    assert err.type_name == f"{__name__}.NeedsTwoArguments"
    assert err.message == "404: not found"
    assert "NeedsTwoArguments(404" in err.traceback
    assert "NeedsTwoArguments" in str(err)
    assert "404: not found" in str(err)
    assert isinstance(err.__cause__, RemoteTraceback)


async def test_exception_that_cannot_be_pickled_becomes_remote_error() -> None:
    def fails() -> None:
        exc = ValueError("holds a lock")
        exc.lock = threading.Lock()  # type: ignore[attr-defined]
        raise exc

    with pytest.raises(RemoteError) as info:
        await isolated(fails)
    assert info.value.type_name == "ValueError"
    assert info.value.message == "holds a lock"


async def test_unpicklable_result_names_its_type() -> None:
    with pytest.raises(IsolationError, match=r"_thread\.lock.*could not be encoded"):
        await isolated(threading.Lock)


@pytest.mark.parametrize(
    ("exc", "type_name"),
    [
        (SystemExit(3), "SystemExit"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
        (GeneratorExit(), "GeneratorExit"),
        (CustomBaseException("odd"), f"{__name__}.CustomBaseException"),
    ],
)
async def test_base_exceptions_never_propagate_as_themselves(
    exc: BaseException, type_name: str
) -> None:
    def fails() -> None:
        raise exc

    with pytest.raises(RemoteError) as info:
        await isolated(fails)
    assert info.value.type_name == type_name
    assert "would end the program" in str(info.value)


async def test_sys_exit_becomes_remote_error() -> None:
    with pytest.raises(RemoteError, match="SystemExit"):
        await isolated(sys.exit, 2)


def segfault() -> None:
    ctypes.string_at(0)


@pytest.mark.parametrize(
    ("func", "sig"),
    [
        (segfault, signal.SIGSEGV),
        (os.abort, signal.SIGABRT),
        (lambda: os.kill(os.getpid(), signal.SIGKILL), signal.SIGKILL),
        (lambda: os.kill(os.getpid(), signal.SIGTERM), signal.SIGTERM),
    ],
    ids=["segfault", "abort", "sigkill", "sigterm"],
)
async def test_child_killed_by_a_signal(func: object, sig: signal.Signals) -> None:
    with pytest.raises(ChildCrashed) as info:
        await isolated(func)  # type: ignore[arg-type]
    err = info.value
    assert err.signal is sig
    assert isinstance(err.signal, signal.Signals)
    assert err.exitcode is None
    assert err.pid > 0
    assert err.pid != os.getpid()
    assert f"killed by {sig.name}" in str(err)


def enable_faulthandler_then_segfault(path: str) -> None:
    faulthandler.enable(file=os.open(path, os.O_WRONLY))
    segfault()


async def test_faulthandler_enabled_by_the_function_reports_a_crash(tmp_path: Path) -> None:
    # This process has faulthandler on (pytest's plugin enables it): the child must not be
    # left with its flag set but its handlers gone, where the function's enable() does nothing.
    assert faulthandler.is_enabled()
    dump = tmp_path / "dump"
    dump.touch()
    with pytest.raises(ChildCrashed):
        await isolated(enable_faulthandler_then_segfault, str(dump))
    text = dump.read_text()
    assert "Fatal Python error: Segmentation fault" in text
    assert "in enable_faulthandler_then_segfault" in text


@pytest.mark.fork_only(reason="about the parent's faulthandler, which a zygote's children lack")
async def test_faulthandler_of_the_parent_stays_on_in_the_child() -> None:
    assert faulthandler.is_enabled()
    # The crash's Python frames come on the child's stderr, as they would in this process.
    with pytest.raises(ChildCrashed, match=r"(?s)Segmentation fault.*line \d+ in segfault"):
        await isolated(segfault, stderr="capture")
    assert await isolated(faulthandler.is_enabled) is True


@pytest.mark.parametrize("code", [0, 3, 255])
async def test_child_leaving_through_os_exit(code: int) -> None:
    with pytest.raises(ChildCrashed) as info:
        await isolated(os._exit, code)
    assert info.value.exitcode == code
    assert info.value.signal is None
    assert f"exited with code {code}" in str(info.value)


@pytest.mark.fork_only(
    reason="patches the child's code in this process, which a zygote's children do not share"
)
async def test_crash_after_partial_result_reports_bytes_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def write_part_then_die(fd: int, buffers: list[bytes]) -> None:
        os.write(fd, b"".join(buffers)[:26])  # the header and 10 bytes of the payload
        os._exit(9)

    monkeypatch.setattr(_child, "_write_all", write_part_then_die)
    with pytest.raises(ChildCrashed, match=r"exited with code 9.*sent 26 bytes"):
        await isolated(bytes, 1000)


@pytest.mark.fork_only(
    reason="patches the child's code in this process, which a zygote's children do not share"
)
async def test_garbage_on_the_result_pipe_is_an_isolation_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def write_garbage_then_hang(fd: int, buffers: list[bytes]) -> None:
        os.write(fd, b"this is not a frame at all")
        signal.pause()  # the parent must kill us

    monkeypatch.setattr(_child, "_write_all", write_garbage_then_hang)
    with pytest.raises(ProtocolError, match="not a result frame"):
        await isolated(square_of_three)


def square_of_three() -> int:
    return 9


@pytest.mark.parametrize(
    "err",
    [
        ChildCrashed("boom", pid=12, exitcode=None, signal=signal.SIGSEGV),
        IsolationTimeout("slow", pid=13, timeout=1.5),
        RemoteError("odd", type_name="a.B", remote_message="m", traceback="tb"),
        IsolationError("plain"),
    ],
)
def test_errors_survive_pickling(err: IsolationError) -> None:
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert copy.args == err.args
    assert vars(copy) == vars(err)


@pytest.mark.fork_only(
    reason="the inner call uses the module's isolated, routed to a zygote its child cannot use"
)
async def test_error_from_a_nested_call_reaches_the_top() -> None:
    async def outer() -> None:
        await isolated(segfault)

    with pytest.raises(ChildCrashed) as info:
        await isolated(outer)
    assert info.value.signal is signal.SIGSEGV


def test_timeout_error_is_a_timeout_error() -> None:
    assert issubclass(IsolationTimeout, TimeoutError)
    assert issubclass(IsolationTimeout, IsolationError)
    assert issubclass(ChildCrashed, IsolationError)
    assert issubclass(RemoteError, IsolationError)
