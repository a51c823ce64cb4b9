"""The daemon: one anyio task group per process that runs the rooms of batchd's work.

`Daemon.run` registers the process in the database, recovers what a crash left in the inbox,
then runs its loops until stopped (or, with `once`, until drained): signals, intake
(`intake.py`), the scheduler (`scheduler.py`, which hands steps to `submit.py`, `poll.py` and
`finish.py`), the lease heartbeat, and webhook delivery. `lifecycle.next_action` decides;
the rooms carry decisions out and record the outcomes through the Store. Every remote side
effect is preceded by a committed intent, so a crash at any point resumes from the database.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, replace

import anyio
import structlog

from batchd import chaos, metrics, systemd
from batchd.backoff import step_delay
from batchd.config import ConfigError, ProviderSettings, Settings
from batchd.daemon.context import Context, db
from batchd.daemon.intake import Intake
from batchd.daemon.scheduler import Scheduler
from batchd.faults import Faults, describe
from batchd.health import LoopMonitor
from batchd.inbox import Inbox
from batchd.models import JobState
from batchd.providers.base import Provider
from batchd.store import Hold, Signal, Store
from batchd.text import counted
from batchd.webhooks import Deliverer

log = structlog.get_logger("batchd.daemon")

#: How often the scheduler looks at the database even without a wake-up (a safety net: commands
#: wake it through SIGNAL_CHECK_S, steps and intake wake it in process).
IDLE_TICK_S = 1.0
#: How often the daemon reads the wake-ups commands send through the database (store/signals.py):
#: an operator's cancel, resume, retry or webhook replay starts within about this long.
SIGNAL_CHECK_S = 0.2
#: SIGTERM to exit: in-flight steps get this long to finish before they are parked.
STOP_GRACE_S = 7.0
#: A loop that crashed, or a start-up that failed, runs again after this long, doubling up to the
#: maximum while the failure lasts.
LOOP_RETRY_MIN_S = 0.5
LOOP_RETRY_MAX_S = 30.0
#: How long start-up waits for the inbox watch before it says READY anyway (rescans still find files).
WATCH_WAIT_S = 10.0
#: Where start-up and the heartbeat report what they meet (Faults).
START_UP = "start-up"
HEARTBEAT = "heartbeat"
#: Jobs nobody holds that a daemon takes over per heartbeat (several daemons share the rest).
CLAIM_BATCH = 100
UNLIMITED = 1 << 62


class _Stopped(Exception):
    """Stopped (a signal) before the work drained."""


class _Parked(Exception):
    """Nothing left to do but parked jobs, which wait for an operator (`batchd resume`)."""

    def __init__(self, job_ids: list[str]) -> None:
        super().__init__(f"{len(job_ids)} job(s) parked")
        self.job_ids = job_ids


@dataclass
class RunResult:
    drained: bool
    #: with --once --timeout: what was still waited for when the time ran out
    left: str | None = None


class Daemon:
    """One batchd process's work over one Store and one Provider."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        provider: Provider,
        providers: Mapping[str, Provider] | None = None,
        deliverer: Deliverer | None = None,
        reload: Callable[[], Settings] | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        daemon_id: str | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.store = store
        self.provider = provider
        #: this process's name in the database: the owner of the jobs it holds
        self.id = daemon_id or uuid.uuid4().hex
        self.deliverer = deliverer
        self._reload = reload
        self._clock = clock
        self._rng = rng or random.Random()
        self._stop = anyio.Event()
        #: what fails around this daemon now: /healthz and STATUS= show it
        self.faults = faults or Faults(clock=clock)
        self._ctx = Context(
            settings, store=store, provider=provider, providers=providers, daemon_id=self.id, clock=clock,
            rng=self._rng, wake=self.wake, poke_deliverer=self._poke_deliverer, faults=self.faults,
        )  # fmt: skip
        self.inbox = Inbox(lambda: self._ctx.settings, store, owner=self._new_job_owner)
        #: the scheduler loop's heartbeat: STATUS= for systemd, the jobs gauge, /healthz's last tick
        self.monitor = LoopMonitor(store, period_s=IDLE_TICK_S, faults=self.faults)
        self._intake = Intake(self._ctx, self.inbox, self._stop)
        self._ctx.intake_backlog = self._intake.backlog
        self._scheduler = Scheduler(self._ctx, self.monitor, self._stop)
        self._ctx.start_new = self._scheduler.start_new
        #: set once recovery is done and every loop runs (what READY=1 tells systemd)
        self.ready = anyio.Event()

    @property
    def settings(self) -> Settings:
        """The settings in force: those of the last successful reload (SIGHUP)."""
        return self._ctx.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        self._ctx.settings = settings

    # ------------------------------------------------------------ control

    def stop(self) -> None:
        """Stop taking work; in-flight steps finish or are parked."""
        if not self._stop.is_set():
            log.info("daemon.stopping")
            systemd.notify("STOPPING=1")
            self._stop.set()
        self.wake()
        self._poke_deliverer()

    @property
    def busy(self) -> frozenset[str]:
        """The jobs that have a step or a poll round running now."""
        return self._scheduler.busy

    @property
    def sweeping(self) -> bool:
        """A list sweep is polling jobs now."""
        return self._scheduler.sweeping

    def wake(self, *, news: bool = False) -> None:
        """Let the scheduler look at the jobs now; with `news` (a store write outside the daemon's
        own steps made a job due: a provider's webhook, a command), at the jobs waiting for the
        sweep under way too."""
        self._scheduler.wake(news=news)

    def _poke_deliverer(self) -> None:
        if self.deliverer is not None:
            self.deliverer.poke()

    def _new_job_owner(self) -> Hold:
        """A job this daemon creates (a take) is its own from the start, at fence 1."""
        return Hold(owner=self.id, fence=1, lease_until=self._clock() + self.settings.cluster.lease_s)

    # ------------------------------------------------------------ the run

    async def run(self, *, once: bool = False, timeout: float | None = None) -> RunResult:
        """Run until stopped (or, with `once`, until drained); return whether it drained."""
        if not await self._start_up():
            return RunResult(drained=False)
        chaos.arm()  # tests only (BATCHD_CHAOS): faults from here on, start-up is not the test
        self._warn_fast_polling()
        drained = False
        left: str | None = None
        # Steps run in `work`, which outlives the loops: on stop the loops end at once and
        # in-flight steps get STOP_GRACE_S to finish before they are cancelled (parked).
        async with anyio.create_task_group() as work:
            async with anyio.create_task_group() as loops:
                loops.start_soon(self._signals)
                loops.start_soon(self._supervise, "intake", lambda: self._intake.run(once))
                # Ready means watched: a producer that starts writing a file in place once the
                # daemon said it is ready must be seen holding it open (not taken at a quiet time).
                # Waited for before the other loops start, so READY=1 is the first notification.
                with anyio.move_on_after(WATCH_WAIT_S):
                    await self._intake.watching.wait()
                loops.start_soon(self._supervise, "scheduler", lambda: self._scheduler.run(work))
                loops.start_soon(self._supervise, "heartbeat", self._heartbeat)
                loops.start_soon(self._supervise, "wake-ups", self._follow_commands)
                if self.deliverer is not None:
                    deliverer = self.deliverer
                    loops.start_soon(self._supervise, "webhooks", lambda: deliverer.serve(work))
                systemd.notify("READY=1")
                self.ready.set()
                log.info(
                    "daemon.ready", inbox=str(self.settings.inbox_dir), provider=self.provider.kind,
                    providers={name: p.kind for name, p in self._ctx.providers.items()},
                )  # fmt: skip
                if once:
                    with anyio.move_on_after(math.inf if timeout is None else timeout) as limit:
                        with contextlib.suppress(_Stopped):
                            try:
                                await self._until_drained()
                                drained = True
                            except _Parked as parked:
                                log.error("daemon.parked_jobs_left", jobs=parked.job_ids, resume="batchd resume JOB")
                    if limit.cancelled_caught:
                        left = await self._what_is_left()
                        log.error("daemon.timeout", timeout_s=timeout, left=left)
                    self.stop()
                await self._stop.wait()
                loops.cancel_scope.cancel()
            work.cancel_scope.deadline = anyio.current_time() + STOP_GRACE_S
        if self.busy:
            log.warning("daemon.parked", jobs=sorted(self.busy))
        # A clean stop frees this daemon's jobs for the others at once (a crash: when the leases end).
        try:
            await db(self.store.cluster.release, self.id)
        except Exception as exc:
            log.warning("daemon.release_failed", error=describe(exc), after="the leases end")
        log.info("daemon.stopped", drained=drained)
        return RunResult(drained=drained, left=left)

    async def _start_up(self) -> bool:
        """Folders, registration, recovery of what a crash left: retried with backoff while the
        database or the disk fails (reported on /healthz), until done (True) or stopped (False)."""
        failures = 0
        while not self._stop.is_set():
            try:
                await db(self.inbox.ensure_folders)
                await self._register()
                recovered = await db(self.inbox.recover)
            except Exception as exc:
                failures += 1
                self.faults.report(START_UP, exc)
                log.error("daemon.start_up_failed", attempt=failures, error=describe(exc), exc_info=exc)
                with anyio.move_on_after(step_delay(failures, LOOP_RETRY_MIN_S, LOOP_RETRY_MAX_S, self._rng)):
                    await self._stop.wait()
                continue
            self.faults.clear(START_UP)
            if recovered:
                log.info("daemon.recovered_claims", jobs=len(recovered))
            return True
        return False

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the daemon's loops; if it raises, report it, wait, and run it again.

        Each loop handles the failures of its own items; this is the line behind that: no single
        error (a bug, a database gone mid-call) may end the daemon. A loop that returns has
        finished its work (intake with --once) and is not run again.
        """
        failures = 0
        while not self._stop.is_set():
            try:
                await loop()
                return
            except Exception as exc:
                failures += 1
                self.faults.report(name, exc)
                metrics.unexpected_error(name)
                log.error("daemon.loop_crashed", loop=name, failures=failures, exc_info=exc)
            with anyio.move_on_after(step_delay(failures, LOOP_RETRY_MIN_S, LOOP_RETRY_MAX_S, self._rng)):
                await self._stop.wait()

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
            self.store.cluster.claim, self.id, self.settings.cluster.lease_s, limit=limit, dead_owners=dead_owners,
            due_within_s=self.settings.polling.max_interval_s,
        )  # fmt: skip
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
                await db(self.store.cluster.renew, self.id)
                await self._claim()
            except Exception as exc:
                # A database that is briefly unreachable must not end the heartbeat for good.
                self.faults.report(HEARTBEAT, exc)
                log.warning("daemon.heartbeat_failed", error=describe(exc))
            else:
                self.faults.clear(HEARTBEAT)

    async def _follow_commands(self) -> None:
        """Act at once on what commands did in the database (store/signals.py), not at the next
        heartbeat or idle round: claim and look at the jobs, or deliver."""
        seen: dict[Signal, int] | None = None
        while not self._stop.is_set():
            try:
                now = await db(self.store.signals.read)
                if seen is not None and now[Signal.JOBS] != seen[Signal.JOBS]:
                    await self._claim()  # a new job nobody holds (`batchd retry`)
                    self._scheduler.wake(news=True)  # a cancel or resume of a job this daemon holds
                if seen is not None and now[Signal.DELIVERIES] != seen[Signal.DELIVERIES]:
                    self._poke_deliverer()
                seen = now
            except Exception as exc:
                # The database is away: the heartbeat reports it; wake-ups resume with it (work
                # made meanwhile is found by the regular rounds: a signal only makes it sooner).
                log.debug("daemon.wake_ups_unread", error=describe(exc))
            with anyio.move_on_after(SIGNAL_CHECK_S):
                await self._stop.wait()

    async def _until_drained(self) -> None:
        """Return once intake has settled, every job has ended and every event is sent; raise
        _Parked when what is left waits for an operator (parked jobs), _Stopped when stopped."""
        while True:
            # Intake first: a take that ends while the store is read has already inserted its job,
            # so reading "intake settled" after the store could miss that job (and stop too early).
            intake_done = self._intake.drained
            try:
                working, parked = await db(self.store.jobs.waiting)
                pending = await db(self.store.deliveries.pending_count)
            except Exception as exc:
                log.warning("daemon.drain_check_failed", error=describe(exc))
            else:
                if intake_done and not pending and not working:
                    if parked:
                        raise _Parked(parked)
                    return
            with anyio.move_on_after(0.1):
                await self._stop.wait()
            if self._stop.is_set():
                raise _Stopped

    async def _what_is_left(self) -> str:
        """What `--once` was still waiting for, in a sentence: jobs by state, events, intake."""
        parts = []
        try:
            counts = await db(self.store.jobs.counts_by_state)
            pending = await db(self.store.deliveries.pending_count)
        except Exception as exc:
            return f"unknown (the database did not answer: {describe(exc)})"
        live = {state: n for state, n in counts.items() if not JobState(state).terminal and n}
        if live:
            by_state = ", ".join(f"{n:,} {state}" for state, n in sorted(live.items()))
            parts.append(f"{counted(sum(live.values()), 'job')} not finished ({by_state})")
        if pending:
            parts.append(f"{counted(pending, 'webhook event')} not delivered yet")
        if not self._intake.drained:
            parts.append("files in the inbox not taken yet")
        return "; ".join(parts) or "nothing (it ended as the time ran out)"

    def _warn_fast_polling(self) -> None:
        remote = any(p.kind != "local" for p in self._ctx.providers.values())
        if remote and self.settings.polling.min_interval_s < 30:
            log.warning(
                "daemon.fast_polling",
                min_interval_s=self.settings.polling.min_interval_s,
                advice="providers advise polling no faster than every 30-60 s per batch",
            )

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self._reload_settings()
                else:
                    log.info("daemon.signal", signal=signal.Signals(signum).name)
                    self.stop()

    async def _reload_settings(self) -> None:
        """SIGHUP: the config read again. Its file and the database are read off the event loop:
        a database locked by another process (30 s of busy_timeout) must not stall every loop,
        nor outlast systemd's watchdog."""
        if self._reload is None:
            return
        systemd.notify(systemd.reloading_message())
        reload = self._reload
        try:
            new = await anyio.to_thread.run_sync(reload)
        except ConfigError as exc:
            log.error("daemon.reload_refused", error=str(exc))
        else:
            dropped = set(self.settings.provider_names) - set(new.provider_names)
            busy = await self._providers_in_use(dropped)
            if busy:
                names = ", ".join(sorted(busy))
                log.error(
                    "daemon.reload_refused",
                    error=f"the new config drops provider(s) {names}, which jobs in flight went to: "
                    "let them end (or cancel them), then reload",
                )
                systemd.notify("READY=1")
                return
            if (new.state_dir, new.database_url) != (self.settings.state_dir, self.settings.database_url):
                log.warning("daemon.reload_needs_restart", keys="state_dir, database_url")
            if _providers_of(new) != _providers_of(self.settings):
                # The providers this process serves were opened at start: until a restart, files
                # go to them as they were (a spec naming a provider only the new config has is
                # refused rather than left waiting).
                log.warning("daemon.reload_needs_restart", keys="provider, providers")
                new = replace(new, provider=self.settings.provider, providers=self.settings.providers)
            self.settings = new
            log.info("daemon.reloaded")
        systemd.notify("READY=1")

    async def _providers_in_use(self, names: set[str]) -> set[str]:
        """Which of `names` jobs not yet ended went to (all of them when the database cannot say)."""
        if not names:
            return set()
        try:
            in_use: set[str] = await db(self.store.jobs.provider_names_in_use)
            return names & in_use
        except Exception as exc:
            log.warning("daemon.reload_cannot_check_providers", error=describe(exc))
            return names


def _providers_of(settings: Settings) -> dict[str, ProviderSettings | None]:
    return {name: settings.provider_named(name) for name in settings.provider_names}
