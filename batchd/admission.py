"""Admission control (DESIGN §2 `queued`, §6): whether a job may go to its provider now.

Pure decisions: the store gathers what is in flight (`store/admission.py`), this module says
yes or why not. A job is let in when, with it, its provider's batches and its model's enqueued
tokens stay within the provider's limits, and the day's and month's spend within `[budget]`;
else it waits in `queued`, in arrival order (a spec's `priority` first). One rule keeps a queue
from sticking: a job too big for a limit on its own is let in when nothing else of its provider
is in flight, so that it runs alone (the provider decides then; a refusal makes it wait again).
A spend budget has no such exception: a job that costs more than the budget waits until an
operator raises the budget or cancels it, and does not hold up the jobs behind it.
"""

from __future__ import annotations

import calendar
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from batchd.config import Price, ProviderSettings
from batchd.models import Job, Limits


@dataclass(frozen=True)
class Limit:
    """What one job is checked against (0: no limit of that kind)."""

    #: the provider's batches in flight at once
    max_batches: int = 0
    #: the tokens the job's model may have enqueued at its provider at once
    max_tokens: int = 0
    #: the spend budget of the current UTC day and month, in USD
    usd_per_day: float = 0.0
    usd_per_month: float = 0.0
    #: when the current UTC day and month began (unix seconds)
    day_start: float = 0.0
    month_start: float = 0.0

    @property
    def limits_provider(self) -> bool:
        return bool(self.max_batches or self.max_tokens)

    @property
    def limits_spend(self) -> bool:
        return bool(self.usd_per_day or self.usd_per_month)

    @property
    def any(self) -> bool:
        return self.limits_provider or self.limits_spend


@dataclass(frozen=True)
class InFlight:
    """What is in flight beside the job, as the store counts it."""

    #: a job of the same provider waits ahead of this one (earlier, or of a higher priority)
    ahead: bool = False
    #: the provider's batches in flight (created, being created, or planned for a job let in)
    batches: int = 0
    #: the tokens enqueued for the job's model at its provider
    tokens: int = 0
    #: the estimated cost of the jobs let in since the day and the month began
    spent_today: float = 0.0
    spent_this_month: float = 0.0


def decide(job: Job, shards: int, cost: float | None, limit: Limit, now: InFlight) -> str | None:
    """None when `job` may go now; else why it waits (shown by `jobs`, `show`, the status page)."""
    if now.ahead:
        return "waiting for the jobs queued before it at its provider"
    alone = now.batches == 0 and now.tokens == 0
    if limit.max_batches and now.batches + shards > limit.max_batches and not alone:
        return (
            f"its provider has {now.batches} of max_batches_in_flight = {limit.max_batches} batches in flight; "
            f"it needs {shards}"
        )
    tokens = job.estimated_tokens
    if limit.max_tokens and now.tokens + tokens > limit.max_tokens and not alone:
        return (
            f"{now.tokens:,} tokens of its model are enqueued at its provider, and it adds about {tokens:,} "
            f"(the limit is {limit.max_tokens:,})"
        )
    if cost is not None:
        if limit.usd_per_day and now.spent_today + cost > limit.usd_per_day:
            return (
                f"the spend budget of the day: ${now.spent_today:,.2f} of ${limit.usd_per_day:,.2f} used, "
                f"and it is estimated at ${cost:,.2f}"
            )
        if limit.usd_per_month and now.spent_this_month + cost > limit.usd_per_month:
            return (
                f"the spend budget of the month: ${now.spent_this_month:,.2f} of ${limit.usd_per_month:,.2f} "
                f"used, and it is estimated at ${cost:,.2f}"
            )
    return None


def expected_shards(job: Job, limits: Limits) -> int:
    """How many remote batches the job's round 0 will be cut into (store/batches.py plans them)."""
    by_requests = math.ceil((job.request_count or 0) / limits.max_requests) if limits.max_requests else 1
    by_bytes = math.ceil((job.size_bytes or 0) / limits.max_bytes) if limits.max_bytes else 1
    return max(1, by_requests, by_bytes)


def estimated_cost(job: Job, price: Price | None) -> float | None:
    """The job's cost if every request wrote its most (None: its model has no price)."""
    if price is None:
        return None
    prompt = job.estimated_input_tokens or 0
    output = job.estimated_output_tokens or 0
    return (prompt * price.input_per_mtok + output * price.output_per_mtok) / 1_000_000


def period_starts(now: float) -> tuple[float, float]:
    """When the UTC day and the UTC month of `now` began (unix seconds)."""
    moment = datetime.fromtimestamp(now, UTC)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp(), day.replace(day=1).timestamp()


def next_period(now: float) -> float:
    """When the next UTC day begins: a job held by a spend budget is asked about again then."""
    day_start, _ = period_starts(now)
    return day_start + 86_400.0


def month_length_s(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    return calendar.monthrange(moment.year, moment.month)[1] * 86_400.0


def provider_limit(provider: ProviderSettings, learned_tokens: int | None) -> tuple[int, int]:
    """The provider's (batches, tokens) limits: the configured ones, the tokens narrowed by what a
    "queue full" answer taught (0: none)."""
    tokens = provider.max_enqueued_tokens
    if learned_tokens is not None:
        tokens = min(tokens, learned_tokens) if tokens else learned_tokens
    return provider.max_batches_in_flight, tokens
