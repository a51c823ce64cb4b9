"""The providers' call driver: tenacity's `AsyncRetrying` with an injected `sleep`.

The wait is `backoff.retry_wait_s` (full jitter raised to the server's Retry-After); tests
record waits instead of sleeping.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from batchd import metrics
from batchd.backoff import RetryPolicy, retry_wait_s
from batchd.providers.errors import ProviderError

T = TypeVar("T")

log = structlog.get_logger(__name__)


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
    label: str | None = None,
) -> T:
    """Run `call` until it succeeds, fails for good, or `policy.attempts` are spent.

    Only `ProviderError(retryable=True)` is retried; anything else propagates at
    once. After the last attempt the last ProviderError itself is raised (not
    tenacity's RetryError). `call` must be safe to repeat: never wrap a create.
    `label` names the call in /metrics (default: `what`).
    """
    draw = rng if rng is not None else random.Random()

    def wait(state: RetryCallState) -> float:
        error = _last_error(state)
        retry_after = error.retry_after if error is not None else None
        return retry_wait_s(policy, state.attempt_number, draw, retry_after=retry_after)

    def before_sleep(state: RetryCallState) -> None:
        error = _last_error(state)
        metrics.retry(label or what)
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
