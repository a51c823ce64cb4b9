"""Estimating the tokens a request enqueues at its provider, for admission control (#18).

Providers count a batch's enqueued tokens before running it (OpenAI's enqueued-token limit
per model, Together's queued tokens): roughly the prompt's tokens plus the most each request
may write (`max_tokens`). batchd has no tokenizer for every model, so the prompt is estimated
from its text: CHARS_PER_TOKEN characters per token, English's usual share. Binary content
(images or files as base64 or data URLs) is left out: providers bill it by other rules, and
counting its characters would make one picture look like a book.
"""

from __future__ import annotations

from typing import Any

#: Characters per token in ordinary text (the rule of thumb OpenAI and Anthropic give).
CHARS_PER_TOKEN = 4
#: Keys whose values carry binary content or references to it, not text a model reads as tokens.
_BINARY_KEYS = frozenset(
    {"data", "url", "image_url", "file_data", "b64_json", "inline_data", "inlineData", "file_uri", "fileUri"}
)
#: Nesting followed at most: deeper values are not counted (validation caps depth anyway).
_MAX_DEPTH = 64


def prompt_tokens(body: Any) -> int:
    """The prompt tokens of one request body, estimated from its text (at least 1)."""
    chars = _text_chars(body, 0)
    return max(1, -(-chars // CHARS_PER_TOKEN))


def _text_chars(value: Any, depth: int) -> int:
    if depth > _MAX_DEPTH:
        return 0
    if isinstance(value, str):
        return 0 if value.startswith("data:") else len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v, depth + 1) for k, v in value.items() if k not in _BINARY_KEYS)
    if isinstance(value, list):
        return sum(_text_chars(v, depth + 1) for v in value)
    return 0


def output_tokens(body: Any) -> int:
    """The most one request may write, as it says: OpenAI's `max_tokens` or
    `max_completion_tokens`, Anthropic's `max_tokens`, Gemini's `generationConfig.maxOutputTokens`
    (0 when it does not say: the provider's default is not known here)."""
    if not isinstance(body, dict):
        return 0
    for key in ("max_completion_tokens", "max_tokens"):
        found = _count(body.get(key))
        if found:
            return found
    config = body.get("generationConfig", body.get("generation_config"))
    if isinstance(config, dict):
        return _count(config.get("maxOutputTokens", config.get("max_output_tokens")))
    return 0


def _count(value: Any) -> int:
    """A positive integer count, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
