"""The child's stdout and stderr, captured at the fd level and kept as a bounded tail."""

from __future__ import annotations

import os

import anyio

_CHUNK = 1 << 16


class Tail:
    """Drains one non-blocking pipe, keeping only its last ``limit`` bytes.

    Drained while the child runs, so a chatty child never blocks on a full pipe, and bounded,
    so it never costs the parent more than about twice ``limit``.
    """

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.limit = limit
        self.total = 0
        self.eof = False
        self._buffer = bytearray()

    def read_available(self) -> None:
        while not self.eof:
            try:
                chunk = os.read(self.fd, _CHUNK)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            self.total += len(chunk)
            self._buffer += chunk
            if len(self._buffer) > 2 * self.limit:
                del self._buffer[: -self.limit]

    async def drain(self) -> None:
        while True:
            self.read_available()
            if self.eof:
                return
            await anyio.wait_readable(self.fd)

    @property
    def data(self) -> bytes:
        return bytes(self._buffer[-self.limit :])

    @property
    def dropped(self) -> int:
        return self.total - min(len(self._buffer), self.limit)
