"""Submitting: planning a round's shards, uploading each, creating its batch, reconciling.

Every remote side effect is preceded by a committed intent (DESIGN §2): the upload's file id
and the intent to create are recorded before the create call, and the create attempt is
counted before it is sent, so that after a crash the next try lists the provider's batches
and adopts the one an interrupted create made instead of creating a second.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import anyio
import structlog

from batchd import lifecycle
from batchd.crashpoints import crashpoint
from batchd.daemon.admission import Admitter
from batchd.daemon.context import Context, db
from batchd.daemon.failures import NeedsOperator
from batchd.inbox import ensure_job_files
from batchd.models import BatchStatus, Job, JobState, RemoteBatch, RemoteBatchRecord, RemoteStatus
from batchd.providers.anthropic import request_total
from batchd.providers.base import ProviderError
from batchd.request_rules import id_key
from batchd.safe_fs import check_within
from batchd.shards import Shard, split, write_followups
from batchd.store import CreatesBusy, ShardPlan, StaleState

log = structlog.get_logger("batchd.daemon")

#: Shards of one job uploaded and created at once.
SHARDS_AT_ONCE = 4
#: How long a reconcile by request count waits for another create of the same size, sent that
#: long ago at most, to be bound before it parks the job for an operator (an older one is a
#: create whose daemon died: waiting would not settle it).
SETTLE_S = 120.0


class Submitter:
    """Plans rounds and submits their shards to the provider."""

    def __init__(self, ctx: Context, admitter: Admitter) -> None:
        self._ctx = ctx
        self._admitter = admitter
        #: per provider whose batches name nothing: one create (or reconcile) at a time (_creating)
        self._create_locks: dict[str, anyio.Lock] = {}

    async def plan(self, job: Job) -> None:
        """Round 0: cut the input into shards within the provider's limits, commit them, submit them."""
        assert job.upload_path is not None
        rows = await self._plan_round(job, Path(job.upload_path), 0)
        log.info("job.planned", job_id=job.id, round=0, shards=len(rows), requests=job.request_count)
        # Straight on: the plan is committed, and a scheduler round would only add latency.
        await self.submit(replace(job, state=JobState.UPLOADING, round=0), tuple(rows))

    async def plan_followup(self, job: Job, folder: Path) -> bool:
        """Resubmit what failed for a passing reason or went unanswered by an expiry; True if planned.

        `folder` is the job's outbox folder, whose errors.jsonl the last merge wrote.
        """
        next_round = job.round + 1
        files = await db(ensure_job_files, self._ctx.settings, job.id)
        followups = files / f"round-{next_round}.jsonl"
        errors = folder / "errors.jsonl"
        count = await db(write_followups, Path(job.upload_path or ""), errors, followups, key=id_key(job.provider))
        if count == 0:
            return False
        rows = await self._plan_round(job, followups, next_round)
        log.info("job.followup_planned", job_id=job.id, round=next_round, requests=count, shards=len(rows))
        return True

    async def _plan_round(self, job: Job, requests: Path, round_: int) -> list[RemoteBatchRecord]:
        """Cut `requests` into shards within the provider's limits and commit them as round `round_`."""
        settings = self._ctx.settings
        provider = self._ctx.provider_settings(job)

        def cut() -> list[Shard]:
            # Beside the inbox, so checked to be batchd's own folders (a planted symlink is moved
            # aside). One worker-thread call for the three: a lone file's plan waits for one hop.
            files = ensure_job_files(settings, job.id)
            check_within(settings.inbox_dir, requests)
            return split(requests, files, provider.limits, prefix=f"round-{round_}")

        shards = await db(cut)
        plans = [ShardPlan(str(s.path), s.request_count, s.size_bytes, s.sha256) for s in shards]
        result: list[RemoteBatchRecord] = await db(
            self._ctx.store.batches.plan_round, job.id, expect=job.state, round_=round_, shards=plans,
            stuck_after_s=provider.stuck_after_s,
        )  # fmt: skip
        return result

    async def submit(self, job: Job, rows: tuple[RemoteBatchRecord, ...]) -> None:
        """Upload and create every given shard (a few at once), then sum the job's state up."""
        errors: list[Exception] = []
        shards_at_once = anyio.CapacityLimiter(SHARDS_AT_ONCE)

        async def one(row: RemoteBatchRecord) -> None:
            async with shards_at_once:
                try:
                    await self._submit_shard(job, row)
                except StaleState:
                    log.info("job.stale_shard", job_id=job.id, shard=row.shard)
                except Exception as exc:
                    # Kept, not raised: one shard's failure must not cancel the shards beside it.
                    errors.append(exc)

        async with anyio.create_task_group() as tg:
            for row in rows:
                tg.start_soon(one, row)
        current = await self._sum_up(job.id)
        full = [e for e in errors if isinstance(e, ProviderError) and e.queue_full]
        if full and await self._admitter.queue_full(current[0], current[1], full[0]):
            return  # the job waits in `queued` for room at its provider: not a failure
        if errors:
            # The shards that worked are recorded; the job backs off and the rest are tried again.
            # A failure other than the provider's says more (a bug counts against the job); among
            # the provider's, the one asking for the longest wait.
            others = [e for e in errors if not isinstance(e, ProviderError)]
            raise others[0] if others else max(errors, key=lambda e: getattr(e, "retry_after", None) or 0)

    async def _submit_shard(self, job: Job, row: RemoteBatchRecord) -> None:
        if job.cancel_requested and (row.status == BatchStatus.PENDING or row.create_attempts == 0):
            # Cancelled before this shard can exist remotely: it is never created.
            await db(self._ctx.store.batches.skip, row)
            return
        if row.status == BatchStatus.PENDING:
            assert row.input_path and row.sha256
            # Made by batchd beside the inbox: refused if a folder on its way was swapped for a symlink.
            await db(check_within, self._ctx.settings.inbox_dir, Path(row.input_path))
            try:
                file_id = await self._ctx.provider_for(job).upload_file(
                    Path(row.input_path), filename=_upload_name(job, row), sha256=row.sha256
                )
            except ProviderError as exc:
                if exc.retryable:
                    raise
                await self._refuse(job, row, f"upload refused: {exc.message}")
                return
            crashpoint("after_upload_answer")
            async with self._creating(job):
                # The file id, the intent to create and its first attempt, committed before the create call.
                row = await db(
                    self._ctx.store.batches.record_upload, row.id, file_id=file_id, intent_at=self._ctx.clock(),
                    alone_for=self._alone_for(job),
                )  # fmt: skip
                log.info("job.uploaded", job_id=job.id, shard=row.shard, round=row.round, file_id=file_id)
                await self._send_create(job, row)
            return
        async with self._creating(job):
            await self._create(job, row, reconcile_first=row.create_attempts > 0)

    def _alone_for(self, job: Job) -> str | None:
        """The provider whose creates are counted one at a time (see count_create), if this is one."""
        return None if self._ctx.provider_for(job).identifies_creates else job.provider_name

    @asynccontextmanager
    async def _creating(self, job: Job) -> AsyncIterator[None]:
        """Around a create (count, send, bind) or a reconcile: one at a time in this daemon when the
        provider's batches cannot be told apart but by their size (the store keeps it so across
        daemons and crashes: count_create's `alone_for`); a create that must wait its turn is a
        passing refusal, waited out with the step's backoff."""
        if self._ctx.provider_for(job).identifies_creates:
            yield
            return
        lock = self._create_locks.setdefault(job.provider_name, anyio.Lock())
        async with lock:
            try:
                yield
            except CreatesBusy as exc:
                raise ProviderError(str(exc), retryable=True) from exc

    async def _refuse(self, job: Job, row: RemoteBatchRecord, reason: str) -> None:
        """The provider refused this shard for good: it ends here (its requests: not_submitted)."""
        log.error("job.refused", job_id=job.id, shard=row.shard, round=row.round, reason=reason)
        await db(self._ctx.store.batches.refuse, row, reason)

    async def _create(self, job: Job, batch: RemoteBatchRecord, *, reconcile_first: bool) -> None:
        if reconcile_first and await self._reconcile(job, batch):
            return
        # Commit the attempt before sending: after a crash, the next try lists before creating.
        # The compare-and-set makes a second, racing create step fail here, before the network.
        counted = await db(self._ctx.store.batches.count_create, batch, alone_for=self._alone_for(job))
        await self._send_create(job, counted)

    async def _send_create(self, job: Job, batch: RemoteBatchRecord) -> None:
        """Create the batch; its attempt is counted already (see `_create`)."""
        assert job.endpoint and job.completion_window
        input_path = Path(batch.input_path) if batch.input_path else None
        if input_path is not None:
            # A dialect that sends the requests inline reads the shard now, maybe long after its
            # upload step checked it (a retry after a crash): checked again, as every read of
            # batchd's files beside the inbox is.
            await db(check_within, self._ctx.settings.inbox_dir, input_path)
        try:
            remote = await self._ctx.provider_for(job).create_batch(
                input_file_id=batch.input_file_id,
                endpoint=job.endpoint,
                completion_window=job.completion_window,
                job_id=job.id,
                input_path=input_path,
                model=job.model,
            )
        except ProviderError as exc:
            if not exc.outcome_unknown:
                # The provider said no before acting: nothing to reconcile next time.
                await db(self._ctx.store.batches.uncount_create, batch)
            if exc.retryable:
                raise
            await self._refuse(job, replace(batch, create_attempts=batch.create_attempts - 1), exc.message)
            return
        crashpoint("after_create_answer")
        await self._bind(job, batch, remote, how="created")

    async def _reconcile(self, job: Job, batch: RemoteBatchRecord) -> bool:
        """Adopt a remote batch an earlier, interrupted create made; True if one was found.

        A batch created before the intent (less the clock skew) is never adopted, so the listing
        need not reach further back: OpenAI's newest-first pages stop there.
        """
        earliest = batch.intent_at - lifecycle.CLOCK_SKEW_S
        provider = self._ctx.provider_for(job)
        remotes = await provider.list_batches(since=datetime.fromtimestamp(earliest, UTC))
        bound = await db(self._ctx.store.batches.bound_among, [r.id for r in remotes])
        recent = [
            r for r in remotes
            if r.id not in bound and (r.created_at is None or r.created_at.timestamp() >= earliest)
        ]  # fmt: skip
        if not provider.identifies_creates:
            return await self._reconcile_by_count(job, batch, recent, earliest)
        candidates = [
            r for r in recent
            if r.input_file_id == batch.input_file_id
            and (not r.metadata or r.metadata.get("batchd_job_id") in (None, job.id))
        ]  # fmt: skip
        if not candidates:
            log.info("job.reconcile_none", job_id=job.id, file_id=batch.input_file_id)
            return False
        candidates.sort(key=lambda r: r.created_at or datetime.min.replace(tzinfo=UTC))
        await self._bind(job, batch, candidates[0], how="adopted")
        return True

    async def _reconcile_by_count(
        self, job: Job, batch: RemoteBatchRecord, recent: list[RemoteBatch], earliest: float
    ) -> bool:
        """A dialect whose batches name neither their input nor their job (Anthropic): a batch
        no job owns, created since the intent, with this shard's request count, is adopted
        only when nothing else could have made it; else the job waits, or is parked for an
        operator when waiting cannot settle it. Never a guess, never a second create while a
        batch that may be ours exists."""
        candidates = [
            r for r in recent
            if r.status not in (RemoteStatus.CANCELLING, RemoteStatus.CANCELLED)  # an operator's way out
            and request_total(r) == batch.request_count
        ]  # fmt: skip
        if not candidates:
            log.info("job.reconcile_none", job_id=job.id, requests=batch.request_count)
            return False
        others = await db(
            self._ctx.store.batches.unbound_intents, since=earliest, request_count=batch.request_count,
            exclude=batch.id, provider=job.provider_name,
        )  # fmt: skip
        ids = ", ".join(r.id for r in candidates)
        if len(candidates) == 1 and not others:
            await self._bind(job, batch, candidates[0], how="adopted")
            return True
        if any(intent >= self._ctx.clock() - SETTLE_S for intent in others):
            # Another create of the same size was sent a moment ago (another daemon's: its answer
            # may be on its way back): once it is bound, what is left is ours.
            log.info("job.reconcile_waits", job_id=job.id, candidates=ids, other_creates=len(others))
            message = f"a lost create is not yet told apart from {len(others)} other create(s)"
            raise ProviderError(message, retryable=True)
        raise NeedsOperator(
            f"a create of shard {batch.shard} (round {batch.round}, {batch.request_count} requests) got no answer, and "
            f"the provider shows {len(candidates)} batch(es) it may have made: {ids}. Cancel at the provider the ones "
            "that are not this job's (all of them to create it anew), then run: batchd resume " + job.id
        )

    async def _bind(self, job: Job, batch: RemoteBatchRecord, remote: RemoteBatch, *, how: str) -> None:
        if remote.queue_full:
            # Accepted, and failed already for a full queue (OpenAI): bound as it ended, and the
            # same shard created again once there is room.
            await self._admitter.batch_failed_full(job, batch, remote)
            return
        await db(self._ctx.store.batches.bind, batch.id, remote)
        log.info(
            f"job.batch_{how}", job_id=job.id, remote_batch_id=remote.id, status=remote.status.value,
            shard=batch.shard, round=batch.round,
        )  # fmt: skip

    async def _sum_up(self, job_id: str) -> tuple[Job, list[RemoteBatchRecord]]:
        """Set the job's state from its current round's batches (after a submit step); the job as
        written and those batches."""
        job = await db(self._ctx.store.jobs.get, job_id)
        assert job is not None
        rows = lifecycle.current_round(job, await db(self._ctx.store.batches.of_job, job_id))
        if job.state is JobState.QUEUED and job.admitted_at is None:
            return job, rows  # a full queue turned it away meanwhile: it waits as that wrote
        state = lifecycle.summary_state(rows, cancelling=job.state == JobState.CANCELLING)
        check = self._ctx.next_check(state, self._ctx.policy.min_interval_s)
        job = await db(self._ctx.store.jobs.record_answer, job_id, expect=job.state, check=check)
        return job, rows


def _upload_name(job: Job, row: RemoteBatchRecord) -> str:
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in job.name) or "batch"
    if row.round == 0 and row.shard == 0 and row.input_path == job.upload_path:
        return f"{safe}.jsonl"
    return f"{safe}.r{row.round}.s{row.shard}.jsonl"
