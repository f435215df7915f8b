"""Zygote mode: the child is forked by a small helper process (see `Zygote`), not by this one.

The call's function, arguments and codec travel by pickle (`Payload`), inline in the request
or, when large, in a memory file the child maps. The child's pipes are still this process's
own, passed to the helper with the request, so results, output capture and the spill file
work as in fork mode; only its watcher differs (`ZygoteWatcher`). Nothing here holds the event
loop long, and there is no fork here to pace.
"""

from __future__ import annotations

import fcntl
import inspect
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

import anyio
import anyio.lowlevel

from .. import _child, _fds, _linux, _spill, _watch, _zygote
from .._codec import PICKLE, Codec
from .._errors import IsolationError
from .._options import Options
from .._outcome import cannot_start
from .._running import RunningChild
from .._threads import Site
from .._watch.zygote import ZygoteWatcher
from .._zygote_helper import Busy, TooBig
from .._zygote_main import Request
from .base import CallPipes, flush_parent_stdio, loop_kind, plan_for

# A payload up to this size goes inside the request; a larger one, or one with large buffers,
# in a memory file (the socket's messages must fit its buffer).
INLINE_MAX: Final = 64 << 10
# The file is written this much at a time, the event loop running in between (about a
# millisecond's worth of copying).
_SLICE: Final = 4 << 20

# What the helper imports for an async function, by the caller's kind of loop.
_LOOP_MODULES: Final = {
    "asyncio": ("asyncio",),
    "uvloop": ("asyncio", "uvloop"),
    "trio": ("trio",),
}


class ZygoteSpawner:
    """Starts each call's child in a zygote helper: ``zygote`` itself, or, for True, the one
    this process shares (started at its first call, see `_zygote.shared`)."""

    def __init__(self, zygote: _zygote.Zygote | bool) -> None:
        self._zygote = zygote

    async def spawn(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        options: Options,
        *,
        stream: bool,
        site: Site | None,
    ) -> RunningChild:
        # (No fork here, so no warning about this process's threads: ``site`` goes unused.)
        # A bad AIOISOLATE_CHILD_WATCHER fails here too, before a helper is started with it.
        _watch.select_watcher()
        payload = Payload(func, args, options.codec)  # TypeError if it cannot be pickled
        imports: tuple[str, ...] = ()
        if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
            imports = _LOOP_MODULES[loop_kind()]
        try:
            zygote = self._zygote
            if not isinstance(zygote, _zygote.Zygote):
                zygote = await _zygote.shared()
            payload.open()
            for _ in payload.slices():
                await anyio.lowlevel.checkpoint()
            while True:
                await anyio.lowlevel.checkpoint_if_cancelled()
                try:
                    return _start(zygote, payload, options, stream, imports)
                except Busy:
                    await zygote._wait_writable()
                except TooBig as exc:
                    if payload.inline is None:
                        raise IsolationError(
                            f"the call's request to the zygote is {exc.args[0]} bytes, more "
                            "than its socket carries in one message: a very large env= or "
                            "other option"
                        ) from None
                    payload.to_file()  # the pickle goes in the file instead
                    payload.open()
                    for _ in payload.slices():
                        await anyio.lowlevel.checkpoint()
        except OSError as exc:
            raise cannot_start(exc) from exc
        finally:
            payload.close()


def _start(
    zygote: _zygote.Zygote,
    payload: Payload,
    options: Options,
    stream: bool,
    imports: tuple[str, ...],
) -> RunningChild:
    flush_parent_stdio()  # the child may write where we do
    pipes: CallPipes | None = None
    watcher: ZygoteWatcher | None = None
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None  # deleted: the child stays in the helper's working directory
    with _fds.lock:
        try:
            pipes = CallPipes(options, stream=stream)
            fds = {"result": pipes.result[1]}
            targets: dict[str, int] = {}
            for name, ours in (("stdout", 1), ("stderr", 2)):
                how = getattr(options, name)
                if name in pipes.outputs:
                    fds[name] = pipes.outputs[name][1]
                elif how == "inherit" and _is_open(ours):
                    fds[name] = ours  # ours now, as a forked child would have it
                else:
                    targets[name] = _child.DISCARD
            if pipes.spill is not None:
                fds["spill"] = pipes.spill
            if payload.fd >= 0:
                fds["payload"] = payload.fd
            plan = plan_for(
                options,
                stream=stream,
                write_fd=-1,  # the helper fills in the fds
                stdout=targets.get("stdout", _child.INHERIT),
                stderr=targets.get("stderr", _child.INHERIT),
                spill_fd=-1,
                inherited_fds=[],
                parent_pid=0,
                # The request is plain pickle: the codec travels with the payload instead.
                codec=PICKLE,
            )
            request = Request(
                plan=plan,
                cwd=cwd,
                payload=payload.inline,
                payload_at=payload.at,
                payload_size=payload.size,
                kill_descendants=options.kill_descendants,
                imports=imports,
            )
            started = time.monotonic()
            watcher = zygote._start_call(request, fds, payload.nbytes)
            pipes.close_write_ends()
            return pipes.running(watcher, options, started=started, stream=stream)
        except BaseException:
            if watcher is not None:  # sent: the helper kills it, and reaps it
                watcher.send_signal(signal.SIGKILL)
                watcher.signal_group(signal.SIGKILL)
                watcher.close()
            if pipes is not None:
                pipes.close()
            raise


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


class Payload:
    """A call's function, arguments and codec, pickled, ready to go with its request: inline,
    or in a memory file (its large buffers each on pages of their own, which the child maps
    rather than copies; see `_spill`)."""

    def __init__(self, func: Callable[..., Any], args: tuple[Any, ...], codec: Codec) -> None:
        value = (func, tuple(_spill.whole(arg) for arg in args), codec)
        try:
            data, buffers = _spill.split(value)
        except Exception as exc:
            raise TypeError(
                f"zygote mode pickles the function and its arguments to send them to the "
                f"helper, and {_describe(func)} or its arguments could not be pickled: "
                f"{type(exc).__name__}: {exc}. Make them picklable (functions defined at module "
                "level, plain data), or run this call in fork mode (without zygote=), which "
                "hands them to the child by fork and pickles nothing"
            ) from exc
        self.fd = -1
        self.inline: bytes | None = None
        self.at = self.size = 0
        self._writes: list[tuple[memoryview | bytes, int]] = []
        if not buffers and len(data) <= INLINE_MAX:
            self.inline = data
            return
        self._to_file(data, buffers)

    def to_file(self) -> None:
        """Go in the file after all (a request too large for the socket with it inline)."""
        if self.inline is not None:
            data, self.inline = self.inline, None
            self._to_file(data, [])

    def _to_file(self, data: bytes, buffers: list[memoryview]) -> None:
        table, offsets, end = _spill.layout(buffers)
        payload = table + data
        self.at = -(-end // 4096) * 4096
        self.size = len(payload)
        self._writes = [*zip(buffers, offsets, strict=True), (payload, self.at)]

    @property
    def nbytes(self) -> int:
        """The pickle's size, buffers included."""
        if self.inline is not None:
            return len(self.inline)
        return sum(memoryview(data).nbytes for data, _ in self._writes)

    def open(self) -> None:
        """Create the file (when one is needed)."""
        if self._writes:
            with _fds.lock:
                self.fd = _linux.payload_file(_fds.library_fds)

    def slices(self) -> Iterator[None]:
        """Fill the file a slice at a time, yielding after each: the caller lets the event
        loop run between slices (no thread: a thread would make the next fork-mode call's
        fork one from a threaded process)."""
        for data, offset in self._writes:
            view = memoryview(data)
            for start in range(0, len(view), _SLICE):
                _spill.write_at(self.fd, view[start : start + _SLICE], offset + start)
                yield

    def close(self) -> None:
        if self.fd >= 0:
            _fds.close(self.fd)
            self.fd = -1


def _describe(func: object) -> str:
    name = getattr(func, "__qualname__", None) or type(func).__name__
    return f"the function {name!r}"
