"""Request bodies the emulator will take: a size cap on every body, and JSON it can parse safely.

`BodyLimitMiddleware` answers 413 to a body over the cap: at once when its
`Content-Length` says so (nothing of it is read), or, for a body that does not
declare its length (chunked), as soon as the bytes read pass the cap (nothing
is buffered beyond what the route itself holds). `read_json` reads a small
JSON body (at most `MAX_JSON_BODY_BYTES`) and `parse_json` parses it: invalid
JSON, or nesting deeper than `batchd.jsonl.MAX_JSON_DEPTH`, raise `BadJson`
(a ValueError), which the routes answer with 400 in their dialect's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd.jsonl import MAX_JSON_DEPTH, loads
from batchd.models import PROVIDER_LIMITS, REQUEST_BODY_SLACK

log = structlog.get_logger()

#: The cap on a request body unless told otherwise: the largest batch input either dialect accepts
#: (OpenAI's 200 MB) plus room for a multipart form around it.
DEFAULT_MAX_BODY_BYTES = max(limits.max_bytes for limits in PROVIDER_LIMITS.values()) + REQUEST_BODY_SLACK
#: The cap on a JSON request body (a batch create, a fault): parsed JSON takes many times its size
#: in memory, and no legitimate one comes near this.
MAX_JSON_BODY_BYTES = 1 << 20


class BodyTooLarge(Exception):
    """A request body passed its cap; `BodyLimitMiddleware` answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than {limit} bytes")
        self.limit = limit


class BadJson(ValueError):
    """A JSON body (or input line) that cannot be parsed, or is nested too deeply."""


def _too_deep(value: Any, max_depth: int) -> bool:
    """Whether arrays and objects nest deeper than `max_depth` (a scalar is 0 deep, `[]` and `{}` 1).

    Iterative, so no depth of input can exhaust the interpreter's stack.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def parse_json(data: bytes | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse one JSON document; raise BadJson if it is invalid or nested deeper than `max_depth`."""
    try:
        value = loads(data)
    except RecursionError:
        # The standard library's parser (the fallback for what orjson refuses) on very deep input.
        raise BadJson(f"nested deeper than {max_depth} levels") from None
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise BadJson("not valid JSON") from None
    raw = data.encode() if isinstance(data, str) else data
    # Counting brackets is cheap and settles almost every document without walking it.
    if isinstance(value, dict | list) and raw.count(b"[") + raw.count(b"{") > max_depth and _too_deep(value, max_depth):
        raise BadJson(f"nested deeper than {max_depth} levels")
    return value


def _is_number(text: str) -> bool:
    # isdigit() alone also takes "²" and other digits int() refuses.
    return text.isascii() and text.isdigit()


async def read_json(request: Request, *, limit: int = MAX_JSON_BODY_BYTES, empty: Any = None) -> Any:
    """The request's JSON body; BodyTooLarge past `limit` bytes (unread if declared), BadJson if malformed.

    With `empty` given, an empty body stands for that value instead of being malformed.
    """
    declared = request.headers.get("content-length", "")
    if _is_number(declared) and int(declared) > limit:
        raise BodyTooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit)
    if empty is not None and not body:
        return empty
    return parse_json(bytes(body))


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if _is_number(text) else None
    return None


class BodyLimitMiddleware:
    """Answers 413 (with `Connection: close`) to a body over `max_bytes`, never holding more of it.

    `refuse(path, limit)` builds the answer in the shape of the path's dialect. A
    `BodyTooLarge` raised by a route (`read_json`'s own smaller cap) gets the
    same answer. Pure ASGI, so bodies within the cap still stream.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, refuse: Callable[[str, int], Response]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(scope, receive, send, self.max_bytes, declared)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if started:
                        # Too late for a 413: the route sees the client go away instead.
                        return {"type": "http.disconnect"}
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except* BodyTooLarge as group:
            if started:
                raise
            limit = min(exc.limit for exc in group.exceptions if isinstance(exc, BodyTooLarge))
            await self._too_large(scope, receive, send, limit, declared)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, limit: int, declared: int | None) -> None:
        log.info("emulator.body_too_large", method=scope["method"], path=scope["path"], limit=limit, declared=declared)
        response = self.refuse(scope["path"], limit)
        # The rest of the body is never read: closing is the only way to be done with it (uvicorn
        # would otherwise read and discard all of it to reuse the connection).
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
