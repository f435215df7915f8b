"""Sandbox options: each one shown biting."""

from __future__ import annotations

import errno
import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from aioisolate import isolated

pytestmark = pytest.mark.anyio

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching to another user needs root (CI runs as root)"
)


@pytest.fixture
def open_fd(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "inherited", os.O_RDWR | os.O_CREAT)
    yield fd
    os.close(fd)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_close_fds_and_pass_fds(open_fd: int) -> None:
    assert await isolated(fd_is_open, open_fd) is True
    assert await isolated(fd_is_open, open_fd, close_fds=True) is False
    assert await isolated(fd_is_open, open_fd, close_fds=True, pass_fds=[open_fd]) is True
    # Standard streams stay.
    assert await isolated(fd_is_open, 1, close_fds=True) is True


def no_new_privs() -> str:
    with open("/proc/self/status") as status:
        return next(line.split()[1] for line in status if line.startswith("NoNewPrivs"))


async def test_no_new_privs() -> None:
    assert await isolated(no_new_privs) == "0"
    assert await isolated(no_new_privs, no_new_privs=True) == "1"


def open_many(n: int) -> int:
    files = []
    try:
        for _ in range(n):
            files.append(open(os.devnull))  # noqa: SIM115
    except OSError as exc:
        return exc.errno or 0
    finally:
        for f in files:
            f.close()
    return 0


async def test_max_open_files() -> None:
    assert await isolated(open_many, 50) == 0
    assert await isolated(open_many, 50, max_open_files=20) == errno.EMFILE


def write_bytes(path: str, n: int) -> int:
    try:
        with open(path, "wb") as f:
            f.write(b"x" * n)
    except OSError as exc:
        return exc.errno or 0
    return 0


async def test_max_file_size(tmp_path: Path) -> None:
    target = str(tmp_path / "out")
    assert await isolated(write_bytes, target, 4096) == 0
    assert await isolated(write_bytes, target, 4096, max_file_size="1KiB") == errno.EFBIG


def fork_once() -> int:
    try:
        pid = os.fork()
    except OSError as exc:
        return exc.errno or 0
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return 0


@needs_root
async def test_max_processes() -> None:
    # Root is exempt from RLIMIT_NPROC, so this runs as nobody.
    assert await isolated(fork_once, user="nobody") == 0
    assert await isolated(fork_once, user="nobody", max_processes=1) == errno.EAGAIN


async def test_cwd(tmp_path: Path) -> None:
    assert await isolated(os.getcwd, cwd=tmp_path) == str(tmp_path)
    assert await isolated(os.getcwd) == os.getcwd()


def environment() -> tuple[dict[str, str], str | None]:
    return dict(os.environ), os.popen("echo $ONLY").read().strip() or None


async def test_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    env, _ = await isolated(environment)
    assert env["SECRET_TOKEN"] == "hunter2"
    env, from_shell = await isolated(environment, env={"ONLY": "this", "PATH": "/usr/bin:/bin"})
    assert env == {"ONLY": "this", "PATH": "/usr/bin:/bin"}
    assert from_shell == "this"  # subprocesses see the same environment


def identity_and_secret(path: str) -> tuple[int, int, list[int], str]:
    try:
        with open(path) as f:
            secret = f.read()
    except PermissionError:
        secret = "denied"
    return os.getuid(), os.getgid(), os.getgroups(), secret


@needs_root
async def test_user_and_group(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    nobody = pwd.getpwnam("nobody")
    assert (await isolated(identity_and_secret, str(secret)))[3] == "root only"
    uid, gid, groups, read = await isolated(identity_and_secret, str(secret), user="nobody")
    assert (uid, gid, groups, read) == (nobody.pw_uid, nobody.pw_gid, [], "denied")


def connect(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


@pytest.fixture
def listener() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


async def test_network_false_cuts_off_even_loopback(listener: int) -> None:
    assert await isolated(connect, listener) == "connected"
    assert await isolated(connect, listener, network=False) == "ENETUNREACH"


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"user": "no-such-user-here"}, ValueError, "no such user"),
        ({"group": "no-such-group-here"}, ValueError, "no such group"),
        ({"cwd": "/no/such/dir"}, ValueError, "is not a directory"),
        ({"max_open_files": 0}, ValueError, "positive whole number"),
        ({"env": {"A": 1}}, TypeError, "strings to strings"),
        ({"pass_fds": ["3"]}, TypeError, "file descriptor numbers"),
        ({"network": "off"}, TypeError, "True or False"),
        ({"user": 4_000_000}, ValueError, "no such user"),
        ({"group": "nogroup"}, ValueError, "group= goes with user="),
        ({"max_processes": 2**64}, ValueError, "more than the system can enforce"),
    ],
)
async def test_bad_sandbox_options_fail_before_fork(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        await isolated(os.getpid, **options)  # type: ignore[arg-type]
