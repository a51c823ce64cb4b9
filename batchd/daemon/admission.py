"""Admission in the daemon: the gate before a job's first round, the "queue full" answers that
make a job wait, and the wake-ups of the queue (the decision: batchd/admission.py; the queue:
store/admission.py).

A queued job costs nothing while it waits: it is out of the due index until woken. The head of
each provider's queue is woken when room may have freed up (a round of that daemon ended, a job
was let in: the next may fit too), every QUEUE_RECHECK_S while jobs wait (room freed by another
daemon, a provider's queue emptied by others), and when a new UTC day begins (a spend budget).
"""

from __future__ import annotations

import structlog

from batchd import admission
from batchd.admission import Limit
from batchd.backoff import step_delay
from batchd.crashpoints import crashpoint
from batchd.daemon.context import Context, db
from batchd.models import Job, JobState, RemoteBatch, RemoteBatchRecord
from batchd.providers.errors import ProviderError
from batchd.store import Verdict

log = structlog.get_logger("batchd.daemon")

#: While jobs wait, the head of each queue asks again at least this often.
QUEUE_RECHECK_S = 60.0
#: What a provider's "queue full" answer teaches (its queue held no more than what was in flight
#: then) is forgotten after this long: the provider's limits change with its tiers and its load.
LEARNED_FOR_S = 3600.0


class Admitter:
    """Lets jobs in, makes them wait, wakes the queue."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        #: (provider name, model) → (tokens the provider's queue held when it said "full", until when)
        self._learned: dict[tuple[str, str], tuple[int, float]] = {}
        #: room may have freed up since the queue was last woken (at start: jobs a crash or
        #: another daemon left queued are looked at once)
        self._room = True
        #: jobs may be waiting in the queue (this daemon queued one, or a wake-up found some)
        self._waiting = True
        #: counts the jobs this daemon queued: a count of the queue read meanwhile may not have
        #: seen them, so it may not say "nothing waits" (see tick)
        self._queued = 0
        #: admissions under way (their outcome may be a queued job)
        self._admitting = 0
        #: when the queue is next woken by time
        self._recheck_at: float | None = None

    # ------------------------------------------------------------ the gate

    def limit_for(self, job: Job) -> Limit:
        settings = self._ctx.settings
        provider = self._ctx.provider_settings(job)
        batches, tokens = admission.provider_limit(provider, self._learned_tokens(job))
        day_start, month_start = admission.period_starts(self._ctx.clock())
        return Limit(
            max_batches=batches, max_tokens=tokens, usd_per_day=settings.budget.usd_per_day,
            usd_per_month=settings.budget.usd_per_month, day_start=day_start, month_start=month_start,
        )  # fmt: skip

    async def gate(self, job: Job) -> Job | None:
        """The job as let in, or None when it waits in `queued` (its reason recorded)."""
        limit = self.limit_for(job)
        if job.state is JobState.RECEIVED and not limit.any and not self._waiting:
            return job  # nothing limits it, nobody waits: the plan records it as let in
        cost = admission.estimated_cost(job, self._ctx.settings.pricing.get(job.model or ""))
        if cost is None and limit.limits_spend:
            log.warning(
                "job.cost_unknown", job_id=job.id, model=job.model, budget="not counted: its model has no price"
            )
        limits = self._ctx.provider_settings(job).limits
        # While the admission runs: room that frees up meanwhile must wake the queue this job may
        # join (room_freed), and no count of the queue read meanwhile may conclude that nothing
        # waits (tick).
        self._waiting = True
        self._admitting += 1
        try:
            verdict: Verdict = await db(
                self._ctx.store.admission.admit, job.id, expect=job.state, limit=limit,
                shards=lambda other: admission.expected_shards(other, limits), cost=cost,
            )  # fmt: skip
        finally:
            self._admitting -= 1
        if verdict.admitted:
            crashpoint("after_admitted")
            if job.state is JobState.QUEUED:
                log.info("job.admitted", job_id=job.id, waited_s=round(self._ctx.clock() - job.updated_at, 3))
            self.room_freed()  # the next in the queue may fit too
            return verdict.job
        self._note_queued()
        if verdict.reason != job.wait_reason:
            log.info("job.queued", job_id=job.id, provider=job.provider_name, reason=verdict.reason)
        return None

    async def queue_full(self, job: Job, rows: list[RemoteBatchRecord], exc: ProviderError) -> bool:
        """The provider refused a create of `job` for a full queue. When none of the round's
        shards is at the provider, the job waits in `queued` (True); else the refusal is waited
        out like any passing one by the caller (False). Either way the budget learns."""
        await self.learn(job, exc.message)
        if any(row.status.live for row in rows):
            return False
        delay = self.wait_s(job, exc.retry_after)
        reason = f"its provider's queue is full ({exc.message}); asking again within {delay:.0f} s or as room frees up"
        retry_at = self._ctx.clock() + delay
        await db(self._ctx.store.jobs.wait_for_room, job.id, expect=job.state, reason=reason, retry_at=retry_at)
        self._note_queued()
        return True

    async def batch_failed_full(self, job: Job, row: RemoteBatchRecord, remote: RemoteBatch) -> None:
        """The provider accepted a batch of `job`, then failed it for a full queue before running
        any of it (OpenAI): the same shard is created again once there is room (the job waits
        in `queued` when the rest of its round is not at the provider)."""
        await self.learn(job, remote.error or "token_limit_exceeded")
        delay = self.wait_s(job, None)
        reason = (
            f"its provider's queue was full: batch {remote.id} failed unrun ({remote.error}); "
            f"it is created again within {delay:.0f} s or as room frees up"
        )
        await db(
            self._ctx.store.batches.requeue, row, remote, expect=job.state, reason=reason,
            retry_at=self._ctx.clock() + delay,
        )  # fmt: skip
        self._note_queued()

    async def learn(self, job: Job, message: str) -> None:
        """What a "queue full" answer teaches: the queue held no more than this model's tokens in
        flight then, so later admissions stay below that for a while (LEARNED_FOR_S)."""
        tokens = await db(self._ctx.store.admission.tokens_in_flight, job)
        if tokens > 0:
            self._learned[(job.provider_name, job.model or "")] = (tokens, self._ctx.clock() + LEARNED_FOR_S)
        log.warning(
            "job.provider_queue_full", job_id=job.id, provider=job.provider_name, model=job.model,
            tokens_in_flight=tokens, error=message,
        )  # fmt: skip

    def wait_s(self, job: Job, retry_after: float | None) -> float:
        """How long a job the provider's full queue turned away waits before asking again (the
        step backoff, growing with its waits in a row; the provider's Retry-After when longer)."""
        policy = self._ctx.policy
        return step_delay(
            job.attempts + 1, policy.min_interval_s, policy.max_interval_s, self._ctx.rng, retry_after=retry_after
        )

    def _learned_tokens(self, job: Job) -> int | None:
        key = (job.provider_name, job.model or "")
        found = self._learned.get(key)
        if found is None:
            return None
        tokens, until = found
        if until <= self._ctx.clock():
            del self._learned[key]
            return None
        return tokens

    # ------------------------------------------------------------ wake-ups

    def _note_queued(self) -> None:
        self._queued += 1
        self._waiting = True

    def room_freed(self) -> None:
        """Something left the provider's flight (a round ended, a job was let in): the queue's
        heads ask again at the scheduler's next tick."""
        if self._waiting:
            self._room = True
            self._ctx.wake()

    async def tick(self, now: float) -> float | None:
        """Wake the queue's heads if room freed up or it is time; return when to come back.

        While nothing is known to wait, the queue is still read every QUEUE_RECHECK_S (one count
        on an index): jobs another daemon queued and this one took over, say, are not forgotten."""
        due = self._recheck_at is not None and now >= self._recheck_at
        if not self._waiting and due:
            self._waiting = self._room = bool(await db(self._ctx.store.admission.queued_count))
            self._recheck_at = None
        if self._waiting and (self._room or due):
            self._room = False
            queued_before = self._queued
            woken = await db(self._ctx.store.admission.wake_heads)
            waiting = bool(await db(self._ctx.store.admission.queued_count))
            # A job queued while these read (a step runs beside this) keeps the queue looked after.
            self._waiting = waiting or self._queued != queued_before or self._admitting > 0
            if woken:
                log.debug("admission.woken", jobs=woken)
            self._recheck_at = None
        if self._recheck_at is None:
            self._recheck_at = now + QUEUE_RECHECK_S
            if self._waiting and (self._ctx.settings.budget.usd_per_day or self._ctx.settings.budget.usd_per_month):
                self._recheck_at = min(self._recheck_at, admission.next_period(now))
        return self._recheck_at
