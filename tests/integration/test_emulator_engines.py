"""The emulator's engines: deterministic echo replies, and forwarding to an upstream server."""

from __future__ import annotations

import json
import math
from typing import Any

import anyio
import httpx
import pytest

from batchd.emulator import EchoEngine, UpstreamEngine
from batchd.emulator.engines import ECHO_CREATED
from batchd.models import BatchEndpoint

CHAT_BODY: dict[str, Any] = {
    "model": "m",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "question"}]},
    ],
}


async def test_echo_chat_is_deterministic_and_plausible() -> None:
    engine = EchoEngine()
    status, reply = await engine.respond(BatchEndpoint.CHAT_COMPLETIONS, CHAT_BODY)
    assert (status, reply) == await EchoEngine().respond(BatchEndpoint.CHAT_COMPLETIONS, CHAT_BODY)
    assert status == 200 and reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["created"] == ECHO_CREATED and reply["model"] == "m"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "echo: second question"}
    assert reply["usage"] == {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}


async def test_echo_completions_and_embeddings() -> None:
    engine = EchoEngine()
    status, reply = await engine.respond(BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": ["a b", "c"]})
    assert status == 200 and reply["object"] == "text_completion"
    assert [c["text"] for c in reply["choices"]] == ["echo: a b", "echo: c"]
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]

    body = {"model": "m", "input": ["same", "same", "other"], "dimensions": 40}
    status, reply = await engine.respond(BatchEndpoint.EMBEDDINGS, body)
    vectors = [item["embedding"] for item in reply["data"]]
    assert status == 200 and reply["object"] == "list" and [d["index"] for d in reply["data"]] == [0, 1, 2]
    assert vectors[0] == vectors[1] != vectors[2] and len(vectors[0]) == 40
    assert math.isclose(math.fsum(v * v for v in vectors[0]), 1.0, abs_tol=1e-4)
    assert set(reply["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (BatchEndpoint.CHAT_COMPLETIONS, {"messages": [{"role": "user", "content": "x"}]}),
        (BatchEndpoint.CHAT_COMPLETIONS, {"model": "m", "messages": []}),
        (BatchEndpoint.COMPLETIONS, {"model": "m"}),
        (BatchEndpoint.EMBEDDINGS, {"model": "m", "input": ""}),
        (BatchEndpoint.EMBEDDINGS, {"model": "m", "input": "x", "dimensions": 0}),
    ],
)
async def test_echo_refuses_malformed_requests_with_400(endpoint: str, body: dict[str, Any]) -> None:
    status, reply = await EchoEngine().respond(endpoint, body)
    assert status == 400 and set(reply["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("upstream_url", ["http://upstream.test", "http://upstream.test/v1/", "http://upstream.test/"])
async def test_upstream_forwards_to_the_v1_path(upstream_url: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(429, json={"error": {"message": "slow down"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        engine = UpstreamEngine(http, upstream_url, concurrency=2)
        status, reply = await engine.respond(BatchEndpoint.CHAT_COMPLETIONS, CHAT_BODY)
    assert (status, reply) == (429, {"error": {"message": "slow down"}})
    assert str(seen[0].url) == "http://upstream.test/v1/chat/completions"
    assert json.loads(seen[0].content) == CHAT_BODY


async def test_upstream_failures_become_502() -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    def not_json(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>oops</html>")

    for handler in (unreachable, not_json):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            status, reply = await UpstreamEngine(http, "http://upstream.test", 1).respond(
                BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": "x"}
            )
        assert status == 502 and set(reply["error"]) == {"message", "type", "param", "code"}


async def test_upstream_bounds_concurrency() -> None:
    active = 0
    peak = 0
    two_in = anyio.Event()
    release = anyio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == 2:
            two_in.set()
        await release.wait()
        active -= 1
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        engine = UpstreamEngine(http, "http://upstream.test", concurrency=2)
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(engine.respond, BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": "x"})
            await two_in.wait()
            release.set()
    assert peak == 2
