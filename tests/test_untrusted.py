"""Results from code that is not trusted: the safe codec and the hardened frame reader."""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio
import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aioisolate import (
    IsolationError,
    ProtocolError,
    RemoteError,
    _child,
    _protocol,
    isolated,
    isolated_iter,
)
from aioisolate._codec import SAFE

pytestmark = pytest.mark.anyio

PLAIN = {
    "none": None,
    "bools": [True, False],
    "numbers": (1, -(2**100), 2.5, float("inf")),
    "text": "héllo",
    "bytes": b"\x00\xff",
    "bytearray": bytearray(b"ab"),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a"}),
    "nested": {"a": [{"b": (1, [2, {3: None}])}]},
}


async def test_safe_codec_carries_plain_data() -> None:
    assert await isolated(lambda: PLAIN, codec="safe") == PLAIN


async def test_safe_codec_carries_numpy_arrays() -> None:
    def arrays() -> dict[str, Any]:
        return {
            "f": numpy.arange(12, dtype=numpy.float32).reshape(3, 4),
            "b": numpy.array([True, False]),
            "s": numpy.array(["ab", "c"]),
        }

    result = await isolated(arrays, codec="safe")
    assert result["f"].dtype == numpy.float32
    assert result["f"].shape == (3, 4)
    numpy.testing.assert_array_equal(result["f"], numpy.arange(12).reshape(3, 4))
    numpy.testing.assert_array_equal(result["b"], [True, False])
    numpy.testing.assert_array_equal(result["s"], ["ab", "c"])


@pytest.mark.parametrize(
    "value",
    [object(), numpy.array([object()]), 1 + 2j, Path("/tmp")],
    ids=["object", "object-array", "complex", "path"],
)
async def test_safe_codec_refuses_everything_else(value: object) -> None:
    with pytest.raises(IsolationError, match="could not be encoded"):
        await isolated(lambda: value, codec="safe")


class WritesAFile:
    """Unpickling this runs open(path, "w"): a payload a hostile child could send."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


def send_raw(kind: int, payload: bytes) -> None:
    """In the child: skip the codec and put a frame of our own on the result pipe."""

    def write(fd: int, buffers: list[bytes]) -> None:
        os.write(fd, _protocol.HEADER.pack(_protocol.MAGIC, _protocol.VERSION, kind, len(payload)))
        os.write(fd, payload)

    _child._write_all = write  # type: ignore[assignment]  # only in this child


async def test_a_smuggled_reduce_payload_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "pwned"

    def hostile() -> None:
        send_raw(_protocol.RESULT, pickle.dumps(WritesAFile(str(target))))

    with pytest.raises(ProtocolError, match="malformed data"):
        await isolated(hostile, codec="safe")
    assert not target.exists()


async def test_a_smuggled_error_description_runs_nothing(tmp_path: Path) -> None:
    # The error envelope is decoded without running code whatever the codec, pickle included.
    target = tmp_path / "pwned"

    def hostile() -> None:
        send_raw(_protocol.ERROR, pickle.dumps(WritesAFile(str(target))))

    for codec in ("safe", "pickle"):
        with pytest.raises(ProtocolError, match="malformed error description"):
            await isolated(hostile, codec=codec)  # type: ignore[arg-type]
    assert not target.exists()


async def test_exceptions_arrive_as_remote_error_text_in_safe_mode() -> None:
    def fails() -> None:
        raise KeyError("missing")

    with pytest.raises(RemoteError) as info:
        await isolated(fails, codec="safe")
    assert info.value.type_name == "KeyError"
    assert info.value.message == "'missing'"
    assert 'raise KeyError("missing")' in info.value.traceback


class JsonCodec:
    def dumps(self, value: Any, /) -> bytes:
        return json.dumps(value).encode()

    def loads(self, data: bytes | bytearray, /) -> Any:
        return json.loads(data)


async def test_a_codec_of_ones_own() -> None:
    assert await isolated(lambda: {"a": [1, 2]}, codec=JsonCodec()) == {"a": [1, 2]}
    items = [i async for i in isolated_iter(lambda: iter([[1], [2]]), codec=JsonCodec())]
    assert items == [[1], [2]]


async def test_bad_codec_fails_before_fork() -> None:
    with pytest.raises(TypeError, match="codec must be"):
        await isolated(pow, 2, 2, codec="marshal")  # type: ignore[arg-type]


async def test_max_result_size_kills_a_child_with_a_big_result() -> None:
    with pytest.raises(ProtocolError, match="max_result_size=1048576") as info:
        await isolated(bytes, 10 << 20, max_result_size="1MiB")
    assert info.value.report is not None
    assert info.value.report.result_bytes < 1 << 20  # the header was enough to refuse it


async def test_safe_mode_has_a_bounded_default() -> None:
    with pytest.raises(ProtocolError, match="max_result_size=268435456"):
        await isolated(bytes, 300 << 20, codec="safe")


async def test_a_frame_claiming_a_terabyte() -> None:
    def claim() -> None:
        def write(fd: int, buffers: list[bytes]) -> None:
            os.write(fd, _protocol.HEADER.pack(_protocol.MAGIC, _protocol.VERSION, 1, 1 << 40))
            signal.pause()

        _child._write_all = write  # type: ignore[assignment]

    with pytest.raises(ProtocolError, match="1099511627776 bytes"):
        await isolated(claim, max_result_size="1GiB")
    with pytest.raises(ProtocolError, match="1099511627776 bytes"):
        await isolated(claim)  # no limit set: the allocation fails, and is reported as such


async def test_a_child_that_keeps_writing_after_its_result() -> None:
    def chatter() -> None:
        real_write = _child._write_all

        def write(fd: int, buffers: list[bytes]) -> None:
            real_write(fd, buffers)
            while True:
                os.write(fd, b"more and more")

        _child._write_all = write  # type: ignore[assignment]

    with pytest.raises(ProtocolError, match="wrote more after its result"):
        await isolated(chatter)


async def test_a_child_that_closes_the_result_pipe() -> None:
    def close_it() -> None:
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:") and int(fd) > 2:
                    os.close(int(fd))
            except OSError:
                pass
        time.sleep(0.1)

    with pytest.raises(IsolationError):
        with anyio.fail_after(10):
            await isolated(close_it)


# The frame reader and the decoder, fuzzed: whatever bytes arrive, the outcome is frames or an
# IsolationError, never another exception and never code run.


def read_frames(data: bytes, max_size: int | None = None) -> list[tuple[int, bytes]]:
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)
        os.close(write_fd)
        write_fd = -1
        os.set_blocking(read_fd, False)
        reader = _protocol.FrameReader(read_fd, max_size=max_size)
        frames = []
        while not reader.eof:
            reader.read_available()
            if reader.complete:
                assert reader.payload is not None
                frames.append((reader.kind, bytes(reader.payload)))
                reader.reset()
        return frames
    finally:
        os.close(read_fd)
        if write_fd != -1:
            os.close(write_fd)


@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_fuzz_frame_reader_on_garbage(data: bytes) -> None:
    try:
        read_frames(data, max_size=1 << 16)
    except IsolationError:
        pass


@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([_protocol.RESULT, _protocol.ITEM, _protocol.END, _protocol.ERROR]),
            st.binary(max_size=300),
        ),
        max_size=5,
    ),
    st.binary(max_size=20),
)
def test_fuzz_valid_frames_come_back_whole(frames: list[tuple[int, bytes]], tail: bytes) -> None:
    data = b"".join(
        _protocol.HEADER.pack(_protocol.MAGIC, _protocol.VERSION, kind, len(p)) + p
        for kind, p in frames
    )
    try:
        got = read_frames(data + tail)
    except IsolationError:
        assert tail  # only what follows the valid frames can be refused
        return
    assert got[: len(frames)] == frames


plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
@settings(max_examples=300, deadline=None)
@given(plain_values)
def test_fuzz_safe_codec_round_trip(value: object) -> None:
    assert SAFE.loads(SAFE.dumps(value)) == value


@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_safe_decoder_on_garbage(data: bytes) -> None:
    for kind in (_protocol.RESULT, _protocol.ERROR):
        try:
            _protocol.decode(kind, data, SAFE)
        except (IsolationError, RemoteError):
            pass


# Hostile payloads in the safe format itself: bounded depth, length and memory.


def test_deep_nesting_is_refused_not_a_crash() -> None:
    deep = b"t" + struct.pack(">Q", 1)
    payload = deep * 1_000_000 + b"N"
    with pytest.raises(IsolationError, match="nested more than 100 deep"):
        SAFE.loads(payload)


def test_lengths_are_checked_against_the_bytes_there() -> None:
    for payload in (
        b"l" + struct.pack(">Q", 10**18),
        b"b" + struct.pack(">Q", 1 << 40) + b"xx",
        b"s" + struct.pack(">Q", 5) + b"ab",
    ):
        with pytest.raises(ProtocolError, match="malformed"):
            SAFE.loads(payload)


@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
def test_memory_built_is_bounded_by_the_input() -> None:
    # Many empty sets: 9 bytes each on the wire, 216 in memory.
    count = 100_000
    payload = b"l" + struct.pack(">Q", count) + (b"S" + struct.pack(">Q", 0)) * count
    refused = ""
    tracemalloc.start()
    try:
        SAFE.loads(payload)
    except IsolationError as exc:
        refused = str(exc)  # refused for its size: also an acceptable outcome
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert not refused or "times its size" in refused
    assert peak < 64 * len(payload) + (4 << 20)


async def test_a_second_stats_frame_is_refused() -> None:
    def flood() -> None:
        stats = b"".join(_protocol.encode_stats(1))

        def write(fd: int, buffers: list[bytes]) -> None:
            while True:
                os.write(fd, stats)

        _child._write_all = write  # type: ignore[assignment]

    with anyio.fail_after(10), pytest.raises(ProtocolError, match="second STATS"):
        await isolated(flood)


def test_fuzz_numpy_arrays_must_match_their_shape() -> None:
    good = SAFE.dumps(numpy.arange(6, dtype=numpy.int16).reshape(2, 3))
    bad = good.replace(struct.pack(">Q", 3), struct.pack(">Q", 4), 1)
    with pytest.raises(IsolationError):
        SAFE.loads(bad)


@pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)
@settings(max_examples=300, deadline=None)
@given(plain_values, st.data())
def test_fuzz_safe_decoder_on_mutated_values(value: object, data: st.DataObject) -> None:
    payload = bytearray(SAFE.dumps(value))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    try:
        SAFE.loads(bytes(payload))
    except IsolationError:
        pass
