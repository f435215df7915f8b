"""The pytest plugin, driven through pytester: each test runs pytest on a small suite in a
subprocess and checks what it reported."""

from __future__ import annotations

import importlib.metadata
import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytest_plugins = ["pytester"]

# The plugin uses the library as any caller does; the watcher variants are tested elsewhere.
pytestmark = pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)

# Every inner suite sees which process is the test runner's, to tell where a test ran.
CONFTEST = """
import os
import pytest

RUNNER_PID = os.getpid()

@pytest.fixture(scope="session")
def runner_pid():
    return RUNNER_PID
"""


def run(pytester: pytest.Pytester, *args: str, **files: str) -> pytest.RunResult:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(**{name: textwrap.dedent(body) for name, body in files.items()})
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


def test_registered_through_the_pytest11_entry_point() -> None:
    points = importlib.metadata.entry_points(group="pytest11")
    assert {p.name: p.value for p in points}["aioisolate"] == "aioisolate.pytest_plugin"


def test_off_unless_asked(pytester: pytest.Pytester) -> None:
    suite = """
        import os
        import pytest

        def test_plain(runner_pid):
            assert os.getpid() == runner_pid

        @pytest.mark.isolated
        def test_marked(runner_pid):
            assert os.getpid() != runner_pid
    """
    run(pytester, test_where=suite).assert_outcomes(passed=2)


def test_the_switch_isolates_every_test(pytester: pytest.Pytester) -> None:
    suite = """
        import os

        def test_one(runner_pid):
            assert os.getpid() != runner_pid

        class TestSome:
            def test_two(self, runner_pid):
                assert os.getpid() != runner_pid
    """
    run(pytester, "--isolated", test_where=suite).assert_outcomes(passed=2)


def test_marker_on_a_module_or_class(pytester: pytest.Pytester) -> None:
    module = """
        import os
        import pytest

        pytestmark = pytest.mark.isolated

        def test_one(runner_pid):
            assert os.getpid() != runner_pid
    """
    klass = """
        import os
        import pytest

        @pytest.mark.isolated(timeout=30)
        class TestIsolated:
            def test_two(self, runner_pid):
                assert os.getpid() != runner_pid

        def test_three(runner_pid):
            assert os.getpid() == runner_pid
    """
    run(pytester, test_module=module, test_class=klass).assert_outcomes(passed=3)


def test_fixtures_are_set_up_in_the_parent_and_inherited(pytester: pytest.Pytester) -> None:
    log = pytester.path / "setups.log"
    suite = f"""
        import os
        import pytest

        @pytest.fixture(scope="session")
        def expensive():
            with open({str(log)!r}, "a") as f:
                f.write(f"session {{os.getpid()}}\\n")
            return {{"rows": [1, 2, 3]}}

        @pytest.fixture
        def per_test(expensive):
            made_in = os.getpid()
            yield {{"made_in": made_in, "items": []}}
            # Teardown runs in the parent, which never saw the test's changes.
            with open({str(log)!r}, "a") as f:
                f.write(f"teardown {{os.getpid()}} {{made_in}}\\n")

        @pytest.mark.isolated
        @pytest.mark.parametrize("n", range(3))
        def test_uses_them(expensive, per_test, runner_pid, n):
            assert expensive == {{"rows": [1, 2, 3]}}
            assert per_test["made_in"] == runner_pid != os.getpid()
            per_test["items"].append(n)
    """
    run(pytester, test_fixtures=suite).assert_outcomes(passed=3)
    lines = log.read_text().splitlines()
    assert len([line for line in lines if line.startswith("session")]) == 1  # set up once
    teardowns = [line.split() for line in lines if line.startswith("teardown")]
    assert len(teardowns) == 3
    assert all(where == made_in for _, where, made_in in teardowns)  # in the parent


def test_a_crash_fails_the_test_with_the_signal_the_frame_and_the_output(
    pytester: pytest.Pytester,
) -> None:
    suite = """
        import ctypes
        import sys
        import pytest

        @pytest.mark.isolated
        def test_segfault():
            print("about to crash")
            print("on stderr too", file=sys.stderr)
            ctypes.string_at(0)

        def test_next():
            pass
    """
    result = run(pytester, "-rf", test_crash=suite)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*isolated test crashed: SIGSEGV (Segmentation fault) at test_crash.py:9 "
            "in test_segfault",
            "*crashing Python frame: *ctypes*in string_at",
            "*Captured stdout call*",
            "about to crash",
            "*Captured stderr call*",
            "on stderr too",
            "FAILED test_crash.py::test_segfault - Failed: isolated test crashed: SIGSEGV*",
        ]
    )


def test_an_exit_without_a_report_fails_the_test(pytester: pytest.Pytester) -> None:
    suite = """
        import os
        import pytest

        @pytest.mark.isolated
        def test_exits():
            os._exit(3)
    """
    result = run(pytester, test_exit=suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*isolated test exited with code 3 before reporting*"])


def test_a_leak_stays_in_the_child(pytester: pytest.Pytester) -> None:
    suite = """
        import psutil
        import pytest

        LEAKED = []
        START = psutil.Process().memory_info().rss

        @pytest.mark.isolated
        @pytest.mark.parametrize("n", range(5))
        def test_leaks_100_mb(n):
            LEAKED.append(bytearray(100 << 20))
            assert len(LEAKED) == 1  # the last test's leak is gone too

        def test_the_runner_did_not_grow():
            assert LEAKED == []
            grown = psutil.Process().memory_info().rss - START
            assert grown < 50 << 20, grown
            # Nor did it keep anything of the children: no process, no fd.
            assert psutil.Process().children() == []
            assert psutil.Process().num_fds() == FDS

        FDS = psutil.Process().num_fds()
    """
    run(pytester, test_leak=suite).assert_outcomes(passed=6)


def test_global_state_changed_by_one_test_is_not_seen_by_the_next(
    pytester: pytest.Pytester,
) -> None:
    suite = """
        import os
        import sys
        import pytest

        COUNTER = {"n": 0}

        @pytest.mark.isolated
        @pytest.mark.parametrize("n", range(3))
        def test_mutates(tmp_path, n):
            assert COUNTER["n"] == 0
            assert "MUTATED" not in os.environ
            assert "json" not in sys.modules or n >= 0
            COUNTER["n"] += 1
            os.environ["MUTATED"] = "1"
            sys.modules["fake_module_from_a_test"] = object()
            os.chdir(tmp_path)

        def test_not_isolated_sees_nothing(pytester_cwd):
            assert COUNTER["n"] == 0
            assert "MUTATED" not in os.environ
            assert "fake_module_from_a_test" not in sys.modules
            assert os.getcwd() == pytester_cwd

        @pytest.fixture(scope="session")
        def pytester_cwd():
            return os.getcwd()
    """
    # The fixture's first use is the parent's cwd at setup: before any test changed it.
    result = run(pytester, "-p", "no:randomly", test_state=suite)
    result.assert_outcomes(passed=4)


def test_a_timeout_kills_the_test_and_what_it_started(pytester: pytest.Pytester) -> None:
    pid_file = pytester.path / "grandchild.pid"
    suite = f"""
        import subprocess
        import time
        import pytest

        @pytest.mark.isolated(timeout=1)
        def test_hangs():
            sleeper = subprocess.Popen(["sleep", "60"])
            with open({str(pid_file)!r}, "w") as f:
                f.write(str(sleeper.pid))
            time.sleep(60)

        def test_next():
            pass
    """
    result = run(pytester, test_timeout=suite)
    result.assert_outcomes(failed=1, passed=1)
    assert result.duration < 30
    result.stdout.fnmatch_lines(
        [
            "*isolated test timed out after timeout=1 s and was killed at test_timeout.py:10 "
            "in test_hangs*",
        ]
    )
    grandchild = int(pid_file.read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == "zombie"


def test_over_the_memory_limit(pytester: pytest.Pytester) -> None:
    suite = """
        import pytest

        @pytest.mark.isolated(memory_limit="50MiB")
        def test_allocates_too_much():
            data = bytearray(200 << 20)

        @pytest.mark.isolated(memory_limit="50MiB")
        def test_allocates_little():
            data = bytearray(10 << 20)
    """
    result = run(pytester, test_memory=suite)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        ["E       MemoryError", "E       (the isolated test's memory_limit is 50MiB*"]
    )


def test_over_the_cpu_limit(pytester: pytest.Pytester) -> None:
    suite = """
        import pytest

        @pytest.mark.isolated(cpu_limit=1, timeout=60)
        def test_spins():
            while True:
                pass
    """
    result = run(pytester, test_cpu=suite)
    result.assert_outcomes(failed=1)
    # SIGXCPU makes the child say where it was, as a timeout's SIGTERM does.
    result.stdout.fnmatch_lines(
        ["*isolated test used up its cpu_limit of 1 CPU seconds at test_cpu.py:* in test_spins"]
    )


def test_skip_and_xfail_inside_isolated_tests(pytester: pytest.Pytester) -> None:
    suite = """
        import ctypes
        import pytest

        pytestmark = pytest.mark.isolated

        def test_skips():
            pytest.skip("not here")

        @pytest.mark.skip(reason="by marker")
        def test_skipped_by_marker():
            raise AssertionError("never runs")

        @pytest.mark.skipif("True", reason="by condition")
        def test_skipped_by_condition():
            raise AssertionError("never runs")

        @pytest.mark.xfail(reason="known bug")
        def test_fails_as_expected():
            assert 1 == 2

        def test_xfail_called():
            pytest.xfail("called")

        @pytest.mark.xfail(reason="crashes as expected")
        def test_crash_expected():
            ctypes.string_at(0)

        @pytest.mark.xfail(reason="passes", strict=True)
        def test_unexpected_pass():
            pass

        @pytest.mark.xfail(reason="passes", strict=False)
        def test_passes_anyway():
            pass
    """
    result = run(pytester, "-rsxX", test_outcomes=suite)
    result.assert_outcomes(skipped=3, xfailed=3, failed=1, xpassed=1)
    result.stdout.fnmatch_lines_random(
        [
            "SKIPPED [[]1[]] test_outcomes.py:*: not here",
            "SKIPPED [[]1[]] test_outcomes.py:*: by marker",
            "XFAIL test_outcomes.py::test_fails_as_expected - known bug",
            "XFAIL test_outcomes.py::test_xfail_called - called",
            "XFAIL test_outcomes.py::test_crash_expected - crashes as expected",
            "XPASS test_outcomes.py::test_passes_anyway - passes",
        ]
    )


def test_assertion_rewriting_and_output_as_without_isolation(
    pytester: pytest.Pytester,
) -> None:
    suite = """
        import logging
        import sys
        import pytest

        def total(items):
            return sum(items)

        @pytest.mark.isolated
        def test_compares(capsys, caplog):
            print("to stdout")
            assert capsys.readouterr().out == "to stdout\\n"
            print("kept for the report")
            print("to stderr", file=sys.stderr)
            logging.getLogger("suite").warning("a log record")
            assert caplog.messages == ["a log record"]
            assert total([1, 2]) == 4
    """
    result = run(pytester, test_rewrite=suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E       assert 3 == 4",
            "E        +  where 3 = total([1, 2])",
            "*Captured stdout call*",
            "kept for the report",
            "*Captured stderr call*",
            "to stderr",
            "*Captured log call*",
            "WARNING  suite:test_rewrite.py:* a log record",
        ]
    )


def test_warnings_as_without_isolation(pytester: pytest.Pytester) -> None:
    suite = """
        import warnings
        import pytest

        pytestmark = pytest.mark.isolated

        def test_warns():
            warnings.warn("reported in the summary", UserWarning)

        def test_recorded(recwarn):
            warnings.warn("caught by recwarn", UserWarning)
            assert [str(w.message) for w in recwarn] == ["caught by recwarn"]

        def test_expected():
            with pytest.warns(DeprecationWarning, match="expected"):
                warnings.warn("expected", DeprecationWarning)

        @pytest.mark.filterwarnings("error::RuntimeWarning")
        def test_turned_into_an_error():
            warnings.warn("now an error", RuntimeWarning)
    """
    result = run(pytester, test_warnings=suite)
    result.assert_outcomes(passed=3, failed=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*warnings summary*",
            "test_warnings.py::test_warns",
            "*UserWarning: reported in the summary",
        ]
    )
    assert "caught by recwarn" not in result.stdout.str().split("warnings summary")[1]
    result.stdout.fnmatch_lines(["E       RuntimeWarning: now an error"])


def test_async_tests_on_asyncio_and_trio(pytester: pytest.Pytester) -> None:
    suite = """
        import os
        import anyio
        import pytest
        import pytest_asyncio

        @pytest.fixture(params=["asyncio", "trio"])
        def anyio_backend(request):
            return request.param

        @pytest.fixture
        async def connection(anyio_backend):
            # Set up by the backend's runner in the parent; the test inherits its value.
            await anyio.sleep(0)
            yield {"made_in": os.getpid()}
            await anyio.sleep(0)

        @pytest.mark.anyio
        @pytest.mark.isolated(timeout=30)
        async def test_anyio(connection, runner_pid, anyio_backend):
            assert connection["made_in"] == runner_pid != os.getpid()
            with anyio.fail_after(5):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(anyio.sleep, 0.01)

        @pytest.mark.anyio
        @pytest.mark.isolated(timeout=30)
        async def test_anyio_fails(anyio_backend):
            await anyio.sleep(0)
            assert anyio_backend == "neither"

        @pytest_asyncio.fixture
        async def server():
            import asyncio

            async def answer(reader, writer):
                writer.write(b"pong")
                await writer.drain()
                writer.close()

            srv = await asyncio.start_server(answer, "127.0.0.1", 0)
            yield srv.sockets[0].getsockname()[1]
            srv.close()
            await srv.wait_closed()

        @pytest.mark.asyncio
        @pytest.mark.isolated(timeout=30)
        async def test_pytest_asyncio(server, runner_pid):
            import asyncio

            assert os.getpid() != runner_pid
            # The fixture's server task was copied with the loop: it answers here.
            reader, writer = await asyncio.open_connection("127.0.0.1", server)
            assert await reader.read() == b"pong"
            writer.close()
    """
    result = run(pytester, "-v", test_async=suite)
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "*test_anyio[[]asyncio[]] PASSED*",
            "*test_anyio[[]trio[]] PASSED*",
            "*test_anyio_fails[[]asyncio[]] FAILED*",
            "*test_anyio_fails[[]trio[]] FAILED*",
            "*test_pytest_asyncio PASSED*",
        ]
    )
    result.stdout.fnmatch_lines(["E       AssertionError: assert 'trio' == 'neither'*"])


def test_the_report_carries_the_childs_figures(pytester: pytest.Pytester) -> None:
    figures_file = pytester.path / "figures.json"
    pytester.makepyfile(
        conftest_extra=f"""
import json

def pytest_runtest_logreport(report):
    figures = getattr(report, "isolated", None)
    if figures is not None:
        with open({str(figures_file)!r}, "a") as f:
            f.write(json.dumps({{"nodeid": report.nodeid, **figures}}) + "\\n")
"""
    )
    suite = """
        import time
        import pytest

        pytestmark = pytest.mark.isolated

        def test_heavy():
            data = bytearray(80 << 20)
            data[::4096] = b"x" * len(data[::4096])
            deadline = time.process_time() + 0.3
            while time.process_time() < deadline:
                pass

        def test_light():
            pass
    """
    result = run(pytester, "-p", "conftest_extra", "--isolated-report", test_figures=suite)
    result.assert_outcomes(passed=2)
    rows = {
        r["nodeid"].split("::")[1]: r
        for r in map(json.loads, figures_file.read_text().split("\n")[:-1])
    }
    assert set(rows) == {"test_heavy", "test_light"}
    assert rows["test_heavy"]["peak_memory"] > 75 << 20
    assert rows["test_light"]["peak_memory"] < 20 << 20
    assert rows["test_heavy"]["user_time"] + rows["test_heavy"]["system_time"] >= 0.3
    assert rows["test_heavy"]["pid"] != rows["test_light"]["pid"]
    # The summary table lists the heaviest first.
    text = result.stdout.str()
    table = text[text.index("isolated tests: the heaviest") :]
    assert table.index("test_heavy") < table.index("test_light")
    assert re.search(r"\b8\d\.\dMiB\s+0\.[3-9]\d+s .* passed\s+test_figures.py::test_heavy", table)


def test_bad_marker_options_fail_the_test_with_a_clear_message(
    pytester: pytest.Pytester,
) -> None:
    suite = """
        import pytest

        @pytest.mark.isolated(5)
        def test_positional():
            pass

        @pytest.mark.isolated(stdout="capture")
        def test_reserved():
            pass

        @pytest.mark.isolated(timeout=-1)
        def test_bad_value():
            pass

        @pytest.mark.isolated(close_fds=True)
        def test_closing_pytests_files():
            pass

        @pytest.mark.isolated(timeout=30)
        def test_fine():
            pass
    """
    result = run(pytester, "-rf", test_marker=suite)
    result.assert_outcomes(failed=4, passed=1)
    result.stdout.fnmatch_lines_random(
        [
            "@pytest.mark.isolated takes keyword options only (timeout=, memory_limit=, *(5,)",
            "@pytest.mark.isolated cannot set stdout: the plugin decides where a test's output*",
            "@pytest.mark.isolated: timeout must be*",
            "@pytest.mark.isolated cannot set close_fds: *keeps pytest's files open in the child",
        ]
    )


def test_pytest_timeout_in_the_parent_kills_the_child(pytester: pytest.Pytester) -> None:
    pid_file = pytester.path / "child.pid"
    suite = f"""
        import os
        import time
        import pytest

        @pytest.mark.isolated
        def test_hangs():
            with open({str(pid_file)!r}, "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)
    """
    result = run(pytester, "--timeout=2", "--isolated-report", test_hang=suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*failed   test_hang.py::test_hangs (SIGTERM)"])
    result.stdout.fnmatch_lines(
        [
            "Timeout (>2.0s) from pytest-timeout.",
            "(the isolated test's child was killed at test_hang.py:9 in test_hangs)",
        ]
    )
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"


def test_pytest_exit_in_an_isolated_test_ends_the_run(pytester: pytest.Pytester) -> None:
    suite = """
        import pytest

        @pytest.mark.isolated
        def test_stops_everything():
            pytest.exit("stop here", returncode=3)

        def test_never_runs():
            raise AssertionError
    """
    result = run(pytester, test_exit=suite)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*stop here*"])
    assert "test_never_runs" not in result.stdout.str()


def test_with_xdist(pytester: pytest.Pytester) -> None:
    # pytest-xdist is in the test extra: the plugin is checked with it, never skipped.
    suite = """
        import ctypes
        import os
        import pytest

        STATE = []

        @pytest.mark.parametrize("n", range(6))
        def test_state(n):
            assert STATE == []
            STATE.append(n)

        def test_crash():
            ctypes.string_at(0)

        def test_where(runner_pid):
            assert os.getpid() != runner_pid
    """
    result = run(pytester, "-n", "2", "--isolated", "--isolated-report", test_xdist=suite)
    result.assert_outcomes(passed=7, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*isolated test crashed: SIGSEGV*",
            "*isolated tests: the heaviest*",
            "8 isolated test(s)*",
        ]
    )


def test_the_summary_says_when_no_test_ran_isolated(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--isolated-report", test_plain="def test_plain():\n    pass\n")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*isolated tests: the heaviest*", "no test ran isolated"])


DOCS_BLOCKS = re.findall(
    r"```python\n(.*?)```", (Path(__file__).parents[1] / "docs" / "pytest.md").read_text(), re.S
)


def test_the_docs_example_runs_as_documented(pytester: pytest.Pytester) -> None:
    run(pytester, test_example=DOCS_BLOCKS[0]).assert_outcomes(passed=2, xfailed=1)


def test_the_docs_conftest_reads_the_figures(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(DOCS_BLOCKS[1])
    pytester.makepyfile(
        test_sizes="""
import pytest

@pytest.mark.isolated
def test_big():
    data = bytearray(600 << 20)

@pytest.mark.isolated
def test_small():
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_sizes.py::test_big used 60? MiB"])
    assert "test_small used" not in result.stdout.str()


def test_ctrl_c_stops_the_run_and_kills_the_child(pytester: pytest.Pytester) -> None:
    pid_file = pytester.path / "child.pid"
    suite = f"""
        import os
        import time
        import pytest

        @pytest.mark.isolated
        def test_waits():
            with open({str(pid_file)!r} + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
            time.sleep(60)
    """
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    path = pytester.makepyfile(test_interrupt=textwrap.dedent(suite))
    runner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(path)],
        cwd=pytester.path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists():  # written once the test runs, in the child
            assert runner.poll() is None, runner.communicate()
            assert time.monotonic() < deadline, "the isolated test never started"
            time.sleep(0.05)
        child = psutil.Process(int(pid_file.read_text()))
        # Ctrl-C at a terminal signals the foreground group: the runner (the child has a
        # group of its own, so that its fate is the runner's to decide).
        runner.send_signal(signal.SIGINT)
        out, _ = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate()
    assert runner.returncode == pytest.ExitCode.INTERRUPTED
    assert b"KeyboardInterrupt" in out
    gone, alive = psutil.wait_procs([child], timeout=10)
    assert alive == []


def test_subtests_as_without_isolation(pytester: pytest.Pytester) -> None:
    suite = """
        import unittest

        def test_with_subtests(subtests):
            for i in range(3):
                with subtests.test(msg="check", i=i):
                    assert i < 2

        class TestCase(unittest.TestCase):
            def test_sub(self):
                for i in range(3):
                    with self.subTest(i=i):
                        self.assertLess(i, 2)
    """
    plain = run(pytester, "-rf", test_subtests=suite)
    isolated = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rf", "--isolated")
    assert isolated.parseoutcomes() == plain.parseoutcomes()
    assert isolated.ret == plain.ret == pytest.ExitCode.TESTS_FAILED
    isolated.stdout.fnmatch_lines_random(
        [
            "SUBFAILED[[]check[]] (i=2) test_subtests.py::test_with_subtests - assert 2 < 2",
            "FAILED test_subtests.py::test_with_subtests - contains 1 failed subtest",
            "SUBFAILED(i=2) test_subtests.py::TestCase::test_sub - AssertionError: 2 not l*",
        ]
    )
    # The subtests' progress letters come from the runner, not from the child's output.
    assert "Captured stdout" not in isolated.stdout.str()


def test_an_async_fixture_serving_from_a_task_group(pytester: pytest.Pytester) -> None:
    # The usual anyio idiom: on asyncio the test runs on the child's copy of the fixture's loop,
    # whose epoll instance must be the child's own, or the runner's loop breaks at teardown.
    suite = """
        import anyio
        import pytest

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        @pytest.fixture
        async def server(anyio_backend):
            async def answer(stream):
                async with stream:
                    await stream.send(b"pong")

            listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, answer)
                yield listener.extra(anyio.abc.SocketAttribute.local_port)
                tg.cancel_scope.cancel()

        @pytest.mark.anyio
        @pytest.mark.isolated(timeout=30)
        @pytest.mark.parametrize("n", range(3))
        async def test_talks_to_the_fixture(server, n):
            async with await anyio.connect_tcp("127.0.0.1", server) as stream:
                assert await stream.receive() == b"pong"

        @pytest.mark.anyio
        async def test_not_isolated(server):
            async with await anyio.connect_tcp("127.0.0.1", server) as stream:
                assert await stream.receive() == b"pong"
    """
    run(pytester, test_serving=suite).assert_outcomes(passed=4)


def test_a_report_value_that_does_not_pickle(pytester: pytest.Pytester) -> None:
    suite = """
        import threading
        import pytest

        @pytest.mark.isolated
        def test_records_a_lock(record_property):
            record_property("answer", 42)
            record_property("lock", threading.Lock())
    """
    result = run(
        pytester, "--junitxml=report.xml", "-o", "junit_family=xunit1", test_property=suite
    )
    result.assert_outcomes(passed=1)
    xml = (pytester.path / "report.xml").read_text()
    assert '<property name="answer" value="42"' in xml
    assert re.search(r'<property name="lock" value="&lt;unlocked _thread.lock object', xml)


def test_limits_for_the_whole_run(pytester: pytest.Pytester) -> None:
    suite = """
        import time
        import pytest

        pytestmark = pytest.mark.isolated

        def test_too_slow():
            time.sleep(30)

        def test_too_big():
            data = bytearray(200 << 20)

        @pytest.mark.isolated(timeout=60, memory_limit="1GiB")
        def test_allowed_more():
            data = bytearray(200 << 20)
            time.sleep(1.5)
    """
    pytester.makefile(".ini", pytest="[pytest]\nisolated_memory_limit = 50MiB\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_limits=textwrap.dedent(suite))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--isolated-timeout=1")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines_random(
        [
            "*isolated test timed out after timeout=1 s*in test_too_slow",
            "E       (the isolated test's memory_limit is 50MiB*",
        ]
    )
    bad = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--isolated-timeout=soon")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --isolated-timeout (or isolated_timeout in the ini file)*"])


def test_a_module_scoped_loop_stays_whole_for_the_next_tests(pytester: pytest.Pytester) -> None:
    # The isolated test registers a socket on its copy of the loop and is killed while waiting:
    # the runner's loop, the same for the next test, must not have seen that registration.
    suite = """
        import asyncio
        import socket
        import pytest
        import pytest_asyncio

        pytestmark = pytest.mark.asyncio(loop_scope="module")

        @pytest_asyncio.fixture(loop_scope="module", scope="module")
        async def pair():
            a, b = socket.socketpair()
            a.setblocking(False)
            yield a, b
            a.close()
            b.close()

        @pytest.mark.isolated(timeout=1)
        async def test_waits_and_is_killed(pair):
            await asyncio.get_running_loop().sock_recv(pair[0], 1)

        async def test_the_runner_reads(pair):
            a, b = pair
            loop = asyncio.get_running_loop()
            loop.call_later(0.1, b.send, b"x")
            assert await asyncio.wait_for(loop.sock_recv(a, 1), 5) == b"x"
    """
    result = run(pytester, test_loop=suite)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["FAILED test_loop.py::test_waits_and_is_killed - Failed: *"])


def test_keyboard_interrupt_raised_by_a_test_stops_the_run(pytester: pytest.Pytester) -> None:
    suite = """
        import pytest

        @pytest.mark.isolated
        def test_interrupts():
            raise KeyboardInterrupt

        def test_never_runs():
            raise AssertionError
    """
    result = run(pytester, test_interrupt=suite)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    assert "test_never_runs" not in result.stdout.str()


def test_a_killed_test_reports_how_long_it_ran(pytester: pytest.Pytester) -> None:
    suite = """
        import time
        import pytest

        @pytest.mark.isolated(timeout=0.5, kill_grace=0)
        def test_killed():
            time.sleep(30)
    """
    run(pytester, "--junitxml=report.xml", test_duration=suite).assert_outcomes(failed=1)
    xml = (pytester.path / "report.xml").read_text()
    match = re.search(r'name="test_killed"[^>]* time="([\d.]+)"', xml)
    assert match is not None
    assert 0.5 <= float(match[1]) < 10


def test_warnings_whose_class_does_not_round_trip(pytester: pytest.Pytester) -> None:
    suite = """
        import warnings
        import pytest

        class TwoPartWarning(UserWarning):
            def __init__(self, a, b):
                super().__init__(f"{a}-{b}")

        @pytest.mark.isolated
        def test_warns():
            warnings.warn(TwoPartWarning(1, 2))
    """
    result = run(pytester, test_warning_class=suite)
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*UserWarning: TwoPartWarning: 1-2"])


def test_what_the_call_records_reaches_teardown_and_reports(pytester: pytest.Pytester) -> None:
    suite = """
        import logging
        import pytest

        @pytest.fixture
        def no_warnings_logged(caplog):
            yield
            # A check from pytest's documentation: on the records of the call phase.
            assert [r.getMessage() for r in caplog.get_records("call")] == ["careful: 3"]

        @pytest.mark.isolated
        def test_logs(no_warnings_logged, record_property):
            logging.getLogger("suite").warning("careful: %d", 3)
            record_property("rows", 12)
    """
    result = run(pytester, "--junitxml=report.xml", "-o", "junit_family=xunit1", test_records=suite)
    result.assert_outcomes(passed=1)
    assert '<property name="rows" value="12"' in (pytester.path / "report.xml").read_text()


def test_the_dump_keeps_the_frames_of_a_test_that_uses_the_library(
    pytester: pytest.Pytester,
) -> None:
    suite = """
        import time
        import aioisolate
        import pytest

        def slow():
            time.sleep(30)

        @pytest.mark.isolated(timeout=2)
        def test_waits_for_its_own_child():
            aioisolate.run_isolated(slow)
    """
    result = run(pytester, test_nested=suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ['  File "*test_nested.py", line 10 in test_waits_for_its_own_child']
    )
