"""Every Python block in the README and docs/ runs, so the docs cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

# The snippets do not depend on the watcher: run them once.
pytestmark = pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)

SNIPPETS = [
    pytest.param(code, id=f"{page.relative_to(ROOT)}#{n}")
    for page in PAGES
    for n, code in enumerate(BLOCK.findall(page.read_text()), 1)
]


def test_there_are_snippets() -> None:
    assert SNIPPETS


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)
