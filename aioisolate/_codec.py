"""How results are turned into bytes in the child and back in the parent.

Two codecs come with the library:

* ``"pickle"`` (the default): cloudpickle in the child, pickle in the parent. Any picklable
  value travels, exceptions travel as themselves, and unpickling runs whatever code the bytes
  name: for code you trust only.
* ``"safe"``: plain data only (None, bool, int, float, str, bytes, bytearray, list, tuple,
  dict, set, frozenset, and numpy arrays of numbers, booleans or strings). The parent decodes
  with an unpickler that refuses to look up any class or function, so the bytes can build
  nothing but those containers: no code runs, whatever the child sends.

Any object with ``dumps(value) -> bytes`` and ``loads(data) -> value`` can be passed instead.
"""

from __future__ import annotations

import io
import pickle
import sys
from typing import Any, Final, Literal, Protocol, runtime_checkable

import cloudpickle

from ._errors import IsolationError


@runtime_checkable
class Codec(Protocol):
    """What ``codec=`` accepts besides ``"pickle"`` and ``"safe"``."""

    def dumps(self, value: Any, /) -> bytes: ...

    def loads(self, data: bytes | bytearray, /) -> Any: ...


class PickleCodec:
    """cloudpickle out, pickle in: any picklable value, for trusted code only."""

    def dumps(self, value: Any, /) -> bytes:
        return bytes(cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))

    def loads(self, data: bytes | bytearray, /) -> Any:
        return pickle.loads(data)


class SafeCodec:
    """Plain data only, decoded without running any code."""

    def dumps(self, value: Any, /) -> bytes:
        return pickle.dumps(_to_plain(value, 0), protocol=pickle.HIGHEST_PROTOCOL)

    def loads(self, data: bytes | bytearray, /) -> Any:
        return _from_plain(load_plain(data))


def load_plain(data: bytes | bytearray | memoryview) -> Any:
    """Unpickle data that may only build plain containers (never looks up a class)."""
    return _PlainUnpickler(io.BytesIO(data)).load()


class _PlainUnpickler(pickle.Unpickler):
    # Every way for a pickle to run code goes through a class or function it names: refusing
    # them all leaves only the opcodes that build None, bools, numbers, strings, bytes,
    # bytearrays, lists, tuples, dicts, sets and frozensets.
    def find_class(self, module: str, name: str) -> Any:
        raise IsolationError(
            f"the child's data names {module}.{name}, and the safe codec loads no class or "
            "function: it was refused and nothing of it ran"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise IsolationError("the child's data holds a persistent id, which the safe codec refuses")


CodecName = Literal["pickle", "safe"]
PICKLE: Final = PickleCodec()
SAFE: Final = SafeCodec()

# Numpy arrays travel as this tagged tuple in the safe codec.
_ARRAY_TAG: Final = "aioisolate.ndarray"
# Element kinds that hold no Python objects: bool, integers, floats, complex, bytes, str, times.
_ARRAY_KINDS: Final = frozenset("biufcSUMm")
_PLAIN_SCALARS: Final = (type(None), bool, int, float, str, bytes, bytearray)
_MAX_DEPTH: Final = 1000


def _to_plain(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise TypeError("the value is nested too deeply for the safe codec")
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return value
    if kind in (list, tuple, set, frozenset):
        return kind(_to_plain(item, depth + 1) for item in value)
    if kind is dict:
        return {_to_plain(k, depth + 1): _to_plain(v, depth + 1) for k, v in value.items()}
    numpy = sys.modules.get("numpy")
    if numpy is not None and kind is numpy.ndarray:
        if value.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"the safe codec carries no numpy array of dtype {value.dtype}")
        return (_ARRAY_TAG, value.dtype.str, value.shape, value.tobytes())
    raise TypeError(
        f"the safe codec carries plain data only (None, bool, int, float, str, bytes, list, "
        f"tuple, dict, set, numpy arrays), not {kind.__module__}.{kind.__qualname__}"
    )


def _from_plain(value: Any) -> Any:
    kind = type(value)
    if kind is tuple and len(value) == 4 and value[0] == _ARRAY_TAG:
        return _array(*value[1:])
    if kind in (list, tuple, set, frozenset):
        return kind(_from_plain(item) for item in value)
    if kind is dict:
        return {k: _from_plain(v) for k, v in value.items()}
    return value


def _array(dtype: Any, shape: Any, data: Any) -> Any:
    try:
        import numpy
    except ImportError as exc:
        raise IsolationError("the child sent a numpy array, and numpy is not installed") from exc
    try:
        kind = numpy.dtype(dtype)
        if kind.kind not in _ARRAY_KINDS:
            raise ValueError(f"dtype {kind} may hold objects")
        return numpy.frombuffer(data, dtype=kind).reshape(shape).copy()
    except (TypeError, ValueError) as exc:
        raise IsolationError(f"the child sent a malformed numpy array: {exc}") from exc


def resolve(codec: object) -> Codec:
    """The codec an option names: "pickle", "safe", or an object with dumps and loads."""
    if codec == "pickle":
        return PICKLE
    if codec == "safe":
        return SAFE
    if isinstance(codec, Codec):
        return codec
    raise TypeError(
        f"codec must be 'pickle', 'safe' or an object with dumps() and loads(), not {codec!r}"
    )
