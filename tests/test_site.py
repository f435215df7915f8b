"""The documentation site builds with mkdocs --strict, and its API reference is complete."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import aioisolate

ROOT = Path(__file__).parent.parent

# Nothing here forks: run once, not once per child watcher.
pytestmark = pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)


def test_reference_names_every_public_object() -> None:
    """docs/reference.md has a `::: aioisolate.NAME` entry for each name in `__all__`."""
    entries = set(
        re.findall(r"^::: aioisolate\.(\w+)$", (ROOT / "docs/reference.md").read_text(), re.M)
    )
    assert entries == set(aioisolate.__all__)


def test_site_builds_strict(tmp_path: Path) -> None:
    # Looked up, not imported: their import-time warnings are not this suite's to judge. They
    # come with the test extra, so a missing one is a failure, not a skip.
    for module in ("mkdocs", "material", "mkdocstrings_handlers"):
        assert importlib.util.find_spec(module) is not None, f"{module} is not installed"
    site = tmp_path / "site"
    # Material's notice about its successor, not a warning about these docs.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert "WARNING" not in build.stderr, build.stderr

    for page in ("index", "quickstart", "how-it-works", "cancellation", "errors", "comparison"):
        assert (site / ("index.html" if page == "index" else f"{page}/index.html")).is_file(), page
    assert (site / "performance.png").is_file()
    assert 'class="mermaid"' in (site / "how-it-works/index.html").read_text()

    reference = (site / "reference/index.html").read_text()
    for name in ("isolated", "Isolator", "isolated_map", "ChildCrashed", "CallReport"):
        assert f'id="aioisolate.{name}"' in reference, name
    assert "Run <code>func(*args)</code> in a forked child process" in reference
