"""Every backoff rule of batchd, and how a server's `Retry-After` is read and honoured.

Pure: no I/O, no clock (the caller passes `now`), no HTTP library (the caller passes a
response's headers), and randomness comes from the `random.Random` the caller passes, so
tests draw from a seeded one and never sleep. Three schedules live here:

* a retried call (a provider request, the emulator's upstream request): "full jitter", a
  uniform draw below an exponentially growing, capped ceiling (`backoff_s`), raised to the
  server's Retry-After (`retry_wait_s`);
* a failed daemon step: doubling from the polling minimum up to the polling maximum, drawn in
  the upper half of that ceiling (`step_delay`); a download's never past its results' expiry
  (`before_deadline`);
* a webhook delivery: `[delivery] retry_delays_s` with ±10 % jitter, raised to the receiver's
  Retry-After up to a day or the longest delay (`webhook_delay`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

#: The most doublings a ceiling is given: 2 ** 1024 no longer converts to a float
#: (OverflowError), and every ceiling reached its cap long before. A failure count is stored,
#: so a count past it must not crash the daemon again after every restart.
MAX_DOUBLINGS = 1023

#: The longest Retry-After a webhook receiver is granted, unless retry_delays_s has a longer
#: delay: a far-off or absurd Retry-After must not keep a delivery from being dead-lettered.
WEBHOOK_RETRY_AFTER_CAP_S = 86400.0
#: A webhook retry delay is drawn between these fractions of the configured delay (±10 %).
WEBHOOK_JITTER = (0.9, 1.1)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently one call is retried."""

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


def retry_after_s(headers: Mapping[str, str], *, now: datetime) -> float | None:
    """The server's advice on when to come back, in seconds, or None.

    `headers` is a response's headers (`response.headers`: case-insensitive) and `now` the
    time it arrived. Same order as the official SDKs: `retry-after-ms` (milliseconds, more
    precise), then `retry-after` as seconds, then as an HTTP date relative to `now`. A date in
    the past gives 0; an absent or unreadable header gives None.
    """
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
    return max(0.0, (when - now).total_seconds())


def honour_retry_after(wait_s: float, retry_after: float | None, *, cap_s: float = math.inf) -> float:
    """`wait_s`, raised to the server's Retry-After (itself cut to `cap_s`) when it gave one.

    The server knows its own load better than our jitter does; the cap keeps an absurd
    answer from stalling the work for ever. A Retry-After below `wait_s` never shortens it.
    """
    if retry_after is None:
        return wait_s
    return max(wait_s, min(retry_after, cap_s))


def backoff_s(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """Full-jitter backoff before retry number `retry_number` (1 for the first retry)."""
    ceiling = min(policy.cap_s, policy.base_s * 2 ** min(retry_number - 1, MAX_DOUBLINGS))
    return rng.uniform(0.0, ceiling)


def retry_wait_s(
    policy: RetryPolicy,
    retry_number: int,
    rng: random.Random,
    *,
    retry_after: float | None = None,
    retry_after_cap_s: float = math.inf,
) -> float:
    """The wait before retry number `retry_number` of a call: full jitter, raised to Retry-After."""
    return honour_retry_after(backoff_s(policy, retry_number, rng), retry_after, cap_s=retry_after_cap_s)


def step_delay(
    attempts: int, min_s: float, max_s: float, rng: random.Random, *, retry_after: float | None = None
) -> float:
    """Backoff after `attempts` consecutive failures of a daemon step: jittered, doubling, capped.

    The ceiling starts at `min_s` (the polling minimum) and never exceeds `max_s` (the polling
    maximum), so an outage is retried as patiently as a quiet batch is polled; the delay is
    drawn in the upper half of the ceiling, then raised to the provider's Retry-After (no cap:
    it can be no longer than the provider makes us wait anyway).
    """
    doublings = min(max(attempts, 0), MAX_DOUBLINGS)
    ceiling = min(max_s, min_s * 2**doublings)
    return honour_retry_after(rng.uniform(ceiling / 2, ceiling), retry_after)


def before_deadline(delay: float, *, now: float, deadline: float | None, floor: float) -> float:
    """`delay`, cut so that the next attempt comes before `deadline` (results that expire then):
    at most half of the time left, so each failure still leaves room for more tries, and never
    below `floor` (no busy loop in the last moments). Without a deadline, or past it, `delay`."""
    if deadline is None or deadline <= now:
        return delay
    return min(delay, max(floor, (deadline - now) / 2))


def webhook_delay(
    attempts: int, delays: Sequence[float], rng: random.Random, *, retry_after: float | None = None
) -> float:
    """The wait before a webhook delivery's next attempt, after its attempt number `attempts`.

    `delays` is `[delivery] retry_delays_s`, and `1 <= attempts <= len(delays)` (after the last
    delay the delivery is dead-lettered, see `webhooks.policy`). The delay gets ±10 % jitter and
    is raised to the receiver's Retry-After, honoured up to a day (or the longest delay, if
    longer).
    """
    low, high = WEBHOOK_JITTER
    delay = delays[attempts - 1] * rng.uniform(low, high)
    return honour_retry_after(delay, retry_after, cap_s=max(WEBHOOK_RETRY_AFTER_CAP_S, *delays))
