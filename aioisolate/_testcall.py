"""One test's call phase in a forked child: the pytest plugin's parent side.

The parent sets the test up (its fixtures live in the parent and the child inherits them by
fork), then forks; the child (`_testchild`) runs pytest's whole call phase and makes the
report, which it sends back in pytest's own serializable form. The parent logs that report, or,
when the child brings none back (a crash, a timeout, a limit), makes one that says what
happened. Teardown runs in the parent.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import pickle
import re
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any, Final, cast

import anyio
import pytest
from _pytest.runner import get_reraise_exceptions

from . import _api, _testchild, _threads
from ._errors import (
    ChildCrashed,
    CPULimitExceeded,
    IsolationError,
    IsolationTimeout,
    MemoryLimitExceeded,
)
from ._options import DEFAULTS, CallOptions
from ._report import CallReport, _size
from ._testchild import Outcome, caplog_records, failed_subtests_key, node_id

MARKER: Final = "isolated"

# The plugin decides where output goes and how the report comes back; and pytest's capture
# and the plugin's own files must stay open in the child.
_RESERVED: Final = frozenset(
    {
        "stdout",
        "stderr",
        "max_output",
        "codec",
        "max_result_size",
        "zygote",
        "limiter",
        "close_fds",
        "pass_fds",
    }
)
# A test is the work itself, not background work: it runs at the parent's priority. With a
# timeout, SIGTERM comes first so that the child can say where it was (see `_testchild.call_phase`).
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


class MarkerError(Exception):
    """The test's ``isolated`` marker asks for what cannot be done: the test fails with this."""


def wants_isolation(item: pytest.Item, isolate_all: bool) -> bool:
    return isolate_all or item.get_closest_marker(MARKER) is not None


# The limits set for the whole run (command line or ini file), which markers override.
SUITE_OPTIONS: Final = pytest.StashKey[dict[str, Any]]()
LIMITS: Final = {
    "timeout": "seconds an isolated test may run before it is killed",
    "memory_limit": "how much an isolated test may add to what it inherited ('512MiB')",
    "cpu_limit": "CPU seconds an isolated test may use",
}


def suite_options(config: pytest.Config) -> dict[str, Any]:
    """The limits the run sets for every isolated test; raises ``pytest.UsageError`` for a
    value that is not one."""
    options: dict[str, Any] = {}
    for name in LIMITS:
        value = config.getoption(f"isolated_{name}") or config.getini(f"isolated_{name}")
        if value in (None, ""):
            continue
        try:
            options[name] = value if name == "memory_limit" else float(value)
            DEFAULTS.merge({name: options[name]})  # type: ignore[misc]
        except (TypeError, ValueError) as exc:
            flag = f"--isolated-{name.replace('_', '-')}"
            raise pytest.UsageError(f"{flag} (or isolated_{name} in the ini file): {exc}") from None
    return options


def options_for(item: pytest.Item) -> CallOptions:
    """The call options of an isolated test: the plugin's defaults, then the run's
    (`suite_options`), then its marker's.

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
            "decides where a test's output goes and how its report comes back, and keeps "
            "pytest's files open in the child"
        )
    suite: dict[str, Any] = item.config.stash[SUITE_OPTIONS]
    options: dict[str, Any] = {**_PLUGIN_DEFAULTS, **suite, **kwargs}
    try:
        DEFAULTS.merge(options)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise MarkerError(f"@pytest.mark.{MARKER}: {exc}") from None
    return options  # type: ignore[return-value]


def run_call_phase(item: pytest.Item) -> pytest.TestReport:
    """Run the test's call phase in a forked child; log and return its report."""
    # The sink of pytest's warning capture for this test, or of a recorder a fixture put in
    # front of it (recwarn): what the test warns goes there in the child, and comes back to
    # the parent's copy.
    sink = getattr(warnings, "_showwarnmsg_impl", None)
    log = getattr(sink, "__self__", None)
    if not isinstance(log, list):
        log = None
    config = item.config
    calls: list[CallReport] = []
    started, clock = time.time(), time.perf_counter()
    with tempfile.TemporaryFile() as fault_file:
        failure: BaseException | None = None
        try:
            outcome = _run_child(item, options_for(item), fault_file.fileno(), log, calls)
        except get_reraise_exceptions(config):
            raise
        except BaseException as exc:
            # Ours (a crash, a limit, a bad marker), or one raised here while the child ran:
            # pytest-timeout's, from its SIGALRM handler, say (the child was killed on the way).
            failure = exc
        if failure is not None:  # out of the except block: the report's error stands alone
            fault_file.seek(0)
            report = _report_failure(item, failure, fault_file.read().decode(errors="replace"))
            # The test's time, not that of making this report.
            report.start, report.stop = started, time.time()
            report.duration = time.perf_counter() - clock
        elif outcome.interrupted:
            raise KeyboardInterrupt  # the test raised it: the run stops, as without isolation
        else:
            report = _take_outcome(item, outcome, log)
    if calls:
        report.isolated = Figures.of(calls[-1]).as_dict()  # type: ignore[attr-defined]
    item.ihook.pytest_runtest_logreport(report=report)
    return report


def _take_outcome(item: pytest.Item, outcome: Outcome, log: list[Any] | None) -> Any:
    """Apply here what the child's call phase did to the item and to pytest, and return its
    report: the reports it logged, its output sections, warnings and properties, and the
    attributes it set on the item (which teardown, junitxml or Hypothesis read)."""
    config = item.config
    for data in outcome.logged:
        item.ihook.pytest_runtest_logreport(report=_restored_report(config, data))
    key = failed_subtests_key()
    if outcome.failed_subtests and key is not None:
        config.stash[key][node_id(item)] += outcome.failed_subtests
    for when, section, content in outcome.sections:
        item.add_report_section(when, section, content)
    if log is not None:
        log.extend(outcome.warnings)
    item.user_properties.extend(outcome.properties)
    for name, value in outcome.attributes.items():
        setattr(item, name, value)
    records = caplog_records(item)
    if records is not None and outcome.log_records is not None:
        records["call"] = outcome.log_records
    return _restored_report(config, outcome.report)


def _run_child(
    item: pytest.Item,
    options: CallOptions,
    fault_fd: int,
    log: list[Any] | None,
    calls: list[CallReport],
) -> Outcome:
    checked = DEFAULTS.merge(options)
    args = (item, fault_fd, log, options.get("memory_limit"))

    async def wait() -> Outcome:
        outcome, _ = await _api.run(_testchild.call_phase, args, checked, reports=calls)
        return cast(Outcome, outcome)

    def run() -> Outcome:
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

    with _threads.quiet_forks():
        return contextvars.copy_context().run(run)


def _restored_report(config: pytest.Config, data: bytes | dict[str, Any]) -> Any:
    if isinstance(data, bytes):
        return pickle.loads(data)
    return config.hook.pytest_report_from_serializable(config=config, data=data)


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


_PLUGGY: Final = f"{os.sep}pluggy{os.sep}"
_OURS: Final = frozenset({__file__, _testchild.__file__})


def _trim(dump: str) -> str:
    """faulthandler's dump without the frames below the test: pluggy's, and from the plugin's
    own down (the child's entry, then the parent's stack, which the child inherited)."""
    kept: list[str] = []
    below_test = False
    for line in dump.splitlines():
        frame = _FRAME.match(line)
        if frame is None:
            below_test = False  # a new thread's block, or the end
            kept.append(line)
        elif frame["file"] in _OURS:
            below_test = True
        elif not below_test and _PLUGGY not in frame["file"]:
            kept.append(line)
    return "\n".join(kept)


def figures_of(report: pytest.TestReport) -> Mapping[str, Any] | None:
    figures = getattr(report, "isolated", None)
    return figures if isinstance(figures, Mapping) else None
