"""A running child, as the parent sees it from fork until it is reaped: reading its frames,
draining its captured output, the memory watchdog, and killing and reaping it.

A `RunningChild` is made by a spawner (see `_spawn`) and driven by the call's lifecycle (see
`_call`): `collect` reads the last frame while waiting for the child to exit and reaps it;
`next_frame` reads a stream's frames one at a time; `kill_and_reap` ends it however often the
caller is interrupted; `ending` hands what is known to `_outcome`. The first wait lets the loop
turn once before the next fork may go (see `ForkSpawner`): nothing else paces forks.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import signal
import time
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import anyio.lowlevel

from . import _fds, _limits, _linux, _protocol, _spill
from ._errors import IsolationError, ProtocolError
from ._forking import Waited
from ._options import Options
from ._outcome import Captured, Ending
from ._output import Tail
from ._shield import to_the_end
from ._watch import ChildWatcher
from ._watch.ready import ReadySet, ready_set


class RunningChild:
    """The parent's view of one running child, from fork until it is reaped."""

    def __init__(
        self,
        watcher: ChildWatcher,
        reader: _protocol.FrameReader,
        outputs: dict[str, Tail],
        options: Options,
        *,
        started: float,
        stream: bool = False,
        anonymous_at_fork: int | None = None,
        spill_fd: int | None = None,
        fork_turn: anyio.Lock | None = None,
    ) -> None:
        self.watcher = watcher
        self.options = options
        self.reaped = False
        self._reader = reader
        self._outputs = outputs
        self._stream = stream
        self._started = started
        # The parent's anonymous resident memory at fork (the child starts with this much),
        # when a memory limit needs it.
        self._anonymous_at_fork = anonymous_at_fork
        self._spill_fd = spill_fd
        self._spilled: mmap.mmap | None = None  # the spill file, mapped once the child is gone
        # The event loop's fork lock, held until the loop has turned once after this fork.
        self._fork_turn = fork_turn
        self._killed = False  # whether we sent the child a signal
        self._ended: float | None = None
        self._waited: Waited | None = None  # (status, rusage), None if unknown
        self._protocol_error: IsolationError | None = None
        self._timed_out = False
        self._exited = False  # seen to exit by a stream's wait, not yet reaped
        self._memory_seen: int | None = None  # set when the watchdog killed the child

    @property
    def pid(self) -> int:
        """The child's pid; 0 while a zygote has not yet said it forked."""
        return self.watcher.pid

    async def _pace(self) -> None:
        """Let the event loop turn once after this fork (twice if other calls wait to fork),
        then let the next fork go.

        A fork holds the event loop for a millisecond or more (more in a big parent). When
        calls reach it together (a fan-out starting, children ending at the same time), timers
        and other tasks then run between two forks, and a burst never freezes the loop.
        """
        forks, self._fork_turn = self._fork_turn, None
        if forks is not None:
            try:
                await anyio.lowlevel.checkpoint()
                if forks.statistics().tasks_waiting:
                    await anyio.lowlevel.checkpoint()
            finally:
                forks.release()

    # A call: the last frame, read while waiting for the child to exit.

    async def collect(self) -> None:
        """Read the result while waiting for the child to exit; return once it is reaped."""
        await self._pace()
        if self.reaped:
            return
        tails = {tail.fd: tail for tail in self._outputs.values()}
        with _fds.lock:
            ready = ready_set(self.watcher, [self._reader.fd, *tails], _fds.library_fds)
        if ready is None:
            await self._collect_with_tasks()
        else:
            try:
                if self.options.memory_limit is None:
                    await self._collect_ready(ready, tails)
                else:
                    async with _task_group() as tg:
                        self._watch_memory(tg)
                        await self._collect_ready(ready, tails)
                        tg.cancel_scope.cancel()
            finally:
                with _fds.lock:
                    ready.close()
        # All the child wrote is in the pipes now. Take it without waiting for EOF, which a
        # descendant that left the process group could postpone for ever.
        self._read_available()
        for tail in self._outputs.values():
            tail.read_available()
        if self._reader.complete and self._reader.kind == _protocol.SPILLED:
            self._take_spill()

    async def time_out(self) -> None:
        """The call's timeout fired: kill and reap the child, whose outcome is then the
        timeout (unless it was reaped already, having finished in time)."""
        if not self.reaped:
            self._timed_out = True
            await self.kill_and_reap()

    def _take_spill(self) -> None:
        if self._spill_fd is None:
            self._protocol_error = ProtocolError("the child sent a spilled result unasked")
            return
        assert self._reader.payload is not None
        try:
            self._spilled = _spill.take(
                self._spill_fd, self._reader.payload, self.options.result_limit
            )
        except IsolationError as exc:
            self._protocol_error = exc
        except (OSError, ValueError) as exc:  # mmap: out of memory, or a file that shrank
            self._protocol_error = IsolationError(
                f"the child's spilled result could not be mapped in the parent: {exc}"
            )

    async def _collect_ready(self, ready: ReadySet, tails: dict[int, Tail]) -> None:
        """`collect` with one wait for all the fds of the call (see `ReadySet`)."""
        exit_fd = self.watcher.fileno()
        while not self.reaped:
            await ready.wait()
            for fd in ready.ready():
                if fd == exit_fd:
                    if self.watcher.has_exited():
                        self._reap()
                elif fd == self._reader.fd:
                    if self._take_final():
                        ready.discard(fd)
                else:
                    tails[fd].read_available()
                    if tails[fd].eof:
                        ready.discard(fd)

    async def _collect_with_tasks(self) -> None:
        """`collect` with a task per fd: where there is no `ReadySet`."""
        async with _task_group() as tg:
            tg.start_soon(self._read, True)
            self._serve(tg)
            await self.watcher.wait_exited()
            self._reap()
            tg.cancel_scope.cancel()

    # A stream: its frames, one at a time.

    async def next_item(self, deadline: float) -> bytes | bytearray | None:
        """The payload of the stream's next ITEM frame; None once there is none (the stream
        ended, failed, or the child died, was refused or timed out at ``deadline``, on the
        loop's clock). A frame the pipe holds already is returned whatever the deadline."""
        await self._pace()
        if not self._frame_ready():
            with anyio.move_on_at(deadline) as waiting:
                await self._next_frame()
            if waiting.cancelled_caught and not self._frame_ready():
                await self.time_out()
                return None
        else:
            # Let other tasks run (and a cancellation in), as any await should.
            await anyio.lowlevel.checkpoint()
        reader = self._reader
        if self._protocol_error is not None or not reader.complete:
            return None
        if reader.kind != _protocol.ITEM:
            return None  # END or ERROR: the child is about to exit
        payload = reader.payload
        assert payload is not None
        reader.reset()
        return payload

    def _frame_ready(self) -> bool:
        """Read what the pipe holds now; True if that settles the next frame (it is complete,
        the stream ended, or it was refused) without waiting."""
        self._read_available()
        if not (self._reader.complete or self._reader.eof or self._protocol_error):
            if not self._exited:
                return False
            # The child is gone and everything it wrote was in the pipe: it ends here.
            self._reader.eof = True
        return True

    async def _next_frame(self) -> None:
        """Wait until the next frame is settled. Captured output, the memory watchdog and the
        child's exit are served meanwhile (between two waits the child may be paused on a full
        pipe, never harmed)."""
        async with _task_group() as tg:
            self._serve(tg)
            tg.start_soon(self._notice_exit, tg.cancel_scope)
            await self._read()
            tg.cancel_scope.cancel()
        self._frame_ready()

    async def _notice_exit(self, waiting: anyio.CancelScope) -> None:
        # A descendant still holding the pipe would keep EOF from coming: once the child has
        # exited, its group goes (while it is a zombie, the group id is still its own), and
        # what is left in the pipe is all there will be.
        await self.watcher.wait_exited()
        self._exited = True
        if self.options.kill_descendants:
            self.watcher.signal_group(signal.SIGKILL)
        waiting.cancel()

    # What runs beside the reader.

    def _serve(self, tg: anyio.abc.TaskGroup) -> None:
        """Start what runs beside the reader: output drains and the memory watchdog."""
        for tail in self._outputs.values():
            tg.start_soon(tail.drain)
        self._watch_memory(tg)

    def _watch_memory(self, tg: anyio.abc.TaskGroup) -> None:
        if self.options.memory_limit is not None:
            tg.start_soon(self._watchdog, self.options.memory_limit)

    async def _watchdog(self, limit: int) -> None:
        await self.watcher.started()
        if self.pid:
            await _limits.watch_memory(self.pid, limit, self._inherited() or 0, self._too_big)

    def _inherited(self) -> int | None:
        """The anonymous memory the child started with, if known: its parent's at fork."""
        if self._anonymous_at_fork is None:
            return self.watcher.anonymous_at_fork  # forked by a zygote, which said
        return self._anonymous_at_fork

    def _too_big(self, used: int) -> None:
        self._memory_seen = used
        self.kill()

    # Reading the result pipe.

    async def _read(self, final: bool = False) -> None:
        """Read until a frame is complete, or EOF. With ``final`` (the frame that ends the
        call), go on to EOF: a child that writes anything after it is killed."""
        while not (self._take_final() if final else self._take_frame()):
            await anyio.wait_readable(self._reader.fd)

    def _take_frame(self) -> bool:
        """Read what the result pipe holds; True once a frame is complete, or at EOF."""
        self._read_available()
        return self._protocol_error is not None or self._reader.eof or self._reader.complete

    def _take_final(self) -> bool:
        """Read what the result pipe holds; True once it needs no more watching: the last frame
        came and nothing follows it (EOF), or the child broke the protocol."""
        return self._take_frame() and (
            not self._reader.complete or self._protocol_error is not None or self._nothing_follows()
        )

    def _nothing_follows(self) -> bool:
        """False while the pipe may still bring data after the last frame."""
        try:
            extra = os.read(self._reader.fd, 1)
        except BlockingIOError:
            return False  # nothing yet: wait for EOF
        if extra:
            self._protocol_error = ProtocolError(
                "the child wrote more after its result; it was killed"
            )
            self.kill()
        else:
            self._reader.eof = True
        return True

    def _read_available(self) -> None:
        if self._protocol_error is None:
            try:
                self._reader.read_available()
            except IsolationError as exc:
                self._protocol_error = exc
                self.kill()

    # Ending the child.

    def send(self, sig: int) -> None:
        """Signal the child, and its process group unless told to spare its descendants."""
        if not self.reaped:
            self._killed = True
            self.watcher.send_signal(sig)
            if self.options.kill_descendants:
                self.watcher.signal_group(sig)

    def kill(self) -> None:
        self.send(signal.SIGKILL)

    def _reap(self, *, block: bool = False) -> None:
        if self.options.kill_descendants:
            # Whatever the child started (a subprocess, say) dies with it. Only while the child
            # is unreaped: until then its group id cannot be another's.
            self.watcher.signal_group(signal.SIGKILL)
        self._waited = self.watcher.reap(block=block)
        self._ended = time.monotonic()
        self.reaped = True
        # What the child wrote last is in the pipes now: take it without waiting for EOF,
        # which a descendant that left the process group could postpone for ever.
        for tail in self._outputs.values():
            tail.read_available()

    async def kill_and_reap(self) -> None:
        """Stop the child and wait until it is reaped, however often the caller is interrupted.

        With ``kill_grace``, SIGTERM first and SIGKILL only if the child outlives the grace.
        Captured output is drained meanwhile, so a child writing as it ends is not blocked.
        """
        self._release_turn()  # the next fork need not wait for this one's end
        pending: BaseException | None = None
        if self.options.kill_grace and not self.reaped:
            self.send(signal.SIGTERM)
            try:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.options.kill_grace):
                    await self._wait_exited()
            except BaseException as exc:
                # Cancelled again (asyncio), or a KeyboardInterrupt (trio delivers it through
                # shields): cut the grace short; SIGKILL follows.
                pending = exc
        self.kill()
        try:
            # The child is already dying: a cancellation meanwhile waits until it is reaped.
            await to_the_end(self._wait_and_reap, lambda: self.reaped)
        except BaseException:
            # A KeyboardInterrupt or a failing watcher. The child has been sent SIGKILL:
            # waiting for it without the loop is short.
            if not self.reaped:
                self._reap(block=True)
            raise
        if pending is not None:
            raise pending

    async def _wait_and_reap(self) -> None:
        await self._wait_exited()
        self._reap()

    async def _wait_exited(self) -> None:
        if not self._outputs:
            await self.watcher.wait_exited()
            return
        async with _task_group() as tg:
            for tail in self._outputs.values():
                tg.start_soon(tail.drain)
            await self.watcher.wait_exited()
            tg.cancel_scope.cancel()

    def _release_turn(self) -> None:
        if self._fork_turn is not None:  # never waited on
            self._fork_turn.release()
            self._fork_turn = None

    def close(self) -> None:
        """Release the call's fds and the watcher; once reaped (or given up on)."""
        self._release_turn()
        if not self._reader.complete:
            self._reader.reset()  # a half-read result (up to its full size) goes now, not at GC
        for fd in [self._reader.fd, *(tail.fd for tail in self._outputs.values())]:
            anyio.notify_closing(fd)
            _fds.close(fd)
        if self._spill_fd is not None:
            _fds.close(self._spill_fd)  # its mapping, if any, lives on
        with _fds.lock:
            self.watcher.close()

    def ending(self) -> Ending:
        """What is known of the call now, for `_outcome`."""
        reader = self._reader
        baseline = reader.resident_at_start
        if baseline is None:
            # A child that died before saying is measured against the anonymous memory it
            # inherited, which fork always counts for it; else against ours now, close to ours
            # at fork.
            baseline = self._inherited()
        if baseline is None and self._waited is not None:
            _, baseline = _linux.resident_memory()
        stdout, stderr = self._outputs.get("stdout"), self._outputs.get("stderr")
        return Ending(
            options=self.options,
            stream=self._stream,
            pid=self.pid,
            waited=self._waited,
            wall_time=(self._ended or time.monotonic()) - self._started,
            killed=self._killed,
            timed_out=self._timed_out,
            memory_seen=self._memory_seen,
            protocol_error=self._protocol_error,
            watcher_failure=self.watcher.failure(),
            kind=reader.kind if reader.complete else None,
            payload=reader.payload if reader.complete else None,
            spilled=self._spilled,
            received=reader.received,
            baseline=baseline or 0,
            stdout=Captured(stdout.data, stdout.dropped) if stdout else None,
            stderr=Captured(stderr.data, stderr.dropped) if stderr else None,
        )


@contextlib.asynccontextmanager
async def _task_group() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group of the call's own: a lone exception (a KeyboardInterrupt, say) leaves it as
    itself, not wrapped in an exception group the caller never asked for."""
    try:
        async with anyio.create_task_group() as tg:
            yield tg
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
