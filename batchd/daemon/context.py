"""What every room of one daemon shares: its settings, store, provider, clock, and how a failed
step backs off.

The rooms (intake, submit, poll, finish, the scheduler) each get one `Context`; none of them
holds another's state. Store calls run in worker threads through `db()`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import structlog

from batchd import metrics
from batchd.backoff import step_delay
from batchd.config import Settings
from batchd.inbox import job_files_dir
from batchd.lifecycle import PollPolicy
from batchd.models import Job, JobState
from batchd.providers.base import Provider, ProviderError
from batchd.store import LEASE, Lease, NextCheck, StaleState, Store

log = structlog.get_logger("batchd.daemon")


async def db(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a Store call in a worker thread: SQLite may wait on a lock; the event loop must not."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


class Context:
    """One daemon's settings (replaced by a reload), store, provider, clock and randomness."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store,
        provider: Provider,
        daemon_id: str,
        clock: Callable[[], float],
        rng: random.Random,
        wake: Callable[[], None],
        poke_deliverer: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.provider = provider
        #: this process's name in the database: the owner of the jobs it holds
        self.daemon_id = daemon_id
        self.clock = clock
        self.rng = rng
        #: look at the jobs again now (the scheduler's wake-up)
        self.wake = wake
        #: look at the webhook deliveries now (an event was committed)
        self.poke_deliverer = poke_deliverer

    @property
    def policy(self) -> PollPolicy:
        p = self.settings.polling
        return PollPolicy(p.min_interval_s, p.max_interval_s)

    def lease(self, *held: Job) -> None:
        """Fence the store writes of the current task to these jobs, at the claims they were read at."""
        LEASE.set(Lease(self.daemon_id, {job.id: job.fence for job in held}))

    def next_check(self, state: JobState, interval: float) -> NextCheck:
        """The job's state after a successful contact with the provider, and when to look again."""
        now = self.clock()
        return NextCheck(state, interval, now if state == JobState.DOWNLOADING else now + interval)

    def work_dir(self, job: Job) -> Path:
        """This daemon's own scratch space for a job: downloads, the merge's index."""
        return self.settings.state_dir / "work" / job.id

    def job_files(self, job: Job) -> Path:
        """Where a job's shard and follow-up files live: beside the inbox, so that any daemon
        sharing it (several hosts on one PostgreSQL database) can take the job over."""
        return job_files_dir(self.settings, job.id)

    async def step_failed(self, job: Job, exc: Exception) -> None:
        """A step of `job` failed: it stays where it is and is tried again after a backoff."""
        # The step may have moved the job on before failing (planned, uploaded): back off from there.
        job = await db(self.store.jobs.get, job.id) or job
        attempts = job.attempts + 1
        retry_after = exc.retry_after if isinstance(exc, ProviderError) else None
        policy = self.policy
        delay = step_delay(attempts, policy.min_interval_s, policy.max_interval_s, self.rng, retry_after=retry_after)
        metrics.retry(f"step.{job.state.value}")
        log.warning(
            "job.step_failed", job_id=job.id, state=job.state.value, attempts=attempts, wait_s=round(delay, 3),
            error=str(exc),
        )  # fmt: skip
        with contextlib.suppress(StaleState):
            await db(
                self.store.jobs.back_off, job.id, expect=job.state, attempts=attempts,
                next_check_at=self.clock() + delay, error=str(exc)[:2000],
            )  # fmt: skip
