"""Standard Webhooks: events, signatures and the delivery worker (DESIGN §5).

An event's body is built once and stored; every attempt sends those exact
bytes with the same `webhook-id`, a fresh `webhook-timestamp` and signatures
computed for that attempt. One concern per module:

    events.py     an event's id and body bytes, its targets, a terminal event's data
    signing.py    the `webhook-signature` header, and checking one as a receiver
    guard.py      the SSRF guard: allow-list match, one resolved and checked address
    post.py       one signed POST and its Outcome
    policy.py     the pure decision after an attempt: delivered, retry at T, dead-letter, disable (410)
    deliverer.py  the Deliverer: due deliveries, attempts per endpoint, carrying decisions out
"""

from __future__ import annotations

from batchd.webhooks.deliverer import (
    DUE_BATCH,
    MAX_PER_ENDPOINT_CONCURRENCY,
    PER_ENDPOINT_CONCURRENCY,
    PER_ENDPOINT_QUEUE,
    Deliverer,
)
from batchd.webhooks.events import build_event, event_targets, new_event, webhook_data
from batchd.webhooks.guard import Refused, allowed_webhook_url, checked_url, pinned_target, webhook_url_refusal
from batchd.webhooks.post import DRAIN_BYTES, DRAIN_S, Outcome, post_event
from batchd.webhooks.signing import new_secret, secret_key, sign, verify

__all__ = [
    "DRAIN_BYTES",
    "DRAIN_S",
    "DUE_BATCH",
    "MAX_PER_ENDPOINT_CONCURRENCY",
    "PER_ENDPOINT_CONCURRENCY",
    "PER_ENDPOINT_QUEUE",
    "Deliverer",
    "Outcome",
    "Refused",
    "allowed_webhook_url",
    "build_event",
    "checked_url",
    "event_targets",
    "new_event",
    "new_secret",
    "pinned_target",
    "post_event",
    "secret_key",
    "sign",
    "verify",
    "webhook_data",
    "webhook_url_refusal",
]
