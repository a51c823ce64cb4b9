"""batchd.backoff's call rules (backoff bounds, Retry-After parsing) and the tenacity driver (no real sleeping)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from structlog.testing import capture_logs

from batchd.backoff import RetryPolicy, backoff_s, is_retryable_status, retry_after_s
from batchd.providers.base import ProviderError
from batchd.providers.retry import with_retries
from tests.hand_clock import RecordingSleep

NOW = datetime(2026, 11, 25, 21, 0, 0, tzinfo=UTC)


def failing(errors: list[BaseException], result: str = "ok") -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """A call that raises the given errors in turn, then returns `result`; counts its calls."""
    count = [0]

    async def call() -> str:
        count[0] += 1
        if errors:
            raise errors.pop(0)
        return result

    return call, count


def response(headers: dict[str, str]) -> httpx.Headers:
    """The headers of a 429 answer carrying `headers`, as a caller passes them (`response.headers`)."""
    return httpx.Response(429, headers=headers).headers


# -- classification -------------------------------------------------------


@pytest.mark.parametrize("code", [408, 429, 500, 502, 503, 504, 599])
def test_retryable_statuses(code: int) -> None:
    assert is_retryable_status(code)


@pytest.mark.parametrize("code", [200, 302, 400, 401, 403, 404, 409, 416, 422, 600])
def test_not_retryable_statuses(code: int) -> None:
    assert not is_retryable_status(code)


# -- Retry-After ----------------------------------------------------------


def test_retry_after_seconds() -> None:
    assert retry_after_s(response({"retry-after": "7"}), now=NOW) == 7.0
    assert retry_after_s(response({"retry-after": "1.5"}), now=NOW) == 1.5


def test_retry_after_ms_wins_over_seconds() -> None:
    assert retry_after_s(response({"retry-after-ms": "250", "retry-after": "9"}), now=NOW) == 0.25


def test_garbage_ms_falls_back_to_seconds() -> None:
    assert retry_after_s(response({"retry-after-ms": "soon", "retry-after": "3"}), now=NOW) == 3.0


def test_retry_after_http_date_is_relative_to_now() -> None:
    date = format_datetime(NOW + timedelta(seconds=42), usegmt=True)
    assert retry_after_s(response({"retry-after": date}), now=NOW) == 42.0


def test_retry_after_date_in_the_past_is_zero() -> None:
    date = format_datetime(NOW - timedelta(minutes=5), usegmt=True)
    assert retry_after_s(response({"retry-after": date}), now=NOW) == 0.0


@pytest.mark.parametrize(
    "headers",
    [{}, {"retry-after": "later"}, {"retry-after": ""}, {"retry-after": "nan"}, {"retry-after-ms": "inf"}],
)
def test_retry_after_absent_or_garbage_is_none(headers: dict[str, str]) -> None:
    assert retry_after_s(response(headers), now=NOW) is None


def test_retry_after_never_negative() -> None:
    assert retry_after_s(response({"retry-after": "-5"}), now=NOW) == 0.0
    assert retry_after_s(response({"retry-after-ms": "-5"}), now=NOW) == 0.0


# -- backoff --------------------------------------------------------------


def test_full_jitter_stays_below_the_capped_exponential() -> None:
    policy = RetryPolicy(attempts=10, base_s=0.5, cap_s=4.0)
    rng = random.Random(1234)
    for retry_number in range(1, 10):
        ceiling = min(4.0, 0.5 * 2 ** (retry_number - 1))
        draws = [backoff_s(policy, retry_number, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        # Full jitter spreads over the whole range, not just near the ceiling.
        assert min(draws) < ceiling * 0.1
        assert max(draws) > ceiling * 0.9


async def test_recorded_sleeps_follow_the_jitter_of_a_seeded_rng() -> None:
    policy = RetryPolicy(attempts=4, base_s=1.0, cap_s=3.0)
    sleep = RecordingSleep()
    call, count = failing([ProviderError("busy", status_code=503, retryable=True) for _ in range(3)])

    assert await with_retries(call, policy=policy, what="t", sleep=sleep, rng=random.Random(7)) == "ok"

    expected_rng = random.Random(7)
    expected = [expected_rng.uniform(0, c) for c in (1.0, 2.0, 3.0)]
    assert sleep.calls == pytest.approx(expected)
    assert count[0] == 4


# -- the driver -----------------------------------------------------------


async def test_success_first_time_never_sleeps() -> None:
    sleep = RecordingSleep()
    call, count = failing([])
    assert await with_retries(call, policy=RetryPolicy(), what="t", sleep=sleep) == "ok"
    assert (count[0], sleep.calls) == (1, [])


async def test_retry_after_dominates_the_jitter() -> None:
    policy = RetryPolicy(attempts=3, base_s=0.5, cap_s=1.0)
    sleep = RecordingSleep()
    call, _ = failing(
        [
            ProviderError("slow down", status_code=429, retryable=True, retry_after=12.0),
            ProviderError("slow down", status_code=429, retryable=True, retry_after=0.0),
        ]
    )
    await with_retries(call, policy=policy, what="t", sleep=sleep, rng=random.Random(1))
    assert sleep.calls[0] == 12.0
    # A Retry-After below the jitter does not shorten it.
    assert 0.0 <= sleep.calls[1] <= 1.0


async def test_call_may_be_a_lambda_returning_an_awaitable() -> None:
    sleep = RecordingSleep()
    call, count = failing([ProviderError("busy", status_code=503, retryable=True)])
    assert await with_retries(lambda: call(), policy=RetryPolicy(), what="t", sleep=sleep) == "ok"
    assert count[0] == 2


async def test_non_retryable_error_raises_at_once() -> None:
    sleep = RecordingSleep()
    error = ProviderError("bad request", status_code=400, retryable=False)
    call, count = failing([error])
    with pytest.raises(ProviderError) as info:
        await with_retries(call, policy=RetryPolicy(), what="t", sleep=sleep)
    assert info.value is error
    assert (count[0], sleep.calls) == (1, [])


async def test_other_exceptions_are_not_retried() -> None:
    sleep = RecordingSleep()
    call, count = failing([KeyError("bug")])
    with pytest.raises(KeyError):
        await with_retries(call, policy=RetryPolicy(), what="t", sleep=sleep)
    assert (count[0], sleep.calls) == (1, [])


async def test_last_provider_error_is_reraised_after_all_attempts() -> None:
    sleep = RecordingSleep()
    errors: list[BaseException] = [ProviderError(f"busy {i}", status_code=503, retryable=True) for i in range(5)]
    last = errors[-1]
    call, count = failing(errors)
    with pytest.raises(ProviderError) as info:
        await with_retries(call, policy=RetryPolicy(attempts=5), what="t", sleep=sleep)
    assert info.value is last
    assert count[0] == 5
    assert len(sleep.calls) == 4


async def test_each_retry_is_logged() -> None:
    sleep = RecordingSleep()
    call, _ = failing([ProviderError("busy", status_code=503, retryable=True, retry_after=2.0)])
    with capture_logs() as logs:
        await with_retries(call, policy=RetryPolicy(), what="together.get", sleep=sleep)
    retries = [e for e in logs if e["event"] == "provider.retry"]
    assert len(retries) == 1
    assert retries[0]["what"] == "together.get"
    assert retries[0]["attempt"] == 1
    assert retries[0]["status_code"] == 503
    assert retries[0]["wait_s"] == 2.0
