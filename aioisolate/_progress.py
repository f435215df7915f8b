"""A ready-made ``on_progress`` for fan-outs: a tqdm progress bar."""

from __future__ import annotations

from typing import Any

from ._map import MapProgress


class tqdm_progress:  # noqa: N801  (used like a function: on_progress=tqdm_progress())
    """A progress bar for `isolated_map` and `Isolator.map`, drawn with tqdm.

    Pass it as ``on_progress=tqdm_progress(desc="searching")``; keyword arguments go to
    ``tqdm.tqdm``. The bar counts finished calls (done and failed) and shows how many failed
    and how many are running; it closes itself when the fan-out ends. Needs the ``progress``
    extra: ``pip install aioisolate[progress]``.

    The bar is drawn on the fan-out's own updates, without tqdm's monitor thread: a thread
    that takes tqdm's locks now and then would make every fork-mode call a fork from a
    threaded process (see `ThreadedForkWarning`).
    """

    def __init__(self, **tqdm_options: Any) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError as exc:
            raise ImportError(
                "tqdm_progress needs tqdm: pip install 'aioisolate[progress]'"
            ) from exc

        class Bar(tqdm):  # type: ignore[misc]
            monitor_interval = 0  # this class's bars start no monitor thread

        self.bar = Bar(**{"unit": "call", **tqdm_options})

    def __call__(self, progress: MapProgress) -> None:
        if progress.total is not None and self.bar.total != progress.total:
            self.bar.total = progress.total
        self.bar.set_postfix(failed=progress.failed, running=progress.running, refresh=False)
        # update() draws at most as often as tqdm's own rate limit allows.
        self.bar.update(progress.done + progress.failed - self.bar.n)
        if progress.finished:
            self.bar.close()
