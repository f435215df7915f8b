"""Everything that differs between operating systems: how the parent learns that a child exited,
how it signals the child, and how the child dies with its parent.

Two ways to watch a child, chosen in `select_watcher` (the one dispatch point):

* ``pidfd`` (Linux 5.3+): a file descriptor for the process, readable once it has exited. The
  event loop waits on it like on a socket, and signals go through it, so they can never reach
  another process that later reused the pid.
* ``thread`` (elsewhere, or where seccomp forbids pidfds): a thread blocks in
  ``waitid(P_PID, pid, WEXITED | WNOWAIT)`` and then writes to a pipe the loop waits on.
  Signals go through ``os.kill``, which is safe because only the caller reaps the child, and
  only after the watcher has seen it exit.

Neither ever calls ``waitpid(-1)``: other libraries' children (asyncio subprocesses, for one)
are theirs to reap. The environment variable ``AIOISOLATE_CHILD_WATCHER=pidfd|thread`` forces
one; the test suite runs the core tests through both.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import select
import signal
import sys
import threading
from typing import Any, Final, Literal, Protocol

Mechanism = Literal["pidfd", "thread"]

ENV_VAR: Final = "AIOISOLATE_CHILD_WATCHER"
# The names of our own threads start with this. They only wait (in waitid), holding no lock a
# child could need, so a fork while they run is not a fork from a threaded process.
THREAD_PREFIX: Final = "aioisolate-"


def _anyio() -> Any:
    """anyio, which only the parent uses here: imported on first use, as this module is also
    imported by a zygote helper, whose size every fork from it pays for."""
    import anyio
    import anyio.lowlevel

    return anyio


class ChildWatcher(Protocol):
    """The parent's handle on one child, until it is reaped.

    A child forked here is watched by `PidfdWatcher` or `ThreadWatcher`; one forked by a zygote
    helper by `_zygote.ZygoteWatcher`, which hears from the helper instead.
    """

    pid: int  # 0 until known (a zygote's child: until the helper says it forked)
    # A zygote's child: the helper's anonymous memory at fork, which the child starts with (it
    # says so with the pid, when the call has a memory limit). None for a child forked here.
    anonymous_at_fork: int | None
    # Whether `fileno` may go into a `ReadySet` (an epoll): a pidfd or a pipe, not a thread.
    pollable: bool

    async def started(self) -> None:
        """Return once `pid` is known (or the child is known never to have started)."""

    async def wait_exited(self) -> None:
        """Return once the child has exited; it stays a zombie until `reap`."""

    def fileno(self) -> int:
        """An fd that turns readable once the child has exited (or there is news of it)."""

    def has_exited(self) -> bool:
        """After `fileno` turned readable: whether that meant the child exited."""

    def send_signal(self, sig: int) -> None:
        """Signal the child itself; a no-op once it has exited. Only call it before `reap`."""

    def signal_group(self, sig: int) -> None:
        """Signal the child's process group (the child and what it started), before `reap`."""

    def reap(self, *, block: bool = False) -> tuple[int, resource.struct_rusage] | None:
        """The exited child's wait status and resource usage, or None if nobody can know them
        (see `reap` below). ``block`` is for a child already sent SIGKILL, with no event loop."""

    def failure(self) -> Exception | None:
        """Why there is no outcome to read, when the watcher knows better than the child's exit
        status (a zygote helper that died, or could not fork); else None."""

    def close(self) -> None:
        """Release what the watcher holds (call once, after the last wait)."""


class _ForkedChild:
    """What the watchers of a child forked by this process share."""

    pid: int
    pollable = False
    anonymous_at_fork: int | None = None

    async def started(self) -> None:
        pass  # known since fork

    def has_exited(self) -> bool:
        return True  # their fd turns readable for nothing else

    def signal_group(self, sig: int) -> None:
        # Only while the child is unreaped: until then its pid, which is the group id, is ours.
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def reap(self, *, block: bool = False) -> tuple[int, resource.struct_rusage] | None:
        return reap(self.pid, block=block)

    def failure(self) -> Exception | None:
        return None


def reap(pid: int, *, block: bool = False) -> tuple[int, resource.struct_rusage] | None:
    """Collect an exited child's wait status and resource usage, or None when something else
    already reaped it.

    Call after `ChildWatcher.wait_exited` returned, when it never blocks; ``block=True`` is
    for a child already sent SIGKILL where no event loop can be used to wait.
    """
    try:
        _, status, rusage = os.wait4(pid, 0 if block else os.WNOHANG)
    except ChildProcessError:
        # A stray waitpid(-1) or SIGCHLD set to SIG_IGN took the status first: not a failure of
        # the call, only a status nobody can know any more.
        return None
    return status, rusage


class PidfdWatcher(_ForkedChild):
    pollable = True

    def __init__(self, pid: int, pidfd: int, registry: set[int]) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self._registry = registry

    async def wait_exited(self) -> None:
        await _anyio().wait_readable(self.pidfd)

    def fileno(self) -> int:
        return self.pidfd

    def send_signal(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
        except ProcessLookupError:
            pass  # already exited

    def close(self) -> None:
        _anyio().notify_closing(self.pidfd)
        self._registry.discard(self.pidfd)
        os.close(self.pidfd)


class ThreadWatcher(_ForkedChild):
    """A thread blocks in waitid() on the child and, when it has exited, writes a byte to a
    pipe whose read end the event loop waits on: one thread per child, however often the
    caller waits."""

    def __init__(self, pid: int, registry: set[int]) -> None:
        self.pid = pid
        self.fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        # Registered so that children forked meanwhile close them (see _fds.library_fds).
        registry.update((self.fd, self._write_fd))
        self._registry = registry
        self._thread = threading.Thread(
            target=_signal_exit,
            args=(pid, self._write_fd),
            name=f"{THREAD_PREFIX}watcher-{pid}",
            daemon=True,
        )
        self._thread.start()

    async def wait_exited(self) -> None:
        await _anyio().wait_readable(self.fd)

    def fileno(self) -> int:
        return self.fd

    def send_signal(self, sig: int) -> None:
        try:
            os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            # Reaped by someone else (SIGCHLD set to SIG_IGN, say), perhaps with its pid
            # already reused: only pidfds rule that out.
            pass

    def close(self) -> None:
        # Called once the child is reaped, so the thread is past waitid() and ends at once;
        # both fds are closed after it, so it can never write to a reused fd number.
        self._thread.join()
        _anyio().notify_closing(self.fd)
        for fd in (self.fd, self._write_fd):
            self._registry.discard(fd)
            os.close(fd)


def _signal_exit(pid: int, write_fd: int) -> None:
    try:
        # WNOWAIT leaves the child a zombie, so its pid (and process group id) stay reserved
        # until the caller reaps it.
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:
        pass  # reaped by someone else: it has exited all the same
    os.write(write_fd, b"x")


_pidfd_verdict: bool | None = None


def pidfd_works() -> bool:
    """Whether this kernel, and any seccomp filter, let us open and signal pidfds.

    Probed once; a probe that fails for want of fds or memory says nothing and is not kept.
    """
    global _pidfd_verdict
    if _pidfd_verdict is not None:
        return _pidfd_verdict
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        _pidfd_verdict = False
        return False
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            return True  # unknown yet; watch() falls back to a thread if opening one fails
        _pidfd_verdict = False
        return False
    try:
        signal.pidfd_send_signal(fd, 0)
    except OSError:
        _pidfd_verdict = False
    else:
        _pidfd_verdict = True
    finally:
        os.close(fd)
    return _pidfd_verdict


def select_watcher() -> Mechanism:
    """The mechanism for the next child; raises before any fork if the forced one is unusable."""
    forced = os.environ.get(ENV_VAR, "")
    if forced == "thread":
        return "thread"
    if forced not in ("", "pidfd"):
        raise ValueError(f"{ENV_VAR}={forced!r} is not one of 'pidfd' or 'thread'")
    if pidfd_works():
        return "pidfd"
    if forced == "pidfd":
        raise RuntimeError(
            f"{ENV_VAR}=pidfd, but this system does not allow pidfds (Linux 5.3+ without a "
            "seccomp filter that forbids pidfd_open); unset it to use the thread watcher"
        )
    return "thread"


def watch(pid: int, mechanism: Mechanism, registry: set[int]) -> ChildWatcher:
    """A watcher for a child just forked. Raises OSError (out of fds, say) if none can be
    made; the caller then kills and reaps the child without one."""
    if mechanism == "pidfd":
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            # Not even a zombie: the child exited at once and something else reaped it (a
            # stray waitpid(-1), or SIGCHLD set to SIG_IGN). What it wrote is in the pipe.
            return GoneWatcher(pid)
        registry.add(pidfd)
        return PidfdWatcher(pid, pidfd, registry)
    return ThreadWatcher(pid, registry)


class GoneWatcher(_ForkedChild):
    """The watcher of a child that was reaped by someone else before it could be watched."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    async def wait_exited(self) -> None:
        await _anyio().lowlevel.checkpoint()

    def fileno(self) -> int:
        raise OSError(errno.ESRCH, "the child is gone: it has no pidfd")

    def send_signal(self, sig: int) -> None:
        pass  # gone, and its pid may be another process's by now

    def signal_group(self, sig: int) -> None:
        pass  # the same goes for its group id

    def close(self) -> None:
        pass


def spill_file(registry: set[int]) -> int | None:
    """A memory file for the child to put a large result in (see `_spill`), or None where there
    are no memfds, or none can be made now (the pipe then carries everything)."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        fd = os.memfd_create("aioisolate-result", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return None
    registry.add(fd)
    return fd


def payload_file(registry: set[int]) -> int:
    """A file for a zygote-mode call's large arguments: a memfd, or an unlinked temporary file
    where there are none."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("aioisolate-arguments", os.MFD_CLOEXEC)
    else:
        import tempfile

        fd = os.dup(tempfile.TemporaryFile().fileno())  # noqa: SIM115
    registry.add(fd)
    return fd


class ReadySet:
    """One fd, readable whenever any of several others is: an epoll instance.

    A call waits on its result pipe, its pidfd and its output pipes at once with a single
    ``wait_readable`` on this fd, instead of a task per fd: fewer wake-ups, and far fewer pages
    of the parent touched (each one a copy-on-write fault while a child shares it).
    """

    def __init__(self, fds: list[int], registry: set[int]) -> None:
        self._epoll = select.epoll(len(fds))
        self.fd = self._epoll.fileno()
        registry.add(self.fd)
        self._registry = registry
        try:
            for fd in fds:
                self._epoll.register(fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    async def wait(self) -> None:
        """Return once one of the fds is readable."""
        await _anyio().wait_readable(self.fd)

    def ready(self) -> list[int]:
        """The fds readable now (never blocks)."""
        return [fd for fd, _ in self._epoll.poll(0)]

    def discard(self, fd: int) -> None:
        """Stop watching an fd (one at EOF stays readable for ever)."""
        self._epoll.unregister(fd)

    def close(self) -> None:
        _anyio().notify_closing(self.fd)
        self._registry.discard(self.fd)
        self._epoll.close()


def ready_set(watcher: ChildWatcher, fds: list[int], registry: set[int]) -> ReadySet | None:
    """A `ReadySet` of the watcher's fd and ``fds``; None where calls wait with a task per fd
    instead: without epoll, and with the thread watcher, which stands for those systems here."""
    if not hasattr(select, "epoll") or not watcher.pollable:
        return None
    try:
        return ReadySet([watcher.fileno(), *fds], registry)
    except OSError:
        return None  # out of fds or memory: the tasks need none


if sys.platform == "linux":
    import ctypes

    _PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")

    def resident_memory() -> tuple[int, int]:
        """This process's resident memory in bytes: all of it, and its anonymous part.

        One small read (psutil would make two). The anonymous part is what fork copies into
        the child's own count; file-backed pages mostly start uncounted there.
        """
        # Three system calls: a file object would add four more (fstat, ioctl, two lseeks).
        fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        try:
            fields = os.read(fd, 256).split()
        finally:
            os.close(fd)
        resident, shared = int(fields[1]), int(fields[2])
        return resident * _PAGE_SIZE, (resident - shared) * _PAGE_SIZE

    def maxrss_bytes(rusage: resource.struct_rusage) -> int:
        return rusage.ru_maxrss * 1024  # kilobytes on Linux

    _libc = ctypes.CDLL(None, use_errno=True)
    # For the one call every child makes: with use_errno, the first call in each thread builds
    # the thread's errno state, which a child (the first caller in its copy) would pay for in
    # copied pages on every call.
    _prctl = ctypes.CDLL(None).prctl
    _PR_SET_PDEATHSIG: Final = 1
    _SIGKILL: Final = int(signal.SIGKILL)
    _PR_SET_NO_NEW_PRIVS: Final = 38
    _CLONE_NEWNET: Final = 0x40000000

    def die_with_parent() -> None:
        """In the child: have the kernel SIGKILL us when the thread that forked us exits."""
        _prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)

    def set_no_new_privs() -> None:
        """In the child: execve can no longer grant privileges (setuid bits, file caps)."""
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))

    def unshare_network() -> None:
        """In the child: move to a new network namespace, with only a loopback that is down."""
        _check(_libc.unshare(_CLONE_NEWNET))

    def _check(result: int) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

else:
    import psutil

    def resident_memory() -> tuple[int, int]:
        info = psutil.Process().memory_info()
        return info.rss, info.rss - getattr(info, "shared", 0)

    def maxrss_bytes(rusage: resource.struct_rusage) -> int:
        return rusage.ru_maxrss  # bytes on macOS

    def die_with_parent() -> None:
        # No equivalent: the child notices a dead parent only when writing its result fails.
        pass

    def set_no_new_privs() -> None:
        raise OSError(errno.ENOSYS, "no_new_privs is Linux-only")

    def unshare_network() -> None:
        raise OSError(errno.ENOSYS, "network namespaces are Linux-only")


def peak_resident() -> int:
    """This process's peak resident memory so far, in bytes (in a child just forked: its
    resident size at fork)."""
    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF))


_EPOLL_TARGET: Final = re.compile(
    r"^tfd:\s*(?P<fd>\d+)\s+events:\s*(?P<events>[0-9a-f]+)\s+data:\s*(?P<data>[0-9a-f]+)", re.M
)


def unshare_epolls() -> None:
    """Give each epoll instance this forked child inherited a copy of its own.

    fork shares an epoll instance, registrations included: a child that runs its copy of the
    parent's event loop (as the pytest plugin's child does, for an async test whose fixtures
    made the loop) would add and remove fds in the parent's instance, under the parent's loop.
    Linux lists each instance's registrations in /proc, from which the copy is made; the copy
    then takes the same fd number. An instance registered with data other than the fd (not
    Python's, libuv's or trio's) is left as it is. Elsewhere there is nothing to do: kqueue is
    not inherited through fork.
    """
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue  # the fd listdir itself used, closed since
        targets = [
            (int(m["fd"]), int(m["events"], 16), int(m["data"], 16))
            for m in _EPOLL_TARGET.finditer(info)
        ]
        # Python sets only the low 32 bits of the data (to the fd); the rest may be anything.
        if any(data & 0xFFFFFFFF != target for target, _, data in targets):
            continue
        copy = select.epoll()
        try:
            for target, events, _ in targets:
                try:
                    copy.register(target, events)
                except OSError:
                    pass  # closed or replaced in this child since (a pipe of the parent's)
            os.dup2(copy.fileno(), fd, inheritable=False)
        finally:
            copy.close()
