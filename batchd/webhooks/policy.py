"""Pure decisions about a webhook delivery: what an attempt's outcome means, and when to try again.

The Deliverer makes an attempt, asks `decide(...)`, and carries the answer out: it records
the outcome, disables the endpoint, logs and counts. Everything here is a function of its
arguments (no network, no store, no clock: `now` and `rng` are passed in), so the whole
retry, dead-letter and disable schedule is tested without a receiver (DESIGN §5, docs/design.md's
"Decisions": ±10 % jitter, Retry-After honoured up to a day or the longest delay).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from batchd.backoff import webhook_delay
from batchd.models import DeliveryState

__all__ = ["GONE_REASON", "Decision", "DeliveryState", "Verdict", "concurrency_after", "decide"]

#: Why an endpoint is disabled after a 410 (shown by `batchd webhooks`, kept on its parked deliveries).
GONE_REASON = "410 Gone from the receiver"


class Verdict(StrEnum):
    """What an attempt's outcome means for its delivery."""

    #: a 2xx answer: the delivery is done (DeliveryState.DELIVERED)
    DELIVERED = "delivered"
    #: a failure with a delay left in the schedule: try again at `Decision.next_attempt_at`
    RETRY = "retry"
    #: the schedule is spent, or no secret can sign the delivery any more: dead-letter it (DeliveryState.DEAD)
    DEAD = "dead"
    #: 410 Gone: disable the endpoint, which parks its pending deliveries (DeliveryState.DISABLED)
    DISABLE = "disable"


@dataclass(frozen=True)
class Decision:
    """The verdict on one attempt, and what the delivery's record says after it."""

    verdict: Verdict
    #: attempts made so far, this one included
    attempts: int
    #: the receiver's HTTP status, or None when no answer came
    status: int | None
    #: why the attempt did not deliver (None when it did)
    error: str | None
    #: unix seconds: RETRY, when to try again; DELIVERED, when it arrived; otherwise, when decided
    at: float
    #: RETRY: the wait before the next attempt, in seconds
    wait_s: float = 0.0


def decide(
    *,
    attempts: int,
    status: int | None,
    error: str | None,
    retry_after: float | None,
    signable: bool,
    retry_delays_s: Sequence[float],
    now: float,
    rng: random.Random,
) -> Decision:
    """What to do after an attempt at a delivery.

    `attempts` is the delivery's count before this attempt; `status`, `error` and
    `retry_after` are what the attempt ended with (no status: no answer); `signable` says
    whether a secret still signs the delivery (its endpoint is still configured);
    `retry_delays_s` is `[delivery] retry_delays_s`. The rng is drawn from only for a RETRY.
    """
    made = attempts + 1
    if status is not None and 200 <= status < 300:
        return Decision(Verdict.DELIVERED, made, status, None, now)
    if status == 410:
        return Decision(Verdict.DISABLE, made, status, error, now)
    if made > len(retry_delays_s) or not signable:
        return Decision(Verdict.DEAD, made, status, error, now)
    wait = webhook_delay(made, retry_delays_s, rng, retry_after=retry_after)
    return Decision(Verdict.RETRY, made, status, error, now + wait, wait)


def concurrency_after(limit: int, *, delivered: bool, waiting: bool, floor: int, ceiling: int) -> int:
    """How many attempts an endpoint may have in flight after one of them ended.

    An endpoint starts at `floor`. Each delivery made while others wait for a slot adds one, up
    to `ceiling`: a receiver that keeps answering 2xx takes more at once (against a fast one,
    four in flight left the sender idle between answers). Any failure halves it, never below
    `floor`: a receiver that struggles (errors, timeouts) is not pressed harder.
    """
    if not delivered:
        return max(floor, limit // 2)
    if waiting:
        return min(ceiling, limit + 1)
    return limit
