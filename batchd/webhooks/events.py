"""Webhook events: their body bytes, built once and stored, and where each one goes (DESIGN §5)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from batchd.config import Settings
from batchd.models import NewEvent


def new_event(event_type: str, data: Mapping[str, Any], *, now: float) -> tuple[str, bytes]:
    """A fresh event id and the body bytes that every attempt will send."""
    event_id = f"evt_{uuid.uuid4().hex}"
    body = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created_at": int(now),
        "data": dict(data),
    }
    return event_id, json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def event_targets(settings: Settings, event_type: str, job_webhook_url: str | None) -> list[tuple[str, str]]:
    """Where an event goes: matching [[webhooks]] entries, then the job's own webhook_url."""
    targets = [(ep.url, "config") for ep in settings.webhooks if event_type in ep.events]
    if job_webhook_url and event_type != "batch.rejected":
        targets.append((job_webhook_url, "inbox"))
    return targets


def build_event(
    settings: Settings, event_type: str, data: Mapping[str, Any], *, now: float, job_webhook_url: str | None
) -> NewEvent:
    event_id, body = new_event(event_type, data, now=now)
    return NewEvent(
        id=event_id, type=event_type, body=body, targets=event_targets(settings, event_type, job_webhook_url)
    )


def webhook_data(doc: dict[str, Any]) -> dict[str, Any]:
    """The `data` of a terminal event (DESIGN §5), from the job's job.json document."""
    keys = (
        "id", "name", "status", "provider", "provider_name", "source", "remote_batch_ids", "request_counts",
        "usage", "output_file", "error_file", "metadata", "reason", "cost",
    )  # fmt: skip
    # A job.json written by an older release (a crash left it) has no provider_name: the default.
    return {k: doc.get(k, "default") if k == "provider_name" else doc[k] for k in keys}
