"""What a provider's batch event names: the batch to poll now, or nothing to act on.

Pure: the body's bytes in, a decision out. Only the event's `type` and the batch it names are
read; nothing else in it is believed (the poll that follows asks the provider).

* OpenAI: `{"id": "evt_…", "object": "event", "created_at", "type": "batch.completed" |
  "batch.failed" | "batch.expired" | "batch.cancelled", "data": {"id": "batch_…"}}`.
* Gemini: `{"type": "batch.succeeded" | "batch.failed" | "batch.expired" | "batch.cancelled",
  "data": {…}}`. Google documents the events and their Standard Webhooks headers; where the
  batch's name sits in `data` is not confirmed, so it is taken from `data.name`, else `data.id`,
  else `data.batch`, as a resource name (`batches/…`) or as the bare id after `batches/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from batchd import jsonl

#: The event types that say a batch ended, per provider kind; any other type is ignored.
ENDINGS: dict[str, frozenset[str]] = {
    "openai": frozenset({"batch.completed", "batch.failed", "batch.expired", "batch.cancelled"}),
    "gemini": frozenset({"batch.succeeded", "batch.failed", "batch.expired", "batch.cancelled"}),
}
#: Where a Gemini event may name its batch, in the order they are tried.
GEMINI_NAME_FIELDS = ("name", "id", "batch")
#: What a batch id may look like (it is only ever looked up, but it is logged too: no odd bytes).
_OPENAI_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_GEMINI_ID = re.compile(r"(?:batches/)?([A-Za-z0-9_-]{1,128})")


class BadEvent(ValueError):
    """The body is not a JSON object (a signed one: the sender's mistake, not a forgery)."""


@dataclass(frozen=True)
class Hint:
    """The event says the batch `remote_id` (as batchd stores the provider's id) ended."""

    remote_id: str
    type: str


@dataclass(frozen=True)
class Ignored:
    """Nothing to act on: another event type, or no batch named in a usable form."""

    reason: str
    type: str | None = None


def read_event(kind: str, body: bytes) -> Hint | Ignored:
    """What the event in `body`, sent by a provider of `kind`, asks batchd to poll; BadEvent when
    the body is no JSON object."""
    try:
        event = jsonl.loads(body)
    except (ValueError, RecursionError):
        raise BadEvent("the body is not JSON") from None
    if not isinstance(event, dict):
        raise BadEvent("the body is not a JSON object")
    endings = ENDINGS.get(kind, frozenset())
    event_type = event.get("type")
    if not isinstance(event_type, str) or event_type not in endings:
        shown = event_type[:64] if isinstance(event_type, str) else None
        return Ignored(f"not one of the events that say a batch ended ({', '.join(sorted(endings))})", shown)
    data = event.get("data")
    remote_id = _batch_named(kind, data) if isinstance(data, dict) else None
    if remote_id is None:
        return Ignored("the event names no batch in a form batchd knows", event_type)
    return Hint(remote_id, event_type)


def _batch_named(kind: str, data: dict[str, Any]) -> str | None:
    """The batch id in an event's `data`, as batchd stores it for a provider of `kind`."""
    if kind == "gemini":
        for name in GEMINI_NAME_FIELDS:
            found = _GEMINI_ID.fullmatch(value) if isinstance(value := data.get(name), str) else None
            if found is not None:
                return f"batches/{found.group(1)}"
        return None
    value = data.get("id")
    return value if isinstance(value, str) and _OPENAI_ID.fullmatch(value) else None
