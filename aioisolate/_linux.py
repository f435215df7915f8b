"""Linux's process figures and controls: /proc memory, prctl, namespaces, memory files.

What the parent measures (resident memory, a child's peak), what a child asks of the kernel
(to die with its parent, no new privileges, a network namespace of its own), the memory files
of large results and arguments, and the copy of inherited epoll instances. Imported by the
child and by the zygote helper, so it imports only the standard library (psutil elsewhere).
Where the system is not Linux, the ``else`` branch gives each a portable stand-in, or says it
is unavailable.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import select
import signal
import sys
from typing import Final


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
