"""What travels on the result pipe: one frame from the child to the parent, and its codec.

A frame is a fixed header followed by a payload::

    magic (4 bytes) | version (1) | kind (1) | reserved (2) | payload length (8, big-endian)

``RESULT`` carries the return value encoded by the call's codec (cloudpickle by default). ``ERROR`` carries a plain-data
description of what went wrong in the child (see `encode_error`), with the exception itself
pickled inside it when that was possible. A call sends exactly one of them and exits. A stream
(`isolated_iter`) sends an ``ITEM`` frame per item, then ``END`` or ``ERROR``. The last frame
comes right after a ``STATS`` frame: the child's resident memory when it started, which the
parent subtracts from its peak.

Unpickling runs code chosen by whoever produced the bytes: this codec is for trusted code only.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import traceback
from dataclasses import dataclass
from typing import Final

import cloudpickle

from . import _spill
from ._codec import PICKLE, SAFE, Codec, load_plain
from ._errors import IsolationError, ProtocolError, RemoteError, RemoteTraceback

MAGIC: Final = b"AISO"
VERSION: Final = 1
HEADER: Final = struct.Struct(">4sBB2xQ")

RESULT: Final = 1
ERROR: Final = 2
ITEM: Final = 3  # one item of a streamed generator; any number come before END or ERROR
END: Final = 4  # the generator finished
STATS: Final = 5  # figures from the child, just before its last frame; read by FrameReader
SPILLED: Final = 6  # a RESULT whose large buffers are in the call's spill file (see _spill)
_STATS_PAYLOAD: Final = struct.Struct(">Q")

# ERROR payloads say which of these happened in the child.
_RAISED: Final = "raised"  # func raised an Exception
_RAISED_BASE: Final = "raised-base"  # func raised a BaseException that is not an Exception
_UNPICKLABLE_RESULT: Final = "unpicklable-result"
_SETUP_FAILED: Final = "setup-failed"  # the child failed before it could run the function

# Large reads cost fewer trips through the event loop; the kernel returns what is there.
_CHUNK: Final = 1 << 20
# The most read in one go before letting the event loop run.
_TURN: Final = 16 << 20


def encode_result(
    value: object, codec: Codec, spill_fd: int = -1, limit: int | None = None
) -> list[bytes]:
    """The frame for a return value, as buffers to write in order (no copy of the payload).

    With the pickle codec and a spill file, large buffers of the value go into the file.
    """
    if spill_fd >= 0 and codec is PICKLE:
        data, table = _spill.dump(value, spill_fd, limit)
        if table is not None:
            return [HEADER.pack(MAGIC, VERSION, SPILLED, len(table) + len(data)), table, data]
        payload = data
    else:
        payload = codec.dumps(value)
    return [HEADER.pack(MAGIC, VERSION, RESULT, len(payload)), payload]


def encode_item(value: object, codec: Codec) -> list[bytes]:
    """The frame for one item of a streamed generator."""
    payload = codec.dumps(value)
    return [HEADER.pack(MAGIC, VERSION, ITEM, len(payload)), payload]


def encode_end() -> list[bytes]:
    """The frame that ends a stream."""
    return [HEADER.pack(MAGIC, VERSION, END, 0)]


def encode_stats(resident_at_start: int) -> list[bytes]:
    """The frame with the child's own figures, sent just before its last frame."""
    payload = _STATS_PAYLOAD.pack(resident_at_start)
    return [HEADER.pack(MAGIC, VERSION, STATS, len(payload)), payload]


def encode_error(exc: BaseException, codec: Codec) -> list[bytes]:
    """The frame for an exception that the function raised in the child.

    The exception itself travels only with the pickle codec; with any other, its type name,
    message and traceback do (the parent raises `RemoteError`).
    """
    if isinstance(exc, Exception) and codec is PICKLE:
        try:
            pickled: bytes | None = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            pickled = None  # travels as a RemoteError instead
        return _error_frame(_RAISED, _qualname(type(exc)), exc, pickled)
    return _error_frame(_RAISED_BASE, _qualname(type(exc)), exc, None)


def encode_unpicklable_result(value: object, exc: BaseException) -> list[bytes]:
    """The frame for a return value that could not be pickled (``exc`` says why)."""
    return _error_frame(_UNPICKLABLE_RESULT, _qualname(type(value)), exc, None)


def encode_setup_error(exc: BaseException) -> list[bytes]:
    """The frame for a failure of the child's own setup, before the function ran."""
    return _error_frame(_SETUP_FAILED, _qualname(type(exc)), exc, None)


def _error_frame(
    what: str, type_name: str, exc: BaseException, pickled: bytes | None
) -> list[bytes]:
    # The description is plain data in the safe codec's format, so the parent can always read
    # it (even when the exception itself cannot be pickled or unpickled) without running code.
    tb_text = "".join(traceback.format_exception(exc))
    payload = SAFE.dumps((what, type_name, _safe_str(exc), tb_text, pickled))
    return [HEADER.pack(MAGIC, VERSION, ERROR, len(payload)), payload]


def decode(
    kind: int, payload: bytes | bytearray, codec: Codec, spilled: mmap.mmap | None = None
) -> object:
    """The value a frame carries, or raise what it describes. ``spilled`` is the call's spill
    file, mapped (see `_spill.take`), for a SPILLED frame."""
    if kind in (RESULT, ITEM, SPILLED):
        try:
            if kind == SPILLED:
                return _spill.load(payload, spilled)
            return codec.loads(payload)
        except IsolationError:
            raise
        except Exception as exc:
            raise IsolationError(
                f"the child's result could not be decoded in the parent: {exc!r}"
            ) from exc
    try:
        # Decoded the safe way whatever the codec: this part never runs code.
        what, type_name, message, tb_text, pickled = load_plain(payload)
        if not all(isinstance(x, str) for x in (what, type_name, message, tb_text)):
            raise TypeError("not an error description")
        if pickled is not None and not isinstance(pickled, bytes):
            raise TypeError("not an error description")
    except (IsolationError, TypeError, ValueError) as exc:
        raise ProtocolError(f"the child sent a malformed error description: {exc}") from None
    cause = RemoteTraceback(tb_text)
    if what == _UNPICKLABLE_RESULT:
        raise IsolationError(
            f"the function returned a {type_name}, which could not be encoded to send it to the "
            f"parent ({message}); return plain data instead"
        ) from cause
    if what == _SETUP_FAILED:
        raise IsolationError(
            f"the child failed to set itself up before running the function: {type_name}: {message}"
        ) from cause
    if what == _RAISED and pickled is not None and codec is PICKLE:
        try:
            original = pickle.loads(pickled)
        except Exception:
            pass  # reported as a RemoteError below
        else:
            if isinstance(original, Exception):
                raise original from cause
    if what == _RAISED:
        reason = "it could not be sent to the parent as itself (it does not pickle and unpickle)"
    else:
        reason = f"a {type_name} is not re-raised in the parent, where it would end the program"
    raise RemoteError(
        f"the function raised {type_name}({message!r}) in the child; {reason}",
        type_name=type_name,
        remote_message=message,
        traceback=tb_text,
    ) from cause


@dataclass
class FrameReader:
    """Reads frames from a non-blocking pipe, each straight into a buffer of its final size.

    It stops at the end of a frame; `reset` readies it for the next one.
    """

    fd: int
    header: bytearray | None = None
    payload: bytearray | None = None
    filled: int = 0
    received: int = 0
    eof: bool = False
    resident_at_start: int | None = None  # from the child's STATS frame
    max_size: int | None = None  # the largest payload accepted (max_result_size)

    @property
    def complete(self) -> bool:
        return self.payload is not None and self.filled == len(self.payload)

    @property
    def kind(self) -> int:
        assert self.header is not None
        return int(self.header[5])

    def read_available(self) -> None:
        """Read what the pipe holds now, up to the end of the frame; never blocks.

        Returns after `_TURN` bytes at most, so that a child writing fast cannot keep the
        event loop here: the caller waits for the pipe again, which is ready at once.
        Raises `ProtocolError` for a header that is not ours, or a frame it refuses.
        """
        budget = _TURN
        while not self.complete and not self.eof and budget > 0:
            if self.payload is None:
                target = memoryview(self._header_buffer())[self.filled :]
            else:
                target = memoryview(self.payload)[self.filled : self.filled + _CHUNK]
            try:
                n = os.readv(self.fd, [target])
            except BlockingIOError:
                return
            if n == 0:
                self.eof = True
                return
            self.filled += n
            self.received += n
            budget -= n
            if self.payload is None and self.filled == HEADER.size:
                self._start_payload()
            if self.complete and self.kind == STATS:
                assert self.payload is not None
                if self.resident_at_start is not None or len(self.payload) != _STATS_PAYLOAD.size:
                    raise ProtocolError("the child sent a malformed or second STATS frame")
                (self.resident_at_start,) = _STATS_PAYLOAD.unpack(self.payload)
                self.reset()

    def reset(self) -> None:
        self.header = None
        self.payload = None
        self.filled = 0

    def _header_buffer(self) -> bytearray:
        if self.header is None:
            self.header = bytearray(HEADER.size)
        return self.header

    def _start_payload(self) -> None:
        assert self.header is not None
        magic, version, kind, length = HEADER.unpack(self.header)
        if (
            magic != MAGIC
            or version != VERSION
            or kind not in (RESULT, ERROR, ITEM, END, STATS, SPILLED)
        ):
            raise ProtocolError(
                f"the child wrote data that is not a result frame to the result pipe "
                f"(header {bytes(self.header)!r})"
            )
        if self.max_size is not None and length > self.max_size:
            raise ProtocolError(
                f"the child announced {length} bytes of result, more than "
                f"max_result_size={self.max_size}; raise the limit if that is expected"
            )
        try:
            self.payload = bytearray(length)
        except MemoryError:
            raise ProtocolError(
                f"the child announced {length} bytes of result, more than the parent can "
                "hold; set max_result_size= to refuse such results early"
            ) from None
        self.filled = 0


def _qualname(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<str() of {type(exc).__name__} failed>"
