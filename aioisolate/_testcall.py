"""One test's call phase in a forked child: the pytest plugin's parent side and child side.

The parent sets the test up (its fixtures live in the parent and the child inherits them by
fork), then forks; the child runs pytest's whole call phase (the ``pytest_runtest_call`` hooks,
so capture, logging, skip/xfail and the async plugins work as usual) and makes the report,
which it sends back in pytest's own serializable form. The parent logs that report, or, when
the child brings none back (a crash, a timeout, a limit), makes one that says what happened.
Teardown runs in the parent.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import faulthandler
import os
import re
import signal
import sys
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any, Final

import anyio
import cloudpickle
import pytest

from . import _call
from ._api import isolated_with_report
from ._errors import (
    ChildCrashed,
    CPULimitExceeded,
    IsolationError,
    IsolationTimeout,
    MemoryLimitExceeded,
)
from ._options import DEFAULTS, CallOptions
from ._report import CallReport, _size

MARKER: Final = "isolated"

# The plugin decides where output goes and how the report comes back.
_RESERVED: Final = frozenset(
    {"stdout", "stderr", "max_output", "codec", "max_result_size", "zygote", "limiter"}
)
# A test is the work itself, not background work: it runs at the parent's priority. With a
# timeout, SIGTERM comes first so that the child can say where it was (see _child_side).
_PLUGIN_DEFAULTS: Final[CallOptions] = {"nice": 0, "kill_grace": 1.0}


@dataclasses.dataclass(frozen=True, slots=True)
class Figures:
    """What the child used, as the report's ``isolated`` attribute carries it (plain data, so
    that it travels with the report through pytest-xdist)."""

    pid: int
    exitcode: int | None
    signal: str | None
    wall_time: float
    user_time: float
    system_time: float
    peak_memory: int

    @classmethod
    def of(cls, report: CallReport) -> Figures:
        return cls(
            pid=report.pid,
            exitcode=report.exitcode,
            signal=report.signal.name if report.signal is not None else None,
            wall_time=report.wall_time,
            user_time=report.user_time,
            system_time=report.system_time,
            peak_memory=report.peak_memory,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class _Outcome:
    """What the child sends back: its report, the output sections it added to the item, and
    the warnings pytest would have recorded."""

    report: dict[str, Any]
    sections: list[tuple[str, str, str]]
    warnings: list[warnings.WarningMessage]


class MarkerError(Exception):
    """The test's ``isolated`` marker asks for what cannot be done: the test fails with this."""


def wants_isolation(item: pytest.Item, isolate_all: bool) -> bool:
    return isolate_all or item.get_closest_marker(MARKER) is not None


def options_for(item: pytest.Item) -> CallOptions:
    """The call options of an isolated test: the plugin's defaults and its marker's options.

    Raises `MarkerError` for a marker that names what the plugin cannot take.
    """
    marker = item.get_closest_marker(MARKER)
    kwargs = marker.kwargs if marker is not None else {}
    if marker is not None and marker.args:
        raise MarkerError(
            f"@pytest.mark.{MARKER} takes keyword options only (timeout=, memory_limit=, "
            f"cpu_limit=, ...), not {marker.args!r}"
        )
    reserved = _RESERVED & set(kwargs)
    if reserved:
        raise MarkerError(
            f"@pytest.mark.{MARKER} cannot set {', '.join(sorted(reserved))}: the plugin "
            "decides where a test's output goes and how its report comes back"
        )
    options: dict[str, Any] = {**_PLUGIN_DEFAULTS, **kwargs}
    try:
        DEFAULTS.merge(options)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise MarkerError(f"@pytest.mark.{MARKER}: {exc}") from None
    return options  # type: ignore[return-value]


def run_call_phase(item: pytest.Item) -> pytest.TestReport:
    """Run the test's call phase in a forked child; log and return its report."""
    # The sink of pytest's warning capture for this test (entered around the whole protocol,
    # before any fixture could put its own recorder in front): what the child's test warns
    # goes there in the child, and the child sends it back for the parent's copy.
    sink = getattr(warnings, "_showwarnmsg_impl", None)
    log = getattr(sink, "__self__", None)
    if not isinstance(log, list):
        log = None
    with tempfile.TemporaryFile() as fault_file:
        failure: BaseException | None = None
        try:
            outcome, figures = _run_child(item, options_for(item), fault_file.fileno(), log)
        except _reraised(item.config):
            raise
        except BaseException as exc:
            # Ours (a crash, a limit, a bad marker), or one raised here while the child ran:
            # pytest-timeout's, from its SIGALRM handler, say (the child was killed on the way).
            failure = exc
        if failure is not None:  # out of the except block: the report's error stands alone
            fault_file.seek(0)
            dump = fault_file.read().decode(errors="replace")
            report = _report_failure(item, failure, dump)
            if isinstance(failure, IsolationError) and failure.report is not None:
                report.isolated = Figures.of(failure.report).as_dict()  # type: ignore[attr-defined]
        else:
            report = item.config.hook.pytest_report_from_serializable(
                config=item.config, data=outcome.report
            )
            report.isolated = figures.as_dict()
            for when, key, content in outcome.sections:
                item.add_report_section(when, key, content)
            if log is not None:
                log.extend(outcome.warnings)
    item.ihook.pytest_runtest_logreport(report=report)
    return report


def _run_child(
    item: pytest.Item, options: CallOptions, fault_fd: int, log: list[Any] | None
) -> tuple[_Outcome, Figures]:
    # The parent's threads here are the test runner's (pytest-xdist's channel, pytest-timeout's
    # timer): the warning's advice (zygote mode) cannot apply to a test, so it is not given for
    # these forks; the child restores the flag for forks the test itself makes.
    warned = _call._warned_threads
    _call._warned_threads = True

    async def wait() -> tuple[_Outcome, CallReport]:
        return await isolated_with_report(_child_side, item, fault_fd, log, warned, **options)

    def run() -> tuple[_Outcome, CallReport]:
        # anyio's pytest plugin names its backend as the running one while its test runner is
        # open (async fixtures), though no loop runs now: unnamed here, in this copy of the
        # context only.
        sniffio = sys.modules.get("sniffio")
        if sniffio is not None:
            sniffio.current_async_library_cvar.set(None)
        # A loop of our own, which leaves the thread's current event loop (pytest-asyncio's,
        # say) as it found it.
        return anyio.run(
            wait, backend="asyncio", backend_options={"loop_factory": asyncio.new_event_loop}
        )

    try:
        outcome, report = contextvars.copy_context().run(run)
    finally:
        _call._warned_threads = warned
    return outcome, Figures.of(report)


def _child_side(item: pytest.Item, fault_fd: int, log: list[Any] | None, warned: bool) -> _Outcome:
    """In the child: the call phase as pytest runs it, and its report in portable form."""
    _call._warned_threads = warned
    # A crash writes the Python stack here, where the parent reads it (pytest's own
    # faulthandler writes to the terminal); a timeout's SIGTERM does too, then ends the child.
    faulthandler.enable(file=fault_fd, all_threads=True)
    faulthandler.register(signal.SIGTERM, file=fault_fd, all_threads=True, chain=True)
    _fresh_trio_runner()
    config = item.config
    reraise = _reraised(config)
    warned_before = len(log) if log is not None else 0
    sections_before = len(item._report_sections)
    call = pytest.CallInfo.from_call(
        lambda: item.ihook.pytest_runtest_call(item=item), when="call", reraise=reraise
    )
    if call.excinfo is not None and isinstance(call.excinfo.value, MemoryError):
        limit = _memory_limit(item)
        if limit is not None:
            call.excinfo.value.add_note(
                f"(the isolated test's memory_limit is {limit}: it may grow by that much beyond "
                "what it inherited from the parent)"
            )
    report = item.ihook.pytest_runtest_makereport(item=item, call=call)
    data = config.hook.pytest_report_to_serializable(config=config, report=report)
    recorded = [_portable(w) for w in log[warned_before:]] if log is not None else []
    return _Outcome(data, list(item._report_sections[sections_before:]), recorded)


def _reraised(config: pytest.Config) -> tuple[type[BaseException], ...]:
    """What ends the run instead of failing the test, as pytest has it."""
    if config.getoption("usepdb", False):
        return (pytest.exit.Exception,)
    return (pytest.exit.Exception, KeyboardInterrupt)


def _fresh_trio_runner() -> None:
    """Let anyio's plugin start a trio run for the test here, if the parent's is open.

    The plugin keeps one test runner open while async fixtures are. On asyncio that is a loop,
    which fork copied whole: the test runs on it here, with the fixtures' tasks. On trio it is
    a guest run whose I/O thread did not survive fork: it can never wake here, so the test gets
    a run of its own (the fixtures' values are inherited; their tasks stay in the parent).
    """
    plugin: Any = sys.modules.get("anyio.pytest_plugin")
    runner = getattr(plugin, "_current_runner", None)
    if runner is not None and type(runner).__module__.endswith("._trio"):
        plugin._current_runner = None
        plugin._runner_stack = None
        plugin._runner_leases = 0


def _memory_limit(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker(MARKER)
    value = marker.kwargs.get("memory_limit") if marker is not None else None
    return None if value is None else str(value)


def _portable(message: warnings.WarningMessage) -> warnings.WarningMessage:
    """The warning, without what may not pickle (``source``, an object such as a socket for a
    ResourceWarning, and an exotic warning instance)."""
    warning: Any = message.message
    category = message.category
    try:
        cloudpickle.dumps((warning, category))
    except Exception:
        warning = UserWarning(f"{category.__name__}: {warning}")
        category = UserWarning
    return warnings.WarningMessage(
        warning, category, message.filename, message.lineno, None, message.line
    )


def _report_failure(item: pytest.Item, exc: BaseException, dump: str) -> pytest.TestReport:
    """The report of a call phase the child did not report on: what happened and where."""
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        # With fd capture (pytest's default), the child wrote into the files the parent's
        # capture reads: take what it wrote before it died.
        try:
            out, err = capman.read_global_capture()
        except Exception:
            out, err = "", ""
        if out:
            item.add_report_section("call", "stdout", out)
        if err:
            item.add_report_section("call", "stderr", err)
    message = None
    if isinstance(exc, (IsolationError, MarkerError, pytest.fail.Exception)):
        message = _describe(item, exc, dump)

    def fail() -> None:
        if message is not None:
            pytest.fail(message, pytrace=False)
        raise exc

    call = pytest.CallInfo.from_call(fail, when="call")
    return item.ihook.pytest_runtest_makereport(item=item, call=call)  # type: ignore[no-any-return]


_FRAME: Final = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)', re.M)


def _describe(item: pytest.Item, exc: BaseException, dump: str) -> str:
    """The failure's text: its first line (pytest's short summary) says what happened."""
    if isinstance(exc, MarkerError):
        return str(exc)
    frames = _frames(dump)
    test_file = str(getattr(item, "path", ""))
    own = next((f for f in frames if f[0] == test_file), None)
    at = f" at {os.path.basename(own[0])}:{own[1]} in {own[2]}" if own is not None else ""
    if isinstance(exc, IsolationTimeout):
        head = f"isolated test timed out after timeout={exc.timeout:g} s and was killed{at}"
    elif isinstance(exc, MemoryLimitExceeded):
        head = f"isolated test went over its memory_limit of {_size(exc.limit)} and was killed"
    elif isinstance(exc, CPULimitExceeded):
        head = f"isolated test used up its cpu_limit of {exc.limit:g} CPU seconds{at}"
    elif isinstance(exc, ChildCrashed) and exc.signal is not None:
        head = f"isolated test crashed: {exc.signal.name} ({signal.strsignal(exc.signal)}){at}"
    elif isinstance(exc, ChildCrashed) and exc.exitcode is not None:
        head = f"isolated test exited with code {exc.exitcode} before reporting"
    elif isinstance(exc, pytest.fail.Exception):  # raised here, as by pytest-timeout
        head = f"{exc.msg}\n(the isolated test's child was killed{at})"
    else:
        head = f"isolated test failed: {type(exc).__name__}"
    lines = [head] if isinstance(exc, pytest.fail.Exception) else [head, str(exc)]
    if frames:
        file, line, func = frames[0]
        crashed = isinstance(exc, ChildCrashed) and "Fatal Python error" in dump
        lines.append(
            f"{'crashing' if crashed else 'innermost'} Python frame: {file}:{line} in {func}"
        )
    if dump.strip():
        lines += ["", _trim(dump).rstrip()]
    return "\n".join(lines)


def _frames(dump: str) -> list[tuple[str, str, str]]:
    """The frames of the thread that crashed (or got SIGTERM), innermost first."""
    start = dump.find("Current thread")
    if start < 0:
        return []
    block = dump[start:].split("\n\n", 1)[0]
    return [(m["file"], m["line"], m["func"]) for m in _FRAME.finditer(block)]


_OWN_DIR: Final = os.path.dirname(__file__) + os.sep
_PLUGGY: Final = f"{os.sep}pluggy{os.sep}"


def _trim(dump: str) -> str:
    """faulthandler's dump without the frames below the test: those of pluggy, and from this
    module down (the parent's stack, which the child inherited)."""
    kept: list[str] = []
    below_test = False
    for line in dump.splitlines():
        frame = _FRAME.match(line)
        if frame is None:
            below_test = False  # a new thread's block, or the end
            kept.append(line)
        elif frame["file"].startswith(_OWN_DIR):
            below_test = True
        elif not below_test and _PLUGGY not in frame["file"]:
            kept.append(line)
    return "\n".join(kept)


def figures_of(report: pytest.TestReport) -> Mapping[str, Any] | None:
    figures = getattr(report, "isolated", None)
    return figures if isinstance(figures, Mapping) else None
