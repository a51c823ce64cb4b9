"""Polling: asking the provider where each job's live batches are, and cancelling them.

With enough jobs in flight one list call (a sweep) serves them all, and a get is made only
for a due job's batch the list missed; otherwise each due job's live batches are asked one
by one. Answers that change nothing are written many per transaction.

A sweep names the batches it wants and how far back they go (`RemoteBatchStore.earliest_held`
less `lifecycle.CLOCK_SKEW_S`), so its cost follows the batches in flight, not the account's
history: OpenAI's newest-first pages stop once every wanted batch is seen or older batches
begin, and only wanted items are parsed. Single gets go one after another within a round or
sweep, and at most GETS_AT_ONCE at once per provider across the rounds, the sweep and the
cancels of the daemon: the gets of a sweep's misses, or of jobs polled one by one, never come
as a burst. With several providers, a sweep lists each one that its jobs went to.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import anyio
import structlog

from batchd import lifecycle, metrics
from batchd.daemon.admission import Admitter
from batchd.daemon.context import Context, db
from batchd.daemon.failures import step_failed
from batchd.lifecycle import Action, Step
from batchd.models import BatchStatus, Job, JobState, RemoteBatch, RemoteBatchRecord
from batchd.providers.base import Provider, ProviderError
from batchd.store import NextCheck, PollAnswer

log = structlog.get_logger("batchd.daemon")

#: A sweep's "no news" answers are written this many per transaction, not one fsync per job
#: (10,000 jobs in flight: a sweep round of 126 s became 6 s).
QUIET_WRITES_PER_TRANSACTION = 500
#: A sweep reads the jobs it polls this many at a time.
SWEEP_PAGE = 1000
#: Single gets (`get_batch`) in flight at once per provider, whatever the rounds running: a
#: provider that advises polling each batch no faster than every 30 s would throttle a burst.
GETS_AT_ONCE = 4


class Poller:
    """Poll rounds and cancels, for the jobs the scheduler hands it."""

    def __init__(self, ctx: Context, admitter: Admitter) -> None:
        self._ctx = ctx
        self._admitter = admitter
        #: per provider name: the bound on its single gets in flight
        self._gets: dict[str, anyio.CapacityLimiter] = {}

    async def round(self, polls: list[tuple[Job, Action]], now: float) -> None:
        """Poll due jobs one get per live batch (too few jobs in flight for a list sweep)."""
        self._ctx.lease(*(job for job, _ in polls))
        started = time.monotonic()
        try:
            await self._apply(polls, {}, now, sweep=False)
        finally:
            metrics.poll_round("get", time.monotonic() - started)

    async def sweep(self, hold: float, now: float) -> None:
        """Poll every job taken for this sweep at `hold` (JobStore.take_for_sweep) with one list
        call, page by page; a get only for a due job's batch the list missed.

        Memory follows the page, not the jobs in flight: the list's answers are kept only for
        the batches taken (without their wire objects), the jobs are read DUE_PAGE at a time.
        """
        store, owner = self._ctx.store, self._ctx.daemon_id
        started = time.monotonic()
        try:
            # One list call per provider the taken jobs went to.
            listings: dict[str, dict[str, RemoteBatch] | ProviderError] = {}
            for name, provider in self._ctx.providers.items():
                listings[name] = await self._list_held(provider, name, hold)
            after = ""
            while True:
                page = await db(store.jobs.held, owner, hold, after=after, limit=SWEEP_PAGE)
                if not page:
                    return
                after = page[-1].id
                batches = await db(store.batches.by_job, [job.id for job in page])
                polls = []
                for job in page:
                    action = lifecycle.next_action(job, batches.get(job.id, []), now)
                    # Anything but a poll (a job held in memory, one that moved on) is left for
                    # the scheduler: release_held gives it its due time back.
                    if action.step is Step.POLL and self._ctx.held_until(job.id, now) is None:
                        polls.append((job, action))
                self._ctx.lease(*(job for job, _ in polls))
                by_provider: dict[str, list[tuple[Job, Action]]] = {}
                for job, action in polls:
                    by_provider.setdefault(job.provider_name, []).append((job, action))
                for name, its_polls in by_provider.items():
                    listed = listings.get(name, {})
                    if isinstance(listed, ProviderError):
                        for job, action in its_polls:
                            if action.at <= now:
                                await step_failed(self._ctx, job, listed)
                    else:
                        await self._apply(its_polls, listed, now, sweep=True)
        finally:
            # Every job it did not write gets its due time back; should the database refuse now,
            # the scheduler tries again at its next ticks (Scheduler._release), not at the hold.
            await db(store.jobs.release_held, owner, hold)
            metrics.poll_round("sweep", time.monotonic() - started)

    async def _list_held(self, provider: Provider, name: str, hold: float) -> dict[str, RemoteBatch] | ProviderError:
        """One provider's answers for the batches of the jobs a sweep took (its failure, kept
        for the jobs it concerns)."""
        store, owner = self._ctx.store, self._ctx.daemon_id
        wanted = await db(store.batches.remote_ids_held, owner, hold, name)
        if not wanted:
            return {}
        earliest = await db(store.batches.earliest_held, owner, hold, name)
        since = datetime.fromtimestamp(earliest - lifecycle.CLOCK_SKEW_S, UTC) if earliest is not None else None
        try:
            # Only the taken batches, no further back than they go, and without their wire
            # objects: an account's list holds every batch it ever ran, and this sweep may
            # hold 100,000 of them.
            return {r.id: r for r in await provider.list_batches(wanted=wanted, since=since)}
        except ProviderError as exc:
            return exc

    async def _apply(
        self, polls: list[tuple[Job, Action]], found: dict[str, RemoteBatch], now: float, *, sweep: bool
    ) -> None:
        """Each job's answers (from `found`, else a get when it is due), written; quiet ones in bulk."""
        quiet: list[PollAnswer] = []
        for job, action in polls:
            try:
                answers = await self._answers(job, action.batches, found, due=action.at <= now)
                full = [(row, remote) for row, remote in answers if remote.queue_full and row.stuck_at is None]
                if full:
                    # Failed unrun for a full queue: created again once there is room. The job's
                    # other answers wait for its next poll (the write above changed the job).
                    await self._admitter.batch_failed_full(job, *full[0])
                    continue
                if not answers:
                    continue
                changed, writes = self._poll_writes(job, answers)
                if sweep and not changed:
                    quiet.extend(writes)
                    if len(quiet) >= QUIET_WRITES_PER_TRANSACTION:
                        await db(self._ctx.store.batches.record_polls, quiet)
                        quiet = []
                else:
                    await db(self._ctx.store.batches.record_polls, writes)
            except ProviderError as exc:
                await step_failed(self._ctx, job, exc)
        if quiet:
            await db(self._ctx.store.batches.record_polls, quiet)

    async def _answers(
        self, job: Job, rows: tuple[RemoteBatchRecord, ...], found: dict[str, RemoteBatch], *, due: bool
    ) -> list[tuple[RemoteBatchRecord, RemoteBatch]]:
        """Where each live batch is: from the sweep, or asked one by one when the job is due."""
        answers = []
        for row in rows:
            assert row.remote_id is not None
            remote = found.get(row.remote_id)
            if remote is None:
                if not due:
                    continue
                remote = await self._get(job, row.remote_id)
            answers.append((row, remote))
        return answers

    async def _get(self, job: Job, remote_id: str) -> RemoteBatch:
        """One batch of `job` asked on its own, within the daemon's bound on gets at once."""
        provider = self._ctx.provider_for(job)
        async with self._gets.setdefault(job.provider_name, anyio.CapacityLimiter(GETS_AT_ONCE)):
            return await provider.get_batch(remote_id)

    def _poll_writes(
        self,
        job: Job,
        answers: list[tuple[RemoteBatchRecord, RemoteBatch]],
        others: Sequence[RemoteBatchRecord] = (),
    ) -> tuple[bool, list[PollAnswer]]:
        """What provider answers change: (any status changed, one store write per batch).
        `others`: the round's batches, for those not answered here."""
        changed = False
        for row, remote in answers:
            if BatchStatus.of(remote.status) != row.status:
                changed = True
                log.info(
                    "job.remote_status", job_id=job.id, remote_batch_id=remote.id, status=remote.status.value,
                    progress=remote.progress, shard=row.shard, round=row.round,
                )  # fmt: skip
        rows = [replace(row, status=BatchStatus.of(remote.status)) for row, remote in answers]
        # The round's other live batches count too (a stuck batch is cancelled on its own).
        answered = {row.id for row, _ in answers}
        rows += [b for b in others if b.id not in answered and b.status.live]
        state = lifecycle.summary_state(rows, cancelling=job.state == JobState.CANCELLING)
        interval = lifecycle.next_poll_interval(job.poll_interval_s, changed, self._ctx.policy)
        check = self._ctx.next_check(state, interval)
        return changed, [_answer(job, row, remote, check) for row, remote in answers]

    async def cancel(self, job: Job, rows: tuple[RemoteBatchRecord, ...]) -> None:
        """Ask the provider to cancel the job's live batches (the user's cancel), or those batchd
        found stuck; record what each says it is now."""
        if not job.cancel_requested:
            await self._cancel_stuck(job, rows)
            return
        log.info("job.cancelling", job_id=job.id, remote_batch_ids=[r.remote_id for r in rows])
        job = await db(self._ctx.store.jobs.start_cancelling, job.id, expect=job.state)
        answers = await self._send_cancels(job, rows)
        _changed, writes = self._poll_writes(job, answers)
        await db(self._ctx.store.batches.record_polls, writes)

    async def _cancel_stuck(self, job: Job, rows: tuple[RemoteBatchRecord, ...]) -> None:
        """Cancel batches found stuck (DESIGN §2 is silent; docs/design.md "Stuck batches"): each
        is recorded as stuck before its cancel is sent, and logged once. Its unanswered requests
        then count as expired and go to a follow-up round. The job stays in its state: the
        batches' answers say where it is (a stuck shard's neighbours may be running)."""
        fresh = [r for r in rows if r.stuck_at is None]
        if fresh:
            limit = lifecycle.stuck_limit(job.provider, job.stuck_after_s)
            marked = {r.id: r for r in await db(self._ctx.store.batches.mark_stuck, fresh)}
            for row in fresh:
                metrics.batch_stuck(job.provider_name)
                log.warning(
                    "job.batch_stuck", job_id=job.id, remote_batch_id=row.remote_id, status=row.status.value,
                    waited_s=_waited(marked[row.id]), limit_s=limit, round=row.round, shard=row.shard,
                )  # fmt: skip
            rows = tuple(marked.get(r.id, r) for r in rows)
        answers = await self._send_cancels(job, rows)
        batches = await db(self._ctx.store.batches.of_job, job.id)
        _changed, writes = self._poll_writes(job, answers, lifecycle.current_round(job, batches))
        await db(self._ctx.store.batches.record_polls, writes)

    async def _send_cancels(
        self, job: Job, rows: tuple[RemoteBatchRecord, ...]
    ) -> list[tuple[RemoteBatchRecord, RemoteBatch]]:
        """Cancel each batch at the provider; what each is now."""
        answers = []
        for row in rows:
            assert row.remote_id is not None
            try:
                remote = await self._ctx.provider_for(job).cancel_batch(row.remote_id)
            except ProviderError as exc:
                if exc.retryable:
                    raise
                # Already finished remotely: nothing to cancel; its status says how it ended.
                log.warning("job.cancel_refused", job_id=job.id, remote_batch_id=row.remote_id, error=exc.message)
                remote = await self._get(job, row.remote_id)
            answers.append((row, remote))
        return answers


def _waited(row: RemoteBatchRecord) -> float | None:
    """How long a batch found stuck had not moved (seconds)."""
    if row.stuck_at is None or row.progress_at is None:
        return None
    return round(row.stuck_at - row.progress_at, 3)


def _answer(job: Job, row: RemoteBatchRecord, remote: RemoteBatch, check: NextCheck) -> PollAnswer:
    """The write one provider answer makes: the batch's news, whether it moved, the job's next check."""
    status = BatchStatus.of(remote.status)
    answered = remote.answered if remote.answered is not None else row.answered
    # Once found stuck, its clock stops: `progress_at` keeps saying since when it had not moved.
    moved = row.stuck_at is None and lifecycle.moved(row, status, remote.progress, remote.answered)
    return PollAnswer(row.id, job.id, remote, job.state, check, answered=answered, moved=moved, hint=job.hinted_at)
