"""The scheduler: each tick reads the jobs of this daemon that are due (the store keeps each
job's due time from `lifecycle.next_action`, see store/due.py), asks the life cycle what each
needs, and starts that step in the right room (submit, poll, finish).

A job has at most one step or poll round running at a time (`busy`). The loop sleeps until
the earliest job is due, a room wakes it (a step ended, a job was claimed), or the idle period
ends; it also sends systemd's WATCHDOG=1. A file intake has just taken does not wait for the
loop: its first step starts at once (`start_new`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import anyio.abc
import structlog

from batchd import lifecycle, metrics, systemd
from batchd.backoff import step_delay
from batchd.daemon.admission import Admitter
from batchd.daemon.context import Context, db
from batchd.daemon.failures import STEPS, step_failed
from batchd.daemon.finish import Finisher
from batchd.daemon.poll import Poller
from batchd.daemon.submit import Submitter
from batchd.faults import Kind, classify, describe
from batchd.health import LoopMonitor
from batchd.lifecycle import Action, PollPolicy, Step
from batchd.models import Job
from batchd.store import StaleState

log = structlog.get_logger("batchd.daemon")

#: Uploads, creates and cancels running at once, per provider (each has its own); polls are
#: grouped separately.
MAX_CONCURRENT_STEPS = 16
#: Downloads and merges running at once: they are long and heavy, and must never hold the
#: slots new submissions need.
MAX_CONCURRENT_DOWNLOADS = 4
#: After a failed tick (the database down, read-only) the loop reads again after this long,
#: doubling up to the maximum while the failure lasts.
TICK_RETRY_MIN_S = 0.5
TICK_RETRY_MAX_S = 15.0
#: Where the loop reports what it meets (Faults).
SCHEDULER = "scheduler"
#: Jobs read per tick at most: a tick that finds a full page starts those and reads again.
DUE_PAGE = 1000
#: A sweep also polls the jobs due within this share of the longest poll interval: one list
#: call then serves half an interval's polls, not only the few due this very second (at most
#: two sweeps per longest interval; a job is polled at most that much early).
SWEEP_AHEAD_SHARE = 0.5
#: The jobs a sweep takes are out of the due reads until it writes them, or for this long at the
#: most (a sweep that died with its daemon: its jobs are polled that much late, never forgotten).
#: Longer than a sweep lasts (100,000 jobs in flight: about two minutes on a busy 2-core machine),
#: or the ticks would read the jobs it still holds again and again.
SWEEP_HOLD_S = 600.0


def sweep_ahead_s(policy: PollPolicy) -> float:
    """How far ahead a sweep looks for jobs to poll with it."""
    return SWEEP_AHEAD_SHARE * policy.max_interval_s


class Scheduler:
    """Turns the life cycle's decisions into running steps, one at a time per job."""

    def __init__(self, ctx: Context, monitor: LoopMonitor, stop: anyio.Event) -> None:
        self._ctx = ctx
        self._monitor = monitor
        self._stop = stop
        self._admitter = Admitter(ctx)
        self._submitter = Submitter(ctx, self._admitter)
        self._poller = Poller(ctx, self._admitter)
        self._finisher = Finisher(ctx, self._submitter)
        self._wake = anyio.Event()
        self._busy: set[str] = set()
        #: per provider name: its steps running at once (a slow provider holds up only its own jobs)
        self._steps: dict[str, anyio.CapacityLimiter] = {}
        self._downloads = anyio.CapacityLimiter(MAX_CONCURRENT_DOWNLOADS)
        #: a list sweep is under way (one at a time)
        self._sweeping = False
        #: jobs due for a poll that wait for the sweep under way (the next sweep takes them):
        #: left out of the due reads meanwhile, or every tick would read them again and again
        self._awaiting_sweep: set[str] = set()
        #: the holds of sweeps that failed: their jobs still to be released (see _sweep)
        self._unreleased: set[float] = set()
        #: a step or poll round ended since the last tick: job counts may have changed (STATUS=)
        self._changed = True
        #: ticks failed in a row (the wait before the next grows with them)
        self._failed_ticks = 0
        #: where steps run while the loop runs (see run); None before and after
        self._work: anyio.abc.TaskGroup | None = None

    @property
    def busy(self) -> frozenset[str]:
        """The jobs that have a step or a poll round running now."""
        return frozenset(self._busy)

    @property
    def sweeping(self) -> bool:
        """A list sweep is under way (its jobs are out of the due reads, not in `busy`)."""
        return self._sweeping

    def wake(self, *, news: bool = False) -> None:
        """Tick now: something changed that the next tick should see. With `news` (a command
        changed jobs: a cancel, a resume; a provider's webhook made one due), the jobs waiting for
        the sweep are read again too: one of them may have a step to take that cannot wait for
        the sweep to end."""
        if news:
            self._awaiting_sweep.clear()
        self._wake.set()

    def start_new(self, jobs: Sequence[Job]) -> None:
        """Start the first step of jobs intake has just recorded, without waiting for a tick's
        reads: a lone file's plan and upload begin at once (the due index would say the same a
        few milliseconds later). What cannot start here is left to a tick, woken for it."""
        now = self._ctx.clock()
        left = False
        for job in jobs:
            action = lifecycle.next_action(job, [], now)
            startable = (
                self._work is not None and not self._stop.is_set() and job.owner == self._ctx.daemon_id
                and action.step is Step.PLAN and action.at <= now
                and job.id not in self._busy and self._ctx.held_until(job.id, now) is None
            )  # fmt: skip
            if not startable:
                left = left or action.step is not Step.NONE
                continue
            assert self._work is not None
            # Busy before the step runs: a tick reading this job meanwhile leaves it alone.
            self._busy.add(job.id)
            self._changed = True
            self._work.start_soon(self._run_step, job, action)
        if left:
            self.wake()

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        """Tick until stopped; steps run in `tg`, which outlives this loop (see Daemon.run)."""
        self._work = tg
        try:
            await self._loop()
        finally:
            self._work = None

    async def _loop(self) -> None:
        assert self._work is not None
        tg = self._work
        watchdog = systemd.watchdog_interval_s()
        last_ping = 0.0
        while not self._stop.is_set():
            if watchdog is not None and time.monotonic() - last_ping >= watchdog:
                systemd.notify("WATCHDOG=1")
                last_ping = time.monotonic()
            # A fresh event before reading: a wake() that lands during the reads must not be lost.
            self._wake = anyio.Event()
            now = self._ctx.clock()
            try:
                next_at = await self._tick(tg, now)
            except Exception as exc:
                # The database down or read-only, a bug: the loop waits and reads again, never ends.
                next_at = now + self._tick_failed(exc)
            else:
                self._failed_ticks = 0
                self._ctx.faults.clear(SCHEDULER)
            if watchdog is not None:
                # Wake in time for the next WATCHDOG=1 even when the loop has nothing to do.
                next_at = min(next_at, now + max(0.0, last_ping + watchdog - time.monotonic()))
            with anyio.move_on_after(max(0.0, next_at - self._ctx.clock())):
                await self._wake.wait()

    def _tick_failed(self, exc: Exception) -> float:
        """Report a failed tick; return how long to wait before the next (doubling, at most TICK_RETRY_MAX_S)."""
        self._failed_ticks += 1
        self._ctx.faults.report(SCHEDULER, exc)
        self._monitor.announce_faults()
        if classify(exc) is Kind.UNEXPECTED:
            metrics.unexpected_error(SCHEDULER)
            log.error("daemon.tick_failed", failures=self._failed_ticks, exc_info=exc)
        else:
            log.warning("daemon.tick_failed", failures=self._failed_ticks, error=describe(exc))
        return step_delay(self._failed_ticks, TICK_RETRY_MIN_S, TICK_RETRY_MAX_S, self._ctx.rng)

    async def _tick(self, tg: anyio.abc.TaskGroup, now: float) -> float:
        """Start every step that is due; return when the loop should look again at the latest.

        Reads only what is due (the store's due index), in pages: the jobs that wait cost
        nothing per tick, however many there are.
        """
        self._monitor.begin()
        store = self._ctx.store
        owner = self._ctx.daemon_id
        for hold in sorted(self._unreleased):
            await db(store.jobs.release_held, owner, hold)
            self._unreleased.discard(hold)
        # A job busy while we read may have moved on since: skip it this tick, or its
        # stale row would start the same step twice (the next wake-up sees it fresh).
        busy = set(self._busy)
        # Nor are the jobs read that could not start anyway: those held back (see Context.hold)
        # and those waiting for the sweep under way. Each tick's cost follows what can start.
        holds = self._ctx.holds(now)
        jobs = await db(store.jobs.due, owner, now, limit=DUE_PAGE, skip=busy | holds.keys() | self._awaiting_sweep)
        batches = await db(store.batches.by_job, [job.id for job in jobs]) if jobs else {}
        later = await db(store.jobs.next_due, owner, now)
        await self._monitor.tick(changed=self._changed)
        self._changed = False
        next_at = min([now + self._monitor.idle_s(), *holds.values()])
        if later is not None:
            next_at = min(next_at, later)
        # The queue's heads woken (room freed up, or it is time): due from the next read on.
        recheck = await self._admitter.tick(now)
        if recheck is not None:
            next_at = min(next_at, recheck)
        if len(jobs) == DUE_PAGE:
            next_at = now  # a full page: more may be due; read again once these are started
        polls: list[tuple[Job, Action]] = []
        starts: list[tuple[Job, Action]] = []
        for job in jobs:
            if job.id in self._busy or job.id in busy:
                continue
            held = self._ctx.held_until(job.id, now)
            if held is not None:
                next_at = min(next_at, held)
                continue
            action = lifecycle.next_action(job, batches.get(job.id, []), now)
            if action.step is Step.NONE:
                continue
            if action.at > now:
                next_at = min(next_at, action.at)
            elif action.step is Step.POLL:
                polls.append((job, action))
            else:
                starts.append((job, action))
        # The downloads whose results expire first start first (they queue for their slots in
        # this order): after a daemon was down, those are the ones that cannot wait.
        never = float("inf")
        starts.sort(key=lambda item: lifecycle.results_deadline(batches.get(item[0].id, [])) or never)
        for job, action in starts:
            self._busy.add(job.id)
            tg.start_soon(self._run_step, job, action)
        for poll in [p for p in polls if lifecycle.polled_alone(p[0])]:
            # A provider's webhook said its batch ended: a get of its own now, never left for a
            # sweep (each in its own round, so that several hinted at once are asked side by side).
            self._busy.add(poll[0].id)
            tg.start_soon(self._poll_round, [poll], now)
        polls = [p for p in polls if not lifecycle.polled_alone(p[0])]
        if polls:
            # With enough jobs in flight, one list call serves every job due now or within
            # `sweep_ahead_s` (one sweep at a time: the jobs due meanwhile wait for the next);
            # otherwise one get per due job. (Counted up to the threshold only.)
            in_flight = await db(store.jobs.count_in_flight, owner, cap=lifecycle.SWEEP_MIN_JOBS)
            if not lifecycle.use_sweep(in_flight):
                self._busy.update(job.id for job, _ in polls)
                tg.start_soon(self._poll_round, polls, now)
            elif not self._sweeping:
                self._sweeping = True
                tg.start_soon(self._sweep, now, frozenset(self._busy))
            else:
                self._awaiting_sweep.update(job.id for job, _ in polls)
        return next_at

    async def _poll_round(self, polls: list[tuple[Job, Action]], now: float) -> None:
        try:
            await self._poller.round(polls, now)
        except Exception as exc:
            # Beyond the provider's answers (which the round handles job by job): each job backs off.
            for job, _ in polls:
                await step_failed(self._ctx, job, exc)
        else:
            self._ctx.faults.clear(STEPS)
        finally:
            for job, _ in polls:
                self._busy.discard(job.id)
            self._changed = True
            self.wake()

    async def _sweep(self, now: float, busy: frozenset[str]) -> None:
        """One list sweep over every in-flight job due by now + sweep_ahead_s (see Poller.sweep)."""
        store = self._ctx.store
        # A time no job is due at: the sweep's mark on the jobs it takes (they leave the due reads).
        hold = now + SWEEP_HOLD_S
        try:
            until = now + sweep_ahead_s(self._ctx.policy)
            if await db(store.jobs.take_for_sweep, self._ctx.daemon_id, until, hold, skip=busy):
                await self._poller.sweep(hold, now)
        except Exception as exc:
            # The list or the database failed beyond what the sweep handles job by job: the jobs
            # it still holds are released by the next ticks (a database that refused the release
            # too would otherwise leave them waiting for the hold, 10 min).
            self._unreleased.add(hold)
            self._ctx.faults.report(STEPS, exc)
            log.warning("daemon.sweep_failed", error=describe(exc))
        else:
            self._ctx.faults.clear(STEPS)
        finally:
            self._sweeping = False
            self._awaiting_sweep.clear()
            self._changed = True
            self.wake()

    async def _admit(self, job: Job, action: Action) -> None:
        """Let the job in (else it waits in `queued`), then plan its round or submit its shards."""
        admitted = await self._admitter.gate(job)
        if admitted is None:
            return
        if action.step is Step.ADMIT and action.batches:
            await self._submitter.submit(admitted, action.batches)
        else:
            await self._submitter.plan(admitted)

    async def _run_step(self, job: Job, action: Action) -> None:
        bound = log.bind(job_id=job.id, step=action.step.value)
        self._ctx.lease(job)
        try:
            steps = self._steps.setdefault(job.provider_name, anyio.CapacityLimiter(MAX_CONCURRENT_STEPS))
            async with self._downloads if action.step is Step.DOWNLOAD else steps:
                if action.step in (Step.PLAN, Step.ADMIT):
                    await self._admit(job, action)
                elif action.step is Step.SUBMIT:
                    await self._submitter.submit(job, action.batches)
                elif action.step is Step.CANCEL:
                    await self._poller.cancel(job, action.batches)
                elif action.step is Step.DOWNLOAD:
                    # The round's batches have ended: room at the provider for a queued job.
                    self._admitter.room_freed()
                    await self._finisher.end_round(job)
        except StaleState:
            bound.info("job.stale_step")
        except Exception as exc:
            # The provider, a full disk, the database or a bug: the step backs off and is tried
            # again (a bug, a bounded number of times); nothing here ends the daemon.
            await step_failed(self._ctx, job, exc)
        else:
            self._ctx.faults.clear(STEPS)
        finally:
            self._busy.discard(job.id)
            self._changed = True
            self.wake()
