"""When a step fails: how the job backs off, what is counted against it, and when it is parked.

The provider's refusals and outside faults (the database, the disk) are waited out with the
step's backoff as long as they last: a full disk for an hour costs an hour, not a job. Only
errors no step expects (bugs) are counted against the job; after PARK_AFTER of them in a row
the job is parked: the scheduler leaves it alone, `batchd jobs`/`show` say so with the last
error, and `batchd resume JOB` takes it up again.

`step_failed` never raises: it is the last line behind every step, and its own database
write may fail too (the same full disk, a read-only file, a PostgreSQL blip). Then the
backoff is kept in memory (`Context.hold`) and the fault is reported.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import structlog

from batchd import lifecycle, metrics
from batchd.backoff import before_deadline, step_delay
from batchd.daemon.context import Context, db
from batchd.faults import Kind, classify, describe
from batchd.models import Job, JobState
from batchd.providers.errors import ProviderError
from batchd.store import StaleState

log = structlog.get_logger("batchd.daemon")

#: Unexpected failures of a job's steps in a row before the job is parked.
PARK_AFTER = 5


class NeedsOperator(Exception):
    """A step cannot go on without a person's decision (an ambiguous reconcile): the job is
    parked at once, with this message as its reason (`batchd jobs`/`show`), until `batchd
    resume`."""


#: Where job steps report the outside faults they meet (Faults).
STEPS = "steps"


async def step_failed(ctx: Context, job: Job, exc: BaseException) -> None:
    """A step of `job` failed with `exc`: back off (recorded, else held in memory), count a bug."""
    try:
        await _step_failed(ctx, job, exc)
    except Exception as handler_exc:
        # Nothing here may end the daemon; the job is simply looked at again after the hold.
        log.exception("job.failure_handler_failed", job_id=job.id, error=describe(handler_exc))
        ctx.hold(job.id, ctx.clock() + ctx.policy.max_interval_s)


async def _results_deadline(ctx: Context, job: Job, now: float) -> float | None:
    """When the first results the job still has to download expire, of those not expired by
    `now` (None: unknown, or the database cannot say now: the backoff is then not cut)."""
    try:
        batches = await db(ctx.store.batches.of_job, job.id)
    except Exception as read_exc:
        ctx.faults.report(STEPS, read_exc)
        return None
    return lifecycle.results_deadline(batches, after=now)


async def _step_failed(ctx: Context, job: Job, exc: BaseException) -> None:
    kind = classify(exc)
    try:
        # The step may have moved the job on before failing (planned, uploaded): back off from there.
        job = await db(ctx.store.jobs.get, job.id) or job
    except Exception as read_exc:
        ctx.faults.report(STEPS, read_exc)
    attempts = job.attempts + 1
    retry_after = exc.retry_after if isinstance(exc, ProviderError) else None
    policy = ctx.policy
    delay = step_delay(attempts, policy.min_interval_s, policy.max_interval_s, ctx.rng, retry_after=retry_after)
    now = ctx.clock()
    if job.state is JobState.DOWNLOADING:
        # Never wait past the moment the provider lets the results go (not even for a Retry-After).
        deadline = await _results_deadline(ctx, job, now)
        delay = before_deadline(delay, now=now, deadline=deadline, floor=policy.min_interval_s)
    next_check_at = now + delay
    error = str(exc)[:2000] or type(exc).__name__
    metrics.retry(f"step.{job.state.value}")
    write: Any
    if isinstance(exc, NeedsOperator):
        metrics.job_parked()
        log.error("job.parked", job_id=job.id, state=job.state.value, reason=error)
        write = partial(
            ctx.store.jobs.record_unexpected, job.id, expect=job.state, attempts=attempts,
            failures=job.unexpected_failures, next_check_at=next_check_at, error=error, park=True,
        )  # fmt: skip
    elif kind is Kind.UNEXPECTED:
        failures = job.unexpected_failures + 1
        park = failures >= PARK_AFTER
        metrics.unexpected_error("step")
        log.error(
            "job.step_crashed", job_id=job.id, state=job.state.value, unexpected_failures=failures, parked=park,
            wait_s=round(delay, 3), exc_info=exc,
        )  # fmt: skip
        if park:
            metrics.job_parked()
            log.error("job.parked", job_id=job.id, state=job.state.value, reason=error)
        write = partial(
            ctx.store.jobs.record_unexpected, job.id, expect=job.state, attempts=attempts, failures=failures,
            next_check_at=next_check_at, error=error, park=park,
        )  # fmt: skip
    else:
        if kind is not Kind.PROVIDER:
            ctx.faults.report(STEPS, exc)
        log.warning(
            "job.step_failed", job_id=job.id, state=job.state.value, attempts=attempts, wait_s=round(delay, 3),
            error=error if kind is Kind.PROVIDER else describe(exc),
        )  # fmt: skip
        write = partial(
            ctx.store.jobs.back_off, job.id, expect=job.state, attempts=attempts, next_check_at=next_check_at,
            error=error,
        )  # fmt: skip
    # Held in memory as well: if the write below fails, the scheduler must not retry at once.
    ctx.hold(job.id, next_check_at)
    try:
        await db(write)
    except StaleState:
        pass  # moved on (another daemon, a cancel): its own state says what comes next
    except Exception as write_exc:
        ctx.faults.report(STEPS, write_exc)
        log.warning("job.backoff_not_recorded", job_id=job.id, error=describe(write_exc))
