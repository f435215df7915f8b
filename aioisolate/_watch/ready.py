"""One wait for all the fds of a call: an epoll instance readable whenever any of them is."""

from __future__ import annotations

import select

import anyio

from .base import ChildWatcher


class ReadySet:
    """One fd, readable whenever any of several others is: an epoll instance.

    A call waits on its result pipe, its pidfd and its output pipes at once with a single
    ``wait_readable`` on this fd, instead of a task per fd: fewer wake-ups, and far fewer pages
    of the parent touched (each one a copy-on-write fault while a child shares it).
    """

    def __init__(self, fds: list[int], registry: set[int]) -> None:
        self._epoll = select.epoll(len(fds))
        self.fd = self._epoll.fileno()
        registry.add(self.fd)
        self._registry = registry
        try:
            for fd in fds:
                self._epoll.register(fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    async def wait(self) -> None:
        """Return once one of the fds is readable."""
        await anyio.wait_readable(self.fd)

    def ready(self) -> list[int]:
        """The fds readable now (never blocks)."""
        return [fd for fd, _ in self._epoll.poll(0)]

    def discard(self, fd: int) -> None:
        """Stop watching an fd (one at EOF stays readable for ever)."""
        self._epoll.unregister(fd)

    def close(self) -> None:
        anyio.notify_closing(self.fd)
        self._registry.discard(self.fd)
        self._epoll.close()


def ready_set(watcher: ChildWatcher, fds: list[int], registry: set[int]) -> ReadySet | None:
    """A `ReadySet` of the watcher's fd and ``fds``; None where calls wait with a task per fd
    instead: without epoll, and with the thread watcher, which stands for those systems here."""
    if not hasattr(select, "epoll") or not watcher.pollable:
        return None
    try:
        return ReadySet([watcher.fileno(), *fds], registry)
    except OSError:
        return None  # out of fds or memory: the tasks need none
