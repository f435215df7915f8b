from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest
from helpers import Channel, Gate

from aioisolate._platform import ENV_VAR

# Every backend the library supports; tests marked anyio run on each.
BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=["pidfd", "thread"], autouse=True)
def child_watcher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test through both ways of watching a child (the thread one is the fallback)."""
    monkeypatch.setenv(ENV_VAR, request.param)
    return request.param  # type: ignore[no-any-return]


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
def no_leaks() -> Iterator[None]:
    """Fail any test that leaves a child process (zombie or not) or a file descriptor behind."""
    me = psutil.Process()
    children_before = {p.pid for p in me.children()}
    fds_before = _open_fds()
    yield
    new_children = [p for p in me.children() if p.pid not in children_before]
    assert not new_children, f"children left behind: {new_children}"
    fds_after = _open_fds()
    assert fds_after == fds_before, "file descriptors leaked or closed by the test"


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
