"""The seam where a way of starting children plugs in: the `Spawner` protocol, and what every
spawner shares (the call's pipes, the child's plan, the running child it hands back).

A spawner starts the child of one call and returns its `RunningChild`, whose watcher says when
the child exits and whose pipes bring its result and output; the call's lifecycle (`_call`)
does the rest, whatever started the child. Each spawner lives in its own module (`fork`,
`zygote`), uses what is here, and never imports another.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, Protocol

import anyio

from .. import _child, _fds, _linux, _protocol
from .._codec import PICKLE, Codec
from .._options import Options
from .._output import Tail
from .._running import RunningChild
from .._threads import Site
from .._watch import ChildWatcher


class Spawner(Protocol):
    """A way of starting the child of a call (fork mode, zygote mode)."""

    async def spawn(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        options: Options,
        *,
        stream: bool,
        site: Site | None,
    ) -> RunningChild:
        """Start a child that runs ``func(*args)`` (a generator function, sending its items as
        they come, with ``stream``) and return it running. ``site`` is where the user's call
        entered the library, for the warnings a start may issue there.

        Nothing is left behind when this raises: a child it started is killed and reaped, and
        its fds are closed. Options are checked already; it raises `IsolationError` when the
        child cannot be started, and what the function or its arguments raise when they
        cannot be prepared (``TypeError`` for arguments zygote mode cannot pickle).
        """
        ...


class CallPipes:
    """The fds of one call, made before its child starts: the result pipe, a pipe per output it
    captures, and the spill file for a large result.

    Make it with the fd lock held (see `_fds`): each fd is listed in ``library_fds`` as it is
    made, so that a child forked meanwhile closes it. Either `running` hands the read ends to
    the running child, or `close` closes them all.
    """

    def __init__(self, options: Options, *, stream: bool) -> None:
        self.opened: list[int] = []  # fds of ours not yet handed to a RunningChild
        self.outputs: dict[str, tuple[int, int]] = {}
        self.spill: int | None = None
        try:
            self.result = self._pipe()
            for name in ("stdout", "stderr"):
                if getattr(options, name) == "capture":
                    self.outputs[name] = self._pipe()
            if not stream and options.codec is PICKLE:
                self.spill = _linux.spill_file(_fds.library_fds)
                if self.spill is not None:
                    self.opened.append(self.spill)
        except BaseException:
            self.close()
            raise

    def _pipe(self) -> tuple[int, int]:
        pipe = os.pipe2(os.O_CLOEXEC)
        self.opened.extend(pipe)
        _fds.library_fds.update(pipe)
        return pipe

    @property
    def write_ends(self) -> list[int]:
        """The ends the child writes to: the result pipe's and the captured outputs'."""
        return [self.result[1], *(w for _, w in self.outputs.values())]

    def output_target(self, name: str, how: str) -> int:
        """The plan's ``stdout`` or ``stderr``: the write end of its pipe when captured."""
        if name in self.outputs:
            return self.outputs[name][1]
        return _child.DISCARD if how == "discard" else _child.INHERIT

    def close_write_ends(self) -> None:
        """Once the child has them (or the helper that forks it): only the child may hold a
        write end, so that EOF comes when it is gone."""
        for fd in self.write_ends:
            self.opened.remove(fd)
            _fds.close(fd)

    def running(
        self,
        watcher: ChildWatcher,
        options: Options,
        *,
        started: float,
        stream: bool,
        anonymous_at_fork: int | None = None,
        fork_turn: anyio.Lock | None = None,
    ) -> RunningChild:
        """The `RunningChild` of a child just started, once the write ends are closed: it
        owns the read ends from here."""
        for fd in self.opened:
            os.set_blocking(fd, False)
        self.opened = []
        return RunningChild(
            watcher,
            _protocol.FrameReader(self.result[0], max_size=options.result_limit),
            {name: Tail(pipe[0], options.max_output) for name, pipe in self.outputs.items()},
            options,
            started=started,
            stream=stream,
            anonymous_at_fork=anonymous_at_fork,
            spill_fd=self.spill,
            fork_turn=fork_turn,
        )

    def close(self) -> None:
        """Close every fd not handed on (a start that failed)."""
        for fd in self.opened:
            _fds.close(fd)
        self.opened = []


def plan_for(
    options: Options,
    *,
    stream: bool,
    write_fd: int,
    stdout: int,
    stderr: int,
    spill_fd: int,
    inherited_fds: list[int],
    parent_pid: int,
    codec: Codec | None = None,
) -> _child.Plan:
    """The child's `Plan` for a call with ``options``: the one place it is made. (A zygote's
    request carries it without the fds, which the helper fills in.)"""
    return _child.Plan(
        write_fd=write_fd,
        inherited_fds=inherited_fds,
        parent_pid=parent_pid,
        loop_kind=loop_kind(),
        memory_limit=options.memory_limit,
        cpu_limit=options.cpu_limit,
        stdout=stdout,
        stderr=stderr,
        stream=stream,
        codec=options.codec if codec is None else codec,
        sandbox=options.sandbox,
        sandboxed=options.sandbox.active,
        spill_fd=spill_fd,
        nice=options.nice,
        result_limit=options.result_limit,
    )


def loop_kind() -> _child.LoopKind:
    """The kind of event loop the calling task runs on (anyio's two backends), for an async
    function to run on one of the same kind in the child."""
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def flush_parent_stdio() -> None:
    """Before a child starts: text still buffered here would otherwise be printed again by a
    forked child, or come after what a zygote's child writes to the same place. A stream that
    cannot be flushed (closed, or a reader that went away) is not our business."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
