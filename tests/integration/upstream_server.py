"""A tiny OpenAI-compatible server for the upstream engine's tests and benchmark.

It answers `POST /v1/chat/completions` at once with a chat completion that
repeats the last message, and counts every request by that message's text,
so a test can tell which requests were sent twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


class CountingUpstream:
    """The server's state: what it received and answered, and an optional hook per request.

    `on_request(n)` runs before the n-th request (1-based) is answered; a
    test uses it to hold requests, or to kill the emulator half-way.
    """

    def __init__(self, on_request: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.received: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self.on_request = on_request
        #: the body of every request, in order of arrival
        self.bodies: list[dict[str, Any]] = []
        self._total = 0

    @property
    def total(self) -> int:
        """Requests received so far."""
        return self._total

    async def chat(self, request: Request) -> Response:
        try:
            body: dict[str, Any] = await request.json()
        except ClientDisconnect:  # the client died mid-request (a test killed it): nothing was asked
            return Response(status_code=499)
        text = str(body["messages"][-1]["content"])
        self.bodies.append(body)
        self.received[text] += 1
        self._total += 1
        if self.on_request is not None:
            await self.on_request(self._total)
        self.answered[text] += 1
        words = len(text.split())
        return JSONResponse(
            {
                "id": f"chatcmpl-upstream-{self._total}",
                "object": "chat.completion",
                "created": 1_764_100_000,
                "model": body.get("model", "upstream-model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"upstream: {text}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": words, "completion_tokens": words + 1, "total_tokens": 2 * words + 1},
            }
        )

    def app(self) -> Starlette:
        """The ASGI app (serve it with `serve_emulator`)."""
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])


class Hold:
    """An `on_request` hook that holds every request after the first `after` until released."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.reached = anyio.Event()
        self.released = anyio.Event()

    async def __call__(self, number: int) -> None:
        if number > self.after:
            self.reached.set()
            await self.released.wait()
