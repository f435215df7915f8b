"""Ways of starting the child of a call, behind one seam (see `base.Spawner`).

`spawner_for` is the one place the way is chosen, from the call's options: fork mode (`fork`)
unless ``zygote=`` names a helper to fork from (`zygote`).
"""

from __future__ import annotations

from .._options import Options
from .base import Spawner
from .fork import FORK
from .zygote import ZygoteSpawner

__all__ = ["Spawner", "spawner_for"]


def spawner_for(options: Options) -> Spawner:
    """The spawner of a call with these options."""
    if options.zygote is None:
        return FORK
    return ZygoteSpawner(options.zygote)
