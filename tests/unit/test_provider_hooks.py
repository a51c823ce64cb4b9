"""The pure parts of provider webhooks: what an event names (hooks/events.py), and a receiver's
signature checks with the time given (webhooks/signing.py), against the reference library."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from standardwebhooks import Webhook

from batchd.hooks.events import BadEvent, Hint, Ignored, read_event
from batchd.webhooks.signing import Refusal, Signed, check, is_fresh, read_headers, verify

SECRET = "whsec_" + base64.b64encode(b"unit-provider-hooks-secret-32byt").decode()
OTHER = "whsec_" + base64.b64encode(b"unit-provider-hooks-other-32byte").decode()
NOW = 1_764_100_000.0


def body(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def headers(payload: bytes, secret: str = SECRET, at: float = NOW, msg_id: str = "msg_1") -> dict[str, str]:
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(at, UTC), payload)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at)), "webhook-signature": signature}


@pytest.mark.parametrize("kind", ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"])
def test_an_openai_ending_names_its_batch(kind: str) -> None:
    event = {"id": "evt_1", "object": "event", "created_at": 1, "type": kind, "data": {"id": "batch_abc"}}
    assert read_event("openai", body(event)) == Hint("batch_abc", kind)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"name": "batches/abc"}, "batches/abc"),
        ({"id": "abc"}, "batches/abc"),
        ({"id": "batches/abc"}, "batches/abc"),
        ({"batch": "abc"}, "batches/abc"),
        # `name` first; a field of no usable form is passed over
        ({"name": "batches/first", "id": "second"}, "batches/first"),
        ({"name": "files/xyz", "id": "abc"}, "batches/abc"),
        ({"name": 7, "id": "abc"}, "batches/abc"),
    ],
)
def test_a_gemini_ending_names_its_batch_in_any_of_the_likely_fields(data: dict[str, Any], expected: str) -> None:
    assert read_event("gemini", body({"type": "batch.succeeded", "data": data})) == Hint(expected, "batch.succeeded")


@pytest.mark.parametrize(
    ("kind", "event"),
    [
        ("openai", {"type": "batch.succeeded", "data": {"id": "batch_a"}}),  # Gemini's word
        ("gemini", {"type": "batch.completed", "data": {"id": "a"}}),  # OpenAI's word
        ("openai", {"type": "response.completed", "data": {"id": "resp_a"}}),
        ("openai", {"data": {"id": "batch_a"}}),
        ("openai", {"type": ["batch.completed"], "data": {"id": "batch_a"}}),
        ("openai", {"type": "batch.completed"}),
        ("openai", {"type": "batch.completed", "data": ["batch_a"]}),
        ("openai", {"type": "batch.completed", "data": {"id": "batch a\n"}}),
        ("openai", {"type": "batch.completed", "data": {"id": "x" * 129}}),
        ("gemini", {"type": "batch.failed", "data": {"name": "batches/../x"}}),
        ("anthropic", {"type": "batch.completed", "data": {"id": "batch_a"}}),
    ],
)
def test_what_names_no_ending_batch_is_ignored(kind: str, event: dict[str, Any]) -> None:
    assert isinstance(read_event(kind, body(event)), Ignored)


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"batch_a"', b"\xff\xfe", b"[" * 50_000])
def test_a_body_that_is_no_json_object_is_a_bad_event(raw: bytes) -> None:
    with pytest.raises(BadEvent):
        read_event("openai", raw)


def test_headers_are_read_before_the_body_and_each_missing_one_says_so() -> None:
    good = headers(b"{}")
    assert read_headers(good) == Signed("msg_1", int(NOW), (good["webhook-signature"],))
    assert read_headers({k.upper(): v for k, v in good.items()}) == read_headers(good)
    assert read_headers({**good, "webhook-signature": "  "}) is Refusal.UNSIGNED
    assert read_headers({k: v for k, v in good.items() if k != "webhook-signature"}) is Refusal.UNSIGNED
    for broken in (
        {"webhook-id": ""},
        {"webhook-timestamp": "-5"},
        {"webhook-timestamp": "1e9"},
        {"webhook-timestamp": "١٢"},
    ):
        assert read_headers({**good, **broken}) is Refusal.MALFORMED


def test_freshness_is_five_minutes_either_way_of_the_given_time() -> None:
    signed = Signed("m", int(NOW), ("v1,x",))
    assert is_fresh(signed, NOW + 300) and is_fresh(signed, NOW - 300)
    assert not is_fresh(signed, NOW + 301) and not is_fresh(signed, NOW - 301)


def test_check_agrees_with_the_reference_library_and_takes_any_secret_of_a_rotation() -> None:
    now = float(int(time.time()))  # the reference library checks against its own clock
    payload = body({"type": "batch.completed", "data": {"id": "batch_a"}})
    signed = headers(payload, at=now)
    assert Webhook(SECRET).verify(payload, signed)  # the reference library takes it...
    assert check([OTHER, SECRET], signed, payload, now=now) is None  # ...and so does batchd, with either secret
    assert check([OTHER], signed, payload, now=now) is Refusal.FORGED
    assert check([SECRET], signed, payload + b" ", now=now) is Refusal.FORGED
    assert check([SECRET], signed, payload, now=now + 301) is Refusal.STALE
    # Several entries offered (the sender rotating): one that matches is enough.
    both = {**signed, "webhook-signature": f"v1,AAAA {signed['webhook-signature']}"}
    assert check([SECRET], both, payload, now=now) is None
    assert verify([SECRET], signed, payload, clock=lambda: now)
    assert not verify([SECRET], signed, payload, clock=lambda: now + 3600)
