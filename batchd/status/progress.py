"""How much of a job was answered: the figure the status page's progress bars show. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from batchd.cli.records import progress_of
from batchd.models import Job, JobState, RemoteBatchRecord


def answered_percent(job: Job, batches: Sequence[RemoteBatchRecord]) -> float | None:
    """Percent of the job's requests that got an answer (a success or an error line of the
    provider's); None when unknown.

    A finished job counts `completed + failed - unanswered` over `total`: a cancelled job with
    13 of 20 requests answered shows 65, not 100 (`failed` also holds the lines batchd wrote for
    requests never answered). In flight, the provider's own figure (`batchd jobs` shows the same).
    """
    if job.state is JobState.REJECTED:
        return None
    if not job.state.terminal:
        return progress_of(job, batches)
    counts = job.request_counts or {}
    total = counts.get("total")
    if job.state is JobState.COMPLETED or total == 0:
        # Completed: every request ended in a success or a permanent error (DESIGN §2).
        return 100.0
    if total is None or "unanswered" not in counts:
        return None  # finished before batchd kept the unanswered figure, or never counted
    answered = counts.get("completed", 0) + counts.get("failed", 0) - counts["unanswered"]
    return round(100.0 * max(0, answered) / total, 2)
