"""Opt-in restrictions the child puts on itself before running the function.

None of this makes fork a full sandbox (see docs/security.md): each closes one gap. The parent
checks the options and resolves names (users, groups) before fork; the child applies them in
`apply`, in an order that keeps each possible: the network namespace needs root, so it comes
before dropping to another user; no_new_privs comes last.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import os
import pwd
import resource
from collections.abc import Mapping

from . import _platform
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
    if isinstance(user, int):
        return user
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"user={user!r}: there is no such user") from None


def resolve_group(group: object) -> int:
    if isinstance(group, bool) or not isinstance(group, int | str):
        raise TypeError(f"group must be a group name or gid, not {type(group).__name__}")
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"group={group!r}: there is no such group") from None


def apply(sandbox: Sandbox, keep_fds: set[int]) -> None:
    """In the child: put the restrictions on; raises IsolationError for one that cannot be."""
    if sandbox.cwd is not None:
        os.chdir(sandbox.cwd)
    if sandbox.env is not None:
        # Through os.environ, so that C code (getenv) and subprocesses see the same.
        os.environ.clear()
        os.environ.update(sandbox.env)
    for which, limit in (
        (resource.RLIMIT_NPROC, sandbox.max_processes),
        (resource.RLIMIT_NOFILE, sandbox.max_open_files),
        (resource.RLIMIT_FSIZE, sandbox.max_file_size),
    ):
        if limit is not None:
            resource.setrlimit(which, (limit, limit))
    if not sandbox.network:
        _private_network()
    if sandbox.close_fds:
        _close_all_but(keep_fds | set(sandbox.pass_fds))
    if sandbox.gid is not None or sandbox.uid is not None:
        _drop_privileges(sandbox.uid, sandbox.gid)
    if sandbox.no_new_privs:
        _platform.set_no_new_privs()


def _private_network() -> None:
    try:
        _platform.unshare_network()
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EINVAL, errno.ENOSYS):
            raise IsolationError(
                "network=False needs a private network namespace, which this system does not "
                f"allow here ({exc.strerror}): run as root, or enable unprivileged user "
                "namespaces"
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


def _drop_privileges(uid: int | None, gid: int | None) -> None:
    if os.geteuid() != 0:
        raise IsolationError("user= and group= need the parent to run as root")
    if gid is None and uid is not None:
        gid = pwd.getpwuid(uid).pw_gid
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
