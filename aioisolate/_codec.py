"""How results are turned into bytes in the child and back in the parent.

Two codecs come with the library:

* ``"pickle"`` (the default): cloudpickle in the child, pickle in the parent. Any picklable
  value travels, exceptions travel as themselves, and unpickling runs whatever code the bytes
  name: for code you trust only.
* ``"safe"``: plain data only (None, bool, int, float, str, bytes, bytearray, list, tuple,
  dict, set, frozenset, and numpy arrays of numbers, booleans or strings), in a format of our
  own. Its decoder builds nothing but those values, so no code runs, whatever the child
  sends; and it is bounded: nesting at most `MAX_DEPTH` deep, lengths checked against the
  bytes that are there, and the memory built at most `MEMORY_FACTOR` times the input size.

Any object with ``dumps(value) -> bytes`` and ``loads(data) -> value`` can be passed instead.
"""

from __future__ import annotations

import math
import pickle
import struct
import sys
from collections.abc import Callable
from typing import Any, Final, Literal, Protocol, runtime_checkable

import cloudpickle

from ._errors import ProtocolError


@runtime_checkable
class Codec(Protocol):
    """What ``codec=`` accepts besides ``"pickle"`` and ``"safe"``."""

    def dumps(self, value: Any, /) -> bytes: ...

    def loads(self, data: bytes | bytearray, /) -> Any: ...


class PickleCodec:
    """cloudpickle out, pickle in: any picklable value, for trusted code only."""

    def __reduce__(self) -> str:
        return "PICKLE"  # the one instance, by name: code compares codecs with `is`

    def dumps(self, value: Any, /) -> bytes:
        return dump_pickle(value)

    def loads(self, data: bytes | bytearray, /) -> Any:
        return pickle.loads(data)


def dump_pickle(
    value: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool] | None = None
) -> bytes:
    """Pickle a value as the pickle codec does: with cloudpickle, or plain pickle when the value
    is plain data (for which both write the same bytes, and plain pickle is quicker to start)."""
    if _is_plain(value):
        return pickle.dumps(
            value, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback
        )
    data: bytes = cloudpickle.dumps(
        value, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback
    )
    return data


_PLAIN_SCALARS: Final = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray})
_PLAIN_CONTAINERS: Final = frozenset({tuple, list, set, frozenset, dict})


def _is_plain(value: object, budget: int = 64) -> bool:
    """Whether a value is builtin scalars in builtin containers, looking at ``budget`` objects
    at most (a larger value goes to cloudpickle, whose fixed cost is small next to it)."""
    pending: list[Any] = [value]
    while pending:
        budget -= 1
        if budget < 0:
            return False
        item = pending.pop()
        kind = type(item)
        if kind in _PLAIN_SCALARS:
            continue
        if kind not in _PLAIN_CONTAINERS or len(item) > budget:
            return False  # the length first: a large container is not copied to be looked at
        if kind is dict:
            pending.extend(item.keys())
            pending.extend(item.values())
        else:
            pending.extend(item)
    return True


class SafeCodec:
    """Plain data only, decoded without running any code, in bounded depth and memory."""

    def __reduce__(self) -> str:
        return "SAFE"

    def dumps(self, value: Any, /) -> bytes:
        out: list[bytes] = []
        _encode(value, out, 0)
        return b"".join(out)

    def loads(self, data: bytes | bytearray, /) -> Any:
        return load_plain(data)


MAX_DEPTH: Final = 100
# Decoding may build at most this many bytes of objects per byte of input (plus a floor):
# an empty set costs 9 bytes on the wire and 216 in memory.
MEMORY_FACTOR: Final = 32
_MEMORY_FLOOR: Final = 1 << 20

_LEN: Final = struct.Struct(">Q")
_FLOAT: Final = struct.Struct(">d")
_CONTAINERS: Final[dict[type, bytes]] = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z"}
_BY_TAG: Final = {tag: kind for kind, tag in _CONTAINERS.items()}
_SCALAR_TAGS: Final[dict[type, bytes]] = {bytes: b"b", bytearray: b"B"}

# Numpy element kinds that hold no Python objects: bool, integers, floats, complex, bytes,
# str, datetimes and timedeltas.
_ARRAY_KINDS: Final = frozenset("biufcSUMm")


def _encode(value: Any, out: list[bytes], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise TypeError(f"the value is nested more than {MAX_DEPTH} deep")
    kind = type(value)
    if value is None:
        out.append(b"N")
    elif kind is bool:
        out.append(b"T" if value else b"F")
    elif kind is int:
        raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
        out += (b"i", _LEN.pack(len(raw)), raw)
    elif kind is float:
        out += (b"f", _FLOAT.pack(value))
    elif kind is str:
        raw = value.encode("utf-8", "surrogatepass")
        out += (b"s", _LEN.pack(len(raw)), raw)
    elif kind in _SCALAR_TAGS:
        out += (_SCALAR_TAGS[kind], _LEN.pack(len(value)), bytes(value))
    elif kind in _CONTAINERS:
        out += (_CONTAINERS[kind], _LEN.pack(len(value)))
        for item in value:
            _encode(item, out, depth + 1)
    elif kind is dict:
        out += (b"d", _LEN.pack(len(value)))
        for key, item in value.items():
            _encode(key, out, depth + 1)
            _encode(item, out, depth + 1)
    elif (numpy := sys.modules.get("numpy")) is not None and kind is numpy.ndarray:
        if value.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"the safe codec carries no numpy array of dtype {value.dtype}")
        out.append(b"a")
        _encode(value.dtype.str, out, depth + 1)
        _encode(tuple(value.shape), out, depth + 1)
        _encode(value.tobytes(), out, depth + 1)
    else:
        raise TypeError(
            "the safe codec carries plain data only (None, bool, int, float, str, bytes, "
            "list, tuple, dict, set, numpy arrays), "
            f"not {kind.__module__}.{kind.__qualname__}"
        )


def load_plain(data: bytes | bytearray | memoryview) -> Any:
    """Decode the safe codec's format; raises `ProtocolError` for anything malformed."""
    decoder = _Decoder(memoryview(data))
    try:
        value = decoder.value(0)
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError, struct.error) as exc:
        raise ProtocolError(f"the child sent malformed data: {exc}") from None
    if decoder.at != len(decoder.data):
        raise ProtocolError("the child sent malformed data: bytes after the value")
    return value


class _Decoder:
    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.at = 0
        self.budget = MEMORY_FACTOR * len(data) + _MEMORY_FLOOR

    def take(self, n: int) -> memoryview:
        if n > len(self.data) - self.at:
            raise ValueError("it ends too soon")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def length(self) -> int:
        (n,) = _LEN.unpack(self.take(8))
        return int(n)

    def charge(self, value: Any) -> Any:
        self.budget -= sys.getsizeof(value)
        if self.budget < 0:
            raise ProtocolError(
                "the child sent data that would take more than "
                f"{MEMORY_FACTOR} times its size in memory to build; it was refused"
            )
        return value

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(f"it is nested more than {MAX_DEPTH} deep")
        tag = bytes(self.take(1))
        if tag == b"N":
            return None
        if tag in (b"T", b"F"):
            return tag == b"T"
        if tag == b"i":
            return self.charge(int.from_bytes(self.take(self.length()), "big", signed=True))
        if tag == b"f":
            return _FLOAT.unpack(self.take(8))[0]
        if tag == b"s":
            return self.charge(str(self.take(self.length()), "utf-8", "surrogatepass"))
        if tag == b"b":
            return self.charge(bytes(self.take(self.length())))
        if tag == b"B":
            return self.charge(bytearray(self.take(self.length())))
        if tag in _BY_TAG or tag == b"d":
            count = self.length()
            if count > len(self.data) - self.at:  # every item takes at least a byte
                raise ValueError("it counts more items than there are bytes")
            if tag == b"d":
                pairs = [(self.value(depth + 1), self.value(depth + 1)) for _ in range(count)]
                return self.charge(dict(pairs))
            items = [self.value(depth + 1) for _ in range(count)]
            return self.charge(_BY_TAG[tag](items))
        if tag == b"a":
            dtype, shape, raw = (self.value(depth + 1) for _ in range(3))
            return self.charge(_array(dtype, shape, raw))
        raise ValueError(f"unknown tag {tag!r}")


def _array(dtype: Any, shape: Any, data: Any) -> Any:
    try:
        import numpy
    except ImportError as exc:
        raise ProtocolError("the child sent a numpy array, and numpy is not installed") from exc
    if not (
        isinstance(dtype, str)
        and isinstance(shape, tuple)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(data, bytes)
    ):
        raise ValueError("a malformed numpy array")
    kind = numpy.dtype(dtype)
    if kind.kind not in _ARRAY_KINDS:
        raise ValueError(f"dtype {kind} may hold objects")
    if math.prod(shape) * kind.itemsize != len(data):
        raise ValueError("a numpy array whose data does not match its shape")
    return numpy.frombuffer(data, dtype=kind).reshape(shape).copy()


CodecName = Literal["pickle", "safe"]
PICKLE: Final = PickleCodec()
SAFE: Final = SafeCodec()


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
