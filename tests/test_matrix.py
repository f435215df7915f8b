"""The test matrix's interpreter discovery (noxfile.py): on PATH, else under pyenv's versions;
what was found is said, and a version found nowhere is named as missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Nothing here forks.
pytestmark = pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)


def fake_python(path: Path, version: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho 'Python {version}'\n")
    path.chmod(0o755)


def matrix(env: dict[str, str]) -> str:
    """What the noxfile says as nox loads it."""
    done = subprocess.run(
        [sys.executable, "-c", "import noxfile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr


def test_pyenv_versions_are_found_and_missing_ones_named(tmp_path: Path) -> None:
    pyenv = tmp_path / "pyenv"
    # A broken shim on PATH (as pyenv's answer for a version it has not selected), and two
    # releases of 3.12 under its root, of which the newest is taken.
    shims = tmp_path / "shims"
    shims.mkdir()
    (shims / "python3.12").write_text("#!/bin/sh\nexit 127\n")
    (shims / "python3.12").chmod(0o755)
    fake_python(pyenv / "versions" / "3.12.1" / "bin" / "python3.12", "3.12.1")
    fake_python(pyenv / "versions" / "3.12.10" / "bin" / "python3.12", "3.12.10")
    on_path = tmp_path / "bin" / "python3.11"
    fake_python(on_path, "3.11.9")
    env = {
        # Nothing else: the interpreter running this test is a python3.X too.
        "PATH": os.pathsep.join([str(shims), str(on_path.parent)]),
        "PYENV_ROOT": str(pyenv),
        "HOME": str(tmp_path),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    said = matrix(env)
    assert f"3.11: {on_path} (Python 3.11.9)" in said
    assert f"3.12: {pyenv}/versions/3.12.10/bin/python3.12 (Python 3.12.10)" in said
    assert "3.13: MISSING (not on PATH, nor under pyenv's versions)" in said
