"""A job's estimated cost from its token totals, whichever way the provider counts tokens."""

from __future__ import annotations

import pytest

from batchd.config import Price
from batchd.pricing import estimate_cost

PRICE = Price(input_per_mtok=3.0, output_per_mtok=15.0)


def test_no_price_no_estimate() -> None:
    assert estimate_cost({"prompt_tokens": 10}, None) is None


def test_openai_counts() -> None:
    cost = estimate_cost({"prompt_tokens": 1_000_000, "completion_tokens": 200_000, "total_tokens": 1_200_000}, PRICE)
    assert cost is not None and cost["estimated_usd"] == pytest.approx(3.0 + 3.0)


def test_anthropic_counts_with_cache_writes_and_reads_at_their_shares_of_the_input_price() -> None:
    usage = {
        "input_tokens": 1_000_000,
        "output_tokens": 100_000,
        "cache_creation_input_tokens": 400_000,  # at 1.25x the input price
        "cache_read_input_tokens": 2_000_000,  # at 0.1x
    }
    cost = estimate_cost(usage, PRICE)
    assert cost is not None
    assert cost["estimated_usd"] == pytest.approx(3.0 + 1.5 + 1.5 + 0.6)
