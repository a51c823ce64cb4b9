"""What the status page reads from the store: read-only, each read bounded.

Called in a worker thread (the store is synchronous). The listing reads at most `limit`
jobs and their remote batches, the newest daemons, and each webhook endpoint's figures
(the `batchd webhooks` query and rows, reused); a job's page reads that job alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchd.admission import period_starts
from batchd.cli.records import daemon_records, endpoint_rows, job_batches
from batchd.config import Settings
from batchd.models import Delivery, Job, JobState, RemoteBatchRecord, StoredEvent
from batchd.outbox import OUTBOX_FILES
from batchd.store import Store
from batchd.store.views import JobsPage, newest_jobs

#: Jobs the listing shows at most: the newest that match.
JOBS_SHOWN = 200
#: Daemons the listing shows at most: the newest (every restart adds one).
DAEMONS_SHOWN = 20
#: The longest name search taken (a longer one is cut).
SEARCH_MAX = 200


@dataclass(frozen=True)
class Filter:
    """The listing's query: a state (None: all) and a piece of the name (None: any)."""

    state: JobState | None = None
    search: str | None = None

    @classmethod
    def parse(cls, state: str | None, search: str | None) -> Filter:
        """From the page's form; an unknown state or an empty search means "any"."""
        known = {s.value for s in JobState}
        text = (search or "").strip()[:SEARCH_MAX]
        return cls(JobState(state) if state in known else None, text or None)


@dataclass(frozen=True)
class Listing:
    """What `/` shows."""

    filter: Filter
    page: JobsPage
    batches: dict[str, list[RemoteBatchRecord]]
    #: every job by state (one GROUP BY, as the jobs gauge counts them)
    counts: dict[str, int]
    #: `batchd status --json` records, newest first
    daemons: list[dict[str, Any]]
    #: `batchd webhooks --json` rows (URLs redacted)
    endpoints: list[dict[str, Any]]
    now: float
    #: (period, spent, budget) for each [budget] set: "day", "month" (UTC; estimated USD)
    spend: list[tuple[str, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class JobDetail:
    """What `/jobs/ID` shows."""

    job: Job
    batches: list[RemoteBatchRecord]
    deliveries: list[Delivery]
    events: list[StoredEvent]
    #: the outbox files that exist
    outbox_files: list[str]
    now: float


def read_listing(store: Store, settings: Settings, query: Filter, *, now: float, limit: int = JOBS_SHOWN) -> Listing:
    state = query.state.value if query.state is not None else None
    page = newest_jobs(store, state=state, name=query.search, limit=limit)
    return Listing(
        filter=query,
        page=page,
        batches=store.batches.by_job([j.id for j in page.jobs]),
        counts=store.jobs.counts_by_state(),
        daemons=daemon_records(store.cluster.daemons(limit=DAEMONS_SHOWN), settings.cluster.lease_s, now),
        endpoints=endpoint_rows(settings, store.deliveries.endpoint_stats()),
        now=now,
        spend=spend_against_budget(store, settings, now),
    )


def spend_against_budget(store: Store, settings: Settings, now: float) -> list[tuple[str, float, float]]:
    """(period, spent, budget) for each spend budget set, period "day" or "month" (UTC): what `/`
    and `/metrics` show."""
    day_start, month_start = period_starts(now)
    budget = settings.budget
    periods = (("day", day_start, budget.usd_per_day), ("month", month_start, budget.usd_per_month))
    return [(period, store.admission.spent_since(start), usd) for period, start, usd in periods if usd]


def read_job(store: Store, job_id: str, *, now: float) -> JobDetail | None:
    job = store.jobs.get(job_id)
    if job is None:
        return None
    outbox = Path(job.outbox_path) if job.outbox_path else None
    files = [str(outbox / name) for name in OUTBOX_FILES if outbox is not None and (outbox / name).is_file()]
    return JobDetail(
        job=job,
        batches=job_batches(store, job),
        deliveries=store.deliveries.select(job_id=job_id),
        events=store.deliveries.job_events(job_id),
        outbox_files=files,
        now=now,
    )
