from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import anyio
import psutil
import pytest
from helpers import Channel, Gate

import aioisolate
from aioisolate._watch import ENV_VAR

# Every backend the library supports; tests marked anyio run on each.
BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param  # type: ignore[no-any-return]


# Modules whose tests also run in zygote mode: their isolated calls go through a zygote.
BOTH_MODES = "both_modes"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{BOTH_MODES}: run the module's tests in zygote mode too (see child_watcher)"
    )
    config.addinivalue_line(
        "markers", "fork_only(reason): a test of fork mode alone, in a module marked both_modes"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test runs through both ways of watching a child (the thread one is the fallback)
    and, in modules marked both_modes, in zygote mode as well: the "zygote" variant."""
    if "child_watcher" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if "child_watcher" in (names.split(",") if isinstance(names, str) else names):
            return  # the test chose its variants
    variants = ["pidfd", "thread"]
    marked = metafunc.definition.get_closest_marker(BOTH_MODES) is not None
    if marked and metafunc.definition.get_closest_marker("fork_only") is None:
        variants.append("zygote")
    metafunc.parametrize("child_watcher", variants, indirect=True)


@pytest.fixture(autouse=True)
def child_watcher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's variant: pidfd or thread watcher in fork mode, or zygote mode."""
    variant: str = request.param
    if variant == "zygote":
        monkeypatch.setenv(ENV_VAR, "pidfd")
        zygote: aioisolate.Zygote = request.getfixturevalue("session_zygote")
        _route_through(zygote, request.module, monkeypatch)
    else:
        monkeypatch.setenv(ENV_VAR, variant)
    return variant


def _route_through(
    zygote: aioisolate.Zygote, module: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make the test module's isolated calls zygote-mode calls (the names it imported)."""
    for name in ("isolated", "isolated_with_report", "isolated_iter", "isolated_map"):
        if hasattr(module, name):
            monkeypatch.setattr(
                module, name, functools.partial(getattr(aioisolate, name), zygote=zygote)
            )
    if hasattr(module, "Isolator"):

        class ZygoteIsolator(aioisolate.Isolator):
            def __init__(self, **options: Any) -> None:
                if "mode" not in options and "zygote" not in options:
                    options["zygote"] = zygote
                super().__init__(**options)

        monkeypatch.setattr(module, "Isolator", ZygoteIsolator)


@pytest.fixture(scope="session")
def session_zygote(request: pytest.FixtureRequest) -> Iterator[aioisolate.Zygote]:
    """One zygote for the whole run, its helper preloaded with the modules of the tests that
    use it (each child would import them again otherwise)."""
    modules = sorted(
        {
            item.module.__name__
            for item in request.session.items
            if isinstance(item, pytest.Function) and item.get_closest_marker(BOTH_MODES)
        }
    )
    zygote = aioisolate.Zygote(preload=["helpers", "trio", "uvloop", *modules])
    anyio.run(zygote.__aenter__)
    yield zygote
    anyio.run(zygote.aclose)


def _start_uvloop_once() -> None:
    # libuv opens a process-wide pipe pair with its first loop and keeps it until exit; open
    # it now so that the per-test fd check below does not see it as a leak.
    import uvloop

    uvloop.new_event_loop().close()


_start_uvloop_once()


def _open_fds() -> list[str]:
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{name}"))
        except FileNotFoundError:
            pass  # the fd listdir itself used
    return sorted(fds)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest, child_watcher: str) -> Iterator[None]:
    """Fail any test that leaves a child process (zombie or not) or a file descriptor behind;
    in zygote mode, in the helper process too."""
    me = psutil.Process()
    children_before = {p.pid for p in me.children()}
    fds_before = _open_fds()
    helper = None
    if child_watcher == "zygote":
        zygote: aioisolate.Zygote = request.getfixturevalue("session_zygote")
        helper = psutil.Process(zygote.pid)
        helper_fds = helper.num_fds()
    yield
    new_children = [p for p in me.children() if p.pid not in children_before]
    assert not new_children, f"children left behind: {new_children}"
    fds_after = _open_fds()
    assert fds_after == fds_before, "file descriptors leaked or closed by the test"
    if helper is not None:
        assert helper.children() == [], "the zygote left children behind"
        assert helper.num_fds() == helper_fds, "the zygote leaked file descriptors"


@pytest.fixture
def channel() -> Iterator[Channel]:
    ch = Channel()
    yield ch
    ch.close()


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.close()
