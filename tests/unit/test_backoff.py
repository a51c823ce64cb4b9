"""batchd.backoff: the step and webhook schedules, Retry-After caps, and counts past any float."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest

from batchd import backoff
from batchd.backoff import RetryPolicy

NOW = datetime(2026, 11, 25, 21, 0, 0, tzinfo=UTC)
DELAYS = (5.0, 300.0, 1800.0)


# -- a failed daemon step -------------------------------------------------


@pytest.mark.parametrize("attempts", range(0, 12))
def test_step_delay_is_drawn_in_the_upper_half_of_a_doubling_capped_ceiling(attempts: int) -> None:
    ceiling = min(60.0, 5.0 * 2**attempts)
    draws = [backoff.step_delay(attempts, 5.0, 60.0, random.Random(seed)) for seed in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in draws)
    assert min(draws) < ceiling * 0.55 and max(draws) > ceiling * 0.95


def test_step_delay_draws_what_a_seeded_rng_says() -> None:
    expected = random.Random(3)
    assert backoff.step_delay(2, 5.0, 60.0, random.Random(3)) == expected.uniform(10.0, 20.0)


def test_step_delay_of_a_negative_count_starts_at_the_minimum() -> None:
    assert 2.5 <= backoff.step_delay(-3, 5.0, 60.0, random.Random(0)) <= 5.0


@pytest.mark.parametrize("attempts", [1023, 1024, 1025, 10**6, 10**30])
def test_step_delay_never_overflows_however_many_failures_are_stored(attempts: int) -> None:
    # 5.0 * 2 ** 1024 raised OverflowError: a job failing that often crashed the daemon on every restart.
    assert 30.0 <= backoff.step_delay(attempts, 5.0, 60.0, random.Random(0)) <= 60.0
    assert backoff.step_delay(attempts, 0.0, 60.0, random.Random(0)) == 0.0


def test_step_delay_is_raised_to_a_retry_after_without_a_cap() -> None:
    assert backoff.step_delay(1, 5.0, 60.0, random.Random(0), retry_after=7200.0) == 7200.0
    # A Retry-After below the draw (or none, or zero) does not shorten it.
    for retry_after in (None, 0.0, 1.0):
        assert backoff.step_delay(1, 5.0, 60.0, random.Random(0), retry_after=retry_after) == backoff.step_delay(
            1, 5.0, 60.0, random.Random(0)
        )


# -- a retried call ---------------------------------------------------------


@pytest.mark.parametrize("retry_number", [1025, 10**6])
def test_full_jitter_never_overflows(retry_number: int) -> None:
    assert 0.0 <= backoff.backoff_s(RetryPolicy(attempts=10**7), retry_number, random.Random(0)) <= 30.0


def test_a_retried_call_honours_retry_after_up_to_its_cap() -> None:
    policy = RetryPolicy(attempts=5, base_s=0.5, cap_s=30.0)
    assert backoff.retry_wait_s(policy, 1, random.Random(0), retry_after=1000.0) == 1000.0
    assert backoff.retry_wait_s(policy, 1, random.Random(0), retry_after=1000.0, retry_after_cap_s=300.0) == 300.0
    plain = backoff.backoff_s(policy, 1, random.Random(0))
    assert backoff.retry_wait_s(policy, 1, random.Random(0), retry_after=0.0) == plain
    assert backoff.retry_wait_s(policy, 1, random.Random(0)) == plain


def test_honour_retry_after() -> None:
    assert backoff.honour_retry_after(3.0, None) == 3.0
    assert backoff.honour_retry_after(3.0, 1.0) == 3.0
    assert backoff.honour_retry_after(3.0, 9.0) == 9.0
    assert backoff.honour_retry_after(3.0, 9.0, cap_s=5.0) == 5.0
    assert backoff.honour_retry_after(3.0, 9.0, cap_s=2.0) == 3.0  # the cap bounds the advice, not the wait
    assert backoff.honour_retry_after(3.0, math.inf) == math.inf


# -- a webhook delivery -------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_webhook_delay_has_ten_percent_jitter(attempts: int) -> None:
    configured = DELAYS[attempts - 1]
    draws = [backoff.webhook_delay(attempts, DELAYS, random.Random(seed)) for seed in range(300)]
    assert all(configured * 0.9 <= d <= configured * 1.1 for d in draws)
    assert min(draws) < configured * 0.92 and max(draws) > configured * 1.08


def test_webhook_delay_draws_what_a_seeded_rng_says() -> None:
    expected = random.Random(5)
    assert backoff.webhook_delay(2, DELAYS, random.Random(5)) == 300.0 * expected.uniform(0.9, 1.1)


def test_webhook_retry_after_is_honoured_up_to_a_day() -> None:
    assert backoff.webhook_delay(1, DELAYS, random.Random(0), retry_after=60.0) == 60.0
    assert backoff.webhook_delay(1, DELAYS, random.Random(0), retry_after=999999999.0) == 86400.0
    # Below the jitter it changes nothing.
    plain = backoff.webhook_delay(1, DELAYS, random.Random(0))
    assert backoff.webhook_delay(1, DELAYS, random.Random(0), retry_after=1.0) == plain


def test_webhook_retry_after_cap_is_the_longest_delay_when_that_is_longer_than_a_day() -> None:
    delays = (5.0, 172800.0)
    assert backoff.webhook_delay(1, delays, random.Random(0), retry_after=999999999.0) == 172800.0


# -- Retry-After from headers ---------------------------------------------------


def test_retry_after_reads_any_mapping_of_headers() -> None:
    assert backoff.retry_after_s({"retry-after": "4"}, now=NOW) == 4.0
    assert backoff.retry_after_s({}, now=NOW) is None


def test_retry_after_date_is_read_against_the_given_now() -> None:
    date = "Wed, 25 Nov 2026 21:01:00 GMT"
    assert backoff.retry_after_s({"retry-after": date}, now=NOW) == 60.0


def test_step_delay_grows_and_is_capped() -> None:
    # A failed daemon step backs off within the polling bounds (5 s to 60 s here).
    rng = random.Random(1)
    delays = [backoff.step_delay(n, 5.0, 60.0, rng) for n in range(1, 12)]
    assert all(0 < d <= 60.0 for d in delays)
    assert 5.0 <= delays[0] <= 10.0 and min(delays[-3:]) >= 30.0


def test_a_download_never_waits_past_the_expiry_of_its_results() -> None:
    # Far from it: the step's own delay (a Retry-After of an hour included).
    assert backoff.before_deadline(3600.0, now=0.0, deadline=86400.0, floor=5.0) == 3600.0
    # Closer: at most half of the time left, so the next failures still have room.
    assert backoff.before_deadline(3600.0, now=0.0, deadline=600.0, floor=5.0) == 300.0
    # In its last moments: the floor, never a busy loop.
    assert backoff.before_deadline(3600.0, now=0.0, deadline=4.0, floor=5.0) == 5.0
    assert backoff.before_deadline(1.0, now=0.0, deadline=4.0, floor=5.0) == 1.0
    # Past it, or without one: the step's delay as it is.
    assert backoff.before_deadline(60.0, now=100.0, deadline=50.0, floor=5.0) == 60.0
    assert backoff.before_deadline(60.0, now=100.0, deadline=None, floor=5.0) == 60.0
