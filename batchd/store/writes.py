"""What a write to the store says: typed records for its transitions.

No column name travels as a string outside the store: each transition method of an
aggregate takes one of these records (or plain typed arguments), and the aggregate
alone knows which columns that means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batchd.models import JobState, RemoteBatch


@dataclass(frozen=True)
class Hold:
    """A daemon's claim on a job: it holds the job at `fence` until `lease_until`."""

    owner: str
    fence: int
    lease_until: float


@dataclass(frozen=True)
class NewJob:
    """A submission the inbox accepted (or a manual retry): inserted as `received`."""

    id: str
    name: str
    source: str
    provider: str
    #: the configured provider ("default": [provider]); `provider` is its kind
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
    #: the daemon that took the file holds the job from the start; None: nobody yet
    hold: Hold | None = None
    #: the claimed file as the upload copy was made from it (to tell later that it changed)
    source_size: int | None = None
    source_mtime_ns: int | None = None
    #: admission: the tokens its requests enqueue (estimated) and its place in the queue
    estimated_input_tokens: int | None = None
    estimated_output_tokens: int | None = None
    priority: int = 0
    #: packing: the pack a small file's job waits in; a pack's count of files
    pack_id: str | None = None
    pack_members: int | None = None


@dataclass(frozen=True)
class RejectedJob:
    """A dropped file that will not be taken: inserted as `rejected`, already finished."""

    id: str
    name: str
    source: str
    provider: str
    claimed_path: str
    rejected_path: str
    report_path: str
    reason: str
    finished_at: float
    provider_name: str = "default"


@dataclass(frozen=True)
class NextCheck:
    """A job's state after the provider answered, and when to look at it again.

    Writing one also clears the step's failure count and last error: the contact worked.
    """

    state: JobState
    poll_interval_s: float
    next_check_at: float


@dataclass(frozen=True)
class Ending:
    """A job's terminal transition: how it ended and what job.json says of it."""

    state: JobState
    finished_at: float
    reason: str | None
    request_counts: Mapping[str, int]
    usage: Mapping[str, int]
    #: with [pricing]: what its usage cost, estimated (spend budgets count it from then on)
    cost_usd: float | None = None


@dataclass(frozen=True)
class ShardPlan:
    """One remote batch of a round, as planned: its own input file."""

    input_path: str
    request_count: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class PollAnswer:
    """What the provider said of one remote batch, and the job's next check that follows.

    `expect` is the job state the answer was read against, `hint` the job's `hinted_at` then:
    the write applies only while the job is still in that state with that hint. A provider's
    webhook that arrived meanwhile (a newer hint) makes the answer stale: it may have been read
    before the batch ended, and the hinted job is polled again at once instead.
    """

    record_id: int
    job_id: str
    remote: RemoteBatch
    expect: JobState
    check: NextCheck
    #: the requests the provider says it answered, as kept (its last count when this answer has none)
    answered: int | None = None
    #: the answer shows the batch moved (a new status, more answered): its stuck clock starts again
    moved: bool = False
    hint: float | None = None


# ---------------------------------------------------------------- webhook deliveries
# What one attempt at a delivery led to (a `webhooks.policy` decision), or why a due delivery
# was not sent, as written by `DeliveryStore.record_outcomes`. A failed attempt carries
# `seen_next_at`, the next_attempt_at it started from: if a replay changed that meanwhile, the
# replay's schedule wins and only the attempt's own record (count, status, error) is written.


@dataclass(frozen=True)
class Delivered:
    """A receiver answered 2xx: the delivery is done (state delivered, its error cleared)."""

    delivery_id: int
    #: attempts made, this one included
    attempts: int
    status: int
    delivered_at: float


@dataclass(frozen=True)
class RetryLater:
    """A failed attempt with delays left: the delivery stays pending, due at `next_attempt_at`."""

    delivery_id: int
    #: attempts made, this one included
    attempts: int
    #: the receiver's status, or None when no answer came
    status: int | None
    error: str | None
    next_attempt_at: float
    seen_next_at: float


@dataclass(frozen=True)
class DeadLettered:
    """A failed attempt after the last delay (or one nothing could sign): the delivery is dead."""

    delivery_id: int
    #: attempts made, this one included
    attempts: int
    #: the receiver's status, or None when no answer came
    status: int | None
    error: str | None
    seen_next_at: float


@dataclass(frozen=True)
class EndpointGone:
    """A 410 answer: the attempt is counted; disabling the endpoint then parks the delivery."""

    delivery_id: int
    #: attempts made, this one included
    attempts: int
    status: int = 410


@dataclass(frozen=True)
class Parked:
    """A due delivery not sent because its endpoint is disabled (state disabled, with the reason)."""

    delivery_id: int
    reason: str


#: Every write `DeliveryStore.record_outcomes` takes.
DeliveryOutcome = Delivered | RetryLater | DeadLettered | EndpointGone | Parked
