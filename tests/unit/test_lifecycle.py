"""The pure life-cycle decisions: what a job does next, and when."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from batchd import lifecycle
from batchd.lifecycle import PollPolicy, Step
from batchd.models import Job, JobState, RemoteBatchRecord, RemoteStatus

NOW = 1_000_000.0
POLICY = PollPolicy(min_interval_s=5.0, max_interval_s=60.0)


def job(state: JobState, **kw: Any) -> Job:
    return replace(
        Job(id="j" * 32, name="n", source="n.jsonl", state=state, provider="local", created_at=NOW, updated_at=NOW),
        **kw,
    )


def batch(status: str = "creating", remote_id: str | None = None, attempts: int = 0) -> RemoteBatchRecord:
    return RemoteBatchRecord(
        id=1,
        job_id="j" * 32,
        round=0,
        shard=0,
        input_file_id="file-1",
        remote_id=remote_id,
        status=status,
        create_attempts=attempts,
        intent_at=NOW - 10,
        updated_at=NOW,
    )


def test_new_job_uploads_now() -> None:
    action = lifecycle.next_action(job(JobState.RECEIVED), [], NOW)
    assert (action.step, action.at) == (Step.UPLOAD, NOW)


def test_failed_upload_waits_for_its_backoff() -> None:
    action = lifecycle.next_action(job(JobState.UPLOADING, next_check_at=NOW + 7), [], NOW)
    assert (action.step, action.at) == (Step.UPLOAD, NOW + 7)


def test_first_create_does_not_reconcile_but_a_repeat_does() -> None:
    first = lifecycle.next_action(job(JobState.SUBMITTING), [batch()], NOW)
    assert first.step is Step.CREATE and not first.reconcile_first
    again = lifecycle.next_action(job(JobState.SUBMITTING), [batch(attempts=1)], NOW)
    assert again.step is Step.CREATE and again.reconcile_first


def test_cancel_before_anything_exists_remotely_ends_locally() -> None:
    assert lifecycle.next_action(job(JobState.RECEIVED, cancel_requested=True), [], NOW).step is Step.DOWNLOAD
    assert lifecycle.next_action(job(JobState.SUBMITTING, cancel_requested=True), [batch()], NOW).step is Step.DOWNLOAD
    # A create that may have happened must be reconciled before anything else.
    assert (
        lifecycle.next_action(job(JobState.SUBMITTING, cancel_requested=True), [batch(attempts=1)], NOW).step
        is Step.CREATE
    )


def test_in_flight_jobs_poll_when_due_and_cancel_at_once() -> None:
    live = batch("in_progress", "b1")
    action = lifecycle.next_action(job(JobState.IN_PROGRESS, next_check_at=NOW + 5), [live], NOW)
    assert (action.step, action.at, action.batch) == (Step.POLL, NOW + 5, live)
    cancel = lifecycle.next_action(job(JobState.IN_PROGRESS, cancel_requested=True, next_check_at=NOW + 5), [live], NOW)
    assert (cancel.step, cancel.at) == (Step.CANCEL, NOW)
    # Once cancelling, it polls until the provider confirms.
    assert lifecycle.next_action(job(JobState.CANCELLING, cancel_requested=True), [live], NOW).step is Step.POLL


def test_terminal_remote_leads_to_download_and_terminal_job_to_nothing() -> None:
    assert lifecycle.next_action(job(JobState.DOWNLOADING), [batch("completed", "b1")], NOW).step is Step.DOWNLOAD
    assert lifecycle.next_action(job(JobState.COMPLETED), [], NOW).step is Step.NONE
    assert lifecycle.next_action(job(JobState.REJECTED), [], NOW).step is Step.NONE


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (RemoteStatus.VALIDATING, JobState.VALIDATING),
        (RemoteStatus.IN_PROGRESS, JobState.IN_PROGRESS),
        (RemoteStatus.FINALIZING, JobState.FINALIZING),
        (RemoteStatus.CANCELLING, JobState.CANCELLING),
        (RemoteStatus.COMPLETED, JobState.DOWNLOADING),
        (RemoteStatus.EXPIRED, JobState.DOWNLOADING),
        (RemoteStatus.FAILED, JobState.DOWNLOADING),
        (RemoteStatus.CANCELLED, JobState.DOWNLOADING),
    ],
)
def test_remote_status_maps_to_job_state(status: RemoteStatus, state: JobState) -> None:
    assert lifecycle.state_for_remote(status) is state


def test_remote_status_parsing_normalises_both_dialects() -> None:
    assert RemoteStatus.parse("IN_PROGRESS") is RemoteStatus.IN_PROGRESS
    assert RemoteStatus.parse("CANCELING") is RemoteStatus.CANCELLING
    assert RemoteStatus.parse("finalizing") is RemoteStatus.FINALIZING


def test_poll_interval_backs_off_and_resets_on_news() -> None:
    assert lifecycle.next_poll_interval(None, False, POLICY) == 5.0
    assert lifecycle.next_poll_interval(5.0, False, POLICY) == 7.5
    assert lifecycle.next_poll_interval(50.0, False, POLICY) == 60.0
    assert lifecycle.next_poll_interval(60.0, True, POLICY) == 5.0


def test_retry_delay_grows_and_is_capped() -> None:
    rng = random.Random(1)
    delays = [lifecycle.retry_delay(n, POLICY, rng) for n in range(1, 12)]
    assert all(0 < d <= 60.0 for d in delays)
    assert 5.0 <= delays[0] <= 10.0 and min(delays[-3:]) >= 30.0


def test_sweep_only_when_many_are_due() -> None:
    assert not lifecycle.use_sweep(2)
    assert lifecycle.use_sweep(3)


@pytest.mark.parametrize(
    ("status", "cancel", "code", "final"),
    [
        ("expired", False, "batch_expired", JobState.EXPIRED),
        ("cancelled", True, "batch_cancelled", JobState.CANCELLED),
        ("failed", False, "batch_failed", JobState.FAILED),
        ("completed", False, "not_returned", JobState.FAILED),
    ],
)
def test_unanswered_requests_decide_the_final_state(status: str, cancel: bool, code: str, final: JobState) -> None:
    batches = [batch(status, "b1")]
    assert lifecycle.unanswered_code(batches, cancel) == code
    assert lifecycle.final_state(3, code) is final
    assert lifecycle.final_state(0, code) is JobState.COMPLETED


def test_never_submitted() -> None:
    assert lifecycle.unanswered_code([batch()], False) == "not_submitted"
    assert lifecycle.unanswered_code([], True) == "batch_cancelled"
    assert lifecycle.final_state(2, "not_submitted") is JobState.FAILED
    assert lifecycle.event_type(JobState.EXPIRED) == "batch.expired"
