"""The options of an isolated call: their names, defaults, and the checks run before any fork."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Final, Literal, TypedDict

import anyio

from ._codec import PICKLE, Codec, CodecName
from ._codec import resolve as resolve_codec

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
        unknown = set(overrides) - set(CallOptions.__annotations__)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        o = dict(overrides)
        if "limiter" in o:
            _check_limiter(o["limiter"])
        if o.get("timeout") is not None:
            timeout = _positive_seconds("timeout", o["timeout"], allow_inf=True)
            o["timeout"] = None if timeout == math.inf else timeout
        if o.get("cpu_limit") is not None:
            o["cpu_limit"] = _positive_seconds("cpu_limit", o["cpu_limit"], most=_MAX_CPU)
        if "kill_grace" in o:
            grace = o["kill_grace"]
            o["kill_grace"] = 0.0 if grace == 0 else _positive_seconds("kill_grace", grace)
        if o.get("memory_limit") is not None:
            o["memory_limit"] = parse_size("memory_limit", o["memory_limit"])
        if "max_output" in o:
            o["max_output"] = parse_size("max_output", o["max_output"])
        if o.get("max_result_size") is not None:
            o["max_result_size"] = parse_size("max_result_size", o["max_result_size"])
        if "codec" in o:
            o["codec"] = resolve_codec(o["codec"])
        if "kill_descendants" in o and not isinstance(o["kill_descendants"], bool):
            raise TypeError("kill_descendants must be True or False")
        for name in ("stdout", "stderr"):
            if name in o and o[name] not in _OUTPUTS:
                raise ValueError(f"{name} must be one of {_OUTPUTS}, not {o[name]!r}")
        return dataclasses.replace(self, **o)  # type: ignore[arg-type]


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


def _check_limiter(limiter: object) -> None:
    if limiter is not None and not isinstance(limiter, anyio.CapacityLimiter):
        raise TypeError(f"limiter must be an anyio.CapacityLimiter, not {type(limiter).__name__}")
