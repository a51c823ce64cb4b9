"""Scripted HTTP servers for the wire tests of every dialect (httpx.MockTransport and friends)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from typing import Any

import httpx

Handler = Callable[[httpx.Request], httpx.Response]


class FakeApi:
    """Answers each request from a script of handlers keyed by (method, path); records requests."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.bodies: list[bytes] = []
        #: when False, request bodies are drained and only their sizes kept (memory tests)
        self.keep_bodies = True
        self.body_sizes: list[int] = []
        self.script: dict[tuple[str, str], list[Handler]] = {}

    def on(self, method: str, path: str, *handlers: Handler) -> None:
        self.script.setdefault((method, path), []).extend(handlers)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.keep_bodies:
            self.bodies.append(await request.aread())
            self.body_sizes.append(len(self.bodies[-1]))
        else:
            assert isinstance(request.stream, httpx.AsyncByteStream)
            self.body_sizes.append(sum([len(chunk) async for chunk in request.stream]))
        self.requests.append(request)
        queue = self.script.get((request.method, request.url.path))
        if not queue:
            return httpx.Response(404, json={"error": f"no script for {request.method} {request.url.path}"})
        handler = queue.pop(0) if len(queue) > 1 else queue[0]
        return handler(request)

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]


def answer(status: int, **kwargs: Any) -> Handler:
    return lambda request: httpx.Response(status, **kwargs)


def raise_(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def form_parts(request: httpx.Request, body: bytes) -> list[EmailMessage]:
    """The parts of a multipart/form-data body."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=default_policy).parsebytes(head + body)
    assert isinstance(message, EmailMessage)
    return list(message.iter_parts())  # type: ignore[arg-type]


class BrokenStream(httpx.AsyncByteStream):
    """A body that breaks off after `cut` bytes, as a dropped connection does."""

    def __init__(self, data: bytes, cut: int) -> None:
        self.data, self.cut = data, cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data[: self.cut]
        raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")


class StreamingTransport(httpx.AsyncBaseTransport):
    """Like MockTransport, but does not read the whole request body before the handler."""

    def __init__(self, handler: FakeApi) -> None:
        self.handler = handler

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.handler(request)
