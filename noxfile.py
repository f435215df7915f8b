"""The test matrix: the whole suite on each supported Python (``make matrix``; CI runs it).

nox finds an interpreter as ``python3.X`` on PATH. pyenv's shims answer only for the versions
pyenv has selected, so the newest installed version of each under pyenv's root goes on PATH
first. What was found is printed before any session runs, and a version found nowhere fails
the run (never a silent skip).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import nox

PYTHONS = ["3.11", "3.12", "3.13"]

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True
nox.options.download_python = "never"  # these machines reach no download site
nox.options.default_venv_backend = "venv"


def _works(path: str) -> str | None:
    """The version an interpreter says it is, or None when it does not run (a shim)."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _find(version: str) -> str | None:
    """``python<version>``, from PATH or else pyenv's versions (its newest patch release)."""
    on_path = shutil.which(f"python{version}")
    if on_path and _works(on_path):
        return on_path
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}"))
    found.sort(key=lambda p: [int(n) for n in p.split(os.sep)[-3].split(".") if n.isdigit()])
    for path in reversed(found):
        if _works(path):
            return path
    return None


def _matrix() -> None:
    lines = []
    for version in PYTHONS:
        path = _find(version)
        if path is None:
            lines.append(f"  {version}: MISSING (not on PATH, nor under pyenv's versions)")
            continue
        if os.path.dirname(path) not in os.environ["PATH"].split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([os.path.dirname(path), os.environ["PATH"]])
        lines.append(f"  {version}: {path} ({_works(path)})")
    print("Python matrix:", *lines, sep="\n", file=sys.stderr, flush=True)


_matrix()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The whole suite, on one interpreter, in a virtual environment of its own."""
    session.install("--quiet", "-e", ".[test]")
    session.run("python", "--version")
    session.run("python", "-m", "pytest", *session.posargs)
