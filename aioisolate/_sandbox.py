"""Opt-in restrictions the child puts on itself before running the function.

None of this makes fork a full sandbox (see docs/security.md): each closes one gap. The parent
checks the options and resolves users and groups before fork; the child applies them in
`apply`, in an order that keeps each possible: the network namespace needs root, so it comes
before dropping to another user; closing fds comes before the fd limit; no_new_privs last.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import os
import pwd
import resource
from collections.abc import Mapping

from . import _linux
from ._errors import IsolationError


@dataclasses.dataclass(frozen=True, slots=True)
class Sandbox:
    close_fds: bool = False
    pass_fds: tuple[int, ...] = ()
    no_new_privs: bool = False
    max_processes: int | None = None
    max_open_files: int | None = None
    max_file_size: int | None = None
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    uid: int | None = None
    gid: int | None = None
    network: bool = True

    @property
    def active(self) -> bool:
        return self != _NONE


_NONE = Sandbox()


def resolve_user(user: object) -> int:
    """A uid from a name or a number; raises before fork if there is no such user."""
    if isinstance(user, bool) or not isinstance(user, int | str):
        raise TypeError(f"user must be a user name or uid, not {type(user).__name__}")
    try:
        return pwd.getpwuid(user).pw_uid if isinstance(user, int) else pwd.getpwnam(user).pw_uid
    except (KeyError, OverflowError):
        raise ValueError(f"user={user!r}: there is no such user") from None


def primary_group(uid: int) -> int:
    return pwd.getpwuid(uid).pw_gid


def resolve_group(group: object) -> int:
    if isinstance(group, bool) or not isinstance(group, int | str):
        raise TypeError(f"group must be a group name or gid, not {type(group).__name__}")
    try:
        return grp.getgrgid(group).gr_gid if isinstance(group, int) else grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError):
        raise ValueError(f"group={group!r}: there is no such group") from None


def apply(sandbox: Sandbox, keep_fds: set[int]) -> None:
    """In the child: put the restrictions on; raises IsolationError for one that cannot be."""
    if sandbox.cwd is not None:
        os.chdir(sandbox.cwd)
    if sandbox.env is not None:
        # Through os.environ, so that C code (getenv) and subprocesses see the same.
        os.environ.clear()
        os.environ.update(sandbox.env)
    if not sandbox.network:
        _private_network()
    if sandbox.close_fds:
        # Before the fd limit, which could leave no fd to list the open ones with.
        _close_all_but(keep_fds | set(sandbox.pass_fds))
    for which, limit in (
        (resource.RLIMIT_NPROC, sandbox.max_processes),
        (resource.RLIMIT_NOFILE, sandbox.max_open_files),
        (resource.RLIMIT_FSIZE, sandbox.max_file_size),
    ):
        if limit is not None:
            resource.setrlimit(which, (limit, limit))
    if sandbox.uid is not None:
        _drop_privileges(sandbox.uid, sandbox.gid)
    if sandbox.no_new_privs:
        _linux.set_no_new_privs()


def _private_network() -> None:
    try:
        _linux.unshare_network()
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EINVAL, errno.ENOSYS):
            raise IsolationError(
                "network=False needs a private network namespace, which this system does not "
                f"allow here ({exc.strerror}): it takes root (CAP_SYS_ADMIN)"
            ) from None
        raise


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the fd listdir itself used


def _drop_privileges(uid: int, gid: int | None) -> None:
    # Groups first: once the uid is not root, they can no longer be changed. The gid was
    # looked up in the parent (no user database lookups after fork).
    os.setgroups([])
    if gid is not None:
        os.setgid(gid)
    os.setuid(uid)
