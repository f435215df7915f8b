"""``python -m aioisolate demo`` and the ``aioisolate`` console script."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import warnings

import anyio
import pytest
from helpers import FORK_WARNINGS, assert_no_fork_warning

from aioisolate import ThreadedForkWarning, _demo, _threads

# The demo runs its own calls; the watcher variants are tested elsewhere.
pytestmark = pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)


def run_demo(*command: str) -> str:
    result = subprocess.run(
        [*command, "demo", "--quick"], capture_output=True, text=True, timeout=300, check=True
    )
    assert_no_fork_warning(result.stderr)
    return result.stdout


def cells(output: str, scenario: str) -> tuple[str, str]:
    """The in-process and isolated cells of a scenario's row in the plain-text table."""
    for line in output.splitlines():
        if line.startswith(f"| {scenario}"):
            _, _, in_process, isolated, _ = (cell.strip() for cell in line.split("|"))
            return in_process, isolated
    raise AssertionError(f"no row for {scenario!r} in:\n{output}")


def mib(cell: str) -> float:
    match = re.search(r"RSS \+([\d.]+) MiB", cell)
    assert match is not None, cell
    return float(match[1])


def test_the_demo_shows_what_isolation_changes() -> None:
    # Not a terminal: the plain-text table.
    output = run_demo(sys.executable, *FORK_WARNINGS, "-m", "aioisolate")
    in_process, isolated = cells(output, "leaky function, 5 calls of 10 MB")
    assert mib(in_process) >= 45  # the leaks stay in the program
    assert mib(isolated) < 5  # they died with the children
    in_process, isolated = cells(output, "segfault in C code")
    assert in_process == "the program dies (SIGSEGV)"
    assert isolated == "ChildCrashed (SIGSEGV) caught; program goes on"
    _, isolated = cells(output, "heavy work, 100,000 records, a short string out")
    assert isolated.endswith("same string")
    _, isolated = cells(output, "tree search, 4 roots fanned out")
    assert isolated.endswith("same scores")


def test_the_console_script() -> None:
    script = shutil.which("aioisolate", path=str(sys.executable).rsplit("/", 1)[0])
    assert script is not None, "the aioisolate console script is not installed"
    assert "segfault in C code" in run_demo(script)
    version = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("aioisolate ")


def test_on_a_terminal_the_table_is_drawn_with_rich(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setattr(_threads, "_warned", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        rows = anyio.run(functools.partial(_demo.demo, quick=True, fancy=True))
    # rich's progress bar draws without a refresh thread: its forks warn of no thread.
    assert not [w for w in seen if issubclass(w.category, ThreadedForkWarning)]
    out = capsys.readouterr().out
    assert "in-process versus isolated" in out
    assert "┃" in out  # rich's box drawing, not the plain table
    assert [row.scenario for row in rows] == [
        "leaky function, 5 calls of 10 MB",
        "heavy work, 100,000 records, a short string out",
        "segfault in C code",
        "tree search, 4 roots fanned out",
    ]
