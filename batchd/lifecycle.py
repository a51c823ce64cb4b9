"""Pure decisions about a job: what to do next, and when. No I/O, no clock.

The daemon asks `next_action(job, batches, now)`, carries the answer out, and
records the outcome through the Store. Everything here is a function of its
arguments, so the whole life cycle can be tested without a network, a disk or
a real clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from batchd.models import BatchStatus, FileFate, FileKind, Job, JobState, RemoteBatchRecord, RemoteStatus

#: When at least this many jobs are in flight, one list call serves them all instead of a get each.
SWEEP_MIN_JOBS = 3
#: A remote batch's `created_at` (the provider's clock) may lie up to this much before what
#: batchd's clock says about it: the two are not the same clock. Reconciliation adopts batches
#: created this much before the recorded intent, and a sweep's listing reaches this far back.
CLOCK_SKEW_S = 60.0

#: Each poll without news stretches the interval by this factor (up to the maximum).
POLL_GROWTH = 1.5

HOUR = 3600.0
#: How long a batch may wait before it runs, or run without progress, before batchd cancels it and
#: sends its unanswered requests to a follow-up round, per dialect, when `stuck_after_s` is 0
#: (docs/design.md "Stuck batches"). A quarter of the 24 h window: a batch still waiting then
#: tends to wait until it expires, and the follow-up keeps 18 h. Gemini's window is 48 h: 12 h.
#: The embedded backend runs what it gets at once: no limit (None).
STUCK_AFTER_S: Mapping[str, float | None] = {
    "together": 6 * HOUR,
    "openai": 6 * HOUR,
    "anthropic": 6 * HOUR,
    "gemini": 12 * HOUR,
    "local": None,
}
#: The batch statuses in which a batch can be stuck: not running yet, or running. (Finalizing,
#: it is writing its results; cancelling, it is on its way out already.)
STUCK_STATUSES = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS})


class Step(StrEnum):
    """What the daemon should do for a job."""

    #: nothing: the job is terminal
    NONE = "none"
    #: cut the round's requests into shards within the provider's limits (RECEIVED; admission
    #: first, when the job's provider or a spend budget limits what is in flight)
    PLAN = "plan"
    #: ask for admission again (QUEUED, once woken: room freed up, or a refusal's wait ended)
    ADMIT = "admit"
    #: upload and create the round's shards that are not created yet
    SUBMIT = "submit"
    #: ask the provider where the live remote batches are
    POLL = "poll"
    #: ask the provider to cancel the live remote batches
    CANCEL = "cancel"
    #: every batch of the round ended: fetch results, merge; then a follow-up round or the end
    DOWNLOAD = "download"


@dataclass(frozen=True)
class Action:
    step: Step
    #: unix seconds at which to act (<= now: act now)
    at: float
    #: the remote batches the step concerns (SUBMIT: those not created; POLL, CANCEL: the live ones)
    batches: tuple[RemoteBatchRecord, ...] = ()


@dataclass(frozen=True)
class PollPolicy:
    min_interval_s: float
    max_interval_s: float


#: States in which the provider holds the batch and the job is polled.
IN_FLIGHT = (JobState.VALIDATING, JobState.IN_PROGRESS, JobState.FINALIZING, JobState.CANCELLING)
#: Job states from least to most advanced, for summarising several live batches.
_ADVANCE = (JobState.VALIDATING, JobState.IN_PROGRESS, JobState.FINALIZING, JobState.CANCELLING)


#: How an accepted job may end (`rejected` is only ever inserted, never reached).
ENDINGS = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.EXPIRED, JobState.CANCELLED})
#: The states a live job may move to from each state. A crash can leave a job's row behind its
#: batches (e.g. `uploading` with every batch created), and a sweep's answer may name only some
#: of a round's batches, so within a round any live state may follow any other. What never
#: happens: leaving an ending, going back to `received`, entering `rejected`, or moving on
#: from `downloading` other than by a follow-up round (`uploading`) or an ending.
_WITHIN_A_ROUND = frozenset(IN_FLIGHT) | {JobState.UPLOADING, JobState.SUBMITTING, JobState.DOWNLOADING} | ENDINGS
NEXT_STATES: dict[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset({JobState.QUEUED, JobState.UPLOADING}) | ENDINGS,
    # Let in: planned (round 0) or its waiting shards submitted (or, cancelled, skipped).
    JobState.QUEUED: _WITHIN_A_ROUND,
    # A round none of whose shards the provider holds (any more) waits its turn when the
    # provider's queue is full: refused at create, or failed unrun (OpenAI) once accepted.
    **{state: _WITHIN_A_ROUND | {JobState.QUEUED} for state in (JobState.UPLOADING, JobState.SUBMITTING, *IN_FLIGHT)},
    JobState.DOWNLOADING: frozenset({JobState.UPLOADING}) | ENDINGS,
    **{state: frozenset() for state in JobState if state.terminal},
}


def may_move(before: JobState, after: JobState) -> bool:
    """Whether the life cycle lets a job go from `before` to `after` (staying put always may)."""
    return after == before or after in NEXT_STATES[before]


def current_round(job: Job, batches: Sequence[RemoteBatchRecord]) -> list[RemoteBatchRecord]:
    return [b for b in batches if b.round == job.round]


def next_action(job: Job, batches: Sequence[RemoteBatchRecord], now: float) -> Action:
    """The next step for `job`, given its remote batches (every round), at time `now`."""
    due = job.next_check_at if job.next_check_at is not None else now
    if job.state.terminal or job.parked_at is not None or job.in_pack:
        # A parked job waits for an operator (`batchd resume`), whatever its state; a file in a
        # pack waits for its pack, whose round's end settles it (daemon/finish.py).
        return Action(Step.NONE, now)
    rows = current_round(job, batches)
    if job.state == JobState.QUEUED:
        if job.cancel_requested:
            # The submit step skips the shards never created (and settles one whose create's
            # outcome was unknown); with none, the round ends here.
            waiting = tuple(b for b in rows if b.status.waiting)
            return Action(Step.SUBMIT, now, waiting) if waiting else Action(Step.DOWNLOAD, now)
        # Woken (room freed up, a refusal's wait ended): ask again; else it waits for a wake-up,
        # costing nothing meanwhile (daemon/admission.py).
        if job.next_check_at is None:
            return Action(Step.NONE, now)
        return Action(Step.ADMIT, due, tuple(b for b in rows if b.status.waiting))
    if job.state == JobState.DOWNLOADING:
        return Action(Step.DOWNLOAD, due)
    if not rows:
        # Cancelled before anything was planned: nothing can exist remotely; end here.
        return Action(Step.DOWNLOAD, now) if job.cancel_requested else Action(Step.PLAN, due)
    waiting = tuple(b for b in rows if b.status.waiting)
    if waiting:
        return Action(Step.SUBMIT, due, waiting)
    live = tuple(b for b in rows if b.status.live)
    if job.cancel_requested and job.state != JobState.CANCELLING and live:
        return Action(Step.CANCEL, now, live)
    if live and job.cancel_requested:
        # The user's cancel is under way: it is polled until the provider confirms.
        return Action(Step.POLL, due, live)
    if live:
        return _watch(job, live, due, now)
    return Action(Step.DOWNLOAD, now)


def _watch(job: Job, live: tuple[RemoteBatchRecord, ...], due: float, now: float) -> Action:
    """Live batches nobody cancelled: polled, and cancelled once they are found stuck."""
    # Found stuck before, but the provider does not say cancelling yet (the cancel failed, or is
    # not seen yet): sent again at each check, as the poll it also is.
    unconfirmed = tuple(b for b in live if b.stuck_at is not None and b.status in STUCK_STATUSES)
    deadlines = {b.id: d for b in live if (d := stuck_deadline(job, b)) is not None}
    stuck = tuple(b for b in live if b.id in deadlines and is_stuck(job, b, now))
    if stuck:
        return Action(Step.CANCEL, min(deadlines[b.id] for b in stuck), unconfirmed + stuck)
    if unconfirmed:
        return Action(Step.CANCEL, due, unconfirmed)
    # Polled at its deadline at the latest: a batch is found stuck on what the provider says
    # then, never on an older answer. A deadline the job was looked at since (its last write: a
    # poll, or a poll's failure and its backoff) is not polled for again: the next check stands.
    ahead = [d for d in deadlines.values() if d > job.updated_at]
    return Action(Step.POLL, min([due, *ahead]), live)


def moved(row: RemoteBatchRecord, status: BatchStatus, progress: float | None, answered: int | None) -> bool:
    """Whether the provider's answer shows the batch moved since `row` was written: another
    status, or more of it done (a count the answer leaves out is no news)."""
    return status != row.status or _more(progress, row.progress) or _more(answered, row.answered)


def _more(new: float | None, old: float | None) -> bool:
    return new is not None and new > (old or 0)


def stuck_limit(kind: str, configured: float | None) -> float | None:
    """How long a batch of the `kind` dialect may wait or run without progress: the configured
    `stuck_after_s` when above 0, else the dialect's default (None: no limit)."""
    if configured is not None and configured > 0:
        return configured
    return STUCK_AFTER_S.get(kind)


def stuck_deadline(job: Job, batch: RemoteBatchRecord) -> float | None:
    """When `batch` counts as stuck unless it moves first: the last time it moved plus the limit.
    None when no limit applies: none for the dialect, a batch neither waiting nor running, one
    found stuck already, or one bound by an older release (its clock was never started)."""
    limit = stuck_limit(job.provider, job.stuck_after_s)
    if limit is None or batch.progress_at is None or batch.stuck_at is not None:
        return None
    if batch.status not in STUCK_STATUSES:
        return None
    return batch.progress_at + limit


def is_stuck(job: Job, batch: RemoteBatchRecord, now: float) -> bool:
    """Whether `batch` is stuck at `now`: past its deadline, and the provider's last word on it,
    heard at or after that deadline (`updated_at`: every write of a bound batch is one), says it
    has not moved since."""
    deadline = stuck_deadline(job, batch)
    return deadline is not None and deadline <= now and batch.updated_at >= deadline


def summary_state(rows: Sequence[RemoteBatchRecord], *, cancelling: bool) -> JobState:
    """The job state that sums up a round's remote batches."""
    statuses = {b.status for b in rows}
    if BatchStatus.PENDING in statuses:
        return JobState.UPLOADING
    if BatchStatus.CREATING in statuses:
        return JobState.SUBMITTING
    live = [b.status.remote for b in rows if b.status.live]
    if not live:
        return JobState.DOWNLOADING
    if cancelling:
        return JobState.CANCELLING
    return min((state_for_remote(s) for s in live if s is not None), key=_ADVANCE.index)


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


def use_sweep(in_flight: int) -> bool:
    """Whether one list call should replace individual gets, given the jobs in flight."""
    return in_flight >= SWEEP_MIN_JOBS


def polled_alone(job: Job) -> bool:
    """Whether a due poll of `job` is a get of its own, started at once whatever the sweeps: a
    provider's webhook said one of its batches ended (a hint), and the sweep under way (or the
    next one) may have listed it before that, or be a while off."""
    return job.hinted_at is not None


#: Why a request ended unanswered, most significant first: when a round's batches ended
#: differently, the unanswered requests carry the first cause that applies. Results that expired
#: at the provider before they were downloaded (`results_expired`) come between the two groups.
_CAUSES = (
    (BatchStatus.REFUSED, "not_submitted"),
    (BatchStatus.SKIPPED, "batch_cancelled"),
    (BatchStatus.CANCELLED, "batch_cancelled"),
)
_LATER_CAUSES = (
    (BatchStatus.EXPIRED, "batch_expired"),
    (BatchStatus.FAILED, "batch_failed"),
)
#: The code of requests whose answers expired at the provider before batchd downloaded them.
RESULTS_EXPIRED = "results_expired"
#: Result files, as a batch's record names them.
RESULT_KINDS = (FileKind.OUTPUT, FileKind.ERRORS)


def results_lost(batch: RemoteBatchRecord) -> bool:
    """Whether some of the batch's results expired at the provider before they were downloaded."""
    return any(batch.fate(kind) is FileFate.EXPIRED for kind in RESULT_KINDS)


def unanswered_code(batches: Sequence[RemoteBatchRecord], cancel_requested: bool) -> str:
    """The error code for requests the provider never answered (DESIGN §4), from the last round;
    `results_expired` from any round (such requests are never resubmitted, so they stay
    unanswered through every later round).

    A batch batchd cancelled as stuck counts as expired (batchd ended the wait early, as the
    window would have; such requests are resubmitted), unless the user cancelled the job.
    """
    if not batches:
        return "batch_cancelled" if cancel_requested else "not_submitted"
    last = max(b.round for b in batches)
    statuses = {_cause(b, cancel_requested) for b in batches if b.round == last}
    for status, code in _CAUSES:
        if status in statuses:
            return code
    if any(results_lost(b) for b in batches):
        return RESULTS_EXPIRED
    for status, code in _LATER_CAUSES:
        if status in statuses:
            return code
    return "not_returned"


def _cause(batch: RemoteBatchRecord, cancel_requested: bool) -> BatchStatus:
    """How a batch ended, as a cause of unanswered requests."""
    if batch.stuck_at is not None and batch.status == BatchStatus.CANCELLED and not cancel_requested:
        return BatchStatus.EXPIRED
    return batch.status


def cancelled_as_stuck(batch: RemoteBatchRecord) -> bool:
    """Whether batchd itself cancelled `batch` because it was stuck (and it ended cancelled)."""
    return batch.stuck_at is not None and batch.status == BatchStatus.CANCELLED


#: A download still failing after this many attempts in a row, once its results' expiry time has
#: passed, is given up: the results are taken as gone (a provider answering a vanished file with
#: a passing error, a 5xx, must not be asked for ever).
GIVE_UP_AFTER_EXPIRY = 5
#: What a provider answers for a file it no longer has.
GONE_STATUSES = frozenset({404, 410})


def results_gone(status: int | None, retryable: bool, *, now: float, expires_at: float | None, failures: int) -> bool:
    """Whether a failed download means the results are gone for good (expired at the provider).

    The provider's word decides: 404 or 410 at any time (a file it gave an id for and no longer
    has). Once the expiry time has passed, also any refusal that is not passing (a 403, say:
    Google answers that for a file that does not exist), and a passing one on its `failures`-th
    attempt in a row (GIVE_UP_AFTER_EXPIRY). Before it, anything else is retried as usual. The
    expiry time alone never decides: an assumed retention may be shorter than the real one, and
    results still there are worth one more request.
    """
    if status in GONE_STATUSES:
        return True
    if expires_at is None or now < expires_at:
        return False
    return not retryable or failures >= GIVE_UP_AFTER_EXPIRY


def results_deadline(batches: Sequence[RemoteBatchRecord], *, after: float | None = None) -> float | None:
    """When the first of the result files still to download expires at the provider (None:
    none is known to), of those expiring after `after` when given: the download step's backoff
    never waits past it (daemon/failures.py), and the scheduler starts the download whose
    results expire first, first."""
    times = [
        b.results_expire_at
        for b in batches
        if b.results_expire_at is not None
        and (after is None or b.results_expire_at > after)
        and b.remote_id is not None
        and any(file_id and b.fate(kind) is None for kind, file_id in _result_files(b))
    ]
    return min(times, default=None)


def _result_files(batch: RemoteBatchRecord) -> tuple[tuple[FileKind, str | None], ...]:
    return (FileKind.OUTPUT, batch.output_file_id), (FileKind.ERRORS, batch.error_file_id)


def wants_followup(job: Job, max_rounds: int) -> bool:
    """Whether a round's passing failures may go to another round (never after a cancel)."""
    return not job.cancel_requested and job.round < max_rounds


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
