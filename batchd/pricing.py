"""A job's estimated cost, from its token totals and the configured `[pricing]` of its model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchd.config import Price

#: What Anthropic charges for prompt caching, as shares of the input price: writing the cache
#: (5-minute cache) and reading from it.
CACHE_WRITE_SHARE = 1.25
CACHE_READ_SHARE = 0.1
#: What Gemini charges for input tokens served from its context cache, as a share of the input
#: price (its 2.5 models' discount); they are counted inside `promptTokenCount` too.
GEMINI_CACHED_SHARE = 0.25


def estimate_cost(usage: Mapping[str, int], price: Price | None) -> dict[str, Any] | None:
    """An estimated cost from token totals and a configured price (None without a price).

    Input and output tokens as OpenAI counts them (`prompt_tokens`, `completion_tokens`) or as
    Anthropic and OpenAI's responses count them (`input_tokens`, `output_tokens`); Anthropic's
    cache writes and reads at their shares of the input price. Gemini's `usageMetadata`: the
    prompt, with its cached part at GEMINI_CACHED_SHARE, and the candidates and thoughts as output
    (Gemini bills thinking as output).
    """
    if price is None:
        return None
    gemini_cached = usage.get("cachedContentTokenCount", 0)
    prompt = usage.get("prompt_tokens", 0) + usage.get("input_tokens", 0) + usage.get("promptTokenCount", 0)
    prompt -= gemini_cached
    completion = (
        usage.get("completion_tokens", 0)
        + usage.get("output_tokens", 0)
        + usage.get("candidatesTokenCount", 0)
        + usage.get("thoughtsTokenCount", 0)
    )
    cached = (
        usage.get("cache_creation_input_tokens", 0) * CACHE_WRITE_SHARE
        + usage.get("cache_read_input_tokens", 0) * CACHE_READ_SHARE
        + gemini_cached * GEMINI_CACHED_SHARE
    )
    usd = ((prompt + cached) * price.input_per_mtok + completion * price.output_per_mtok) / 1_000_000
    return {
        "estimated_usd": round(usd, 6),
        "input_per_mtok": price.input_per_mtok,
        "output_per_mtok": price.output_per_mtok,
    }
