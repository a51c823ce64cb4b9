"""A manual retry (`batchd retry JOB`): a new job for what a finished job left undone.

DESIGN §4: a manual retry of a finished job is a new job with its own outbox
folder. Its input is the finished job's requests that did not succeed, those
with a line in its errors.jsonl, in input order; it is submitted like any drop.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

from batchd.config import Settings
from batchd.inbox import ensure_job_files
from batchd.models import Job, JobState
from batchd.request_rules import id_key
from batchd.shards import write_followups
from batchd.store import NewJob, Store


class NothingToRetry(Exception):
    """Every request of the job succeeded, or it never got that far."""


def retry_job(store: Store, settings: Settings, job: Job) -> Job:
    """Record a new job (received) whose input is `job`'s failed and unanswered requests."""
    if job.is_pack:
        raise NothingToRetry(
            f"job {job.short_id} is batchd's pack of {job.pack_members} files, each its own job: retry those"
        )
    if not job.state.terminal or job.state == JobState.REJECTED or not job.upload_path or not job.outbox_path:
        raise NothingToRetry(f"job {job.short_id} is {job.state.value}: only a finished, accepted job can be retried")
    new_id = uuid.uuid4().hex
    work = ensure_job_files(settings, new_id)
    upload = work / "retry.jsonl"
    errors = Path(job.outbox_path) / "errors.jsonl"
    count = write_followups(Path(job.upload_path), errors, upload, everything=True, key=id_key(job.provider))
    if count == 0:
        raise NothingToRetry(f"every request of job {job.short_id} succeeded: nothing to retry")
    digest = hashlib.sha256(upload.read_bytes()).hexdigest()
    # The provider the job went to: its requests are in that provider's line format.
    config = settings.provider_named(job.provider_name)
    new = NewJob(
        id=new_id,
        name=job.name,
        source=job.source,
        provider=config.kind if config is not None else job.provider,
        provider_name=job.provider_name,
        endpoint=job.endpoint,
        claimed_path=job.claimed_path,
        spec_path=job.spec_path,
        upload_path=str(upload),
        sha256=digest,
        size_bytes=upload.stat().st_size,
        request_count=count,
        completion_window=job.completion_window,
        model=job.model,
        webhook_url=job.webhook_url,
        metadata=dict(job.metadata),
        # The failed requests' share of what the whole job was estimated to enqueue.
        estimated_input_tokens=_share(job.estimated_input_tokens, count, job.request_count),
        estimated_output_tokens=_share(job.estimated_output_tokens, count, job.request_count),
        priority=job.priority,
    )
    return store.jobs.insert(new)


def _share(tokens: int | None, part: int, whole: int | None) -> int | None:
    if tokens is None or not whole:
        return tokens
    return -(-tokens * part // whole)
