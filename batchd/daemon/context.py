"""What every room of one daemon shares: its settings, store, provider, clock, the faults it
meets, and the jobs held back because their backoff could not be recorded.

The rooms (intake, submit, poll, finish, the scheduler) each get one `Context`; none of them
holds another's state. Store calls run in worker threads through `db()`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog

from batchd.config import DEFAULT_PROVIDER, ProviderSettings, Settings
from batchd.faults import Faults
from batchd.lifecycle import PollPolicy
from batchd.models import Job, JobState
from batchd.providers.base import Provider, ProviderError
from batchd.store import LEASE, Lease, NextCheck, Store

log = structlog.get_logger("batchd.daemon")

#: The longest a finishing step waits for intake to catch up (a steady stream of files must not
#: keep results from the outbox).
YIELD_TO_INTAKE_S = 30.0


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
        providers: Mapping[str, Provider] | None = None,
        daemon_id: str,
        clock: Callable[[], float],
        rng: random.Random,
        wake: Callable[[], None],
        poke_deliverer: Callable[[], None],
        faults: Faults,
    ) -> None:
        self.settings = settings
        self.store = store
        #: the default provider ([provider])
        self.provider = provider
        #: every configured provider by name (DEFAULT_PROVIDER: the default one)
        self.providers: Mapping[str, Provider] = providers or {DEFAULT_PROVIDER: provider}
        #: this process's name in the database: the owner of the jobs it holds
        self.daemon_id = daemon_id
        self.clock = clock
        self.rng = rng
        #: look at the jobs again now (the scheduler's wake-up)
        self.wake = wake
        #: look at the webhook deliveries now (an event was committed)
        self.poke_deliverer = poke_deliverer
        #: what fails around the daemon now (/healthz, STATUS=)
        self.faults = faults
        #: job id → monotonic-free unix time before which the scheduler leaves it alone
        self._held: dict[str, float] = {}
        #: while files found in the inbox wait to be taken, the event set once they are all taken;
        #: None when none waits (the daemon sets it to its intake's)
        self.intake_backlog: Callable[[], anyio.Event | None] = lambda: None
        #: start the first steps of jobs intake just recorded (the daemon sets it to its
        #: scheduler's start_new; by default, a wake-up: the next tick finds them due)
        self.start_new: Callable[[Sequence[Job]], None] = lambda jobs: wake()

    @property
    def policy(self) -> PollPolicy:
        p = self.settings.polling
        return PollPolicy(p.min_interval_s, p.max_interval_s)

    def provider_for(self, job: Job) -> Provider:
        """The provider a job was submitted to (its spec's, else the default).

        A name no longer configured (the config changed across a restart) is a passing refusal:
        the job waits, visibly, until the provider is configured again."""
        provider = self.providers.get(job.provider_name)
        if provider is None:
            raise _not_configured(job)
        return provider

    def provider_settings(self, job: Job) -> ProviderSettings:
        """The configuration of the job's provider (its limits); the same refusal as provider_for."""
        found = self.settings.provider_named(job.provider_name)
        if found is None:
            raise _not_configured(job)
        return found

    async def yield_to_intake(self) -> None:
        """Wait while files wait to be taken, YIELD_TO_INTAKE_S at most: finishing (merges, outbox
        writes) gives the process to intake during a burst. A new file waits for its upload and
        create, which start the provider's clock; answers wait safely at the provider meanwhile."""
        caught_up = self.intake_backlog()
        if caught_up is not None:
            with anyio.move_on_after(YIELD_TO_INTAKE_S):
                await caught_up.wait()

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

    def hold(self, job_id: str, until: float) -> None:
        """Leave `job_id` alone until `until`, whatever the store says (its backoff may not have been
        recorded: the database itself failed)."""
        self._held[job_id] = until

    def holds(self, now: float) -> dict[str, float]:
        """The holds still on at `now` (job id → when each ends); the ended ones are forgotten."""
        for job_id in [j for j, until in self._held.items() if until <= now]:
            del self._held[job_id]
        return dict(self._held)

    def held_until(self, job_id: str, now: float) -> float | None:
        """When a hold on `job_id` ends, if one is still on at `now`."""
        until = self._held.get(job_id)
        if until is None:
            return None
        if until <= now:
            del self._held[job_id]
            return None
        return until


def _not_configured(job: Job) -> ProviderError:
    return ProviderError(
        f"the job's provider {job.provider_name!r} is not configured (any more): add its "
        f"[providers.{job.provider_name}] table back, or cancel the job",
        retryable=True,
    )
