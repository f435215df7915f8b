"""One test's call phase in a forked child: the pytest plugin's child side.

The child runs pytest's whole call phase (the ``pytest_runtest_call`` hooks, so capture,
logging, skip/xfail and the async plugins work as usual) and makes the report, which it sends
back with what else the call phase did that the parent must see (`Outcome`), all in forms that
pickle.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import pickle
import signal
import sys
import warnings
from typing import Any, Final, cast

import cloudpickle
import pytest
from _pytest.runner import get_reraise_exceptions

from . import _linux, _threads


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What the child sends back: its report, and what its call phase did that the parent
    must see (see `_take_outcome`); or that the test raised KeyboardInterrupt."""

    report: bytes | dict[str, Any]
    sections: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    warnings: list[warnings.WarningMessage] = dataclasses.field(default_factory=list)
    logged: list[bytes | dict[str, Any]] = dataclasses.field(default_factory=list)
    failed_subtests: int = 0
    properties: list[tuple[str, object]] = dataclasses.field(default_factory=list)
    attributes: dict[str, Any] = dataclasses.field(default_factory=dict)
    log_records: list[logging.LogRecord] | None = None
    interrupted: bool = False


def call_phase(
    item: pytest.Item, fault_fd: int, log: list[Any] | None, memory_limit: int | str | None
) -> Outcome:
    """In the child: the call phase as pytest runs it, and what came of it in portable form."""
    _threads.end_quiet_forks()  # the test's own forks warn as usual
    # A crash writes the Python stack here, where the parent reads it (pytest's own
    # faulthandler writes to the terminal); so do a timeout's SIGTERM and the cpu_limit's
    # SIGXCPU, which then end the child as they would have.
    faulthandler.enable(file=fault_fd, all_threads=True)
    for sig in (signal.SIGTERM, signal.SIGXCPU):
        faulthandler.register(sig, file=fault_fd, all_threads=True, chain=True)
    _linux.unshare_epolls()
    _fresh_trio_runner()
    config = item.config
    relay = _Relay(config)
    warned_before = len(log) if log is not None else 0
    sections_before = len(item._report_sections)
    properties_before = len(item.user_properties)
    attributes_before = dict(vars(item))
    failed_subtests_before = _failed_subtests(item)
    try:
        call = pytest.CallInfo.from_call(
            lambda: item.ihook.pytest_runtest_call(item=item),
            when="call",
            reraise=get_reraise_exceptions(config),
        )
    except KeyboardInterrupt:
        return Outcome(report={}, interrupted=True)
    if call.excinfo is not None and isinstance(call.excinfo.value, MemoryError):
        if memory_limit is not None:
            call.excinfo.value.add_note(
                f"(the isolated test's memory_limit is {memory_limit}: it may grow by that much "
                "beyond what it inherited from the parent)"
            )
    report = item.ihook.pytest_runtest_makereport(item=item, call=call)
    records = caplog_records(item)
    return Outcome(
        report=_portable_report(config, report),
        sections=list(item._report_sections[sections_before:]),
        warnings=[w for w in map(_portable, log[warned_before:])] if log is not None else [],
        logged=[_portable_report(config, r) for r in relay.reports],
        failed_subtests=_failed_subtests(item) - failed_subtests_before,
        properties=[(k, _picklable(v)) for k, v in item.user_properties[properties_before:]],
        attributes={
            name: value
            for name, value in vars(item).items()
            if not name.startswith("_")
            and attributes_before.get(name, _MISSING) is not value
            and _round_trips(value)
        },
        log_records=None if records is None else _portable_records(records.get("call", [])),
    )


_MISSING: Final = object()


def caplog_records(item: pytest.Item) -> dict[str, list[logging.LogRecord]] | None:
    """The records pytest's logging keeps for each phase (``caplog.get_records(when)``)."""
    try:
        from _pytest.logging import caplog_records_key
    except ImportError:
        return None
    return item.stash.get(caplog_records_key, None)


def _portable_records(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """Log records with their message formatted, without arguments or an exception (which
    may not pickle)."""
    portable = []
    for record in records:
        copy = logging.makeLogRecord(vars(record))
        copy.msg, copy.args = record.getMessage(), None
        if record.exc_info and not record.exc_text:
            copy.exc_text = logging.Formatter().formatException(record.exc_info)
        copy.exc_info = None
        portable.append(copy)
    return portable


def _round_trips(value: Any) -> bool:
    try:
        pickle.loads(cloudpickle.dumps(value))
    except Exception:
        return False
    return True


class _Relay:
    """In the child, the only listener to ``pytest_runtest_logreport``: reports logged during
    the call (pytest's subtests log one per subtest) go to the parent, which logs them. The
    listeners they would reach here (the terminal, the counts, pytest-xdist's channel to its
    controller) are the parent's."""

    def __init__(self, config: pytest.Config) -> None:
        self.reports: list[pytest.TestReport] = []
        config.pluginmanager.register(self, "aioisolate-relay")
        caller = config.hook.pytest_runtest_logreport
        # pluggy has no public way to silence a hook's implementations; this child ends soon.
        caller._hookimpls[:] = [impl for impl in caller.get_hookimpls() if impl.plugin is self]

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.append(report)


def _failed_subtests(item: pytest.Item) -> int:
    """pytest's count of the test's failed subtests, which fails a test that passed."""
    key = failed_subtests_key()
    counts = None if key is None else item.config.stash.get(key, None)
    return 0 if counts is None else int(counts.get(node_id(item), 0))


def node_id(item: pytest.Item) -> Any:
    return getattr(item, "id", item.nodeid)  # the key pytest 9 counts under


def failed_subtests_key() -> Any:
    try:
        from _pytest.subtests import failed_subtests_key  # pytest 9+
    except ImportError:
        return None
    return failed_subtests_key


def _portable_report(config: pytest.Config, report: pytest.TestReport) -> bytes | dict[str, Any]:
    """The report, pickled as it is; or, if it does not pickle, as pytest serializes it for
    pytest-xdist, with any value that would not pickle (a user property, a plugin's attribute)
    replaced by its repr."""
    try:
        return cast(bytes, cloudpickle.dumps(report))
    except Exception:
        pass
    data: dict[str, Any] = config.hook.pytest_report_to_serializable(config=config, report=report)
    try:
        cloudpickle.dumps(data)
    except Exception:
        properties = [(name, _picklable(value)) for name, value in data["user_properties"]]
        data = {name: _picklable(value) for name, value in data.items()}
        data["user_properties"] = properties
    return data


def _picklable(value: Any) -> Any:
    try:
        cloudpickle.dumps(value)
    except Exception:
        return repr(value)
    return value


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


def _portable(message: warnings.WarningMessage) -> warnings.WarningMessage:
    """The warning, without what may not pickle (``source``, an object such as a socket for a
    ResourceWarning, and an exotic warning instance)."""
    warning: Any = message.message
    category = message.category
    if not _round_trips((warning, category)):
        warning = UserWarning(f"{category.__name__}: {warning}")
        category = UserWarning
    return warnings.WarningMessage(
        warning, category, message.filename, message.lineno, None, message.line
    )
