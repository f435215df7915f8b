"""The house: one concept per module, small modules, and imports that only run downward.

Read from the source, not by importing it: what a module imports at its top level (not under
``TYPE_CHECKING``, not inside a function) is what loading it costs and what it depends on.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aioisolate"

# One run is enough: nothing here forks.
pytestmark = pytest.mark.parametrize("child_watcher", ["pidfd"], indirect=True)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements that run when the module loads (branches and try blocks included)."""
    found: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue
            found += _top_level(node.body) + _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            found += _top_level(node.body)
            for handler in node.handlers:
                found += _top_level(handler.body)
            found += _top_level(node.orelse) + _top_level(node.finalbody)
        else:
            found.append(node)
    return found


def imports_of(name: str) -> tuple[set[str], set[str]]:
    """The package's modules and the outside top-level packages that ``name`` imports as it
    loads."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    ours: set[str] = set()
    outside: set[str] = set()
    for node in _top_level(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("aioisolate"):
                    ours.add(alias.name)
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("aioisolate"):
                    ours.add(node.module)
                elif node.module:
                    outside.add(node.module.split(".")[0])
                continue
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join([*base, node.module] if node.module else base)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                ours.add(sub if sub in MODULES else target)
    ours.discard(name)
    return {m for m in ours if m in MODULES}, outside


def closure(name: str) -> tuple[set[str], set[str]]:
    """Every module of ours, and every outside package, that loading ``name`` loads."""
    seen: set[str] = set()
    outside: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        # Importing a submodule runs its packages' __init__ first.
        parents = [current.rsplit(".", n)[0] for n in range(1, current.count(".") + 1)]
        ours, theirs = imports_of(current)
        outside |= theirs
        pending += [*ours, *(p for p in parents if p in MODULES and p != "aioisolate")]
    return seen, outside


def test_no_import_runs_back_up() -> None:
    """The modules' imports form no cycle: every module depends only on modules below it."""
    graph = {name: imports_of(name)[0] for name in MODULES}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = "open"
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                pytest.fail(f"an import runs back up: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        path.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_lifecycle_knows_spawners_only_through_the_seam() -> None:
    ours, _ = imports_of("aioisolate._call")
    assert not {m for m in ours if "zygote" in m}
    assert "aioisolate._spawn" in ours
    for spawner in ("aioisolate._spawn.fork", "aioisolate._spawn.zygote"):
        others = {m for m in imports_of(spawner)[0] if m.startswith("aioisolate._spawn.")}
        assert others == {"aioisolate._spawn.base"}, spawner
    assert not {
        m for m in imports_of("aioisolate._spawn.base")[0] if m.startswith("aioisolate._spawn.")
    }


def test_the_zygote_helper_loads_no_event_loop_library_nor_thread_policy() -> None:
    # What _zygote_boot loads: the helper's own code and what its children run.
    ours, outside = closure("aioisolate._zygote_main")
    # psutil only where the system is not Linux (_linux's portable branch).
    assert outside <= set(sys.stdlib_module_names) | {"cloudpickle", "psutil"}, outside
    assert not ours & {
        "aioisolate._threads",
        "aioisolate._watch",
        "aioisolate._running",
        "aioisolate._call",
        "aioisolate._api",
        "aioisolate._options",
    }
    # The fork primitive they share stands on the standard library alone.
    ours, outside = closure("aioisolate._forking")
    assert ours == {"aioisolate._forking"}
    assert outside <= set(sys.stdlib_module_names)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_is_small_and_says_what_it_owns(name: str) -> None:
    source = MODULES[name].read_text()
    assert len(source.splitlines()) <= 450, f"{name} has grown past 450 lines: split it"
    assert ast.get_docstring(ast.parse(source)), f"{name} has no docstring"
