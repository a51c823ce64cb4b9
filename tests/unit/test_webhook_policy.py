"""The pure webhook delivery decision: delivered, retry when, dead-letter, disable (DESIGN §5)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from batchd.models import DeliveryState
from batchd.webhooks.policy import Decision, Verdict, concurrency_after, decide

NOW = 1_000_000.0
DELAYS = (5.0, 300.0, 1800.0)


def after(attempts: int, status: int | None, **kw: Any) -> Decision:
    """The decision after attempt number `attempts + 1`, answered with `status`."""
    args: dict[str, Any] = {
        "error": None if status is not None and 200 <= status < 300 else f"HTTP {status}",
        "retry_after": None,
        "signable": True,
        "retry_delays_s": DELAYS,
        "now": NOW,
        "rng": random.Random(7),
    }
    args.update(kw)
    return decide(attempts=attempts, status=status, **args)


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_a_2xx_delivers(status: int) -> None:
    assert after(0, status) == Decision(Verdict.DELIVERED, 1, status, None, NOW)


def test_a_2xx_delivers_even_after_the_schedule_ran_out() -> None:
    assert after(len(DELAYS), 200).verdict is Verdict.DELIVERED


@pytest.mark.parametrize("status", [None, 301, 302, 400, 404, 429, 500, 503])
def test_anything_else_is_retried_on_the_schedule(status: int | None) -> None:
    decision = after(1, status, error="boom")
    assert (decision.verdict, decision.attempts, decision.status, decision.error) == (Verdict.RETRY, 2, status, "boom")
    assert 300.0 * 0.9 <= decision.wait_s <= 300.0 * 1.1
    assert decision.at == NOW + decision.wait_s


def test_the_retry_wait_is_the_webhook_schedule_of_a_seeded_rng() -> None:
    rng = random.Random(7)
    assert after(0, 503).wait_s == 5.0 * rng.uniform(0.9, 1.1)


def test_each_attempt_takes_the_next_delay() -> None:
    for attempts, configured in enumerate(DELAYS):
        assert configured * 0.9 <= after(attempts, 503).wait_s <= configured * 1.1


def test_after_the_last_delay_the_delivery_is_dead_lettered() -> None:
    assert after(len(DELAYS), 503) == Decision(Verdict.DEAD, len(DELAYS) + 1, 503, "HTTP 503", NOW)
    assert after(len(DELAYS) - 1, 503).verdict is Verdict.RETRY


def test_without_a_delay_the_first_failure_is_dead() -> None:
    assert after(0, 500, retry_delays_s=()).verdict is Verdict.DEAD


def test_a_delivery_nothing_can_sign_is_dead_at_once() -> None:
    decision = after(0, None, error="endpoint is no longer configured", signable=False)
    assert decision == Decision(Verdict.DEAD, 1, None, "endpoint is no longer configured", NOW)


@pytest.mark.parametrize("attempts", [0, 2, len(DELAYS), 50])
def test_a_410_disables_the_endpoint_whatever_the_count(attempts: int) -> None:
    assert after(attempts, 410) == Decision(Verdict.DISABLE, attempts + 1, 410, "HTTP 410", NOW)


def test_retry_after_is_honoured_up_to_a_day() -> None:
    assert after(0, 429, retry_after=120.0).wait_s == 120.0
    assert after(0, 429, retry_after=999999999.0).wait_s == 86400.0
    # Below the jitter it shortens nothing.
    assert after(0, 429, retry_after=1.0).wait_s == after(0, 429).wait_s


def test_retry_after_is_honoured_up_to_the_longest_delay_when_longer_than_a_day() -> None:
    decision = after(0, 503, retry_after=999999999.0, retry_delays_s=(5.0, 200000.0))
    assert decision.wait_s == 200000.0


def test_retry_after_does_not_keep_a_spent_delivery_alive() -> None:
    assert after(len(DELAYS), 503, retry_after=10.0).verdict is Verdict.DEAD


def test_only_a_retry_draws_from_the_rng() -> None:
    for status in (200, 410):
        rng = random.Random(1)
        after(0, status, rng=rng)
        assert rng.random() == random.Random(1).random()
    rng = random.Random(1)
    after(len(DELAYS), 503, rng=rng)
    assert rng.random() == random.Random(1).random()


def test_delivery_states_are_the_stored_lower_case_strings() -> None:
    assert [s.value for s in DeliveryState] == ["pending", "delivered", "dead", "disabled"]
    assert DeliveryState("dead") is DeliveryState.DEAD


def test_an_endpoint_that_delivers_while_others_wait_gets_one_more_slot_up_to_the_ceiling() -> None:
    bounds = {"floor": 4, "ceiling": 16}
    limit = 4
    for _ in range(20):
        limit = concurrency_after(limit, delivered=True, waiting=True, **bounds)
    assert limit == 16
    # Nothing waiting: no reason to take more at once.
    assert concurrency_after(5, delivered=True, waiting=False, **bounds) == 5


def test_a_failure_halves_an_endpoints_slots_down_to_the_floor() -> None:
    bounds = {"floor": 4, "ceiling": 16}
    assert concurrency_after(16, delivered=False, waiting=True, **bounds) == 8
    assert concurrency_after(8, delivered=False, waiting=False, **bounds) == 4
    assert concurrency_after(5, delivered=False, waiting=True, **bounds) == 4
    assert concurrency_after(4, delivered=False, waiting=True, **bounds) == 4
