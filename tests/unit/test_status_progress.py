"""Progress (`jobs`, `show`, the status page): what was answered, not whether the job ended."""

from __future__ import annotations

from typing import Any

from batchd.cli.records import progress_of
from batchd.models import BatchStatus, Job, JobState, RemoteBatchRecord


def job(state: JobState, counts: dict[str, int] | None = None) -> Job:
    return Job(id="a" * 32, name="n", source="n.jsonl", state=state, provider="local", created_at=0.0,
               updated_at=0.0, request_counts=counts)  # fmt: skip


def batch(progress: float | None, **fields: Any) -> RemoteBatchRecord:
    return RemoteBatchRecord(id=1, job_id="a" * 32, round=0, shard=0, input_file_id="f", remote_id="b",
                             status=BatchStatus.IN_PROGRESS, create_attempts=1, intent_at=0.0, updated_at=0.0,
                             progress=progress, **fields)  # fmt: skip


def test_a_finished_job_shows_what_was_answered() -> None:
    cancelled = {"total": 20, "completed": 10, "failed": 10, "unanswered": 7}
    assert progress_of(job(JobState.CANCELLED, cancelled), []) == 65.0
    expired = {"total": 3, "completed": 0, "failed": 3, "unanswered": 3}
    assert progress_of(job(JobState.EXPIRED, expired), []) == 0.0
    assert progress_of(job(JobState.COMPLETED, {"total": 2, "completed": 1, "failed": 1}), []) == 100.0
    # Finished before the store kept the figure: unknown rather than a guess of 100 %.
    assert progress_of(job(JobState.FAILED, {"total": 2, "completed": 1, "failed": 1}), []) is None
    assert progress_of(job(JobState.REJECTED), []) is None


def test_a_job_in_flight_shows_the_providers_figure() -> None:
    assert progress_of(job(JobState.IN_PROGRESS), [batch(60.0)]) == 60.0
    assert progress_of(job(JobState.IN_PROGRESS), [batch(None)]) is None
    assert progress_of(job(JobState.UPLOADING), []) == 0.0
