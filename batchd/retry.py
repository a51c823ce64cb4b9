"""Retry policies for provider calls: what is retryable, how long to wait, and the driver.

The wait is "full jitter" exponential backoff (a uniform draw below an
exponentially growing, capped ceiling) raised to at least the server's own
`Retry-After` advice. The driver is tenacity's `AsyncRetrying` with an injected
`sleep`, so tests record waits instead of sleeping.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import anyio
import httpx
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from batchd import metrics
from batchd.providers.base import ProviderError

T = TypeVar("T")

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one provider call is retried."""

    #: total attempts, the first included (1 means no retry)
    attempts: int = 5
    #: ceiling of the first backoff draw, in seconds
    base_s: float = 0.5
    #: the backoff ceiling never grows past this, in seconds
    cap_s: float = 30.0


def is_retryable_status(code: int) -> bool:
    """Whether an HTTP status means "the same request may succeed later"."""
    return code in (408, 429) or 500 <= code <= 599


def _finite_non_negative(value: float) -> float | None:
    if not math.isfinite(value):
        return None
    return max(0.0, value)


def retry_after_s(response: httpx.Response, now: datetime | None = None) -> float | None:
    """The server's advice on when to come back, in seconds, or None.

    Same order as the official SDKs: `retry-after-ms` (milliseconds, more
    precise), then `retry-after` as seconds, then as an HTTP date relative to
    `now`. A date in the past gives 0; an absent or unreadable header gives None.
    """
    headers = response.headers
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            parsed = _finite_non_negative(float(ms) / 1000.0)
        except ValueError:
            parsed = None
        if parsed is not None:
            return parsed

    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return _finite_non_negative(float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=UTC)
    reference = now if now is not None else datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


def backoff_s(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """Full-jitter backoff before retry number `retry_number` (1 for the first retry)."""
    ceiling = min(policy.cap_s, policy.base_s * 2 ** (retry_number - 1))
    return rng.uniform(0.0, ceiling)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


def _last_error(state: RetryCallState) -> ProviderError | None:
    outcome = state.outcome
    if outcome is None or not outcome.failed:
        return None
    exc = outcome.exception()
    return exc if isinstance(exc, ProviderError) else None


async def with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    what: str,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run `call` until it succeeds, fails for good, or `policy.attempts` are spent.

    Only `ProviderError(retryable=True)` is retried; anything else propagates at
    once. After the last attempt the last ProviderError itself is raised (not
    tenacity's RetryError). `call` must be safe to repeat: never wrap a create.
    """
    draw = rng if rng is not None else random.Random()

    def wait(state: RetryCallState) -> float:
        jitter = backoff_s(policy, state.attempt_number, draw)
        error = _last_error(state)
        # The server knows its own load better than our jitter does.
        if error is not None and error.retry_after is not None:
            return max(jitter, error.retry_after)
        return jitter

    def before_sleep(state: RetryCallState) -> None:
        error = _last_error(state)
        metrics.retry(what)
        log.warning(
            "provider.retry",
            what=what,
            attempt=state.attempt_number,
            status_code=error.status_code if error is not None else None,
            wait_s=round(state.upcoming_sleep, 3),
            error=error.message if error is not None else None,
        )

    async def attempt() -> T:
        # tenacity awaits only coroutine functions; `call` may be a lambda returning an awaitable.
        return await call()

    retrying = AsyncRetrying(
        sleep=sleep,
        stop=stop_after_attempt(max(1, policy.attempts)),
        wait=wait,
        retry=retry_if_exception(_is_retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    result: T = await retrying(attempt)
    return result
