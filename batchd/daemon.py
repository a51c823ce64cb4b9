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
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from batchd import lifecycle, metrics, systemd
from batchd.config import ConfigError, Settings
from batchd.crashpoints import crashpoint
from batchd.health import LoopMonitor
from batchd.inbox import Inbox, Kind, classify
from batchd.lifecycle import Action, PollPolicy, Step
from batchd.models import Job, JobState, RemoteBatch, RemoteBatchRecord
from batchd.providers.base import Provider, ProviderError
from batchd.results import MergeResult, merge_results, outbox_candidates, truncated_tail, write_job_json
from batchd.store import StaleState, Store
from batchd.watch import InboxWatcher, WatchEvent
from batchd.webhooks import Deliverer, build_event

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
#: A sweep's "no news" answers are written this many per transaction, not one fsync per job
#: (10,000 jobs in flight: a sweep round of 126 s became 6 s).
QUIET_WRITES_PER_TRANSACTION = 500


def iso(ts: float | None) -> str | None:
    """ISO-8601 UTC with a Z, as job.json and webhooks show times."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


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
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        self.inbox = Inbox(lambda: self.settings, store)
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

    def wake(self) -> None:
        self._wake.set()

    def _poke_deliverer(self) -> None:
        if self.deliverer is not None:
            self.deliverer.poke()

    @property
    def policy(self) -> PollPolicy:
        p = self.settings.polling
        return PollPolicy(p.min_interval_s, p.max_interval_s)

    async def run(self, *, once: bool = False, timeout: float | None = None) -> RunResult:
        """Run until stopped (or, with `once`, until drained); return whether it drained."""
        await db(self.inbox.ensure_folders)
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
        log.info("daemon.stopped", drained=drained)
        return RunResult(drained=drained)

    async def _until_drained(self) -> None:
        while True:
            # Intake first: a take that ends while the store is read has already inserted its job,
            # so reading "intake settled" after the store could miss that job (and stop too early).
            intake_done = self._intake_settled and not self._intake_pending
            active = await db(self.store.active_jobs)
            pending = await db(self.store.pending_delivery_count)
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
            jobs = await db(self.store.active_jobs)
            batches = await db(self.store.active_remote_batches)
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
        try:
            async with self._downloads if action.step is Step.DOWNLOAD else self._steps:
                if action.step is Step.UPLOAD:
                    await self._upload(job)
                elif action.step is Step.CREATE:
                    assert action.batch is not None
                    await self._create(job, action.batch, reconcile_first=action.reconcile_first)
                elif action.step is Step.CANCEL:
                    assert action.batch is not None
                    await self._cancel(job, action.batch)
                elif action.step is Step.DOWNLOAD:
                    await self._download(job)
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
        # The step may have moved the job on before failing (upload, then create): back off from there.
        job = await db(self.store.get_job, job.id) or job
        attempts = job.attempts + 1
        delay = lifecycle.retry_delay(attempts, self.policy, self._rng)
        metrics.retry(f"step.{job.state.value}")
        if isinstance(exc, ProviderError) and exc.retry_after:
            delay = max(delay, exc.retry_after)
        log.warning(
            "job.step_failed", job_id=job.id, state=job.state.value, attempts=attempts, wait_s=round(delay, 3),
            error=str(exc),
        )  # fmt: skip
        with contextlib.suppress(StaleState):
            await db(
                self.store.update_job, job.id, expect=job.state, attempts=attempts,
                next_check_at=self._clock() + delay, last_error=str(exc)[:2000],
            )  # fmt: skip

    # ------------------------------------------------------------ steps

    async def _upload(self, job: Job) -> None:
        if job.state == JobState.RECEIVED:
            job = await db(self.store.update_job, job.id, expect=JobState.RECEIVED, state=JobState.UPLOADING)
        assert job.upload_path and job.sha256
        log.info("job.uploading", job_id=job.id, bytes=job.size_bytes)
        try:
            file_id = await self.provider.upload_file(
                Path(job.upload_path), filename=_upload_name(job), sha256=job.sha256
            )
        except ProviderError as exc:
            if exc.retryable:
                raise
            await self._give_up(job, f"upload refused: {exc.message}")
            return
        crashpoint("after_upload_answer")
        batch = await db(
            self.store.add_remote_intent, job.id, file_id=file_id, expect=JobState.UPLOADING, state=JobState.SUBMITTING,
            attempts=0, next_check_at=None, last_error=None,
        )  # fmt: skip
        log.info("job.uploaded", job_id=job.id, file_id=file_id)
        # Straight on to the create: the intent is committed, and a scheduler round would only add latency.
        job = replace(job, state=JobState.SUBMITTING, input_file_id=file_id, attempts=0)
        if not job.cancel_requested:
            await self._create(job, batch, reconcile_first=False)

    async def _give_up(self, job: Job, reason: str) -> None:
        """The provider refused for good: finish the job (its outbox says not_submitted)."""
        log.error("job.refused", job_id=job.id, reason=reason)
        await db(
            self.store.update_job, job.id, expect=job.state, state=JobState.DOWNLOADING, reason=reason,
            attempts=0, next_check_at=None,
        )  # fmt: skip

    async def _create(self, job: Job, batch: RemoteBatchRecord, *, reconcile_first: bool) -> None:
        if reconcile_first and await self._reconcile(job, batch):
            return
        assert job.endpoint and job.completion_window
        # Commit the attempt before sending: after a crash, the next try lists before creating.
        # The compare-and-set makes a second, racing create step fail here, before the network.
        batch = await db(
            self.store.update_remote, batch.id, expect={"create_attempts": batch.create_attempts, "remote_id": None},
            create_attempts=batch.create_attempts + 1,
        )  # fmt: skip
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
                await db(
                    self.store.update_remote, batch.id, expect={"create_attempts": batch.create_attempts},
                    create_attempts=batch.create_attempts - 1,
                )  # fmt: skip
            if exc.retryable:
                raise
            await self._give_up(job, f"batch create refused: {exc.message}")
            return
        crashpoint("after_create_answer")
        await self._bind(job, batch, remote, how="created")

    async def _reconcile(self, job: Job, batch: RemoteBatchRecord) -> bool:
        """Adopt a remote batch an earlier, interrupted create made; True if one was found."""
        remotes = await self.provider.list_batches()
        bound = await db(self.store.bound_remote_ids)
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
        state = lifecycle.state_for_remote(remote.status)
        await db(
            self.store.update_remote,
            batch.id,
            expect={"remote_id": None},
            remote_id=remote.id,
            remote_created_at=remote.created_at.timestamp() if remote.created_at else None,
            **_remote_fields(remote),
            job_values=self._next_check(state, self.policy.min_interval_s),
        )
        log.info(f"job.batch_{how}", job_id=job.id, remote_batch_id=remote.id, status=remote.status.value)

    async def _write_outbox(self, job: Job) -> dict[str, Any]:
        """Download, merge in input order, write job.json last; return its content."""
        settings = self.settings
        batches = await db(self.store.remote_batches, job.id)
        work = settings.state_dir / "work" / job.id
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
        folder = await db(self.store.reserve_outbox, job.id, candidates, os.path.lexists)
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
        state = lifecycle.final_state(merge.unanswered, code)
        reason = job.reason
        if state != JobState.COMPLETED and reason is None:
            reason = _reason(batches, merge, code)
        doc = job_document(job, state, merge, batches, folder, finished_at=self._clock(), reason=reason)
        await db(write_job_json, folder, doc)
        crashpoint("after_job_json")
        return doc

    def _next_check(self, state: JobState, interval: float) -> dict[str, Any]:
        """Job fields after a successful contact with the provider."""
        now = self._clock()
        return {
            "state": state,
            "poll_interval_s": interval,
            "next_check_at": now if state == JobState.DOWNLOADING else now + interval,
            "attempts": 0,
            "last_error": None,
        }

    async def _poll_round(self, polls: list[tuple[Job, Action]], sweep: bool, now: float) -> None:
        """Poll jobs: with `sweep`, one list call for all of them (and a get only for a due job the
        list missed); otherwise one get per job."""
        started = time.monotonic()
        try:
            found: dict[str, RemoteBatch] = {}
            if sweep:
                try:
                    found = {r.id: r for r in await self.provider.list_batches()}
                except ProviderError as exc:
                    for job, action in polls:
                        if action.at <= now:
                            await self._step_failed(job, exc)
                    return
            quiet: list[tuple[int, str, dict[str, Any], dict[str, Any]]] = []
            for job, action in polls:
                assert action.batch is not None and action.batch.remote_id is not None
                remote = found.get(action.batch.remote_id)
                if remote is None and action.at > now:
                    continue
                try:
                    remote = remote or await self.provider.get_batch(action.batch.remote_id)
                    changed, fields, job_values = self._poll_update(job, action.batch, remote)
                    if sweep and not changed:
                        quiet.append((action.batch.id, job.id, fields, job_values))
                        if len(quiet) >= QUIET_WRITES_PER_TRANSACTION:
                            await db(self.store.update_remotes, quiet)
                            quiet = []
                    else:
                        await self._apply(job, action.batch, remote)
                except ProviderError as exc:
                    await self._step_failed(job, exc)
            if quiet:
                await db(self.store.update_remotes, quiet)
        finally:
            metrics.poll_round("sweep" if sweep else "get", time.monotonic() - started)
            for job, _ in polls:
                self._busy.discard(job.id)
            self.wake()

    def _poll_update(
        self, job: Job, batch: RemoteBatchRecord, remote: RemoteBatch
    ) -> tuple[bool, dict[str, Any], dict[str, Any]]:
        """What a provider answer changes: (status changed, remote batch fields, job fields)."""
        changed = remote.status.value != batch.status
        state = lifecycle.state_for_remote(remote.status)
        if job.state == JobState.CANCELLING and not remote.status.terminal:
            state = JobState.CANCELLING
        interval = lifecycle.next_poll_interval(job.poll_interval_s, changed, self.policy)
        return changed, _remote_fields(remote), self._next_check(state, interval)

    async def _apply(self, job: Job, batch: RemoteBatchRecord, remote: RemoteBatch) -> None:
        changed, fields, job_values = self._poll_update(job, batch, remote)
        await db(self.store.update_remote, batch.id, **fields, job_values=job_values)
        if changed:
            log.info(
                "job.remote_status", job_id=job.id, remote_batch_id=remote.id, status=remote.status.value,
                progress=remote.progress,
            )  # fmt: skip

    async def _cancel(self, job: Job, batch: RemoteBatchRecord) -> None:
        assert batch.remote_id is not None
        log.info("job.cancelling", job_id=job.id, remote_batch_id=batch.remote_id)
        job = await db(self.store.update_job, job.id, expect=job.state, state=JobState.CANCELLING)
        try:
            remote = await self.provider.cancel_batch(batch.remote_id)
        except ProviderError as exc:
            if exc.retryable:
                raise
            # Already finished remotely: nothing to cancel; the next poll sees the end.
            log.warning("job.cancel_refused", job_id=job.id, error=exc.message)
            remote = await self.provider.get_batch(batch.remote_id)
        await self._apply(job, batch, remote)

    async def _download(self, job: Job) -> None:
        """Fetch every result file, write the outbox, then finish the job in one transaction."""
        doc = await db(_finished_document, job)
        if doc is None:
            doc = await self._write_outbox(job)
        state = JobState(doc["status"])
        finished_at = _timestamp(doc["finished_at"])
        event = build_event(
            self.settings, lifecycle.event_type(state), webhook_data(doc), now=finished_at,
            job_webhook_url=job.webhook_url,
        )  # fmt: skip
        job = await db(
            self.store.update_job, job.id, expect=job.state, state=state, finished_at=finished_at,
            reason=doc["reason"], request_counts=doc["request_counts"], usage=doc["usage"], events_=[event],
        )  # fmt: skip
        folder = Path(job.outbox_path or ".")
        metrics.job_finished(state.value, finished_at - job.created_at, [folder / n for n in _OUTBOX_FILES])
        log.info(
            "job.finished", job_id=job.id, status=state.value, completed=doc["request_counts"]["completed"],
            failed=doc["request_counts"]["failed"], output_file=doc["output_file"], error_file=doc["error_file"],
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


def _remote_fields(remote: RemoteBatch) -> dict[str, Any]:
    """What batchd keeps of a remote batch each time it hears about it."""
    return {
        "status": remote.status.value,
        "output_file_id": remote.output_file_id,
        "error_file_id": remote.error_file_id,
        "error": remote.error,
        "progress": remote.progress,
    }


def _upload_name(job: Job) -> str:
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in job.name)
    return f"{safe or 'batch'}.jsonl"


def _reason(batches: list[RemoteBatchRecord], merge: MergeResult, code: str) -> str:
    errors = [b.error for b in batches if b.error]
    text = f"{merge.unanswered} of {merge.total} requests unanswered ({code})"
    return f"{text}: {errors[-1]}" if errors else text


def job_document(
    job: Job,
    state: JobState,
    merge: MergeResult,
    batches: list[RemoteBatchRecord],
    folder: Path,
    *,
    finished_at: float,
    reason: str | None,
) -> dict[str, Any]:
    """The content of job.json (DESIGN §4)."""
    output = folder / "output.jsonl"
    errors = folder / "errors.jsonl"
    return {
        "id": job.id,
        "name": job.name,
        "status": state.value,
        "source": job.source,
        "endpoint": job.endpoint,
        "provider": job.provider,
        "remote_batch_ids": [b.remote_id for b in batches if b.remote_id],
        "request_counts": {"total": merge.total, "completed": merge.completed, "failed": merge.failed},
        "usage": dict(merge.usage),
        "created_at": iso(job.created_at),
        "finished_at": iso(finished_at),
        "output_file": str(output.resolve()) if output.exists() else None,
        "error_file": str(errors.resolve()) if errors.exists() else None,
        "metadata": dict(job.metadata),
        "reason": reason,
        "model": job.model,
        "input_sha256": job.sha256,
    }


def webhook_data(doc: dict[str, Any]) -> dict[str, Any]:
    """The `data` of a terminal event (DESIGN §5)."""
    keys = (
        "id", "name", "status", "provider", "source", "remote_batch_ids", "request_counts", "usage",
        "output_file", "error_file", "metadata", "reason",
    )  # fmt: skip
    return {k: doc[k] for k in keys}
