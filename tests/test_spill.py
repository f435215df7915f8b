"""Large results through the call's spill file: what arrives, and what is refused."""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy
import pytest

from aioisolate import (
    IsolationError,
    ProtocolError,
    _linux,
    _protocol,
    _spill,
    isolated,
    isolated_with_report,
)
from aioisolate._codec import PICKLE

pytestmark = [pytest.mark.anyio, pytest.mark.both_modes]

BIG = 4 << 20


@pytest.fixture
def spills(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the spill files the parent mapped, one per call that spilled."""
    mapped: list[int] = []
    real_take = _spill.take

    def take(fd: int, payload: bytes | bytearray, limit: int | None) -> mmap.mmap | None:
        spilled = real_take(fd, payload, limit)
        if spilled is not None:
            mapped.append(len(spilled))
        return spilled

    monkeypatch.setattr(_spill, "take", take)
    return mapped


def big_bytes() -> bytes:
    return bytes(range(256)) * (BIG // 256)


def big_array() -> numpy.ndarray[Any, Any]:
    return numpy.arange(BIG // 8, dtype=numpy.int64).reshape(2, -1)


def many_buffers() -> dict[str, object]:
    return {
        "array": numpy.ones(BIG, dtype=numpy.uint8),
        "view": numpy.arange(BIG // 4, dtype=numpy.int32)[::2],  # not contiguous: in the pickle
        "small": numpy.zeros(10),
        "text": "x" * 100,
        "tuple": (bytearray(b"b" * BIG), 3),  # a bytearray inside a value: in the pickle
    }


async def test_bytes_and_bytearray_spill_and_keep_their_type(spills: list[int]) -> None:
    value = await isolated(big_bytes)
    assert type(value) is bytes
    assert value == big_bytes()
    array = await isolated(lambda: bytearray(big_bytes()))
    assert type(array) is bytearray
    assert array == bytearray(big_bytes())
    array[0] = 255  # a bytearray of its own
    assert len(spills) == 2
    assert all(size >= BIG for size in spills)


async def test_numpy_arrays_are_built_on_the_mapped_file(spills: list[int]) -> None:
    value, report = await isolated_with_report(big_array)
    assert numpy.array_equal(value, big_array())
    assert value.flags.writeable  # as an unpickled array is
    value[0, 0] = -1  # a private copy of that page: nothing else sees it
    assert spills == [BIG]
    # No copy: the array's memory is the mapping itself.
    owner: object = value
    while not isinstance(owner, mmap.mmap):
        owner = owner.obj if isinstance(owner, memoryview) else owner.base  # type: ignore[attr-defined]
        assert owner is not None
    assert report.result_bytes >= BIG


async def test_several_buffers_in_one_value(spills: list[int]) -> None:
    value = await isolated(many_buffers)
    expected = many_buffers()
    assert value.keys() == expected.keys()
    for key in ("array", "view", "small"):
        assert numpy.array_equal(value[key], expected[key])
    assert value["tuple"] == expected["tuple"]
    assert value["text"] == expected["text"]
    # The large contiguous array went to the file; the rest stayed in the pickle.
    assert spills == [BIG]


async def test_small_results_do_not_spill(spills: list[int]) -> None:
    assert await isolated(bytes, _spill.SPILL_MIN - 1) == bytes(_spill.SPILL_MIN - 1)
    assert await isolated(big_bytes, codec="safe") == big_bytes()  # only the pickle codec spills
    assert spills == []


async def test_without_memfds_everything_takes_the_pipe(
    spills: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "memfd_create")
    assert await isolated(big_bytes) == big_bytes()
    assert numpy.array_equal(await isolated(big_array), big_array())
    assert spills == []


async def test_a_spill_over_max_result_size_is_refused() -> None:
    with pytest.raises(ProtocolError, match=r"spilled 41943\d\d bytes.*max_result_size=1048576"):
        await isolated(big_bytes, max_result_size="1MiB")


def two_halves() -> list[object]:
    # Each part under the limit, the two together over it.
    return [numpy.ones(700 << 10, dtype=numpy.uint8), numpy.ones(700 << 10, dtype=numpy.uint8)]


async def test_max_result_size_counts_the_pickle_and_the_buffers_together(
    spills: list[int],
) -> None:
    with pytest.raises(ProtocolError, match="max_result_size=1048576") as info:
        await isolated(two_halves, max_result_size="1MiB")
    assert info.value.report is not None
    assert spills == []  # refused from the table: the child wrote nothing to the file


def unsealed() -> bytes:
    class NoSeals:
        F_ADD_SEALS = 1033

        def fcntl(self, fd: int, *args: int) -> int:
            return 0

    _spill.fcntl = NoSeals()  # type: ignore[assignment]
    return big_bytes()


async def test_an_unsealed_spill_file_is_not_read() -> None:
    with pytest.raises(ProtocolError, match="unsealed"):
        await isolated(unsealed)


def lying_table() -> bytes:
    real_dump = _spill.dump

    def dump(value: object, fd: int, limit: int | None) -> tuple[bytes, bytes | None]:
        data, _ = real_dump(value, fd, limit)
        return data, struct.pack(">IQQ", 1, 0, 1 << 40)  # a buffer far beyond the file

    _spill.dump = dump  # type: ignore[assignment]
    return big_bytes()


async def test_a_table_pointing_past_the_file_is_refused() -> None:
    with pytest.raises(ProtocolError, match="points beyond the end of the file"):
        await isolated(lying_table)


async def test_a_spill_file_that_cannot_be_made_falls_back_to_the_pipe(
    spills: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_linux, "spill_file", lambda registry: None)
    assert await isolated(big_bytes) == big_bytes()
    assert spills == []


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00\x00\x00\x05", struct.pack(">IQQ", 1, 0, 10) + b"not a pickle", b"\xff" * 40],
)
def test_a_malformed_spill_frame_is_an_isolation_error(payload: bytes) -> None:
    with pytest.raises(IsolationError, match="could not be decoded"):
        _protocol.decode(_protocol.SPILLED, payload, PICKLE, None)
