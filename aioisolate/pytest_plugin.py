"""The pytest plugin: run chosen tests in a forked child process.

Installed with the package (entry point ``pytest11``) and off unless asked: mark a test (or a
class, or a module with ``pytestmark``) ``@pytest.mark.isolated(timeout=..., memory_limit=...,
cpu_limit=...)``, or run ``pytest --isolated`` to isolate every test. ``--isolated-report``
adds a table of the isolated tests that used the most memory and CPU. See docs/pytest.md.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from _pytest.runner import call_and_report, show_test_item

from . import _testcall
from ._report import _size


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aioisolate", "isolated tests (aioisolate)")
    group.addoption(
        "--isolated",
        action="store_true",
        default=False,
        help="run every test's call phase in a forked child process, as if each were marked "
        "@pytest.mark.isolated",
    )
    for name, meaning in _testcall.LIMITS.items():
        flag = f"--isolated-{name.replace('_', '-')}"
        group.addoption(
            flag,
            dest=f"isolated_{name}",
            default=None,
            help=f"{meaning}, for every isolated test (a marker's {name}= overrides it)",
        )
        parser.addini(f"isolated_{name}", f"{meaning}; as {flag}", default=None)
    group.addoption(
        "--isolated-report",
        action="store_true",
        default=False,
        help="after the run, list the isolated tests that used the most memory and CPU time",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{_testcall.MARKER}(timeout=None, memory_limit=None, cpu_limit=None, **options): run "
        "the test in a forked child process; a crash, leak or change to global state stays "
        "there. Options are aioisolate's call options (docs/pytest.md).",
    )
    config.stash[_testcall.SUITE_OPTIONS] = _testcall.suite_options(config)
    if config.getoption("isolated_report"):
        config.pluginmanager.register(_Summary(), "aioisolate-summary")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """pytest's own protocol (setup, call, teardown, each reported), with the call phase in a
    child. Setup and teardown stay here, so fixtures are set up once and inherited by fork."""
    if not _testcall.wants_isolation(item, item.config.getoption("isolated")):
        return None
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    request_holder: Any = item
    hasrequest = hasattr(item, "_request")
    if hasrequest and not request_holder._request:
        request_holder._initrequest()  # a re-run, as pytest-rerunfailures does
    try:
        report = call_and_report(item, "setup")
        if report.passed:
            setup_only = item.config.getoption("setuponly", False)
            if item.config.getoption("setupshow", False):
                if "add_space" in inspect.signature(show_test_item).parameters:  # pytest 8.4+
                    show_test_item(item, add_space=not setup_only)
                else:
                    show_test_item(item)  # type: ignore[call-arg]
            if not setup_only:
                _testcall.run_call_phase(item)
        if item.session.shouldfail or item.session.shouldstop:
            nextitem = None  # tear everything down, so that its errors are reported
        call_and_report(item, "teardown", nextitem=nextitem)
    finally:
        if hasrequest:
            request_holder._request = False
            request_holder.funcargs = None
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


class _Summary:
    """The ``--isolated-report`` table, from the figures each isolated test's report carries
    (so it works the same with pytest-xdist, whose workers send their reports here)."""

    ROWS = 10

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, dict[str, Any]]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        figures = _testcall.figures_of(report)
        if figures is not None and report.when == "call":
            outcome: str = report.outcome
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "xpassed"
            self.rows.append((report.nodeid, outcome, dict(figures)))

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        write = terminalreporter.write_line
        terminalreporter.write_sep("=", "isolated tests: the heaviest")
        if not self.rows:
            write("no test ran isolated")
            return
        rows = sorted(self.rows, key=lambda r: (r[2]["peak_memory"], _cpu(r[2])), reverse=True)
        total_cpu = sum(_cpu(f) for _, _, f in self.rows)
        write(
            f"{len(self.rows)} isolated test(s), {total_cpu:.2f} s of CPU time in their "
            "children; peak memory is what a child added to what it inherited"
        )
        write(f"{'peak memory':>12} {'CPU':>9} {'wall':>9}  {'outcome':<8} test")
        for nodeid, outcome, f in rows[: self.ROWS]:
            ended = f" ({f['signal']})" if f.get("signal") else ""
            write(
                f"{_size(f['peak_memory']):>12} {_cpu(f):>8.2f}s {f['wall_time']:>8.2f}s  "
                f"{outcome:<8} {nodeid}{ended}"
            )


def _cpu(figures: dict[str, Any]) -> float:
    return float(figures["user_time"]) + float(figures["system_time"])
