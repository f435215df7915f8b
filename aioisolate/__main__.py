"""``python -m aioisolate``: the command line (see `_cli`)."""

from ._cli import main

main()
