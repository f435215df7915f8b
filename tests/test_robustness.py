"""Failures inside the library's own steps: nothing leaks, and errors come out as themselves.

The no_leaks fixture (conftest.py) checks after every test here that no child and no fd is left.
"""

from __future__ import annotations

import asyncio
import errno
import faulthandler
import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import anyio
import pytest
from helpers import Channel, isolated_children

from aioisolate import (
    ChildCrashed,
    IsolationError,
    Isolator,
    _child,
    _forking,
    _linux,
    _watch,
    isolated,
    run_isolated,
)
from aioisolate._running import RunningChild
from aioisolate._watch.pidfd import PidfdWatcher
from aioisolate._watch.ready import ReadySet
from aioisolate._watch.thread import ThreadWatcher

pytestmark = pytest.mark.anyio


class Interrupt(BaseException):
    """Stands in for KeyboardInterrupt, which would also stop pytest itself."""


async def test_interrupt_delivered_as_signals_are_unblocked_after_fork(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Ctrl-C that arrives during fork stays pending until the mask is restored, and is
    # raised right there: the child just forked must be killed and reaped, its pipe closed.
    real_sigmask = _forking._signal.pthread_sigmask
    forked = []

    def sigmask(how: int, mask: object) -> set[int]:
        previous: set[int] = real_sigmask(how, mask)
        if how == signal.SIG_SETMASK and os.getpid() == parent:
            forked.append(1)
            raise Interrupt
        return previous

    parent = os.getpid()
    monkeypatch.setattr(_forking._signal, "pthread_sigmask", sigmask)
    with pytest.raises(Interrupt):
        await isolated(time.sleep, 600)
    assert forked == [1]


async def test_fork_failing_is_a_clear_error_and_the_next_call_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_more_processes() -> int:
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fork", no_more_processes)
        with pytest.raises(IsolationError, match="could not start a child process") as info:
            await isolated(pow, 2, 2)
    assert isinstance(info.value.__cause__, BlockingIOError)
    assert await isolated(pow, 2, 2) == 4


async def test_out_of_fds_for_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fds(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pipe2", no_fds)
    with pytest.raises(IsolationError, match="Too many open files"):
        await isolated(pow, 2, 2)


async def test_other_error_from_fork_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused() -> int:
        raise RuntimeError("fork refused by policy")

    monkeypatch.setattr(os, "fork", refused)
    with pytest.raises(RuntimeError, match="refused by policy"):
        await isolated(pow, 2, 2)


async def test_error_while_waiting_comes_out_as_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not wrapped in an exception group by the task group inside the call.
    async def broken_wait(self: object) -> None:
        raise Interrupt

    monkeypatch.setattr(PidfdWatcher, "wait_exited", broken_wait)
    monkeypatch.setattr(ThreadWatcher, "wait_exited", broken_wait)
    monkeypatch.setattr(ReadySet, "wait", broken_wait)
    with pytest.raises(Interrupt):
        await isolated(time.sleep, 600)


async def test_interrupt_during_cleanup_still_reaps(
    monkeypatch: pytest.MonkeyPatch, channel: Channel
) -> None:
    killed = []
    real_kill = RunningChild.kill

    def kill(self: RunningChild) -> None:
        killed.append(self.pid)
        real_kill(self)

    async def wait(self: _watch.ChildWatcher) -> None:
        if killed:
            raise Interrupt  # a second Ctrl-C, which trio delivers through shields
        await real_waits[type(self)](self)

    real_waits = {cls: cls.wait_exited for cls in (PidfdWatcher, ThreadWatcher)}
    monkeypatch.setattr(RunningChild, "kill", kill)
    for cls in real_waits:
        monkeypatch.setattr(cls, "wait_exited", wait)

    def announce_then_hang() -> None:
        channel.send("started")
        time.sleep(600)

    async with anyio.create_task_group() as tg:

        async def call() -> None:
            with pytest.raises(Interrupt):
                await isolated(announce_then_hang)

        tg.start_soon(call)
        await channel.receive()
        tg.cancel_scope.cancel()
    assert killed


async def test_broken_parent_stdout_does_not_break_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    assert await isolated(pow, 3, 2) == 9


async def test_child_setup_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise RuntimeError("no /dev/null here")

    monkeypatch.setattr(_child, "_forget_event_loops", fail)
    with pytest.raises(IsolationError, match="failed to set itself up.*no /dev/null here"):
        await isolated(pow, 3, 2)


async def test_internal_exit_code_is_explained() -> None:
    with pytest.raises(ChildCrashed, match="unless the function chose that code"):
        await isolated(os._exit, _child.EXIT_INTERNAL)


def caught_signals() -> set[int]:
    """The signals with a handler in this process, as the kernel sees it."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                mask = int(line.split()[1], 16)
                return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}
    raise AssertionError("no SigCgt line")


# faulthandler's signals: a parent that has it on (pytest does) gives its children it on too.
FAULTHANDLER_SIGNALS = {
    signal.SIGSEGV,
    signal.SIGFPE,
    signal.SIGABRT,
    signal.SIGBUS,
    signal.SIGILL,
}


async def test_handlers_installed_from_c_are_reset_too() -> None:
    import ctypes

    # A handler installed from C, which Python's signal table does not show (libuv's SIGCHLD
    # handler is one): never called here, only installed.
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
    handler = handler_type(lambda signum: None)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.argtypes = [ctypes.c_int, handler_type]
    libc.signal.restype = ctypes.c_void_p
    libc.signal(signal.SIGUSR2, handler)
    try:
        assert signal.SIGUSR2 in caught_signals()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # as far as Python knows
        # glibc keeps 32 and 33 for itself, out of anyone's reach (and of valid_signals()).
        valid = signal.valid_signals()
        in_child = {sig for sig in await isolated(caught_signals) if sig in valid}
        expected = {signal.SIGINT}
        if faulthandler.is_enabled():
            expected |= FAULTHANDLER_SIGNALS
        assert in_child == expected
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)


def stop_myself() -> str:
    # A background process group that touches the terminal gets SIGTTOU/SIGTTIN, which would
    # stop the child for ever.
    os.kill(os.getpid(), signal.SIGTTOU)
    os.kill(os.getpid(), signal.SIGTTIN)
    return "not stopped"


async def test_terminal_stop_signals_do_not_stop_the_child() -> None:
    assert await isolated(stop_myself) == "not stopped"


def test_child_does_not_read_what_the_parent_read_ahead() -> None:
    code = textwrap.dedent(
        """
        import sys, anyio
        from aioisolate import isolated
        print(repr(sys.stdin.readline()))  # buffers the rest of stdin in the parent
        print(repr(anyio.run(isolated, sys.stdin.read)))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input="line1\nline2\nline3\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.splitlines() == ["'line1\\n'", "''"]


@pytest.mark.asyncio
async def test_isolator_close_waits_through_a_second_native_cancel(
    monkeypatch: pytest.MonkeyPatch, channel: Channel
) -> None:
    main = asyncio.current_task()
    assert main is not None
    real_kill = RunningChild.kill

    def kill_and_cancel_main(self: RunningChild) -> None:
        real_kill(self)
        main.cancel()  # arrives while __aexit__ waits for its calls to finish

    def announce_then_hang() -> None:
        channel.send(os.getpid())
        time.sleep(600)

    runs = []

    async def use_isolator() -> None:
        async with Isolator() as iso:
            runs.append(asyncio.ensure_future(iso.run(announce_then_hang)))
            await channel.receive()
            monkeypatch.setattr(RunningChild, "kill", kill_and_cancel_main)
            main.cancel()
            await asyncio.sleep(600)

    with pytest.raises(asyncio.CancelledError):
        await use_isolator()
    assert isolated_children() == []  # all reaped before the block was left
    with pytest.raises(IsolationError, match="Isolator was closed"):
        await runs[0]


async def test_interrupt_during_kill_grace_still_kills_and_reaps(
    monkeypatch: pytest.MonkeyPatch, channel: Channel
) -> None:
    real_wait = RunningChild._wait_exited
    graced = []

    async def wait(self: RunningChild) -> None:
        if not graced:
            graced.append(1)
            raise Interrupt  # a Ctrl-C while waiting out the grace
        await real_wait(self)

    def ignore_term_and_hang() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        channel.send("started")
        time.sleep(600)

    monkeypatch.setattr(RunningChild, "_wait_exited", wait)
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            with pytest.raises(Interrupt):
                await isolated(ignore_term_and_hang, kill_grace=30)

        tg.start_soon(call)
        await channel.receive()
        tg.cancel_scope.cancel()
    assert graced == [1]  # and no child is left: see no_leaks


async def test_report_of_an_isolator_closed_mid_call(channel: Channel) -> None:
    errors: list[IsolationError] = []

    def announce_then_hang() -> None:
        channel.send("started")
        time.sleep(600)

    async def call(iso: Isolator) -> None:
        try:
            await iso.run(announce_then_hang)
        except IsolationError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg, Isolator() as iso:
        tg.start_soon(call, iso)
        await channel.receive()
    assert errors[0].report is not None
    assert errors[0].report.signal is signal.SIGKILL


async def test_an_error_from_a_nested_call_keeps_its_own_report() -> None:
    async def outer() -> None:
        await isolated(os._exit, 3)

    with pytest.raises(ChildCrashed) as info:
        await isolated(outer)
    assert info.value.report is not None
    assert info.value.report.pid == info.value.pid  # the inner child's, not the outer's
    assert info.value.report.exitcode == 3


def test_a_child_running_a_copy_of_the_parents_loop_leaves_the_parents_epoll_alone() -> None:
    # The pytest plugin's child runs async tests on its copy of the loop their fixtures made;
    # fork shares the loop's epoll instance, registrations included, unless the child makes
    # its own copy.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    loop = asyncio.new_event_loop()
    try:

        async def serve() -> None:
            while True:
                conn, _ = await loop.sock_accept(listener)
                await loop.sock_sendall(conn, b"pong")
                conn.close()

        server = loop.create_task(serve())  # its first step (registering the listener) is to come

        def ask_in_the_child() -> bytes:
            _linux.unshare_epolls()

            async def ask() -> bytes:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                answer = await reader.read()
                writer.close()
                return answer

            return loop.run_until_complete(ask())  # the server task runs here too, in the copy

        assert run_isolated(ask_in_the_child) == b"pong"
        # The parent's loop goes on: its server registers the listener, as yet unregistered in
        # the parent's epoll instance (with a shared one: FileExistsError).
        loop.run_until_complete(asyncio.sleep(0))
        assert not server.done()
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(server)
    finally:
        loop.close()
        listener.close()
