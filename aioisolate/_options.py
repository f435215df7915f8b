"""The options of an isolated call: their names (`CallOptions`), their checked form (`Options`),
and the checks run before any fork: one table (`_CHECKS`) names every option and its check."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import resource
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal, TypedDict

import anyio

from ._codec import PICKLE, Codec, CodecName
from ._codec import resolve as resolve_codec
from ._engines import Engine
from ._sandbox import Sandbox, primary_group, resolve_group, resolve_user
from ._zygote import Zygote

Output = Literal["inherit", "discard", "capture"]
_OUTPUTS: Final = ("inherit", "discard", "capture")


class CallOptions(TypedDict, total=False):
    """Keyword options of `isolated`, `Isolator` and `Isolator.run`.

    Every option left out takes the isolator's value, then the default.

    Attributes:
        limiter: an ``anyio.CapacityLimiter`` bounding how many children run at once; by
            default `default_limiter`.
        timeout: seconds the child may run, counted from fork; then it is killed and
            `IsolationTimeout` is raised. Default: no limit.
        memory_limit: how much the child may grow beyond what it inherited, in bytes or as a
            string such as ``"512MiB"``. An allocation past it raises ``MemoryError`` in the
            child; a child that grows past it anyway is killed (`MemoryLimitExceeded`).
        cpu_limit: seconds of CPU time the child may use, rounded up to whole seconds (the
            kernel's unit); then it is stopped (`CPULimitExceeded`).
        kill_grace: seconds between SIGTERM and SIGKILL when a call is cancelled or times out.
            Default 0: SIGKILL at once.
        kill_descendants: kill the processes the child started (everything in its process
            group) when it ends, whatever the outcome. Default True.
        stdout: ``"inherit"`` (the default: the child writes where the parent does),
            ``"discard"``, or ``"capture"`` into the call's report.
        stderr: the same for stderr. Capturing it also enables ``faulthandler`` in the child,
            so that a crash reports the Python line where it happened.
        max_output: bytes of each captured stream to keep (the tail); default ``"1MiB"``.
        codec: how the result comes back: ``"pickle"`` (the default; trusted code only, as
            unpickling runs code), ``"safe"`` (plain data only, decoded without running any
            code), or an object with ``dumps`` and ``loads``.
        max_result_size: the largest result (each item, for a stream) the parent accepts, in
            bytes or as a string; a child that announces more is killed. Default: no limit
            with ``"pickle"``, 256 MiB with any other codec.
        nice: how much lower than the parent's the child's CPU priority is (an ``os.nice``
            increment, 0 to 19). Default 10: when the CPUs are busy, the event loop gets one
            as soon as it wakes, and so stays responsive while children compute; when they
            are idle, the children get all of them all the same. 0 runs the child at the
            parent's priority.

        zygote: fork the child from a small helper process instead of from this one (zygote
            mode; see `Zygote` for what changes): an open `Zygote` to share one helper, or
            True for the enclosing scope's (an `Isolator` opened with ``zygote=True`` starts
            its own; a call made outside one uses a helper this process starts at its first
            such call and keeps until it exits). Default None (or False): fork mode.
        engine: an open engine, such as `DaskEngine`, that runs the call on another machine:
            the child is forked there, and the value, error and report come back here. No
            limiter applies unless one is given: the cluster bounds how many calls run.

    Sandbox options, all off by default (see docs/security.md for what each protects):

    Attributes:
        close_fds: close every fd the child inherited except stdin, stdout, stderr and
            ``pass_fds``.
        pass_fds: fds to keep open with ``close_fds``.
        no_new_privs: set ``PR_SET_NO_NEW_PRIVS``: programs the child executes gain no
            privileges from setuid bits or file capabilities.
        max_processes: ``RLIMIT_NPROC`` (processes of the child's user; root is exempt).
        max_open_files: ``RLIMIT_NOFILE``.
        max_file_size: ``RLIMIT_FSIZE``, bytes or a string: the largest file it may write.
        cwd: the child's working directory.
        env: the child's whole environment (``{}`` for none).
        user: a user name or uid to switch to (the parent must run as root).
        group: a group name or gid to switch to, with ``user`` (default: the user's group).
        network: False puts the child in a network namespace of its own, with no interface
            up, loopback included (needs root). Unix sockets reached by path, and sockets
            it inherited, still work: add ``close_fds``.
    """

    limiter: anyio.CapacityLimiter | None
    timeout: float | None
    memory_limit: int | str | None
    cpu_limit: float | None
    kill_grace: float
    kill_descendants: bool
    stdout: Output
    stderr: Output
    max_output: int | str
    codec: CodecName | Codec
    max_result_size: int | str | None
    nice: int
    zygote: Zygote | bool | None
    engine: Engine | None
    close_fds: bool
    pass_fds: Iterable[int]
    no_new_privs: bool
    max_processes: int | None
    max_open_files: int | None
    max_file_size: int | str | None
    cwd: str | os.PathLike[str] | None
    env: Mapping[str, str] | None
    user: int | str | None
    group: int | str | None
    network: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    """Checked options, with sizes in bytes."""

    limiter: anyio.CapacityLimiter | None = None
    timeout: float | None = None
    memory_limit: int | None = None
    cpu_limit: float | None = None
    kill_grace: float = 0.0
    kill_descendants: bool = True
    stdout: Output = "inherit"
    stderr: Output = "inherit"
    max_output: int = 1 << 20
    codec: Codec = PICKLE
    max_result_size: int | None = None
    nice: int = 10
    zygote: Zygote | Literal[True] | None = None  # True: the enclosing scope's (see CallOptions)
    engine: Engine | None = None
    sandbox: Sandbox = Sandbox()

    @property
    def result_limit(self) -> int | None:
        """The largest payload to accept: the option, else a bound for codecs other than
        pickle (whose children may not be trusted)."""
        if self.max_result_size is not None or self.codec is PICKLE:
            return self.max_result_size
        return _SAFE_RESULT_LIMIT

    def merge(self, overrides: CallOptions) -> Options:
        """These options with ``overrides`` checked and applied; raises before any fork."""
        if not overrides:
            return self
        unknown = [name for name in overrides if name not in _CHECKS]
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        changes: dict[str, Any] = {}
        sandbox: dict[str, Any] = {}
        for name, value in overrides.items():
            check = _CHECKS[name]
            if check is None:
                sandbox[name] = value  # checked together below: user= and group= go in pairs
            else:
                changes[name] = check(name, value)
        if sandbox:
            changes["sandbox"] = _check_sandbox(self.sandbox, sandbox)
        merged = dataclasses.replace(self, **changes)
        if merged.engine is not None and merged.zygote is not None:
            raise ValueError(
                "zygote= forks children on this machine and engine= on another: choose one"
            )
        if merged.engine is not None and merged.sandbox.pass_fds:
            raise ValueError("pass_fds names fds of this process, which a remote child lacks")
        if merged.zygote is not None and merged.sandbox.pass_fds:
            raise ValueError(
                "pass_fds names fds of this process, and in zygote mode the child is forked by "
                "the helper, which does not have them: use fork mode (no zygote=) for pass_fds"
            )
        return merged


DEFAULTS: Final = Options()

# What rlimits can hold (they are 64-bit counts), with room to add what the child inherited.
_MAX_SIZE: Final = 1 << 60
_MAX_CPU: Final = 1e9  # seconds: about 30 years
_SAFE_RESULT_LIMIT: Final = 256 << 20

_UNITS: Final = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "KIB": 1 << 10,
    "M": 1000**2,
    "MB": 1000**2,
    "MIB": 1 << 20,
    "G": 1000**3,
    "GB": 1000**3,
    "GIB": 1 << 30,
    "T": 1000**4,
    "TB": 1000**4,
    "TIB": 1 << 40,
}
_SIZE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(name: str, value: object) -> int:
    """Bytes from an int or a string like ``"512MiB"``, ``"1.5GB"`` or ``"4096"``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name} must be a number of bytes or a string like '512MiB'")
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = match and _UNITS.get(match.group(2).upper())
        if not match or unit is None:
            raise ValueError(
                f"{name}={value!r} is not a size; write bytes or a number with a unit "
                "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '512MiB'"
            )
        value = int(float(match.group(1)) * unit)
    if value <= 0:
        raise ValueError(f"{name} must be positive, not {value}")
    if value > _MAX_SIZE:
        raise ValueError(f"{name}={value} is more than any system has (at most {_MAX_SIZE})")
    return value


def _positive_seconds(
    name: str, value: object, *, allow_inf: bool = False, most: float = math.inf
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, not {value}")
    if value == math.inf and not allow_inf:
        raise ValueError(f"{name} must be finite; leave it out for no limit")
    if value > most:
        raise ValueError(f"{name}={value} is more than the system can enforce ({most:g})")
    return float(value)


_SANDBOX_OPTIONS: Final = (
    "close_fds",
    "pass_fds",
    "no_new_privs",
    "max_processes",
    "max_open_files",
    "max_file_size",
    "cwd",
    "env",
    "user",
    "group",
    "network",
)


def _check_sandbox(current: Sandbox, given: dict[str, Any]) -> Sandbox:
    changes: dict[str, Any] = {}
    for name in ("close_fds", "no_new_privs", "network"):
        if name in given:
            if not isinstance(given[name], bool):
                raise TypeError(f"{name} must be True or False")
            changes[name] = given[name]
    if "pass_fds" in given:
        fds = tuple(given["pass_fds"])
        if not all(isinstance(fd, int) and not isinstance(fd, bool) and fd >= 0 for fd in fds):
            raise TypeError("pass_fds must be file descriptor numbers")
        changes["pass_fds"] = fds
    for name, which in (
        ("max_processes", resource.RLIMIT_NPROC),
        ("max_open_files", resource.RLIMIT_NOFILE),
    ):
        if given.get(name) is not None:
            value = given[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive whole number, not {value!r}")
            hard = resource.getrlimit(which)[1]
            if hard != resource.RLIM_INFINITY and value > hard and os.geteuid() != 0:
                raise ValueError(f"{name}={value} is above this process's hard limit ({hard})")
            if value > _MAX_SIZE:
                raise ValueError(f"{name}={value} is more than the system can enforce")
            changes[name] = value
    if given.get("max_file_size") is not None:
        changes["max_file_size"] = parse_size("max_file_size", given["max_file_size"])
    if given.get("cwd") is not None:
        cwd = os.fspath(given["cwd"])
        if not os.path.isdir(cwd):
            raise ValueError(f"cwd={cwd!r} is not a directory")
        changes["cwd"] = cwd
    if given.get("env") is not None:
        env = dict(given["env"])
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise TypeError("env must map strings to strings")
        changes["env"] = env
    if given.get("user") is not None:
        changes["uid"] = resolve_user(given["user"])
        changes["gid"] = primary_group(changes["uid"])
    if given.get("group") is not None:
        changes["gid"] = resolve_group(given["group"])
        if changes.get("uid", current.uid) is None:
            # A root child could take any group back: a group alone would restrict nothing.
            raise ValueError("group= goes with user=: alone it would leave the child root")
    if ("uid" in changes or "gid" in changes) and os.geteuid() != 0:
        raise ValueError("user= and group= switch to another user, which needs root")
    return dataclasses.replace(current, **changes)


def _check_limiter(name: str, limiter: object) -> object:
    if limiter is not None and not isinstance(limiter, anyio.CapacityLimiter):
        raise TypeError(f"limiter must be an anyio.CapacityLimiter, not {type(limiter).__name__}")
    return limiter


def _check_timeout(name: str, value: object) -> float | None:
    if value is None:
        return None
    timeout = _positive_seconds(name, value, allow_inf=True)
    return None if timeout == math.inf else timeout


def _check_cpu_limit(name: str, value: object) -> float | None:
    return None if value is None else _positive_seconds(name, value, most=_MAX_CPU)


def _check_grace(name: str, value: object) -> float:
    return 0.0 if value == 0 else _positive_seconds(name, value)


def _check_size(name: str, value: object) -> int | None:
    return None if value is None else parse_size(name, value)


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False")
    return value


def _check_output(name: str, value: object) -> object:
    if value not in _OUTPUTS:
        raise ValueError(f"{name} must be one of {_OUTPUTS}, not {value!r}")
    return value


def _check_codec(name: str, value: object) -> Codec:
    return resolve_codec(value)


def _check_nice(name: str, nice: object) -> int:
    if isinstance(nice, bool) or not isinstance(nice, int):
        raise TypeError(f"nice must be an int from 0 to 19, not {nice!r}")
    if not 0 <= nice <= 19:
        raise ValueError(
            f"nice must be from 0 (the parent's priority) to 19 (the lowest), not {nice}"
        )
    return nice


def _check_zygote(name: str, value: object) -> Zygote | Literal[True] | None:
    if value is None or value is False:
        return None  # fork mode
    if value is True or isinstance(value, Zygote):
        return value
    raise TypeError(f"zygote must be a Zygote, True or False, not {type(value).__name__}")


def _check_engine(name: str, value: object) -> Engine | None:
    if value is not None and not isinstance(value, Engine):
        raise TypeError(f"engine must be an engine such as DaskEngine, not {type(value).__name__}")
    return value


# Every option, and the check that turns what the caller gave into its `Options` field; None
# for the sandbox's, which `_check_sandbox` takes together (tests/test_public_api.py checks
# that this table and `CallOptions` name the same options).
_CHECKS: Final[dict[str, Callable[[str, Any], Any] | None]] = {
    "limiter": _check_limiter,
    "timeout": _check_timeout,
    "memory_limit": _check_size,
    "cpu_limit": _check_cpu_limit,
    "kill_grace": _check_grace,
    "kill_descendants": _check_flag,
    "stdout": _check_output,
    "stderr": _check_output,
    "max_output": parse_size,
    "codec": _check_codec,
    "max_result_size": _check_size,
    "nice": _check_nice,
    "zygote": _check_zygote,
    "engine": _check_engine,
    **dict.fromkeys(_SANDBOX_OPTIONS),
}
