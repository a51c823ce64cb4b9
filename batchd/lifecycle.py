"""Pure decisions about a job: what to do next, and when. No I/O, no clock.

The daemon asks `next_action(job, batches, now)`, carries the answer out, and
records the outcome through the Store. Everything here is a function of its
arguments, so the whole life cycle can be tested without a network, a disk or
a real clock.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from batchd.models import Job, JobState, RemoteBatchRecord, RemoteStatus

#: When at least this many jobs are in flight, one list call serves them all instead of a get each.
SWEEP_MIN_JOBS = 3

#: Each poll without news stretches the interval by this factor (up to the maximum).
POLL_GROWTH = 1.5


class Step(StrEnum):
    """What the daemon should do for a job."""

    #: nothing: the job is terminal
    NONE = "none"
    #: upload the input file (RECEIVED or UPLOADING)
    UPLOAD = "upload"
    #: create the remote batch whose intent is committed (reconcile first if tried before)
    CREATE = "create"
    #: ask the provider where the remote batch is
    POLL = "poll"
    #: ask the provider to cancel the remote batch
    CANCEL = "cancel"
    #: fetch result files and write the outbox, then finish
    DOWNLOAD = "download"


@dataclass(frozen=True)
class Action:
    step: Step
    #: unix seconds at which to act (<= now: act now)
    at: float
    #: the remote batch the step concerns, when there is one
    batch: RemoteBatchRecord | None = None
    #: CREATE only: a create may already have happened; list and adopt before creating
    reconcile_first: bool = False


@dataclass(frozen=True)
class PollPolicy:
    min_interval_s: float
    max_interval_s: float


#: States in which the provider holds the batch and the job is polled.
IN_FLIGHT = (JobState.VALIDATING, JobState.IN_PROGRESS, JobState.FINALIZING, JobState.CANCELLING)


def next_action(job: Job, batches: Sequence[RemoteBatchRecord], now: float) -> Action:
    """The next step for `job`, given its remote batches, at time `now`."""
    due = job.next_check_at if job.next_check_at is not None else now
    state = job.state
    if state.terminal:
        return Action(Step.NONE, now)
    pending = [b for b in batches if b.remote_id is None]
    if state in (JobState.RECEIVED, JobState.UPLOADING):
        if job.cancel_requested:
            return Action(Step.DOWNLOAD, now)
        return Action(Step.UPLOAD, due)
    if state == JobState.SUBMITTING:
        if not pending:
            # The intent row is written with the state change; without one, upload again.
            return Action(Step.UPLOAD, due)
        batch = pending[0]
        if job.cancel_requested and batch.create_attempts == 0:
            # Nothing can exist remotely yet: end here without creating anything.
            return Action(Step.DOWNLOAD, now)
        return Action(Step.CREATE, due, batch, reconcile_first=batch.create_attempts > 0)
    if state in IN_FLIGHT:
        live = [b for b in batches if b.remote_id is not None and not _remote_terminal(b.status)]
        if job.cancel_requested and state != JobState.CANCELLING and live:
            return Action(Step.CANCEL, now, live[0])
        if not live:
            return Action(Step.DOWNLOAD, now)
        return Action(Step.POLL, due, live[0])
    if state == JobState.DOWNLOADING:
        return Action(Step.DOWNLOAD, due)
    raise AssertionError(f"unhandled state {state}")


def _remote_terminal(status: str) -> bool:
    try:
        return RemoteStatus(status).terminal
    except ValueError:
        return False


def state_for_remote(status: RemoteStatus) -> JobState:
    """The job state that mirrors a remote batch status."""
    if status.terminal:
        return JobState.DOWNLOADING
    return {
        RemoteStatus.VALIDATING: JobState.VALIDATING,
        RemoteStatus.IN_PROGRESS: JobState.IN_PROGRESS,
        RemoteStatus.FINALIZING: JobState.FINALIZING,
        RemoteStatus.CANCELLING: JobState.CANCELLING,
    }[status]


def next_poll_interval(previous: float | None, changed: bool, policy: PollPolicy) -> float:
    """First polls come fast; each poll without news waits longer, up to the maximum."""
    if previous is None or changed:
        return policy.min_interval_s
    return min(policy.max_interval_s, max(policy.min_interval_s, previous * POLL_GROWTH))


def retry_delay(attempts: int, policy: PollPolicy, rng: random.Random) -> float:
    """Backoff after `attempts` consecutive failures of a step: jittered, doubling, capped.

    It starts at the polling minimum and never exceeds the polling maximum, so
    an outage is retried as patiently as a quiet batch is polled.
    """
    ceiling = min(policy.max_interval_s, policy.min_interval_s * 2 ** max(attempts, 0))
    return rng.uniform(ceiling / 2, ceiling)


def use_sweep(in_flight: int) -> bool:
    """Whether one list call should replace individual gets, given the jobs in flight."""
    return in_flight >= SWEEP_MIN_JOBS


def unanswered_code(batches: Sequence[RemoteBatchRecord], cancel_requested: bool) -> str:
    """The error code for requests the provider never answered (DESIGN §4)."""
    bound = [b for b in batches if b.remote_id is not None]
    if not bound:
        return "batch_cancelled" if cancel_requested else "not_submitted"
    status = bound[-1].status
    return {
        RemoteStatus.EXPIRED.value: "batch_expired",
        RemoteStatus.CANCELLED.value: "batch_cancelled",
        RemoteStatus.FAILED.value: "batch_failed",
    }.get(status, "not_returned")


def final_state(unanswered: int, code: str) -> JobState:
    """Completed when every request got an answer; else the cause that left some unanswered."""
    if unanswered == 0:
        return JobState.COMPLETED
    return {
        "batch_expired": JobState.EXPIRED,
        "batch_cancelled": JobState.CANCELLED,
    }.get(code, JobState.FAILED)


def event_type(state: JobState) -> str:
    """The webhook event a terminal state sends."""
    return f"batch.{state.value}"
