"""Records and enums shared by every part of batchd. No I/O here.

The job life cycle (DESIGN §2)::

    received → [queued →] uploading → submitting → validating → in_progress → finalizing → downloading
                                             ↘ cancelling ↘                             ↓
                                                                  completed | failed | expired | cancelled
    rejected   (never left the inbox: bad file, bad spec)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """Where a job is. Stored in the database as the lower-case value; shown by the CLI."""

    #: claimed from the inbox and validated; nothing sent yet
    RECEIVED = "received"
    #: accepted, waiting for admission: the provider's batches or enqueued tokens in flight, a
    #: spend budget, or the provider's "queue full" answer (the reason is `Job.wait_reason`)
    QUEUED = "queued"
    #: the intent to upload is committed; the input file is being uploaded
    UPLOADING = "uploading"
    #: the file is uploaded; the intent to create the batch is committed
    SUBMITTING = "submitting"
    #: the provider accepted the batch and is validating it
    VALIDATING = "validating"
    #: the provider is running the requests
    IN_PROGRESS = "in_progress"
    #: the provider is writing its result files
    FINALIZING = "finalizing"
    #: a cancel was asked for and is being carried out remotely
    CANCELLING = "cancelling"
    #: the remote batch ended; result files are being fetched and the outbox written
    DOWNLOADING = "downloading"
    #: every request ended in a success or a permanent error
    COMPLETED = "completed"
    #: the provider failed the batch or refused the upload
    FAILED = "failed"
    #: the completion window ran out before every request was answered
    EXPIRED = "expired"
    #: the user cancelled the job
    CANCELLED = "cancelled"
    #: the dropped file never left the inbox: bad file or bad spec
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.EXPIRED, JobState.CANCELLED, JobState.REJECTED}
)


class RemoteStatus(StrEnum):
    """A provider batch status, normalised from either wire dialect."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @classmethod
    def parse(cls, value: str) -> RemoteStatus:
        """Normalise Together's upper case (and its old `CANCELING`) and OpenAI's lower case."""
        lowered = value.strip().lower()
        if lowered == "canceling":
            lowered = "cancelling"
        if lowered == "canceled":
            lowered = "cancelled"
        return cls(lowered)

    @property
    def terminal(self) -> bool:
        return self in (
            RemoteStatus.COMPLETED,
            RemoteStatus.FAILED,
            RemoteStatus.EXPIRED,
            RemoteStatus.CANCELLED,
        )


class BatchStatus(StrEnum):
    """Where one of a job's remote batches is, as batchd records it (the `remote_batches.status`
    column): batchd's own steps before the provider holds the batch, then the provider's status."""

    #: planned, not uploaded yet
    PENDING = "pending"
    #: uploaded; the intent to create is committed (the create may be under way)
    CREATING = "creating"
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    #: never created: the job was cancelled first
    SKIPPED = "skipped"
    #: never created: the provider refused its upload or its create for good
    REFUSED = "refused"

    @classmethod
    def of(cls, remote: RemoteStatus) -> BatchStatus:
        """The record of a status the provider reported."""
        return cls(remote.value)

    @property
    def waiting(self) -> bool:
        """Not created yet: the submit step uploads or creates it."""
        return self in (BatchStatus.PENDING, BatchStatus.CREATING)

    @property
    def remote(self) -> RemoteStatus | None:
        """The provider's status, once the provider holds the batch; None before (or never)."""
        try:
            return RemoteStatus(self.value)
        except ValueError:
            return None

    @property
    def live(self) -> bool:
        """The provider holds the batch and has not ended it: it is polled."""
        remote = self.remote
        return remote is not None and not remote.terminal


class BatchEndpoint:
    """Endpoints a batch may target (the seed's names)."""

    CHAT_COMPLETIONS = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    #: Anthropic's Messages: what every request of a Message Batch is (not an endpoint of the
    #: OpenAI-format dialects, so not in SUPPORTED_ENDPOINTS)
    MESSAGES = "/v1/messages"
    #: Gemini's generateContent: what every request of a Gemini batch is (the model is named by
    #: the create call, not by the lines; not in SUPPORTED_ENDPOINTS either)
    GENERATE_CONTENT = "generateContent"


SUPPORTED_ENDPOINTS: tuple[str, ...] = (
    BatchEndpoint.CHAT_COMPLETIONS,
    BatchEndpoint.COMPLETIONS,
    BatchEndpoint.EMBEDDINGS,
)


class BatchJobStatus(StrEnum):
    """The seed's status values (lower case), from either wire dialect.

    A member compares equal to its value in any letter case, because the seed's
    own examples compare `batch.status == "COMPLETED"` while its values are
    lower case: `BatchJobStatus.COMPLETED == "COMPLETED" == "completed"`.
    Hashing uses the lower-case value, so a member finds a lower-case key in a
    dict or set (an upper-case plain-str key cannot be found: str hashes by case).
    """

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return str.__eq__(self, other.lower())
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if isinstance(other, str):
            return not str.__eq__(self, other.lower())
        return NotImplemented

    __hash__ = str.__hash__

    @classmethod
    def _missing_(cls, value: object) -> BatchJobStatus | None:
        # `BatchJobStatus("COMPLETED")` and Together's old `CANCELING` find their member.
        if isinstance(value, str):
            lowered = {"canceling": "cancelling", "canceled": "cancelled"}.get(value.lower(), value.lower())
            for member in cls:
                if member.value == lowered:
                    return member
        return None


MB = 1_000_000

#: The longest request line batchd takes, whatever the provider (a batchd decision, docs/design.md
#: "Decisions"): providers document no per-request byte limit below their per-batch one, and a
#: chat request carrying base64 images is tens of MB. Validation holds at most this much of a line.
MAX_REQUEST_BYTES = 32 * MB


@dataclass(frozen=True)
class Limits:
    """Per-batch limits of a provider, and the longest single request line."""

    max_bytes: int
    max_requests: int
    #: a longer line is rejected (rule `too_large`) without being held whole
    max_request_bytes: int = MAX_REQUEST_BYTES


#: One table of per-batch limits; the local backend uses Together's (DESIGN §3).
PROVIDER_LIMITS: Mapping[str, Limits] = {
    "together": Limits(max_bytes=100 * MB, max_requests=50_000),
    "openai": Limits(max_bytes=200 * MB, max_requests=50_000),
    "local": Limits(max_bytes=100 * MB, max_requests=50_000),
    "anthropic": Limits(max_bytes=256 * MB, max_requests=100_000),
    # Gemini: 2 GB per input file; it documents no request count, so batchd keeps Anthropic's
    # 100,000 (docs/design.md "Decisions"): a round's merge and follow-ups stay bounded.
    "gemini": Limits(max_bytes=2_000 * MB, max_requests=100_000),
}

#: How long a provider keeps a batch's results, by dialect, counted from the moment each entry
#: names: downloads are never later than that (docs/providers.md "Retention"). Where a dialect's
#: wire says when its results expire, that wins (each dialect's `parse_batch`).
RESULTS_KEPT: Mapping[str, timedelta] = {
    # Anthropic documents 29 days "after creation" of the batch.
    "anthropic": timedelta(days=29),
    # Gemini deletes every file 48 h after it was made: the responses file is made as the batch ends.
    "gemini": timedelta(hours=48),
    # OpenAI: `output_expires_after` when the batch was created with one (batchd never sets it),
    # else its default for files: 30 days from the file's creation (the batch's end).
    "openai": timedelta(days=30),
    # Together documents none; assumed as OpenAI's, from the batch's end (an assumption only caps
    # backoffs and orders downloads: results are declared expired only when the provider says so
    # or a download keeps failing after this time).
    "together": timedelta(days=30),
}


class FileKind(StrEnum):
    """What batchd keeps track of at the provider for one remote batch (`RemoteBatchRecord.provider_files`)."""

    #: the uploaded input file
    INPUT = "input"
    #: the output file (Anthropic: the results at the batch's `results_url`)
    OUTPUT = "output"
    #: the error file
    ERRORS = "errors"
    #: the batch itself (Anthropic, whose results live in it)
    BATCH = "batch"


class FileFate(StrEnum):
    """What became of one of a batch's files at the provider, as batchd recorded it."""

    #: downloaded whole into the daemon's work folder: not fetched again
    DOWNLOADED = "downloaded"
    #: deleted at the provider by batchd (or already gone when it deleted it)
    DELETED = "deleted"
    #: the provider refused to delete it: logged once, not tried again
    REFUSED = "refused"
    #: gone at the provider before batchd downloaded it (its retention ran out)
    EXPIRED = "expired"


#: How much larger than the biggest batch input a request body may be: room for a multipart
#: form's boundaries, part headers and fields around the file (the embedded backend's body cap).
REQUEST_BODY_SLACK = 1 << 20


@dataclass(frozen=True)
class RemoteBatch:
    """A provider's batch as batchd sees it, whatever the wire dialect."""

    id: str
    status: RemoteStatus
    input_file_id: str
    endpoint: str
    #: when the provider created it (aware, UTC); None when the wire omits it
    created_at: datetime | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    #: the provider's own words when it failed the batch
    error: str | None = None
    #: 0–100 when the provider reports it (Together)
    progress: float | None = None
    #: total / completed / failed when the provider reports them (OpenAI)
    request_counts: Mapping[str, int] | None = None
    metadata: Mapping[str, str] | None = None
    #: once it ended: when the provider stops keeping its results (aware, UTC), from the wire
    #: where it says so, else from the dialect's `RESULTS_KEPT`; None before, or when unknown
    results_expire_at: datetime | None = None
    #: the provider failed it because the account's queue was full (OpenAI's
    #: `token_limit_exceeded`), having run none of it: a wait, not a failure (daemon/poll.py)
    queue_full: bool = False
    #: the wire object as received, for the client API and for debugging
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def answered(self) -> int | None:
        """The requests the provider says it answered so far (completed + failed); None when it
        does not count them (Together: its `progress` says it instead)."""
        if self.request_counts is None:
            return None
        return self.request_counts.get("completed", 0) + self.request_counts.get("failed", 0)


@dataclass(frozen=True)
class RemoteFile:
    """A file the provider stored, as its upload answer describes it."""

    id: str
    filename: str
    bytes: int
    #: the provider's word: "batch-api" (Together), "batch" (OpenAI)
    purpose: str
    created_at: datetime | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class BatchJob:
    """A batch as the seed's client API shows it, whatever the wire dialect.

    Times are unix seconds; `status` is a `BatchJobStatus` (lower case, equal
    to either spelling). Together sends no `request_counts` (None) and one
    finish time, shown under the field of the status it finished in.
    """

    id: str
    object: str = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: BatchJobStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    #: unix seconds; 0 when the provider did not say
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: dict[str, int] | None = None
    #: beyond the seed: 0–100 (Together), the batch's metadata (OpenAI)
    progress: float | None = None
    metadata: dict[str, str] | None = None


@dataclass(frozen=True)
class BatchRequest:
    """One line of a batch input file (the seed's request format)."""

    custom_id: str
    method: str
    url: str
    body: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"custom_id": self.custom_id, "method": self.method, "url": self.url, "body": self.body}


@dataclass(frozen=True, slots=True)
class Job:
    """One submission, as stored."""

    id: str
    name: str
    source: str
    state: JobState
    #: the provider's kind ("together", "anthropic", …)
    provider: str
    created_at: float
    updated_at: float
    #: the configured provider: "default" ([provider]) or a [providers.NAME] table's NAME
    provider_name: str = "default"
    endpoint: str | None = None
    claimed_path: str | None = None
    spec_path: str | None = None
    upload_path: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    request_count: int | None = None
    completion_window: str | None = None
    model: str | None = None
    webhook_url: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    input_file_id: str | None = None
    outbox_path: str | None = None
    reason: str | None = None
    report_path: str | None = None
    rejected_path: str | None = None
    cancel_requested: bool = False
    poll_interval_s: float | None = None
    next_check_at: float | None = None
    attempts: int = 0
    last_error: str | None = None
    request_counts: Mapping[str, int] | None = None
    usage: Mapping[str, int] | None = None
    finished_at: float | None = None
    #: 0 for the first submission; each follow-up round of resubmissions counts up
    round: int = 0
    #: the daemon holding the job, until lease_until; fence counts the claims
    owner: str | None = None
    lease_until: float | None = None
    fence: int = 0
    #: the claimed file as the upload copy was made from it (size, mtime in ns)
    source_size: int | None = None
    source_mtime_ns: int | None = None
    #: why the source no longer matches what was submitted, when it changed after the take
    source_changed: str | None = None
    #: failures of the kind no step expects; past a bound the job is parked
    unexpected_failures: int = 0
    #: while parked: since when and why (the scheduler leaves it alone until it is resumed)
    parked_at: float | None = None
    parked_reason: str | None = None
    #: when the scheduler next has something to do for the job (None: never again, or until an
    #: operator acts): kept by the store from `lifecycle.next_action` at every write (store/due.py)
    due_at: float | None = None
    #: admission (#18): the tokens the job enqueues, estimated at intake (input from the request
    #: lines' size, output from their max_tokens); None for a job of an older release
    estimated_input_tokens: int | None = None
    estimated_output_tokens: int | None = None
    #: its place among jobs waiting for admission, higher first (a spec's `priority`)
    priority: int = 0
    #: when it was let in (its tokens and batches count as in flight from then on); None: not yet
    admitted_at: float | None = None
    #: while `queued`: why it waits
    wait_reason: str | None = None
    #: with [pricing]: its cost as estimated at admission, then as its usage says once ended
    estimated_cost_usd: float | None = None
    cost_usd: float | None = None
    #: the provider's `stuck_after_s` when the job's last round was planned (0 or None: the
    #: dialect's default, `lifecycle.stuck_limit`)
    stuck_after_s: float | None = None
    #: when a provider's webhook said one of its batches ended, until the poll that follows
    #: (batchd/hooks): such a job is polled on its own at once, not by a list sweep
    hinted_at: float | None = None
    #: packing (batchd/packs.py): a small file's job names the pack job whose remote batches carry
    #: its requests; a pack job counts the files it carries
    pack_id: str | None = None
    pack_members: int | None = None

    @property
    def is_pack(self) -> bool:
        """A pack: a job of batchd's own that carries the requests of several small files."""
        return self.pack_members is not None

    @property
    def in_pack(self) -> bool:
        """Waiting for its pack: its state follows the pack's until the pack's round ends (then
        it ends, or goes on alone with a follow-up round of its own)."""
        return self.pack_id is not None and self.round == 0 and not self.state.terminal

    @property
    def estimated_tokens(self) -> int:
        """The tokens the job enqueues at its provider, as estimated at intake (0: unknown)."""
        return (self.estimated_input_tokens or 0) + (self.estimated_output_tokens or 0)

    @property
    def short_id(self) -> str:
        return self.id[:8]


@dataclass(frozen=True, slots=True)
class RemoteBatchRecord:
    """One remote batch a job owns (or the committed intent to create it)."""

    id: int
    job_id: str
    round: int
    shard: int
    input_file_id: str
    remote_id: str | None
    status: BatchStatus
    create_attempts: int
    intent_at: float
    updated_at: float
    remote_created_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    error: str | None = None
    progress: float | None = None
    #: the shard's own file (a part of the job's input, or a follow-up round's requests)
    input_path: str | None = None
    request_count: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    #: batchd's clock when it last saw the batch move: bound, a new status, more requests
    #: answered; how long it has been stuck counts from here (None: bound by an older release)
    progress_at: float | None = None
    #: the requests the provider says it answered so far (completed + failed), when it says
    answered: int | None = None
    #: when batchd found the batch stuck (not running, or running without progress, past the
    #: limit) and set out to cancel it; its unanswered requests then count as expired
    stuck_at: float | None = None
    #: unix seconds: when the provider stops keeping its results (see RemoteBatch)
    results_expire_at: float | None = None
    #: what became of its files at the provider: FileKind value → FileFate value
    provider_files: Mapping[str, str] | None = None

    def fate(self, kind: FileKind) -> FileFate | None:
        """What batchd recorded of this batch's file of `kind` (None: nothing yet)."""
        found = (self.provider_files or {}).get(kind.value)
        return FileFate(found) if found is not None else None


@dataclass(frozen=True)
class NewEvent:
    """A webhook event to insert with a transition, and where it goes."""

    id: str
    type: str
    body: bytes
    #: (url, secret_ref) pairs
    targets: Sequence[tuple[str, str]]


class DeliveryState(StrEnum):
    """Where one event's delivery to one endpoint is (the `deliveries.state` column; DESIGN §5)::

        pending → delivered | dead | disabled
        disabled → pending    (`batchd webhooks enable URL`)

    A delivered or dead delivery is never written again: `batchd webhooks replay` adds a new
    pending row for its event instead. `webhooks.policy.decide` says where an attempt leads.
    """

    #: waiting for its next attempt, due at `next_attempt_at` (an attempt may be under way)
    PENDING = "pending"
    #: a receiver answered 2xx: done
    DELIVERED = "delivered"
    #: dead-lettered: the retry schedule ran out, or no secret can sign it any more; kept for a replay
    DEAD = "dead"
    #: parked: its endpoint answered 410 and stays disabled until `batchd webhooks enable URL`
    DISABLED = "disabled"


@dataclass(frozen=True)
class Delivery:
    """One event on its way to one endpoint."""

    id: int
    event_id: str
    event_type: str
    job_id: str | None
    body: bytes
    url: str
    secret_ref: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None
    #: the daemon sending it, until lease_until
    owner: str | None = None
    lease_until: float | None = None


@dataclass(frozen=True)
class StoredEvent:
    """A webhook event as stored: its id and body bytes are what every attempt sends."""

    id: str
    job_id: str | None
    type: str
    body: bytes
    created_at: float


@dataclass(frozen=True)
class EndpointStats:
    """What `batchd webhooks` shows of one URL deliveries went to.

    The state counts look at each event's latest delivery to the URL (a replay adds a row);
    `failed_attempts` counts every attempt that did not deliver, replays included.
    """

    url: str
    pending: int = 0
    delivered: int = 0
    dead: int = 0
    #: parked because the endpoint is disabled
    disabled: int = 0
    failed_attempts: int = 0
    #: delivery rows a replay superseded
    replayed: int = 0
    next_attempt_at: float | None = None
    last_error: str | None = None
    #: "config" ([[webhooks]]) or "inbox" (a spec's webhook_url)
    secret_ref: str | None = None
    disabled_at: float | None = None
    disabled_reason: str | None = None
