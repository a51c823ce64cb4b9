"""The daemon: intake, submit, poll, download, notify — one anyio task group.

`lifecycle.next_action` decides; this module carries the decision out and
records the outcome through the Store. Every remote side effect is preceded by
a committed intent, so a crash at any point resumes from the database.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from batchd import lifecycle, metrics, systemd
from batchd.backoff import step_delay
from batchd.config import ConfigError, Settings
from batchd.crashpoints import crashpoint
from batchd.health import LoopMonitor
from batchd.inbox import Inbox, Kind, classify, job_files_dir
from batchd.lifecycle import Action, PollPolicy, Step
from batchd.models import BatchStatus, Job, JobState, RemoteBatch, RemoteBatchRecord
from batchd.outbox import job_document, outbox_candidates, reason_for, write_job_json
from batchd.pricing import estimate_cost
from batchd.providers.base import Provider, ProviderError
from batchd.results import MergeResult, merge_results, truncated_tail
from batchd.shards import Shard, split, write_followups
from batchd.store import LEASE, Ending, Hold, Lease, NextCheck, PollAnswer, ShardPlan, StaleState, Store
from batchd.watch import InboxWatcher, WatchEvent
from batchd.webhooks import Deliverer, build_event, webhook_data

log = structlog.get_logger("batchd.daemon")

#: A remote batch adopted during reconciliation may carry a created_at up to this much
#: before our recorded intent: the provider's clock and ours are not the same clock.
CLOCK_SKEW_S = 60.0
#: How often the scheduler looks at the database even without a wake-up (CLI actions).
IDLE_TICK_S = 1.0
#: Uploads, creates and cancels running at once; polls are grouped separately.
MAX_CONCURRENT_STEPS = 16
#: Downloads and merges running at once: they are long and heavy, and must never hold the
#: slots new submissions need.
MAX_CONCURRENT_DOWNLOADS = 4
#: Inbox files claimed and validated at once (each in a worker thread).
MAX_CONCURRENT_TAKES = 4
#: SIGTERM to exit: in-flight steps get this long to finish before they are parked.
STOP_GRACE_S = 7.0
#: Jobs nobody holds that a daemon takes over per heartbeat (several daemons share the rest).
CLAIM_BATCH = 100
UNLIMITED = 1 << 62
#: Shards of one job uploaded and created at once.
SHARDS_AT_ONCE = 4
#: A sweep's "no news" answers are written this many per transaction, not one fsync per job
#: (10,000 jobs in flight: a sweep round of 126 s became 6 s).
QUIET_WRITES_PER_TRANSACTION = 500


async def db(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a Store call in a worker thread: SQLite may wait on a lock; the event loop must not."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


class _Stopped(Exception):
    """Stopped (a signal) before the work drained."""


@dataclass
class RunResult:
    drained: bool


class Daemon:
    """One batchd process's work over one Store and one Provider."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        provider: Provider,
        deliverer: Deliverer | None = None,
        reload: Callable[[], Settings] | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        daemon_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        #: this process's name in the database: the owner of the jobs it holds
        self.id = daemon_id or uuid.uuid4().hex
        self.inbox = Inbox(lambda: self.settings, store, owner=self._new_job_owner)
        self.deliverer = deliverer
        self._reload = reload
        self._clock = clock
        self._rng = rng or random.Random()
        self._stop = anyio.Event()
        self._wake = anyio.Event()
        self._busy: set[str] = set()
        self._steps = anyio.CapacityLimiter(MAX_CONCURRENT_STEPS)
        self._downloads = anyio.CapacityLimiter(MAX_CONCURRENT_DOWNLOADS)
        self._takes = anyio.CapacityLimiter(MAX_CONCURRENT_TAKES)
        self._taking: set[Path] = set()
        self._intake_pending = 0
        #: set once recovery is done and every loop runs (what READY=1 tells systemd)
        self.ready = anyio.Event()
        self._intake_settled = False
        #: the scheduler loop's heartbeat: STATUS= for systemd, the jobs gauge, /healthz's last tick
        self.monitor = LoopMonitor(store, period_s=IDLE_TICK_S)

    # ------------------------------------------------------------ control

    def stop(self) -> None:
        """Stop taking work; in-flight steps finish or are parked."""
        if not self._stop.is_set():
            log.info("daemon.stopping")
            systemd.notify("STOPPING=1")
            self._stop.set()
        self._wake.set()
        self._poke_deliverer()

    @property
    def busy(self) -> frozenset[str]:
        """The jobs that have a step or a poll round running now."""
        return frozenset(self._busy)

    def wake(self) -> None:
        self._wake.set()

    def _poke_deliverer(self) -> None:
        if self.deliverer is not None:
            self.deliverer.poke()

    def _new_job_owner(self) -> Hold:
        """A job this daemon creates (a take) is its own from the start, at fence 1."""
        return Hold(owner=self.id, fence=1, lease_until=self._clock() + self.settings.cluster.lease_s)

    def _lease(self, *held: Job) -> None:
        """Fence the store writes of the current task to these jobs, at the claims they were read at."""
        LEASE.set(Lease(self.id, {job.id: job.fence for job in held}))

    @property
    def policy(self) -> PollPolicy:
        p = self.settings.polling
        return PollPolicy(p.min_interval_s, p.max_interval_s)

    async def run(self, *, once: bool = False, timeout: float | None = None) -> RunResult:
        """Run until stopped (or, with `once`, until drained); return whether it drained."""
        await db(self.inbox.ensure_folders)
        await self._register()
        recovered = await db(self.inbox.recover)
        if recovered:
            log.info("daemon.recovered_claims", jobs=len(recovered))
        self._warn_fast_polling()
        drained = False
        # Steps run in `work`, which outlives the loops: on stop the loops end at once and
        # in-flight steps get STOP_GRACE_S to finish before they are cancelled (parked).
        async with anyio.create_task_group() as work:
            async with anyio.create_task_group() as loops:
                loops.start_soon(self._signals)
                loops.start_soon(self._intake, once)
                loops.start_soon(self._schedule, work)
                loops.start_soon(self._heartbeat)
                if self.deliverer is not None:
                    loops.start_soon(self.deliverer.serve, work)
                systemd.notify("READY=1")
                self.ready.set()
                log.info("daemon.ready", inbox=str(self.settings.inbox_dir), provider=self.provider.kind)
                if once:
                    with anyio.move_on_after(math.inf if timeout is None else timeout), contextlib.suppress(_Stopped):
                        await self._until_drained()
                        drained = True
                    self.stop()
                await self._stop.wait()
                loops.cancel_scope.cancel()
            work.cancel_scope.deadline = anyio.current_time() + STOP_GRACE_S
        if self._busy:
            log.warning("daemon.parked", jobs=sorted(self._busy))
        # A clean stop frees this daemon's jobs for the others at once (a crash: when the leases end).
        await db(self.store.cluster.release, self.id)
        log.info("daemon.stopped", drained=drained)
        return RunResult(drained=drained)

    async def _register(self) -> None:
        """Record this daemon; take over its own earlier incarnations' jobs and the jobs nobody holds."""
        host = socket.gethostname()
        earlier = await db(
            self.store.cluster.register, self.id, host=host, pid=os.getpid(),
            home=f"{host}:{self.settings.state_dir}",
        )  # fmt: skip
        # The state lock proves the earlier daemons of this home dead: no need to wait for their leases.
        claimed = await self._claim(dead_owners=earlier, limit=UNLIMITED)
        log.info("daemon.registered", daemon_id=self.id, jobs=claimed)

    async def _claim(self, *, dead_owners: Collection[str] = (), limit: int = CLAIM_BATCH) -> int:
        claimed = await db(
            self.store.cluster.claim, self.id, self.settings.cluster.lease_s, limit=limit, dead_owners=dead_owners
        )
        if claimed:
            log.info("daemon.claimed", jobs=len(claimed))
            self.wake()
        return len(claimed)

    async def _heartbeat(self) -> None:
        """Renew this daemon's leases and take over jobs nobody holds, every third of a lease.

        A job lost to another daemon (this one stalled past its lease) simply stops being read
        by the scheduler, and the fence refuses any write a step still tries to make to it.
        """
        while not self._stop.is_set():
            lease_s = self.settings.cluster.lease_s
            with anyio.move_on_after(lease_s / 3):
                await self._stop.wait()
            if self._stop.is_set():
                return
            try:
                await db(self.store.cluster.renew, self.id, lease_s)
                await self._claim()
            except Exception:
                # A database that is briefly unreachable must not end the heartbeat for good.
                log.exception("daemon.heartbeat_failed")

    async def _until_drained(self) -> None:
        while True:
            # Intake first: a take that ends while the store is read has already inserted its job,
            # so reading "intake settled" after the store could miss that job (and stop too early).
            intake_done = self._intake_settled and not self._intake_pending
            active = await db(self.store.jobs.live)
            pending = await db(self.store.deliveries.pending_count)
            if intake_done and not active and not pending:
                return
            with anyio.move_on_after(0.1):
                await self._stop.wait()
            if self._stop.is_set():
                raise _Stopped

    def _warn_fast_polling(self) -> None:
        if self.provider.kind != "local" and self.settings.polling.min_interval_s < 30:
            log.warning(
                "daemon.fast_polling",
                min_interval_s=self.settings.polling.min_interval_s,
                advice="providers advise polling no faster than every 30-60 s per batch",
            )

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self._reload_settings()
                else:
                    log.info("daemon.signal", signal=signal.Signals(signum).name)
                    self.stop()

    def _reload_settings(self) -> None:
        if self._reload is None:
            return
        systemd.notify(systemd.reloading_message())
        try:
            new = self._reload()
        except ConfigError as exc:
            log.error("daemon.reload_refused", error=str(exc))
        else:
            if (new.provider, new.state_dir, new.database_url) != (
                self.settings.provider,
                self.settings.state_dir,
                self.settings.database_url,
            ):
                log.warning("daemon.reload_needs_restart", keys="provider, state_dir, database_url")
            self.settings = new
            log.info("daemon.reloaded")
        systemd.notify("READY=1")

    # ------------------------------------------------------------ intake

    async def _intake(self, once: bool) -> None:
        """Take files: inotify events are hints, the rescan is the truth."""
        settling: dict[Path, float] = {}
        watcher = None if once else InboxWatcher(self.settings.inbox_dir)
        try:
            async with anyio.create_task_group() as takes:
                await self._watch(takes, watcher, settling, once)
        finally:
            self._intake_settled = True
            if watcher is not None:
                watcher.close()

    async def _watch(
        self, takes: anyio.abc.TaskGroup, watcher: InboxWatcher | None, settling: dict[Path, float], once: bool
    ) -> None:
        """Take files as events and rescans find them, until stopped (or, with `once`, settled)."""
        await self._rescan(takes, settling)
        next_rescan = self._clock() + self.settings.inbox.rescan_s
        while not self._stop.is_set():
            if once and not settling:
                break
            now = self._clock()
            deadline = min([next_rescan, *settling.values()])
            events: list[WatchEvent] = []
            if watcher is not None:
                events = await watcher.read(timeout=max(0.0, deadline - now), stop=self._stop)
            else:
                with anyio.move_on_after(max(0.0, deadline - now)):
                    await self._stop.wait()
            rescan = False
            for ev in events:
                if ev.kind == "ready":
                    settling.pop(ev.path, None)
                    self._start_take(takes, ev.path)
                elif ev.kind == "changed":
                    settling[ev.path] = self._clock() + self.settings.inbox.settle_s
                else:
                    rescan = True
            now = self._clock()
            if rescan or now >= next_rescan or any(at <= now for at in settling.values()):
                await self._rescan(takes, settling)
                if now >= next_rescan:
                    next_rescan = now + self.settings.inbox.rescan_s

    async def _rescan(self, takes: anyio.abc.TaskGroup, settling: dict[Path, float]) -> None:
        now = time.time()  # compared with file mtimes, which are wall-clock
        settle = self.settings.inbox.settle_s
        found = await db(self.inbox.candidates)
        for path in list(settling):
            if path not in found:
                del settling[path]
        for path in found:
            if self._stop.is_set():
                return
            if classify(path) is Kind.BAD:
                self._start_take(takes, path)
                continue
            try:
                mtime = path.lstat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime >= settle:
                settling.pop(path, None)
                self._start_take(takes, path)
            else:
                # Seen only by a rescan and still changing: wait until it has been quiet for settle_s.
                settling[path] = self._clock() + (mtime + settle - now)

    def _start_take(self, takes: anyio.abc.TaskGroup, path: Path) -> None:
        # An event and a rescan can name the same file; one take per path at a time.
        if path in self._taking:
            return
        self._taking.add(path)
        self._intake_pending += 1
        takes.start_soon(self._take, path)

    async def _take(self, path: Path) -> None:
        try:
            async with self._takes:
                job = await db(self.inbox.take, path)
        except Exception as exc:
            # A full disk or a bug must not stop intake; a claimed file is taken again at the next start.
            log.exception("inbox.take_failed", path=str(path), error=str(exc))
            return
        finally:
            self._taking.discard(path)
            self._intake_pending -= 1
        if job is not None:
            metrics.intake(rejected=job.state == JobState.REJECTED)
            self.wake()
            if job.state == JobState.REJECTED:
                self._poke_deliverer()

    # ------------------------------------------------------------ scheduling

    async def _schedule(self, tg: anyio.abc.TaskGroup) -> None:
        watchdog = systemd.watchdog_interval_s()
        last_ping = 0.0
        # What the last tick read: unchanged jobs and batches are kept as those objects (Store.active_jobs).
        known_jobs: dict[str, Job] = {}
        known_batches: dict[int, RemoteBatchRecord] = {}
        while not self._stop.is_set():
            if watchdog is not None and time.monotonic() - last_ping >= watchdog:
                systemd.notify("WATCHDOG=1")
                last_ping = time.monotonic()
            # A fresh event before reading: a wake() that lands during the reads must not be lost.
            self._wake = anyio.Event()
            self.monitor.begin()
            now = self._clock()
            # A job busy while we read may have moved on since: skip it this tick, or its
            # stale row would start the same step twice (the next wake-up sees it fresh).
            busy_during_read = set(self._busy)
            jobs = await db(self.store.jobs.live, self.id, known=known_jobs)
            batches = await db(self.store.batches.of_live_jobs, known=known_batches)
            known_jobs = {job.id: job for job in jobs}
            known_batches = {row.id: row for rows in batches.values() for row in rows}
            await self.monitor.tick(jobs)
            next_at = now + self.monitor.idle_s()
            if watchdog is not None:
                # Wake in time for the next WATCHDOG=1 even when the loop has nothing to do.
                next_at = min(next_at, now + max(0.0, last_ping + watchdog - time.monotonic()))
            pollable: list[tuple[Job, Action]] = []
            for job in jobs:
                if job.id in self._busy or job.id in busy_during_read:
                    continue
                action = lifecycle.next_action(job, batches.get(job.id, []), now)
                if action.step is Step.NONE:
                    continue
                if action.step is Step.POLL:
                    pollable.append((job, action))
                if action.at > now:
                    next_at = min(next_at, action.at)
                    continue
                if action.step is not Step.POLL:
                    self._busy.add(job.id)
                    tg.start_soon(self._run_step, job, action)
            due = [(job, action) for job, action in pollable if action.at <= now]
            if due:
                # One list call serves every job in flight; without enough of them, one get per due job.
                # Count the busy ones too: a job skipped for this tick is still in flight.
                in_flight = sum(1 for job in jobs if job.state in lifecycle.IN_FLIGHT)
                sweep = lifecycle.use_sweep(in_flight)
                polls = pollable if sweep else due
                self._busy.update(job.id for job, _ in polls)
                tg.start_soon(self._poll_round, polls, sweep, now)
            with anyio.move_on_after(max(0.0, next_at - self._clock())):
                await self._wake.wait()

    async def _run_step(self, job: Job, action: Action) -> None:
        bound = log.bind(job_id=job.id, step=action.step.value)
        self._lease(job)
        try:
            async with self._downloads if action.step is Step.DOWNLOAD else self._steps:
                if action.step is Step.PLAN:
                    await self._plan(job)
                elif action.step is Step.SUBMIT:
                    await self._submit(job, action.batches)
                elif action.step is Step.CANCEL:
                    await self._cancel(job, action.batches)
                elif action.step is Step.DOWNLOAD:
                    await self._end_round(job)
        except StaleState:
            bound.info("job.stale_step")
        except ProviderError as exc:
            await self._step_failed(job, exc)
        except Exception as exc:
            # A bug or a full disk must not stop the daemon; the step is retried with backoff.
            bound.exception("job.step_crashed")
            await self._step_failed(job, exc)
        finally:
            self._busy.discard(job.id)
            self.wake()

    async def _step_failed(self, job: Job, exc: Exception) -> None:
        # The step may have moved the job on before failing (planned, uploaded): back off from there.
        job = await db(self.store.jobs.get, job.id) or job
        attempts = job.attempts + 1
        retry_after = exc.retry_after if isinstance(exc, ProviderError) else None
        delay = step_delay(
            attempts, self.policy.min_interval_s, self.policy.max_interval_s, self._rng, retry_after=retry_after
        )
        metrics.retry(f"step.{job.state.value}")
        log.warning(
            "job.step_failed", job_id=job.id, state=job.state.value, attempts=attempts, wait_s=round(delay, 3),
            error=str(exc),
        )  # fmt: skip
        with contextlib.suppress(StaleState):
            await db(
                self.store.jobs.back_off, job.id, expect=job.state, attempts=attempts,
                next_check_at=self._clock() + delay, error=str(exc)[:2000],
            )  # fmt: skip

    # ------------------------------------------------------------ submitting

    def _work_dir(self, job: Job) -> Path:
        """This daemon's own scratch space for a job: downloads, the merge's index."""
        return self.settings.state_dir / "work" / job.id

    def _job_files(self, job: Job) -> Path:
        """Where a job's shard and follow-up files live: beside the inbox, so that any daemon
        sharing it (several hosts on one PostgreSQL database) can take the job over."""
        return job_files_dir(self.settings, job.id)

    async def _plan(self, job: Job) -> None:
        """Round 0: cut the input into shards within the provider's limits, commit them, submit them."""
        assert job.upload_path is not None
        files = self._job_files(job)
        await anyio.Path(files).mkdir(parents=True, exist_ok=True)
        limits = self.settings.provider.limits
        shards = await db(split, Path(job.upload_path), files, limits, prefix="round-0")
        rows = await db(
            self.store.batches.plan_round, job.id, expect=job.state, round_=0, shards=[_shard_plan(s) for s in shards]
        )
        log.info("job.planned", job_id=job.id, round=0, shards=len(rows), requests=job.request_count)
        # Straight on: the plan is committed, and a scheduler round would only add latency.
        await self._submit(replace(job, state=JobState.UPLOADING, round=0), tuple(rows))

    async def _submit(self, job: Job, rows: tuple[RemoteBatchRecord, ...]) -> None:
        """Upload and create every given shard (a few at once), then sum the job's state up."""
        errors: list[ProviderError] = []
        shards_at_once = anyio.CapacityLimiter(SHARDS_AT_ONCE)

        async def one(row: RemoteBatchRecord) -> None:
            async with shards_at_once:
                try:
                    await self._submit_shard(job, row)
                except ProviderError as exc:
                    errors.append(exc)
                except StaleState:
                    log.info("job.stale_shard", job_id=job.id, shard=row.shard)

        async with anyio.create_task_group() as tg:
            for row in rows:
                tg.start_soon(one, row)
        await self._sum_up(job.id)
        if errors:
            # The shards that worked are recorded; the job backs off and the rest are tried again.
            raise max(errors, key=lambda e: e.retry_after or 0)

    async def _submit_shard(self, job: Job, row: RemoteBatchRecord) -> None:
        if job.cancel_requested and (row.status == BatchStatus.PENDING or row.create_attempts == 0):
            # Cancelled before this shard can exist remotely: it is never created.
            await db(self.store.batches.skip, row)
            return
        if row.status == BatchStatus.PENDING:
            assert row.input_path and row.sha256
            try:
                file_id = await self.provider.upload_file(
                    Path(row.input_path), filename=_upload_name(job, row), sha256=row.sha256
                )
            except ProviderError as exc:
                if exc.retryable:
                    raise
                await self._refuse(job, row, f"upload refused: {exc.message}")
                return
            crashpoint("after_upload_answer")
            # The file id and the intent to create, committed before the create call.
            row = await db(self.store.batches.record_upload, row.id, file_id=file_id, intent_at=self._clock())
            log.info("job.uploaded", job_id=job.id, shard=row.shard, round=row.round, file_id=file_id)
        await self._create(job, row, reconcile_first=row.create_attempts > 0)

    async def _refuse(self, job: Job, row: RemoteBatchRecord, reason: str) -> None:
        """The provider refused this shard for good: it ends here (its requests: not_submitted)."""
        log.error("job.refused", job_id=job.id, shard=row.shard, round=row.round, reason=reason)
        await db(self.store.batches.refuse, row, reason)

    async def _create(self, job: Job, batch: RemoteBatchRecord, *, reconcile_first: bool) -> None:
        if reconcile_first and await self._reconcile(job, batch):
            return
        assert job.endpoint and job.completion_window
        # Commit the attempt before sending: after a crash, the next try lists before creating.
        # The compare-and-set makes a second, racing create step fail here, before the network.
        batch = await db(self.store.batches.count_create, batch)
        try:
            remote = await self.provider.create_batch(
                input_file_id=batch.input_file_id,
                endpoint=job.endpoint,
                completion_window=job.completion_window,
                job_id=job.id,
            )
        except ProviderError as exc:
            if not exc.outcome_unknown:
                # The provider said no before acting: nothing to reconcile next time.
                await db(self.store.batches.uncount_create, batch)
            if exc.retryable:
                raise
            await self._refuse(job, replace(batch, create_attempts=batch.create_attempts - 1), exc.message)
            return
        crashpoint("after_create_answer")
        await self._bind(job, batch, remote, how="created")

    async def _reconcile(self, job: Job, batch: RemoteBatchRecord) -> bool:
        """Adopt a remote batch an earlier, interrupted create made; True if one was found."""
        remotes = await self.provider.list_batches()
        bound = await db(self.store.batches.bound_ids)
        earliest = batch.intent_at - CLOCK_SKEW_S
        candidates = [
            r for r in remotes
            if r.input_file_id == batch.input_file_id
            and r.id not in bound
            and (r.created_at is None or r.created_at.timestamp() >= earliest)
            and (not r.metadata or r.metadata.get("batchd_job_id") in (None, job.id))
        ]  # fmt: skip
        if not candidates:
            log.info("job.reconcile_none", job_id=job.id, file_id=batch.input_file_id)
            return False
        candidates.sort(key=lambda r: r.created_at or datetime.min.replace(tzinfo=UTC))
        await self._bind(job, batch, candidates[0], how="adopted")
        return True

    async def _bind(self, job: Job, batch: RemoteBatchRecord, remote: RemoteBatch, *, how: str) -> None:
        await db(self.store.batches.bind, batch.id, remote)
        log.info(
            f"job.batch_{how}", job_id=job.id, remote_batch_id=remote.id, status=remote.status.value,
            shard=batch.shard, round=batch.round,
        )  # fmt: skip

    async def _sum_up(self, job_id: str) -> None:
        """Set the job's state from its current round's batches (after a submit step)."""
        job = await db(self.store.jobs.get, job_id)
        assert job is not None
        rows = lifecycle.current_round(job, await db(self.store.batches.of_job, job_id))
        state = lifecycle.summary_state(rows, cancelling=job.state == JobState.CANCELLING)
        check = self._next_check(state, self.policy.min_interval_s)
        await db(self.store.jobs.record_answer, job_id, expect=job.state, check=check)

    def _next_check(self, state: JobState, interval: float) -> NextCheck:
        """The job's state after a successful contact with the provider, and when to look again."""
        now = self._clock()
        return NextCheck(state, interval, now if state == JobState.DOWNLOADING else now + interval)

    # ------------------------------------------------------------ polling and cancelling

    async def _poll_round(self, polls: list[tuple[Job, Action]], sweep: bool, now: float) -> None:
        """Poll jobs: with `sweep`, one list call for all of them (and a get only for a due job's
        batch the list missed); otherwise one get per live batch of each due job."""
        self._lease(*(job for job, _ in polls))
        started = time.monotonic()
        try:
            found: dict[str, RemoteBatch] = {}
            if sweep:
                wanted = {row.remote_id for _, action in polls for row in action.batches}
                try:
                    # Only this round's batches: the round holds them while it writes, and an
                    # account's list holds every batch it ever ran.
                    found = {r.id: r for r in await self.provider.list_batches() if r.id in wanted}
                except ProviderError as exc:
                    for job, action in polls:
                        if action.at <= now:
                            await self._step_failed(job, exc)
                    return
            quiet: list[PollAnswer] = []
            for job, action in polls:
                try:
                    answers = await self._answers(action.batches, found, due=action.at <= now)
                    if not answers:
                        continue
                    changed, writes = self._poll_writes(job, answers)
                    if sweep and not changed:
                        quiet.extend(writes)
                        if len(quiet) >= QUIET_WRITES_PER_TRANSACTION:
                            await db(self.store.batches.record_polls, quiet)
                            quiet = []
                    else:
                        await db(self.store.batches.record_polls, writes)
                except ProviderError as exc:
                    await self._step_failed(job, exc)
            if quiet:
                await db(self.store.batches.record_polls, quiet)
        finally:
            metrics.poll_round("sweep" if sweep else "get", time.monotonic() - started)
            for job, _ in polls:
                self._busy.discard(job.id)
            self.wake()

    async def _answers(
        self, rows: tuple[RemoteBatchRecord, ...], found: dict[str, RemoteBatch], *, due: bool
    ) -> list[tuple[RemoteBatchRecord, RemoteBatch]]:
        """Where each live batch is: from the sweep, or asked one by one when the job is due."""
        answers = []
        for row in rows:
            assert row.remote_id is not None
            remote = found.get(row.remote_id)
            if remote is None:
                if not due:
                    continue
                remote = await self.provider.get_batch(row.remote_id)
            answers.append((row, remote))
        return answers

    def _poll_writes(
        self, job: Job, answers: list[tuple[RemoteBatchRecord, RemoteBatch]]
    ) -> tuple[bool, list[PollAnswer]]:
        """What provider answers change: (any status changed, one store write per batch)."""
        changed = False
        for row, remote in answers:
            if BatchStatus.of(remote.status) != row.status:
                changed = True
                log.info(
                    "job.remote_status", job_id=job.id, remote_batch_id=remote.id, status=remote.status.value,
                    progress=remote.progress, shard=row.shard, round=row.round,
                )  # fmt: skip
        rows = [replace(row, status=BatchStatus.of(remote.status)) for row, remote in answers]
        state = lifecycle.summary_state(rows, cancelling=job.state == JobState.CANCELLING)
        interval = lifecycle.next_poll_interval(job.poll_interval_s, changed, self.policy)
        check = self._next_check(state, interval)
        return changed, [PollAnswer(row.id, job.id, remote, job.state, check) for row, remote in answers]

    async def _cancel(self, job: Job, rows: tuple[RemoteBatchRecord, ...]) -> None:
        log.info("job.cancelling", job_id=job.id, remote_batch_ids=[r.remote_id for r in rows])
        job = await db(self.store.jobs.start_cancelling, job.id, expect=job.state)
        answers = []
        for row in rows:
            assert row.remote_id is not None
            try:
                remote = await self.provider.cancel_batch(row.remote_id)
            except ProviderError as exc:
                if exc.retryable:
                    raise
                # Already finished remotely: nothing to cancel; its status says how it ended.
                log.warning("job.cancel_refused", job_id=job.id, remote_batch_id=row.remote_id, error=exc.message)
                remote = await self.provider.get_batch(row.remote_id)
            answers.append((row, remote))
        _changed, writes = self._poll_writes(job, answers)
        await db(self.store.batches.record_polls, writes)

    # ------------------------------------------------------------ results

    async def _end_round(self, job: Job) -> None:
        """Every batch of the round ended: merge what came back, then a follow-up round or the end."""
        doc = await db(_finished_document, job)
        if doc is None:
            doc = await self._merge_round(job)
            if doc is None:
                return  # a follow-up round was planned
        await self._finish(job, doc)

    async def _merge_round(self, job: Job) -> dict[str, Any] | None:
        """Download, merge in input order; plan a follow-up round (None) or write job.json (its content)."""
        settings = self.settings
        batches = await db(self.store.batches.of_job, job.id)
        work = self._work_dir(job)
        await anyio.Path(work).mkdir(parents=True, exist_ok=True)
        answers: list[Path] = []
        for batch in batches:
            for kind, file_id in (("output", batch.output_file_id), ("errors", batch.error_file_id)):
                if batch.remote_id and file_id:
                    dest = work / f"{batch.remote_id}.{kind}.jsonl"
                    size = await self.provider.download_file(file_id, dest)
                    if await db(truncated_tail, dest):
                        # A body that ended mid-line although its length looked right: fetch it whole again.
                        await anyio.Path(dest).unlink()
                        raise ProviderError(f"{file_id} arrived cut off mid-line", retryable=True)
                    log.info("job.downloaded", job_id=job.id, file_id=file_id, bytes=size)
                    answers.append(dest)
        crashpoint("after_download")
        # Reserved in the database, then created: a restart finds the reservation and reuses it.
        candidates = outbox_candidates(settings.outbox_dir, job.name, job.id)
        folder = await db(self.store.jobs.reserve_outbox, job.id, candidates, os.path.lexists)
        await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
        code = lifecycle.unanswered_code(batches, job.cancel_requested)
        assert job.upload_path is not None
        merge: MergeResult = await db(
            merge_results,
            input_path=Path(job.upload_path),
            answers=answers,
            folder=folder,
            unanswered_code=code,
            scratch_dir=work,
        )
        if lifecycle.wants_followup(job, settings.resubmit.max_rounds) and await self._plan_followup(job, folder):
            return None
        state = lifecycle.final_state(merge.unanswered, code)
        reason = job.reason
        if state != JobState.COMPLETED and reason is None:
            reason = reason_for(batches, merge, code)
        doc = job_document(
            job, state, merge, batches, folder, finished_at=self._clock(), reason=reason,
            cost=estimate_cost(merge.usage, settings.pricing.get(job.model or "")),
        )  # fmt: skip
        await db(write_job_json, folder, doc)
        crashpoint("after_job_json")
        return doc

    async def _plan_followup(self, job: Job, folder: Path) -> bool:
        """Resubmit what failed for a passing reason or went unanswered by an expiry; True if planned."""
        next_round = job.round + 1
        files = self._job_files(job)
        await anyio.Path(files).mkdir(parents=True, exist_ok=True)
        followups = files / f"round-{next_round}.jsonl"
        count = await db(write_followups, Path(job.upload_path or ""), folder / "errors.jsonl", followups)
        if count == 0:
            return False
        shards = await db(split, followups, files, self.settings.provider.limits, prefix=f"round-{next_round}")
        await db(
            self.store.batches.plan_round, job.id, expect=job.state, round_=next_round,
            shards=[_shard_plan(s) for s in shards],
        )  # fmt: skip
        log.info("job.followup_planned", job_id=job.id, round=next_round, requests=count, shards=len(shards))
        return True

    async def _finish(self, job: Job, doc: dict[str, Any]) -> None:
        """The terminal transition and its webhook events, in one transaction."""
        state = JobState(doc["status"])
        finished_at = _timestamp(doc["finished_at"])
        event = build_event(
            self.settings, lifecycle.event_type(state), webhook_data(doc), now=finished_at,
            job_webhook_url=job.webhook_url,
        )  # fmt: skip
        ending = Ending(state, finished_at, doc["reason"], doc["request_counts"], doc["usage"])
        job = await db(self.store.jobs.finish, job.id, expect=job.state, ending=ending, events=[event])
        folder = Path(job.outbox_path or ".")
        metrics.job_finished(state.value, finished_at - job.created_at, [folder / n for n in _OUTBOX_FILES])
        log.info(
            "job.finished", job_id=job.id, status=state.value, completed=doc["request_counts"]["completed"],
            failed=doc["request_counts"]["failed"], rounds=job.round + 1, output_file=doc["output_file"],
            error_file=doc["error_file"],
        )  # fmt: skip
        self._poke_deliverer()


def _finished_document(job: Job) -> dict[str, Any] | None:
    """The job.json a crash left behind after writing it but before the terminal commit."""
    if job.outbox_path is None:
        return None
    path = Path(job.outbox_path) / "job.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    # job.json is written atomically, so it is whole; it only has to be this job's.
    return doc if doc.get("id") == job.id else None


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


#: What a job writes into its outbox folder (counted by the outbox-bytes metric).
_OUTBOX_FILES = ("output.jsonl", "errors.jsonl", "job.json")


def _upload_name(job: Job, row: RemoteBatchRecord) -> str:
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in job.name) or "batch"
    if row.round == 0 and row.shard == 0 and row.input_path == job.upload_path:
        return f"{safe}.jsonl"
    return f"{safe}.r{row.round}.s{row.shard}.jsonl"


def _shard_plan(shard: Shard) -> ShardPlan:
    return ShardPlan(str(shard.path), shard.request_count, shard.size_bytes, shard.sha256)
