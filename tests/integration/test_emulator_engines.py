"""The emulator's engines: deterministic echo replies, and forwarding to an upstream server with retries."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import anyio
import httpx
import pytest

from batchd.backoff import RetryPolicy
from batchd.emulator import EchoEngine, UpstreamEngine
from batchd.emulator.engines import ECHO_CREATED
from batchd.emulator.upstream import MAX_RETRY_AFTER_S, Outcome, encode_body, retry_wait
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


class Sleeps:
    """Records backoffs instead of waiting them out."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def scripted(*answers: httpx.Response | type[Exception]) -> tuple[list[httpx.Request], httpx.MockTransport]:
    """A transport answering with `answers` in turn (the last one repeats); an exception class is raised."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen), len(answers)) - 1]
        if isinstance(answer, httpx.Response):
            return answer
        raise answer("scripted failure")

    return seen, httpx.MockTransport(handler)


@pytest.mark.parametrize("upstream_url", ["http://upstream.test", "http://upstream.test/v1/", "http://upstream.test/"])
async def test_upstream_forwards_to_the_v1_path_with_its_key(upstream_url: str) -> None:
    seen, transport = scripted(httpx.Response(200, json={"ok": True}))
    async with httpx.AsyncClient(transport=transport) as http:
        engine = UpstreamEngine(http, upstream_url, concurrency=2, api_key="upstream-key")
        status, reply = await engine.respond(BatchEndpoint.CHAT_COMPLETIONS, CHAT_BODY)
    assert (status, reply) == (200, {"ok": True})
    assert str(seen[0].url) == "http://upstream.test/v1/chat/completions"
    assert seen[0].headers["authorization"] == "Bearer upstream-key"
    assert json.loads(seen[0].content) == CHAT_BODY


async def test_upstream_retries_429_and_5xx_honouring_retry_after() -> None:
    seen, transport = scripted(
        httpx.Response(429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "7"}),
        httpx.Response(503, text="<html>overloaded</html>"),
        httpx.Response(200, json={"ok": True}),
    )
    sleeps = Sleeps()
    async with httpx.AsyncClient(transport=transport) as http:
        engine = UpstreamEngine(http, "http://upstream.test", 1, sleep=sleeps, rng=random.Random(1))
        assert await engine.respond(BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": "x"}) == (200, {"ok": True})
    assert len(seen) == 3
    # The server's advice wins over the first (at most 0.5 s) jitter draw; then plain backoff.
    assert sleeps.waits[0] == 7.0 and 0 <= sleeps.waits[1] <= 1.0


async def test_upstream_gives_up_after_bounded_attempts_with_the_last_answer() -> None:
    seen, transport = scripted(httpx.Response(500, json={"error": {"message": "boom"}}))
    sleeps = Sleeps()
    async with httpx.AsyncClient(transport=transport) as http:
        engine = UpstreamEngine(http, "http://upstream.test", 1, retry=RetryPolicy(attempts=3), sleep=sleeps)
        status, reply = await engine.respond(BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": "x"})
    assert (status, reply) == (500, {"error": {"message": "boom"}})
    assert len(seen) == 3 and len(sleeps.waits) == 2


async def test_upstream_transport_errors_are_retried_then_become_502() -> None:
    seen, transport = scripted(httpx.ConnectError, httpx.ReadTimeout, httpx.Response(200, json={"ok": True}))
    async with httpx.AsyncClient(transport=transport) as http:
        engine = UpstreamEngine(http, "http://upstream.test", 1, sleep=Sleeps())
        assert await engine.respond(BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": "x"}) == (200, {"ok": True})
    assert len(seen) == 3

    seen, transport = scripted(httpx.ConnectError)
    async with httpx.AsyncClient(transport=transport) as http:
        engine = UpstreamEngine(http, "http://upstream.test", 1, retry=RetryPolicy(attempts=2), sleep=Sleeps())
        status, reply = await engine.respond(BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": "x"})
    assert status == 502 and reply["error"]["code"] == "upstream_unavailable" and len(seen) == 2
    assert set(reply["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        (httpx.Response(200, text="<html>oops</html>"), 502),
        (httpx.Response(400, json={"error": {"message": "bad model"}}), 400),
    ],
)
async def test_upstream_does_not_retry_what_would_fail_again(answer: httpx.Response, status: int) -> None:
    seen, transport = scripted(answer)
    sleeps = Sleeps()
    async with httpx.AsyncClient(transport=transport) as http:
        got, reply = await UpstreamEngine(http, "http://upstream.test", 1, sleep=sleeps).respond(
            BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": "x"}
        )
    assert got == status and set(reply["error"]) >= {"message"}
    assert len(seen) == 1 and sleeps.waits == []


def test_retry_wait_is_a_pure_decision() -> None:
    policy = RetryPolicy(attempts=3, base_s=1.0, cap_s=4.0)
    rng = random.Random(0)
    busy = Outcome(429, {}, retryable=True, retry_after=1000.0)
    assert retry_wait(policy, 1, busy, rng) == MAX_RETRY_AFTER_S
    assert retry_wait(policy, 3, busy, rng) is None
    assert retry_wait(policy, 1, Outcome(400, {}, retryable=False), rng) is None
    assert 0 <= (retry_wait(policy, 2, Outcome(500, {}, retryable=True), rng) or -1) <= 2.0


async def test_a_backoff_does_not_hold_a_concurrency_slot() -> None:
    """With one slot, a request waiting out a 429 lets another one through meanwhile."""
    order: list[str] = []
    backing_off = anyio.Event()
    other_done = anyio.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        order.append(prompt)
        if prompt == "first" and order.count("first") == 1:
            return httpx.Response(429, json={"error": {"message": "later"}})
        return httpx.Response(200, json={"prompt": prompt})

    async def sleep(seconds: float) -> None:
        backing_off.set()
        await other_done.wait()

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        engine = UpstreamEngine(http, "http://upstream.test", concurrency=1, sleep=sleep)

        async def second() -> None:
            await backing_off.wait()
            await engine.respond(BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": "second"})
            other_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            status, _ = await engine.respond(BatchEndpoint.COMPLETIONS, {"model": "m", "prompt": "first"})
    assert status == 200 and order == ["first", "second", "first"]


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


def test_a_body_is_sent_as_compact_json_and_past_64_bits_as_httpx_would() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "naïve ☃"}], "seed": 7}
    assert json.loads(encode_body(body)) == body
    assert encode_body(body) == json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    huge = {"model": "m", "prompt": "x", "n": 2**70}
    assert encode_body(huge) == b'{"model":"m","prompt":"x","n":1180591620717411303424}'
