"""Large buffers of a result, moved through a sealed memory file instead of the pipe.

Through the pipe, a result's bytes are copied four times: pickled in the child, written into
the pipe, read out of it and unpickled in the parent. A result whose bulk is in buffers (bytes,
bytearray, numpy arrays, and whatever else pickle protocol 5 can move out of band) goes another
way: the child writes each buffer of `SPILL_MIN` bytes or more once into a memory file (a
memfd) that the parent created for the call, seals the file against any change, and sends
through the pipe only the pickle and a table of where each buffer lies. The parent maps the
file and builds the value on the mapped pages: a numpy array uses them as they are, bytes and
bytearray copy them once.

The parent checks the seals before it maps the file: a descendant of the child that kept the fd
can then neither change the data nor shrink the file under the mapping. Only the pickle codec
spills (it trusts the child anyway); the file exists where the platform has memfds (Linux).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import pickle
import struct
from typing import Any, Final

from ._codec import dump_pickle
from ._errors import ProtocolError

# Smaller buffers stay in the pickle: a pipe holds them at once.
SPILL_MIN: Final = 64 << 10
# Buffers start on a page: numpy wants 64-byte alignment, and the kernel copies whole pages.
_ALIGN: Final = mmap.PAGESIZE
# No change of any kind once sealed. (Linux names: spill files exist only where these do.)
_SEALS: Final = sum(
    getattr(fcntl, name, 0)
    for name in ("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE")
)
_COUNT: Final = struct.Struct(">I")
_ENTRY: Final = struct.Struct(">QQ")  # offset, length


class _Whole:
    """A bytes or bytearray result, reduced to a buffer so that it can leave the pickle (the
    pickler writes those two types in band whatever the protocol)."""

    __slots__ = ("value",)

    def __init__(self, value: bytes | bytearray) -> None:
        self.value = value

    def __reduce_ex__(self, protocol: object) -> tuple[Any, ...]:
        return type(self.value), (pickle.PickleBuffer(self.value),)


def dump(value: object, fd: int, limit: int | None = None) -> tuple[bytes, bytes | None]:
    """In the child: pickle ``value``, writing its large buffers into the file ``fd`` and
    sealing it. Returns the pickle and the table of buffers, or the pickle and None when
    nothing was spilled (the pickle then reads without any file).

    A result over ``limit`` bytes in all writes nothing to the file: its table is enough for
    the parent to refuse it (see `take`)."""
    data, buffers = split(whole(value))
    if not buffers:
        return data, None
    table, offsets, _ = layout(buffers)
    if limit is not None and len(data) + sum(raw.nbytes for raw in buffers) > limit:
        return data, table
    try:
        for raw, offset in zip(buffers, offsets, strict=True):
            write_at(fd, raw, offset)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)  # type: ignore[attr-defined,unused-ignore]
    except OSError:
        # No memory for the file: the pipe carries it all, as for any other result.
        return dump_pickle(value), None
    return data, table


def whole(value: Any) -> Any:
    """``value``, wrapped to leave the pickle whole if it is a large bytes or bytearray."""
    if type(value) in (bytes, bytearray) and len(value) >= SPILL_MIN:
        return _Whole(value)
    return value


def split(value: object) -> tuple[bytes, list[memoryview]]:
    """Pickle ``value`` as the pickle codec does, keeping out of the pickle every contiguous
    buffer of `SPILL_MIN` bytes or more (returned, in the order the pickle expects them)."""
    buffers: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            raw = buffer.raw()
        except BufferError:
            return True  # not contiguous: in the pickle
        if raw.nbytes < SPILL_MIN:
            return True
        buffers.append(raw)
        return False

    return dump_pickle(value, out_of_band), buffers


def layout(buffers: list[memoryview]) -> tuple[bytes, list[int], int]:
    """Where each buffer goes in a file (each on a page of its own): the table that says so,
    the offsets, and the end of the last buffer."""
    table = [_COUNT.pack(len(buffers))]
    offsets = []
    offset = 0
    for raw in buffers:
        offset = -(-offset // _ALIGN) * _ALIGN
        table.append(_ENTRY.pack(offset, raw.nbytes))
        offsets.append(offset)
        offset += raw.nbytes
    return b"".join(table), offsets, offset


def write_at(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of the file ``fd``."""
    data = memoryview(data)
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def take(fd: int, payload: bytes | bytearray, limit: int | None) -> mmap.mmap | None:
    """In the parent, once the child is gone: map the file the child spilled into (None if the
    table lists no buffer). Raises `ProtocolError` for a result over ``limit`` (the pickle and
    the buffers together), a file that is not sealed, or a table that lies about it."""
    table = _table(payload)
    total = len(payload) + sum(length for _, length in table)
    if limit is not None and total > limit:
        raise ProtocolError(
            f"the child spilled {total} bytes of result, more than max_result_size={limit}; "
            "raise the limit if that is expected"
        )
    if not table:
        return None
    # The seals first: once they are on, the size read next can no longer change.
    if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:  # type: ignore[attr-defined,unused-ignore]
        raise ProtocolError("the child left its result file unsealed; it was not read")
    size = os.fstat(fd).st_size
    if any(offset + length > size for offset, length in table):
        raise ProtocolError("the child's spill table points beyond the end of the file")
    # Private and writable: the arrays built on it are writable, as unpickled arrays are, and
    # a write copies only the page it touches.
    return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def _table(payload: bytes | bytearray) -> list[tuple[int, int]]:
    view = memoryview(payload)
    if len(view) < _COUNT.size:
        raise ProtocolError("the child sent a spilled result without its table")
    (count,) = _COUNT.unpack_from(view)
    if _COUNT.size + count * _ENTRY.size > len(view):
        raise ProtocolError("the child sent a spill table longer than its frame")
    return [_ENTRY.unpack_from(view, _COUNT.size + i * _ENTRY.size) for i in range(count)]


def load(payload: bytes | bytearray | memoryview, spilled: mmap.mmap | None) -> Any:
    """In the parent: the value of a spilled result, from its frame's payload and the map."""
    view = memoryview(payload)
    (count,) = _COUNT.unpack_from(view)
    start = _COUNT.size + count * _ENTRY.size
    if start > len(view):
        raise ValueError("a spill table longer than its frame")
    size = 0 if spilled is None else len(spilled)
    whole = memoryview(spilled) if spilled is not None else memoryview(b"")
    buffers = []
    for i in range(count):
        offset, length = _ENTRY.unpack_from(view, _COUNT.size + i * _ENTRY.size)
        if offset + length > size:
            raise ValueError("a spilled buffer beyond the end of the file")
        buffers.append(whole[offset : offset + length])
    return pickle.loads(view[start:], buffers=buffers)
