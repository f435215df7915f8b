"""Coverage-guided fuzzing of the frame reader and the safe decoder (run by `make fuzz`).

Any bytes a child may write go through FrameReader and then the safe codec; the only
acceptable outcomes are frames, IsolationError or RemoteError.
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports():
    from aioisolate import IsolationError, RemoteError, _protocol
    from aioisolate._codec import SAFE


def one_input(data: bytes) -> None:
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data[:60000])  # what a pipe holds without a reader
        os.close(write_fd)
        write_fd = -1
        os.set_blocking(read_fd, False)
        reader = _protocol.FrameReader(read_fd, max_size=1 << 20)
        while not reader.eof:
            try:
                reader.read_available()
            except IsolationError:
                return
            if reader.complete:
                assert reader.payload is not None
                try:
                    _protocol.decode(reader.kind, reader.payload, SAFE)
                except (IsolationError, RemoteError):
                    pass
                reader.reset()
    finally:
        os.close(read_fd)
        if write_fd != -1:
            os.close(write_fd)


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
