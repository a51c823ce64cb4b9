"""Arranging the store for a test: jobs and deliveries put in a state through the store's own transitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchd.models import Delivery, Job, JobState, NewEvent, RemoteBatch, RemoteBatchRecord, RemoteStatus
from batchd.store import Delivered, Ending, NewJob, NextCheck, RejectedJob, RetryLater, ShardPlan, Store

#: What a test's job says it answered when it ends (no request: nothing was submitted).
NO_COUNTS = {"total": 0, "completed": 0, "failed": 0}


def add_job(
    store: Store,
    job_id: str = "a" * 32,
    name: str = "x",
    *,
    state: JobState = JobState.RECEIVED,
    events: Sequence[NewEvent] = (),
    **fields: Any,
) -> Job:
    """A job named `name` in `state`, brought there the way the daemon would (insert, plan, answers, end)."""
    fields.setdefault("provider", "local")
    if state is JobState.REJECTED:
        rejected = RejectedJob(
            id=job_id, name=name, source=f"{name}.jsonl", claimed_path="", rejected_path="", report_path="",
            reason="rejected by a test", finished_at=store.now(), provider=fields["provider"],
        )  # fmt: skip
        return store.jobs.insert_rejected(rejected, events)
    job = store.jobs.insert(NewJob(id=job_id, name=name, source=f"{name}.jsonl", **fields))
    if state is JobState.RECEIVED:
        assert not events, "a job gets its events when it ends"
        return job
    if state.terminal:
        return end_job(store, job_id, state, events, expect=JobState.RECEIVED)
    store.batches.plan_round(job_id, expect=JobState.RECEIVED, round_=0, shards=[])
    if state is JobState.UPLOADING:
        found = store.jobs.get(job_id)
        assert found is not None
        return found
    return store.jobs.record_answer(job_id, expect=JobState.UPLOADING, check=NextCheck(state, 5.0, store.now()))


def add_in_flight(
    store: Store,
    job_id: str,
    name: str,
    *,
    remote_id: str,
    provider: str = "openai",
    provider_name: str = "default",
    next_check_at: float,
    **fields: Any,
) -> RemoteBatchRecord:
    """A job whose one batch (`remote_id`) the provider holds, validating, next polled at
    `next_check_at`: brought there the way the daemon would (insert, plan, upload, bind, answer)."""
    new = NewJob(id=job_id, name=name, source=f"{name}.jsonl", provider=provider, provider_name=provider_name, **fields)
    store.jobs.insert(new)
    shard = ShardPlan(input_path=f"/x/{name}.jsonl", request_count=1, size_bytes=10, sha256="0" * 64)
    (row,) = store.batches.plan_round(job_id, expect=JobState.RECEIVED, round_=0, shards=[shard])
    row = store.batches.record_upload(row.id, file_id="file-1", intent_at=store.now())
    remote = RemoteBatch(
        id=remote_id, status=RemoteStatus.VALIDATING, input_file_id="file-1", endpoint="/v1/chat/completions"
    )
    row = store.batches.bind(row.id, remote)
    check = NextCheck(JobState.VALIDATING, next_check_at - store.now(), next_check_at)
    store.jobs.record_answer(job_id, expect=JobState.UPLOADING, check=check)
    return row


def end_job(
    store: Store,
    job_id: str,
    state: JobState,
    events: Sequence[NewEvent] = (),
    *,
    expect: JobState,
    request_counts: dict[str, int] | None = None,
) -> Job:
    """The terminal transition of a test's job, with its events."""
    ending = Ending(state, store.now(), None, request_counts or NO_COUNTS, {})
    return store.jobs.finish(job_id, expect=expect, ending=ending, events=events)


def deliver(store: Store, delivery: Delivery, *, status: int = 200) -> None:
    """Record a delivery as delivered, as the Deliverer does after a 2xx answer."""
    store.deliveries.record_outcomes([Delivered(delivery.id, delivery.attempts + 1, status, store.now())])


def fail_attempt(
    store: Store, delivery: Delivery, *, next_attempt_at: float, status: int | None = 503, error: str = "HTTP 503"
) -> None:
    """Record a failed attempt of a delivery and its retry at `next_attempt_at`, as the Deliverer does."""
    retry = RetryLater(delivery.id, delivery.attempts + 1, status, error, next_attempt_at, delivery.next_attempt_at)
    store.deliveries.record_outcomes([retry])
