"""A job's estimated cost, from its token totals and the configured `[pricing]` of its model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchd.config import Price


def estimate_cost(usage: Mapping[str, int], price: Price | None) -> dict[str, Any] | None:
    """An estimated cost from token totals and a configured price (None without a price)."""
    if price is None:
        return None
    prompt = usage.get("prompt_tokens", 0)
    completion = usage.get("completion_tokens", 0)
    usd = (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1_000_000
    return {
        "estimated_usd": round(usd, 6),
        "input_per_mtok": price.input_per_mtok,
        "output_per_mtok": price.output_per_mtok,
    }
