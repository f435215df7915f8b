"""Engines: what runs isolated calls on other machines (``engine=``); `DaskEngine` is one.

The `Engine` protocol is the library's own, not an API to implement: its method takes the
checked options and the report list the local call path uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .._options import Options
    from .._report import CallReport


@runtime_checkable
class Engine(Protocol):
    """Something that runs isolated calls elsewhere (`DaskEngine`): given with ``engine=``."""

    async def _run_call(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        options: Options,
        reports: list[CallReport] | None,
    ) -> tuple[Any, CallReport]:
        """Run ``func(*args)`` in a child with ``options``; return its value and report, or
        raise what it raised, as a local call would. Append the report to ``reports``."""
        ...
