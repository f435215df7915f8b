"""The command line: ``python -m aioisolate demo`` (also installed as ``aioisolate demo``)."""

from __future__ import annotations

import argparse

from . import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="aioisolate", description="Run functions in forked child processes from async Python."
    )
    parser.add_argument("--version", action="version", version=f"aioisolate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run a leak, heavy work, a crash and a fan-out, in-process and isolated"
    )
    demo.add_argument("--quick", action="store_true", help="smaller runs (a few seconds)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run

        run(quick=args.quick)
