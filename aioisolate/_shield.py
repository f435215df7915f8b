"""Waiting that a cancellation cannot cut short: for cleanup that must finish (a child reaped,
an isolator's calls ended, a remote call cancelled) before the cancellation goes on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio


async def to_the_end(wait: Callable[[], Awaitable[object]], done: Callable[[], bool]) -> None:
    """Await ``wait()``, shielded, until ``done()``; then re-raise the last cancellation that
    arrived meanwhile, if any.

    A shield alone is not enough: asyncio's ``task.cancel()`` goes through anyio's shields,
    so the wait is taken up again after each one. Any other exception (a KeyboardInterrupt,
    which trio delivers through shields) propagates at once: the caller decides what then.
    """
    pending: BaseException | None = None
    while not done():
        try:
            with anyio.CancelScope(shield=True):
                await wait()
        except anyio.get_cancelled_exc_class() as exc:
            pending = exc
    if pending is not None:
        raise pending
