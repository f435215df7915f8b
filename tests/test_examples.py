"""The web service and the trio program: every outcome of an upload, in process and over a real
server, and the trio program's report."""

from __future__ import annotations

import ctypes
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
import web_service
from helpers import FORK_WARNINGS, assert_no_fork_warning

EXAMPLES = Path(__file__).parent.parent / "examples"

GOOD = b"name = Ada\nshout = @name * 3\n\ncode = %3:abcdef\n"
GOOD_FIELDS = {"name": "Ada", "shout": "AdaAdaAda", "code": "abc"}
CRASH = b"name = Ada\ncode = %99:short\n"  # a count past the end of its text
CYCLE = b"a = @b\nb = @a\n"  # aliases that never end
BOMB = b"a = lol * 100000\nb = @a * 100000\n"  # 30 GB once expanded

TIMEOUT = 0.5
MEMORY_LIMIT = "64MiB"


# uvicorn serves the app on asyncio, with uvloop when it is installed: the tests use both.
@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param  # type: ignore[no-any-return]


def service(*, timeout: float = TIMEOUT) -> httpx.AsyncClient:
    """A client of the app, served in this process."""
    app = web_service.create_app(timeout=timeout, memory_limit=MEMORY_LIMIT)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service")


async def post(body: bytes, *, timeout: float = TIMEOUT) -> httpx.Response:
    async with service(timeout=timeout) as client:
        with anyio.fail_after(30):
            return await client.post("/parse", content=body)


@pytest.mark.anyio
async def test_a_good_document_is_parsed() -> None:
    response = await post(GOOD)
    assert response.status_code == 200
    assert response.json() == {"fields": GOOD_FIELDS}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"just words\n", 422, "line 1: expected 'name = value'"),
        (b"a = @nowhere\n", 422, "a: @nowhere is not a field"),
        (b"a = %x:text\n", 422, "a: a counted string is written %N:text"),
        (b"a = x * 1234567890\n", 422, "line 1: at most 999999999 repetitions"),
        (b"a = \xff\n", 422, "the document is not UTF-8: invalid start byte at byte 4"),
        (CRASH, 500, "the parser crashed on this document (SIGSEGV)"),
        (CYCLE, 504, f"parsing took longer than {TIMEOUT} seconds"),
        (BOMB, 413, f"parsing the document needs more than {MEMORY_LIMIT}"),
        (b"x" * (web_service.MAX_UPLOAD + 1), 413, "uploads are limited to 65536 bytes"),
    ],
    ids=["syntax", "alias", "count", "repeat", "utf8", "crash", "cycle", "bomb", "too-large"],
)
async def test_a_bad_document_is_an_http_error(body: bytes, status: int, message: str) -> None:
    response = await post(body)
    assert (response.status_code, response.json()) == (status, {"error": message})


@pytest.mark.anyio
async def test_a_crash_is_logged_with_the_line_that_crashed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response = await post(CRASH)
    assert response.status_code == 500
    [record] = [r for r in caplog.records if r.name == "web_service"]
    assert "killed by SIGSEGV" in record.getMessage()
    assert "in _take_counted" in record.getMessage()  # the child's faulthandler report


@pytest.mark.anyio
async def test_the_service_stays_up_after_a_crash() -> None:
    async with service() as client:
        with anyio.fail_after(30):
            crashed = await client.post("/parse", content=CRASH)
            parsed = await client.post("/parse", content=GOOD)
            health = await client.get("/health")
    assert crashed.status_code == 500
    assert (parsed.status_code, parsed.json()) == (200, {"fields": GOOD_FIELDS})
    assert health.json() == {"status": "ok", "pid": os.getpid()}


def lift_limit_and_grow(data: bytes) -> dict[str, str]:
    """Native code that lifts its own memory limit, then holds 256 MiB until it is killed."""
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)
    buffer = ctypes.create_string_buffer(256 << 20)
    ctypes.memset(buffer, 1, 256 << 20)
    while True:
        time.sleep(60)


def raise_key_error(data: bytes) -> dict[str, str]:
    raise KeyError("a bug in the parser")


@pytest.mark.anyio
async def test_growth_caught_by_the_watchdog_is_413(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(web_service, "parse", lift_limit_and_grow)
    # A timeout far longer than the watchdog takes (it samples every 50 ms).
    response = await post(GOOD, timeout=60)
    assert response.status_code == 413
    assert response.json() == {"error": f"parsing the document needs more than {MEMORY_LIMIT}"}


@pytest.mark.anyio
async def test_another_exception_in_the_parser_is_500(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(web_service, "parse", raise_key_error)
    response = await post(GOOD)
    assert response.status_code == 500
    assert response.json() == {"error": "the parser failed on this document"}
    assert "the parser raised KeyError: 'a bug in the parser'" in caplog.text


@pytest.mark.anyio
async def test_web_service_as_a_program() -> None:
    """The real thing: uvicorn in a process of its own, which survives a crashing upload."""
    command = [sys.executable, *FORK_WARNINGS, str(EXAMPLES / "web_service.py"), "--port", "0"]
    log = ""
    log_ended = False
    log_changed = anyio.Event()
    with anyio.fail_after(60):
        async with await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        ) as server:
            assert server.stderr is not None
            stderr = server.stderr

            async def read_log() -> None:
                nonlocal log, log_ended, log_changed
                async for chunk in stderr:
                    log += chunk.decode(errors="replace")
                    log_changed.set()
                    log_changed = anyio.Event()
                log_ended = True
                log_changed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(read_log)
                try:
                    # uvicorn says where it listens once it does (--port 0: any free port).
                    while not (started := re.search(r"running on (http://\S+) ", log)):
                        assert not log_ended, log
                        await log_changed.wait()
                    async with httpx.AsyncClient(base_url=started[1]) as client:
                        crashed = await client.post("/parse", content=CRASH)
                        parsed = await client.post("/parse", content=GOOD)
                        health = await client.get("/health")
                finally:
                    server.send_signal(signal.SIGTERM)
            returncode = await server.wait()

    assert crashed.status_code == 500
    assert (parsed.status_code, parsed.json()) == (200, {"fields": GOOD_FIELDS})
    assert health.json() == {"status": "ok", "pid": server.pid}  # the same process throughout
    assert "the parser crashed: child process" in log
    assert "Finished server process" in log  # uvicorn's graceful shutdown
    assert_no_fork_warning(log)
    # uvicorn (0.29 on) raises the signal again once it has shut down, so the server ends as
    # SIGTERM's default would have ended it.
    assert returncode == -signal.SIGTERM


def test_trio_program_reports_its_calls() -> None:
    result = subprocess.run(
        [sys.executable, *FORK_WARNINGS, str(EXAMPLES / "trio_program.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert_no_fork_warning(result.stderr)
    out = result.stdout
    figures = r"child \d+: wall [\d.]+ s, cpu [\d.]+ s, peak [\d.]+ MiB"
    assert re.search(rf"primes below 20,000,000 +1,270,607   {figures}", out), out
    assert re.search(rf"index of 1,000,000 +1,000,000   {figures}", out), out
    assert "1 GiB buffer             MemoryError in the child (memory_limit=100MiB)" in out
    cancelled = re.search(
        r"endless search +cancelled by trio.move_on_after after ([\d.]+) s: "
        r"child \d+ killed and reaped",
        out,
    )
    assert cancelled, out
    assert float(cancelled[1]) >= 1.0
    assert out.endswith("children left running: 0\n")
