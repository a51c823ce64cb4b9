"""Engines answer the requests of a batch, one request at a time.

`EchoEngine` is deterministic and offline (demos and tests): the same request
always gets the same reply, byte for byte. `UpstreamEngine` (in `upstream.py`)
forwards each request to a real OpenAI-compatible server (vLLM, llama.cpp,
Ollama, …).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Protocol

import structlog

from batchd.emulator import gemini_content
from batchd.emulator.answers import anthropic_error_body
from batchd.emulator.google_errors import google_error_body
from batchd.emulator.messages import message_params_problem
from batchd.emulator.triggers import openai_error_body
from batchd.emulator.upstream import UpstreamEngine, upstream_base
from batchd.models import BatchEndpoint

log = structlog.get_logger()

__all__ = ["ECHO_CREATED", "EchoEngine", "Engine", "UpstreamEngine", "upstream_base"]


class Engine(Protocol):
    """Answers one request of a batch."""

    async def respond(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Return the HTTP status and JSON body the endpoint would answer for `body`."""
        ...


#: `created` of every echo reply: a fixed instant, so replies never depend on the wall clock.
ECHO_CREATED = 1_764_100_000
#: Length of an echo embedding unless the request asks for `dimensions`.
ECHO_EMBEDDING_DIMENSIONS = 16
_MAX_DIMENSIONS = 4096


def _digest(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    """The text of a chat message's content: a string, or a list of parts with `text`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _bad_request(message: str, param: str) -> tuple[int, dict[str, Any]]:
    body = openai_error_body(400, message)
    body["error"]["param"] = param
    return 400, body


def _embedding(text: str, dimensions: int) -> list[float]:
    """A unit vector derived from sha256(text): same text, same vector."""
    raw = b""
    counter = 0
    while len(raw) < dimensions:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [byte / 127.5 - 1.0 for byte in raw[:dimensions]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


class EchoEngine:
    """Deterministic offline replies; tokens are counted as whitespace-separated words."""

    def __init__(self, *, created: int = ECHO_CREATED) -> None:
        self._created = created

    async def respond(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Answer like the endpoint would, from the request alone."""
        if endpoint == BatchEndpoint.MESSAGES:
            return self._message(body)
        if endpoint == BatchEndpoint.GENERATE_CONTENT:
            return self._generate(body)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _bad_request("model is required", "model")
        if endpoint == BatchEndpoint.CHAT_COMPLETIONS:
            return self._chat(model, body)
        if endpoint == BatchEndpoint.COMPLETIONS:
            return self._completion(model, body)
        if endpoint == BatchEndpoint.EMBEDDINGS:
            return self._embeddings(model, body)
        return 404, openai_error_body(404, f"Unknown endpoint {endpoint}")

    def _chat(self, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _bad_request("messages must be a non-empty list of objects", "messages")
        users = [m for m in messages if m.get("role") == "user"]
        last = _text_of((users or messages)[-1].get("content"))
        content = f"echo: {last}"
        prompt_tokens = sum(_words(_text_of(m.get("content"))) for m in messages)
        reply = {
            "id": f"chatcmpl-{_digest(body)[:24]}",
            "object": "chat.completion",
            "created": self._created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(prompt_tokens, _words(content)),
        }
        return 200, reply

    def _message(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Anthropic's Messages: a message with one text block, usage as Anthropic counts it."""
        problem = message_params_problem(body)
        if problem is not None:
            return 400, anthropic_error_body(400, problem)
        messages: list[dict[str, Any]] = body["messages"]
        users = [m for m in messages if m.get("role") == "user"]
        text = f"echo: {_text_of((users or messages)[-1].get('content'))}"
        system = body.get("system")
        prompt_tokens = sum(_words(_text_of(m.get("content"))) for m in messages)
        prompt_tokens += _words(_text_of(system)) if system is not None else 0
        reply = {
            "id": f"msg_{_digest(body)[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": prompt_tokens,
                "output_tokens": _words(text),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        return 200, reply

    def _generate(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Gemini's GenerateContent: the echo of its chat completion translation, in Gemini's shape."""
        problem = gemini_content.generate_content_problem(body)
        if problem is not None:
            return 400, google_error_body(400, problem)
        model = gemini_content.model_name(body)
        status, reply = self._chat(model, gemini_content.to_chat(body))
        if status != 200:
            return status, google_error_body(status, str(reply["error"]["message"]))
        return status, gemini_content.from_chat(reply, model)

    def _completion(self, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        prompt = body.get("prompt")
        given: list[Any] = prompt if isinstance(prompt, list) else [prompt]
        if not given or not all(isinstance(p, str) for p in given):
            return _bad_request("prompt must be a string or a list of strings", "prompt")
        prompts = [str(p) for p in given]
        texts = [f"echo: {p}" for p in prompts]
        reply = {
            "id": f"cmpl-{_digest(body)[:24]}",
            "object": "text_completion",
            "created": self._created,
            "model": model,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": "stop"} for i, text in enumerate(texts)
            ],
            "usage": _usage(sum(_words(p) for p in prompts), sum(_words(t) for t in texts)),
        }
        return 200, reply

    def _embeddings(self, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        raw = body.get("input")
        if raw is None or raw == [] or raw == "":
            return _bad_request("input must not be empty", "input")
        # A list of ints is one tokenised input; any other list holds several inputs.
        inputs = raw if isinstance(raw, list) and not isinstance(raw[0], int) else [raw]
        dimensions = body.get("dimensions", ECHO_EMBEDDING_DIMENSIONS)
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= _MAX_DIMENSIONS:
            return _bad_request(f"dimensions must be an integer from 1 to {_MAX_DIMENSIONS}", "dimensions")
        # Token arrays are embedded by their JSON text; strings by themselves.
        texts = [i if isinstance(i, str) else json.dumps(i) for i in inputs]
        prompt_tokens = sum(_words(t) for t in texts)
        reply = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _embedding(text, dimensions)}
                for i, text in enumerate(texts)
            ],
            "model": model,
            "usage": _usage(prompt_tokens, 0),
        }
        return 200, reply
