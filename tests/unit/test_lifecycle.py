"""The pure life-cycle decisions: what a job does next, and when."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from batchd import lifecycle
from batchd.lifecycle import PollPolicy, Step
from batchd.models import BatchStatus, Job, JobState, RemoteBatchRecord, RemoteStatus

NOW = 1_000_000.0
POLICY = PollPolicy(min_interval_s=5.0, max_interval_s=60.0)


def job(state: JobState, **kw: Any) -> Job:
    return replace(
        Job(id="j" * 32, name="n", source="n.jsonl", state=state, provider="local", created_at=NOW, updated_at=NOW),
        **kw,
    )


def batch(
    status: str = "creating", remote_id: str | None = None, attempts: int = 0, *, shard: int = 0, round_: int = 0
) -> RemoteBatchRecord:
    return RemoteBatchRecord(
        id=shard + 1,
        job_id="j" * 32,
        round=round_,
        shard=shard,
        input_file_id="file-1",
        remote_id=remote_id,
        status=BatchStatus(status),
        create_attempts=attempts,
        intent_at=NOW - 10,
        updated_at=NOW,
    )


def test_a_new_job_is_planned_now() -> None:
    action = lifecycle.next_action(job(JobState.RECEIVED), [], NOW)
    assert (action.step, action.at) == (Step.PLAN, NOW)


def test_shards_not_created_yet_are_submitted_when_the_backoff_is_over() -> None:
    rows = [batch("pending", shard=0), batch("creating", attempts=1, shard=1), batch("validating", "b", shard=2)]
    action = lifecycle.next_action(job(JobState.UPLOADING, next_check_at=NOW + 7), rows, NOW)
    assert (action.step, action.at, [b.shard for b in action.batches]) == (Step.SUBMIT, NOW + 7, [0, 1])


def test_cancel_before_anything_was_planned_ends_locally() -> None:
    assert lifecycle.next_action(job(JobState.RECEIVED, cancel_requested=True), [], NOW).step is Step.DOWNLOAD
    # Planned shards go through SUBMIT, which skips those that cannot exist remotely yet.
    cancelled = job(JobState.UPLOADING, cancel_requested=True)
    assert lifecycle.next_action(cancelled, [batch("pending")], NOW).step is Step.SUBMIT


def test_in_flight_jobs_poll_every_live_shard_and_cancel_at_once() -> None:
    live = [batch("in_progress", "b1", shard=0), batch("validating", "b2", shard=1)]
    done = batch("completed", "b0", shard=2)
    action = lifecycle.next_action(job(JobState.VALIDATING, next_check_at=NOW + 5), [*live, done], NOW)
    assert (action.step, action.at, list(action.batches)) == (Step.POLL, NOW + 5, live)
    cancel = lifecycle.next_action(
        job(JobState.IN_PROGRESS, cancel_requested=True, next_check_at=NOW + 5), [*live, done], NOW
    )
    assert (cancel.step, cancel.at, list(cancel.batches)) == (Step.CANCEL, NOW, live)
    # Once cancelling, it polls until the provider confirms.
    assert lifecycle.next_action(job(JobState.CANCELLING, cancel_requested=True), live, NOW).step is Step.POLL


def test_a_round_whose_batches_all_ended_is_downloaded() -> None:
    rows = [batch("completed", "b1", shard=0), batch("expired", "b2", shard=1), batch("refused", shard=2)]
    assert lifecycle.next_action(job(JobState.IN_PROGRESS), rows, NOW).step is Step.DOWNLOAD
    assert lifecycle.next_action(job(JobState.DOWNLOADING), rows, NOW).step is Step.DOWNLOAD
    assert lifecycle.next_action(job(JobState.COMPLETED), [], NOW).step is Step.NONE
    assert lifecycle.next_action(job(JobState.REJECTED), [], NOW).step is Step.NONE


def test_only_the_current_round_counts() -> None:
    old = batch("expired", "b0", round_=0)
    followup = batch("pending", round_=1)
    action = lifecycle.next_action(job(JobState.UPLOADING, round=1), [old, followup], NOW)
    assert (action.step, [b.round for b in action.batches]) == (Step.SUBMIT, [1])


@pytest.mark.parametrize(
    ("statuses", "state"),
    [
        (["pending", "creating", "in_progress"], JobState.UPLOADING),
        (["creating", "in_progress"], JobState.SUBMITTING),
        (["finalizing", "validating", "completed"], JobState.VALIDATING),
        (["in_progress", "finalizing"], JobState.IN_PROGRESS),
        (["completed", "expired", "skipped"], JobState.DOWNLOADING),
    ],
)
def test_a_round_sums_up_to_its_least_advanced_batch(statuses: list[str], state: JobState) -> None:
    rows = [batch(s, "b", shard=i) for i, s in enumerate(statuses)]
    assert lifecycle.summary_state(rows, cancelling=False) is state


def test_a_cancelling_job_stays_cancelling_until_its_batches_end() -> None:
    assert lifecycle.summary_state([batch("in_progress", "b")], cancelling=True) is JobState.CANCELLING
    assert lifecycle.summary_state([batch("cancelled", "b")], cancelling=True) is JobState.DOWNLOADING


def test_follow_up_rounds_until_the_limit_and_never_after_a_cancel() -> None:
    assert lifecycle.wants_followup(job(JobState.DOWNLOADING, round=0), 2)
    assert lifecycle.wants_followup(job(JobState.DOWNLOADING, round=1), 2)
    assert not lifecycle.wants_followup(job(JobState.DOWNLOADING, round=2), 2)
    assert not lifecycle.wants_followup(job(JobState.DOWNLOADING, cancel_requested=True), 2)


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
    assert lifecycle.unanswered_code([batch("refused")], False) == "not_submitted"
    assert lifecycle.unanswered_code([], False) == "not_submitted"
    assert lifecycle.unanswered_code([batch("skipped")], True) == "batch_cancelled"
    assert lifecycle.unanswered_code([], True) == "batch_cancelled"


def test_the_last_round_and_its_most_significant_cause_decide_the_code() -> None:
    rows = [batch("expired", "a", round_=0), batch("completed", "b", round_=1, shard=0)]
    assert lifecycle.unanswered_code(rows, False) == "not_returned"
    rows.append(batch("failed", "c", round_=1, shard=1))
    rows.append(batch("expired", "d", round_=1, shard=2))
    assert lifecycle.unanswered_code(rows, False) == "batch_expired"
    assert lifecycle.final_state(2, "not_submitted") is JobState.FAILED
    assert lifecycle.event_type(JobState.EXPIRED) == "batch.expired"


# ---------------------------------------------------------------- stuck batches

HOUR = 3600.0


def live_batch(
    status: str, *, moved_at: float, seen_at: float, stuck_at: float | None = None, shard: int = 0
) -> RemoteBatchRecord:
    """A bound batch that last moved at `moved_at` and was last heard of at `seen_at`."""
    return replace(batch(status, f"b{shard}", shard=shard), progress_at=moved_at, updated_at=seen_at, stuck_at=stuck_at)


def watched(provider: str = "together", **kw: Any) -> Job:
    """A job in flight, its next poll a minute after NOW, last written at NOW - 30."""
    kw.setdefault("next_check_at", NOW + 60)
    kw.setdefault("updated_at", NOW - 30)
    state = kw.pop("state", JobState.VALIDATING)
    return job(state, provider=provider, **kw)


@pytest.mark.parametrize("status", ["validating", "in_progress"])
def test_a_batch_is_polled_at_its_stuck_deadline_and_cancelled_if_it_has_not_moved(status: str) -> None:
    # Together's default: 6 h without running (validating) or without progress (in_progress).
    deadline = NOW + 20
    quiet = live_batch(status, moved_at=deadline - 6 * HOUR, seen_at=NOW - 30)
    before = lifecycle.next_action(watched(), [quiet], NOW)
    assert (before.step, before.at, before.batches) == (Step.POLL, deadline, (quiet,))  # earlier than the next poll
    # Past the deadline, the last word on it is older: polled now, not cancelled on an old answer.
    late = lifecycle.next_action(watched(), [quiet], deadline + 5)
    assert (late.step, late.at) == (Step.POLL, deadline)
    # Heard of at the deadline, unmoved: cancelled (due since its deadline).
    seen = replace(quiet, updated_at=deadline + 1)
    stuck = lifecycle.next_action(watched(updated_at=deadline + 1), [seen], deadline + 1)
    assert (stuck.step, stuck.at, stuck.batches) == (Step.CANCEL, deadline, (seen,))


def test_a_move_restarts_the_clock() -> None:
    moved = live_batch("in_progress", moved_at=NOW - 10, seen_at=NOW - 10)
    action = lifecycle.next_action(watched(), [moved], NOW)
    assert (action.step, action.at) == (Step.POLL, NOW + 60)  # the next poll comes first
    assert lifecycle.stuck_deadline(watched(), moved) == NOW - 10 + 6 * HOUR


def test_only_the_stuck_shard_is_cancelled_and_the_others_are_polled_later() -> None:
    stuck = live_batch("validating", moved_at=NOW - 7 * HOUR, seen_at=NOW - 1, shard=0)
    running = live_batch("in_progress", moved_at=NOW - 5, seen_at=NOW - 5, shard=1)
    action = lifecycle.next_action(watched(), [stuck, running], NOW)
    assert (action.step, action.batches) == (Step.CANCEL, (stuck,))


@pytest.mark.parametrize(
    ("provider", "configured", "limit"),
    [
        ("together", None, 6 * HOUR),
        ("openai", 0.0, 6 * HOUR),
        ("anthropic", None, 6 * HOUR),
        ("gemini", None, 12 * HOUR),  # a 48 h window
        ("local", None, None),  # the embedded backend runs what it gets: no limit
        ("local", 30.0, 30.0),  # a setting above 0 overrides, whatever the dialect
        ("together", 90.0, 90.0),
    ],
)
def test_the_limit_is_the_dialect_s_default_unless_configured(
    provider: str, configured: float | None, limit: float | None
) -> None:
    assert lifecycle.stuck_limit(provider, configured) == limit
    j = watched(provider, stuck_after_s=configured)
    old = live_batch("validating", moved_at=NOW - 13 * HOUR, seen_at=NOW)
    action = lifecycle.next_action(j, [old], NOW)
    assert action.step is (Step.POLL if limit is None else Step.CANCEL)
    if limit is not None:
        assert action.at == NOW - 13 * HOUR + limit


def test_a_configured_limit_is_kept_by_the_job() -> None:
    j = watched(stuck_after_s=1.0)
    fresh = live_batch("validating", moved_at=NOW - 0.5, seen_at=NOW - 0.5)
    assert lifecycle.next_action(j, [fresh], NOW).at == NOW + 0.5
    assert lifecycle.next_action(j, [replace(fresh, updated_at=NOW + 0.5)], NOW + 0.5).step is Step.CANCEL


def test_the_user_s_cancel_is_not_a_stuck_cancel() -> None:
    old = live_batch("validating", moved_at=NOW - 7 * HOUR, seen_at=NOW)
    asked = lifecycle.next_action(watched(cancel_requested=True), [old], NOW)
    assert (asked.step, asked.at) == (Step.CANCEL, NOW)
    # Once cancelling, the user's cancel is polled until confirmed; no stuck cancel is added.
    polled = lifecycle.next_action(watched(cancel_requested=True, state=JobState.CANCELLING), [old], NOW)
    assert (polled.step, polled.at) == (Step.POLL, NOW + 60)


def test_a_stuck_cancel_is_sent_again_until_the_provider_says_cancelling() -> None:
    found = live_batch("validating", moved_at=NOW - 7 * HOUR, seen_at=NOW - 5, stuck_at=NOW - 5)
    again = lifecycle.next_action(watched(), [found], NOW)
    assert (again.step, again.at, again.batches) == (Step.CANCEL, NOW + 60, (found,))  # at the next check
    going = replace(found, status=BatchStatus.CANCELLING)
    assert lifecycle.next_action(watched(), [going], NOW).step is Step.POLL
    assert lifecycle.stuck_deadline(watched(), going) is None


def test_a_finalizing_batch_is_never_stuck() -> None:
    writing = live_batch("finalizing", moved_at=NOW - 7 * HOUR, seen_at=NOW)
    action = lifecycle.next_action(watched(), [writing], NOW)
    assert (action.step, action.at) == (Step.POLL, NOW + 60)


def test_a_deadline_the_job_was_looked_at_since_waits_for_the_next_check() -> None:
    # The poll at the deadline failed: its backoff (the next check) stands, not "due now" again.
    quiet = live_batch("validating", moved_at=NOW - 6 * HOUR - 10, seen_at=NOW - 20)
    backed_off = watched(updated_at=NOW - 5, next_check_at=NOW + 40)
    action = lifecycle.next_action(backed_off, [quiet], NOW)
    assert (action.step, action.at) == (Step.POLL, NOW + 40)


def test_a_batch_bound_by_an_older_release_has_no_stuck_clock() -> None:
    unknown = replace(batch("validating", "b0"), progress_at=None)
    assert lifecycle.stuck_deadline(watched(), unknown) is None


def test_what_counts_as_a_move() -> None:
    row = replace(batch("in_progress", "b0"), progress=40.0, answered=None)
    assert lifecycle.moved(row, BatchStatus.FINALIZING, 40.0, None)  # a new status
    assert lifecycle.moved(row, BatchStatus.IN_PROGRESS, 41.0, None)  # Together's progress
    assert lifecycle.moved(row, BatchStatus.IN_PROGRESS, None, 3)  # a count of answered requests
    assert not lifecycle.moved(row, BatchStatus.IN_PROGRESS, 40.0, None)
    assert not lifecycle.moved(row, BatchStatus.IN_PROGRESS, None, None)  # a count left out is no news
    assert not lifecycle.moved(replace(row, answered=3), BatchStatus.IN_PROGRESS, None, 0)


def test_a_stuck_batch_s_unanswered_requests_count_as_expired_unless_the_user_cancelled() -> None:
    stuck = replace(batch("cancelled", "b0"), stuck_at=NOW)
    assert lifecycle.unanswered_code([stuck], False) == "batch_expired"
    assert lifecycle.final_state(2, "batch_expired") is JobState.EXPIRED
    assert lifecycle.unanswered_code([stuck], True) == "batch_cancelled"
    # Cancelled by someone else at the provider: a cancel is what it is.
    assert lifecycle.unanswered_code([batch("cancelled", "b0")], False) == "batch_cancelled"
    # The stuck cancel came too late: the batch completed, and what it did not return says so.
    assert lifecycle.unanswered_code([replace(batch("completed", "b0"), stuck_at=NOW)], False) == "not_returned"


# ---------------------------------------------------------------- retention


def with_results(row: RemoteBatchRecord, expires: float | None = NOW + 3600, **fates: str) -> RemoteBatchRecord:
    return replace(
        row, output_file_id="out", error_file_id="err", results_expire_at=expires, provider_files=fates or None
    )


def test_results_that_expired_before_download_name_their_own_code_in_any_round() -> None:
    lost = with_results(batch("completed", "a"), output="expired")
    assert lifecycle.results_lost(lost) and lifecycle.unanswered_code([lost], False) == "results_expired"
    assert lifecycle.final_state(1, "results_expired") is JobState.FAILED
    # A later round cannot answer them (they are never resubmitted): the code stays.
    later = [lost, batch("completed", "b", round_=1)]
    assert lifecycle.unanswered_code(later, False) == "results_expired"
    # A cancel of the last round, or a shard the provider refused, still says more.
    assert lifecycle.unanswered_code([*later, batch("cancelled", "c", round_=1, shard=1)], True) == "batch_cancelled"
    # Downloaded, deleted or refused results are not lost.
    kept = with_results(batch("completed", "a"), output="downloaded", errors="deleted")
    assert not lifecycle.results_lost(kept) and lifecycle.unanswered_code([kept], False) == "not_returned"


@pytest.mark.parametrize(
    ("status", "retryable", "now", "failures", "gone"),
    [
        (404, False, NOW, 1, True),  # the provider says so: at any time
        (410, False, NOW - 86400, 1, True),
        (403, False, NOW - 1, 1, False),  # before the expiry: a refusal is only a refusal
        (503, True, NOW - 1, 99, False),  # ...and a passing failure is retried for as long as it lasts
        (403, False, NOW, 1, True),  # past it: a refusal says the results are gone
        (None, True, NOW + 1, 1, False),  # past it, the network: tried again...
        (503, True, NOW + 1, lifecycle.GIVE_UP_AFTER_EXPIRY - 1, False),
        (503, True, NOW + 1, lifecycle.GIVE_UP_AFTER_EXPIRY, True),  # ...but not for ever
    ],
)
def test_a_failed_download_means_expired_results_only_when_the_provider_or_the_clock_says(
    status: int | None, retryable: bool, now: float, failures: int, gone: bool
) -> None:
    assert lifecycle.results_gone(status, retryable, now=now, expires_at=NOW, failures=failures) is gone
    # Without a known expiry, only the provider's 404 or 410 says so.
    assert lifecycle.results_gone(status, retryable, now=now, expires_at=None, failures=99) is (status in (404, 410))


def test_the_download_deadline_is_the_first_expiry_of_a_file_not_yet_fetched() -> None:
    first = with_results(batch("completed", "a", shard=0), NOW + 100)
    second = with_results(batch("completed", "b", shard=1), NOW + 50)
    assert lifecycle.results_deadline([first, second]) == NOW + 50
    # What the backoff must reach: the first one not gone by now (the other may still be fetched).
    assert lifecycle.results_deadline([first, second], after=NOW + 60) == NOW + 100
    assert lifecycle.results_deadline([first, second], after=NOW + 100) is None
    fetched = replace(second, provider_files={"output": "downloaded", "errors": "downloaded"})
    assert lifecycle.results_deadline([first, fetched]) == NOW + 100
    half = replace(second, provider_files={"output": "downloaded"})  # its error file is still to come
    assert lifecycle.results_deadline([first, half]) == NOW + 50
    gone = replace(second, provider_files={"output": "expired", "errors": "expired"})
    assert lifecycle.results_deadline([gone]) is None
    assert lifecycle.results_deadline([with_results(batch("completed", "c"), None)]) is None
    assert lifecycle.results_deadline([batch("in_progress", "d")]) is None  # no results yet
