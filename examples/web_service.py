"""A web service that parses untrusted uploads in isolated children (Starlette on asyncio).

``POST /parse`` takes a document as the request body and parses it in a forked child, with a
timeout, a memory limit, the safe codec and the sandbox options that need no root. The parser
misbehaves on hostile input the way C parsers do: it can crash, loop forever or allocate
without bound. Each of those ends the child, never the service, and comes back as an HTTP
error; the next upload is parsed as usual. ``GET /health`` answers while the service is up.

    python examples/web_service.py --port 8000
    curl --data-binary $'name = Ada\\nshout = @name * 3' localhost:8000/parse

The document format, one field a line, ``name = value``, where the value is one of:

    text          the text itself
    %N:text       a counted string: the first N characters of text
    @other        the value of another field (an alias)
    VALUE * N     any of the above, repeated N times
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import re

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aioisolate import (
    CallOptions,
    ChildCrashed,
    IsolationError,
    IsolationTimeout,
    MemoryLimitExceeded,
    ProtocolError,
    RemoteError,
    isolated,
)

logger = logging.getLogger("web_service")

MAX_UPLOAD = 64 << 10  # bytes; larger bodies are refused before anything is forked
_REPEAT = re.compile(r"(?P<base>.*?)\s*\*\s*(?P<count>\d+)")


class ParseError(ValueError):
    """The document is not valid: the client's mistake, reported as 422."""


# The child's exceptions arrive as RemoteError with the safe codec: this is how one of ours is
# named (the module is "__main__" when this file runs as a program, in the child as here).
PARSE_ERROR = f"{ParseError.__module__}.{ParseError.__qualname__}"


def parse(data: bytes) -> dict[str, str]:
    """Parse a document into its fields. Meant to run isolated: hostile input can crash it,
    make it loop forever, or make it allocate without bound."""
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ParseError(f"the document is not UTF-8: {exc.reason} at byte {exc.start}") from None
    fields: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, equals, value = (part.strip() for part in line.partition("="))
        if not equals or not name.isidentifier():
            raise ParseError(f"line {number}: expected 'name = value'")
        repeated = _REPEAT.fullmatch(value)
        if repeated is None:
            fields[name] = (value, 1)
        elif len(repeated["count"]) > 9:
            raise ParseError(f"line {number}: at most 999999999 repetitions")
        else:
            fields[name] = (repeated["base"], int(repeated["count"]))
    return {name: _resolve(fields, name) for name in fields}


def _resolve(fields: dict[str, tuple[str, int]], name: str) -> str:
    base, count = fields[name]
    # Aliases are followed with no record of where the chain has been, so a cycle
    # (a = @b, b = @a) never ends: the kind of bug the timeout is for.
    while base.startswith("@"):
        target = base[1:]
        if target not in fields:
            raise ParseError(f"{name}: @{target} is not a field")
        base, times = fields[target]
        # Repetitions multiply along the chain, unchecked: a few short lines can ask for
        # gigabytes (as in a "billion laughs" XML bomb), the kind the memory limit is for.
        count *= times
    if base.startswith("%"):
        declared, colon, rest = base[1:].partition(":")
        if not colon or not declared.isdigit():
            raise ParseError(f"{name}: a counted string is written %N:text")
        base = _take_counted(rest, int(declared))
    return base * count


def _take_counted(text: str, declared: int) -> str:
    """The first ``declared`` characters of ``text``, trusting the count as a C parser might."""
    if declared > len(text):
        # A C parser that copies the declared length reads past the end of its buffer and can
        # crash the process; reading address 0 stands in for that crash, reliably (SIGSEGV).
        ctypes.string_at(0)
    return text[:declared]


# How the parser runs: every option here is about the upload being hostile.
PARSER_OPTIONS: CallOptions = {
    # The result is decoded as plain data: input that took over the parser through a memory
    # bug could otherwise send a pickle that runs code in this process.
    "codec": "safe",
    # The crash report (faulthandler) goes to the log, not to the service's stderr or client.
    "stderr": "capture",
    "stdout": "discard",
    # The child would otherwise hold the listening socket and every client's connection.
    "close_fds": True,
    "env": {},  # no secrets from the environment
    "no_new_privs": True,  # no setuid programs
    # user= and network=False would close more gaps (docs/security.md), but they need root.
}


def create_app(*, timeout: float = 2.0, memory_limit: str = "128MiB") -> Starlette:
    """The service, with the parser's wall-clock and memory limits per upload."""
    options: CallOptions = {**PARSER_OPTIONS, "timeout": timeout, "memory_limit": memory_limit}

    async def parse_upload(request: Request) -> JSONResponse:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD:
                return _error(413, f"uploads are limited to {MAX_UPLOAD} bytes")
        # Uploads beyond the limiter's tokens (one per CPU) wait for a free one; the timeout
        # counts from the fork, so that wait is not charged to the document.
        try:
            fields = await isolated(parse, bytes(body), **options)
        except RemoteError as exc:
            # The message comes from the child, which the upload may control: keep it short.
            message = exc.message[:200]
            if exc.type_name == PARSE_ERROR:
                # 422: the request is well-formed HTTP but its content is not a valid document.
                return _error(422, message)
            if exc.type_name == "MemoryError":
                # The child's own limit refused an allocation. 413: the document is too large
                # once expanded, and sending it again will not help.
                return _error(413, f"parsing the document needs more than {memory_limit}")
            logger.error("the parser raised %s: %s", exc.type_name, message)
            return _error(500, "the parser failed on this document")
        except MemoryLimitExceeded:
            # The same as above, caught by the parent's watchdog instead of the child's limit.
            return _error(413, f"parsing the document needs more than {memory_limit}")
        except IsolationTimeout:
            # 504, not 408: 408 means the client was too slow to send the request, while here
            # the parser, an upstream of this handler, did not answer in time.
            return _error(504, f"parsing took longer than {timeout} seconds")
        except ChildCrashed as exc:
            # A parser must reject bad input, never crash on it: this is our bug, hence 500,
            # and the crash report goes to the log for us. The service itself is untouched.
            logger.error("the parser crashed: %s", exc)
            how = exc.signal.name if exc.signal is not None else f"exit code {exc.exitcode}"
            return _error(500, f"the parser crashed on this document ({how})")
        except ProtocolError as exc:
            # The child sent garbage, or a result larger than the service accepts: refused.
            logger.error("the parser's answer was refused: %s", exc)
            return _error(500, "the parser failed on this document")
        except IsolationError as exc:
            # No fork possible, an unencodable result.
            logger.error("the parse failed: %s", exc)
            return _error(500, "the parser failed on this document")
        return JSONResponse({"fields": fields})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "pid": os.getpid()})

    return Starlette(
        routes=[
            Route("/parse", parse_upload, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
        ]
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def main() -> None:
    import uvicorn  # only the program needs a server; tests call the app directly

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 for any free port")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per parse")
    parser.add_argument("--memory-limit", default="128MiB", help="per parse")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app = create_app(timeout=args.timeout, memory_limit=args.memory_limit)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
