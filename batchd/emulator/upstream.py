"""The upstream engine: each request of a batch goes to a real OpenAI-compatible server.

Anthropic's Messages and Gemini's GenerateContent requests are translated to chat completions and
their answers back (messages.py and gemini_content.py say why and what translates).

vLLM, llama.cpp's server, Ollama or a hosted real-time API answer
`POST {upstream}/v1/chat/completions` (…) one request at a time; this engine
turns them into a Batch API. Requests go out at most `concurrency` at once;
429, 5xx and transport errors are retried with full-jitter backoff that
honours `Retry-After`, a bounded number of times, and the last answer (or a
502 for a server that never answered) lands in the batch's error file like any
other failure. Durability is the worker's: every answer is recorded in the
batch's spool as it arrives, so a restart does not send answered requests again.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import orjson
import structlog

from batchd.backoff import RetryPolicy, is_retryable_status, retry_after_s, retry_wait_s
from batchd.emulator import gemini_content
from batchd.emulator.answers import anthropic_error_body
from batchd.emulator.bodies import BadJson, parse_json
from batchd.emulator.google_errors import google_error_body
from batchd.emulator.messages import from_chat, message_params_problem, to_chat, upstream_error_message
from batchd.emulator.triggers import openai_error_body
from batchd.models import BatchEndpoint

log = structlog.get_logger()

#: Attempts per request (the first included) and the backoff between them.
UPSTREAM_RETRY = RetryPolicy(attempts=5, base_s=0.5, cap_s=30.0)
#: A longer Retry-After is cut to this: a batch should not stall for hours on one answer.
MAX_RETRY_AFTER_S = 300.0


def upstream_base(upstream_url: str) -> str:
    """The server root of an OpenAI-compatible URL given with or without a trailing /v1."""
    base = upstream_url.rstrip("/")
    return base.removesuffix("/v1")


@dataclass(frozen=True)
class Outcome:
    """One attempt's result: what the batch would record, and whether to try again."""

    status: int
    body: dict[str, Any]
    retryable: bool
    #: the server's advice, in seconds
    retry_after: float | None = None


def retry_wait(
    policy: RetryPolicy,
    attempt: int,
    outcome: Outcome,
    rng: random.Random,
    *,
    max_retry_after: float = MAX_RETRY_AFTER_S,
) -> float | None:
    """Seconds to wait before trying again after attempt number `attempt`, or None to keep `outcome`.

    Full-jitter backoff, raised to the server's `Retry-After` (capped at
    `max_retry_after`).
    """
    if not outcome.retryable or attempt >= policy.attempts:
        return None
    return retry_wait_s(policy, attempt, rng, retry_after=outcome.retry_after, retry_after_cap_s=max_retry_after)


class UpstreamEngine:
    """Forwards every request to an OpenAI-compatible server, at most `concurrency` at a time.

    The `http` client is owned by the caller (it sets timeouts and closes
    it). `api_key` is sent as a bearer token when given. `retry` bounds the
    attempts per request; `sleep` and `rng` are injectable so tests record
    backoffs instead of waiting. A slot is held only while a request is on
    the wire, never during a backoff.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        upstream_url: str,
        concurrency: int,
        *,
        api_key: str | None = None,
        retry: RetryPolicy = UPSTREAM_RETRY,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._http = http
        self._base = upstream_base(upstream_url)
        self._concurrency = concurrency
        # The body goes out as JSON bytes made here (content=), so its content type is ours to say.
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        #: each endpoint's URL, parsed once
        self._urls: dict[str, httpx.URL] = {}
        self._retry = retry
        self._sleep = sleep
        self._rng = rng or random.Random()
        # Created on first use: anyio primitives need a running event loop.
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def concurrency(self) -> int:
        """Requests this engine sends at once (the worker dispatches no more than that per batch)."""
        return self._concurrency

    async def respond(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST `body` to `{upstream}{endpoint}` (retrying what may succeed later); its status and JSON body."""
        if endpoint == BatchEndpoint.MESSAGES:
            return await self._message(body)
        if endpoint == BatchEndpoint.GENERATE_CONTENT:
            return await self._generate(body)
        return await self._forward(endpoint, body)

    async def _message(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A Messages request, answered by the upstream's chat completions (translated both ways)."""
        problem = message_params_problem(params)
        if problem is not None:
            return 400, anthropic_error_body(400, problem)
        status, reply = await self._forward(BatchEndpoint.CHAT_COMPLETIONS, to_chat(params))
        if 200 <= status < 300:
            return status, from_chat(reply, str(params["model"]))
        return status, anthropic_error_body(status, upstream_error_message(reply, status))

    async def _generate(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A GenerateContent request, answered by the upstream's chat completions (translated both ways)."""
        problem = gemini_content.generate_content_problem(request)
        if problem is not None:
            return 400, google_error_body(400, problem)
        chat = gemini_content.to_chat(request)
        status, reply = await self._forward(BatchEndpoint.CHAT_COMPLETIONS, chat)
        if 200 <= status < 300:
            return status, gemini_content.from_chat(reply, gemini_content.model_name(request))
        return status, google_error_body(status, upstream_error_message(reply, status))

    async def _forward(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = httpx.URL(f"{self._base}{endpoint}")
        content = encode_body(body)
        attempt = 0
        while True:
            attempt += 1
            outcome = await self._attempt(url, content)
            wait = retry_wait(self._retry, attempt, outcome, self._rng)
            if wait is None:
                return outcome.status, outcome.body
            log.info(
                "emulator.upstream.retry", url=str(url), status=outcome.status, attempt=attempt, wait_s=round(wait, 3)
            )
            await self._sleep(wait)

    async def _attempt(self, url: httpx.URL, content: bytes) -> Outcome:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._concurrency)
        limiter = self._limiter
        # A free slot is taken at once: anyio's acquire goes round the event loop even then.
        try:
            limiter.acquire_nowait()
        except anyio.WouldBlock:
            await limiter.acquire()
        try:
            response = await self._http.post(url, content=content, headers=self._headers)
        except httpx.HTTPError as exc:
            log.warning("emulator.upstream.unreachable", url=str(url), error=type(exc).__name__)
            message = f"upstream request failed: {type(exc).__name__}: {exc}"
            error = openai_error_body(502, message, code="upstream_unavailable")
            # A transport failure (refused, reset, timed out) may pass; a malformed URL will not.
            return Outcome(502, error, retryable=isinstance(exc, httpx.TransportError))
        finally:
            limiter.release()
        retryable = is_retryable_status(response.status_code)
        # Only an answer that is retried has its advice read.
        retry_after = retry_after_s(response.headers, now=datetime.now(UTC)) if retryable else None
        try:
            payload = parse_json(response.content)
        except BadJson:  # not JSON, or nested too deeply to parse safely
            payload = None
        if not isinstance(payload, dict):
            log.warning("emulator.upstream.bad_body", url=str(url), status=response.status_code)
            message = f"upstream answered {response.status_code} without a JSON object"
            error = openai_error_body(502, message, code="upstream_bad_response")
            return Outcome(502, error, retryable, retry_after)
        return Outcome(response.status_code, payload, retryable, retry_after)


def encode_body(body: dict[str, Any]) -> bytes:
    """A request body as JSON bytes, by orjson (several times faster than httpx's json.dumps, the
    largest cost of a request after httpx's own); what orjson refuses (integers past 64 bits)
    as httpx would encode it."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
