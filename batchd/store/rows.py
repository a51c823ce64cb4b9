"""Rows as records: what the store's reads hand to the rest of batchd."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import RowMapping

from batchd.models import BatchStatus, Delivery, DeliveryState, Job, JobState, RemoteBatchRecord, StoredEvent


def job_from_row(row: RowMapping | Mapping[str, Any]) -> Job:
    data = dict(row)
    data["state"] = JobState(data["state"])
    data["metadata"] = data.get("metadata") or {}
    data["cancel_requested"] = bool(data.get("cancel_requested"))
    return Job(**data)


def remote_from_row(row: RowMapping) -> RemoteBatchRecord:
    data = dict(row)
    data["status"] = BatchStatus(data["status"])
    return RemoteBatchRecord(**data)


def event_from_row(row: RowMapping) -> StoredEvent:
    data = dict(row)
    data["body"] = bytes(data["body"])
    return StoredEvent(**data)


def delivery_from_row(row: RowMapping) -> Delivery:
    data = dict(row)
    data["body"] = bytes(data["body"])
    data["state"] = DeliveryState(data["state"])
    return Delivery(**data)
