"""The delivery worker: sends due deliveries and carries out what `policy.decide` says of each attempt."""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import httpx
import structlog

from batchd import metrics
from batchd.config import Secret, Settings
from batchd.crashpoints import crashpoint
from batchd.faults import Faults, describe
from batchd.models import Delivery
from batchd.store import DeadLettered, Delivered, DeliveryOutcome, EndpointGone, Parked, RetryLater, Store
from batchd.urls import redact_url
from batchd.webhooks.guard import Resolver
from batchd.webhooks.policy import GONE_REASON, Decision, Verdict, concurrency_after, decide
from batchd.webhooks.post import Outcome, post_event

log = structlog.get_logger("batchd.webhooks")

#: Attempts to one endpoint at the same time at first; a slow receiver only holds up its own queue.
PER_ENDPOINT_CONCURRENCY = 4
#: ...and at most, reached by an endpoint that keeps answering 2xx while more wait (policy.concurrency_after).
MAX_PER_ENDPOINT_CONCURRENCY = 16
#: Where the deliverer reports what it meets (Faults).
WEBHOOKS = "webhooks"
#: Deliveries taken on per endpoint (attempts running, waiting for a slot or for their outcome's
#: commit) at the first concurrency; more stay in the store. An endpoint whose concurrency has
#: grown takes on as many more per slot (256 at 16): at 64, deliveries waiting for a commit
#: left slots idle, and the queue ran dry between refills. Refilled once down to half of this.
PER_ENDPOINT_QUEUE = 64
#: New due deliveries picked up per `run_due` call (a grown endpoint's refill in one read).
DUE_BATCH = 256


@dataclass
class _Commit:
    """Attempt outcomes that go into the store in one transaction."""

    outcomes: list[DeliveryOutcome] = field(default_factory=list)
    started: bool = False
    error: BaseException | None = None


class Deliverer:
    """Sends due deliveries; records each attempt's decision (retry, dead-letter, disable) in the store."""

    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        owner: str | None = None,
        faults: Faults | None = None,
    ) -> None:
        self._store = store
        #: what fails around the daemon now (shared with it): a database that cannot take an outcome
        self.faults = faults or Faults()
        self._settings = settings
        self._http = http
        #: the daemon this deliverer belongs to: deliveries are claimed for it (None: not claimed)
        self._owner = owner
        self._clock = clock
        #: the SSRF guard's DNS cache for spec URLs (its TTL on the injected clock)
        self._resolver = Resolver(clock=clock)
        self._rng = rng or random.Random()
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._in_flight: set[int] = set()
        #: deliveries taken on per endpoint (running or waiting for a slot)
        self._queued: dict[str, int] = {}
        #: outcomes waiting for the next commit (see _record)
        self._commit = _Commit()
        # Taken at once when free: anyio's plain Lock yields to the loop on every acquire.
        self._commit_lock = anyio.Lock(fast_acquire=True)
        self._wake = anyio.Event()
        #: one set per run_due in progress: deliveries whose attempt ended meanwhile
        self._ended_during_run: list[set[int]] = []

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    def poke(self) -> None:
        """Look at the store now: a new event was committed, or an attempt ended."""
        self._wake.set()

    async def serve(self, tg: anyio.abc.TaskGroup, *, idle_s: float = 1.0) -> None:
        """Deliver until cancelled: attempts run in `tg`; the loop sleeps until the next one is due."""
        while True:
            # A fresh event before reading: a poke() during the reads must not be lost.
            self._wake = anyio.Event()
            try:
                read_at = self._clock()
                if await self.run_due(tg):
                    next_at: float | None = read_at  # more may be due: read again at once
                else:
                    # What was due when run_due read is on its way, or waits for a poke: an attempt
                    # under way pokes when it fails, and an endpoint with a full queue when half of
                    # it is done. Only what falls due later is looked for: asked for the earliest
                    # pending delivery, the store went through every one of a full queue's backlog.
                    exclude, full = frozenset(self._in_flight), self._full_endpoints()
                    next_due = partial(self._store.deliveries.next_due_at, exclude, skip_urls=full, after=read_at)
                    next_at = await anyio.to_thread.run_sync(next_due)
            except Exception as exc:
                # A locked or vanished database must not end deliveries for the daemon's lifetime;
                # the fault is logged once (Faults), not once a second while it lasts.
                if WEBHOOKS not in self.faults.current():
                    log.exception("webhook.loop_failed")
                self.faults.report(WEBHOOKS, exc)
                next_at = None
            else:
                self.faults.clear(WEBHOOKS)
            wait = idle_s if next_at is None else min(idle_s, max(0.0, next_at - self._clock()))
            with anyio.move_on_after(wait):
                await self._wake.wait()

    async def run_due(self, tg: anyio.abc.TaskGroup) -> bool:
        """Start an attempt for every due delivery not already on its way (up to a queue per endpoint).

        Returns whether more deliveries may be due now than it could take on.
        """
        # Deliveries in flight are still due in the store (their outcome is not recorded yet):
        # they are left out of the read, and so is every endpoint whose queue is full. Otherwise
        # a backlog held by one hanging endpoint fills every batch, and no other endpoint gets a
        # delivery until it times out; and re-reading every delivery in flight (bodies included)
        # on each wake-up cost more than the deliveries themselves. The id list stays short: at
        # most a queue per endpoint (see _capacity).
        exclude, full = frozenset(self._in_flight), self._full_endpoints()
        # An attempt that ends while this call awaits the store has left the in-flight set, yet
        # its delivery may be in the due list read before its outcome was recorded: starting it
        # again sent the event twice. Such ids are collected here and skipped.
        ended: set[int] = set()
        self._ended_during_run.append(ended)
        try:
            settings = self._settings()
            # Held long enough for a queued attempt to run out its timeout, and at least a job lease.
            lease_s = max(settings.cluster.lease_s, 4 * settings.delivery.timeout_s)
            # Taken here: the thread must not read what the loop changes meanwhile.
            room = {url: self._capacity(url) - self._queued.get(url, 0) for url in self._queued.keys() | self._limiters}
            due, disabled = await anyio.to_thread.run_sync(lambda: self._due_and_disabled(exclude, full, room, lease_s))
            for delivery in due:
                if delivery.id in self._in_flight or delivery.id in ended:
                    continue
                if delivery.url in disabled:
                    reason = disabled[delivery.url]
                    await self._record(Parked(delivery.id, reason))
                    metrics.webhook("parked")
                    log.info("webhook.parked", event_id=delivery.event_id, url=redact_url(delivery.url), reason=reason)
                    continue
                if self._queued.get(delivery.url, 0) >= self._capacity(delivery.url):
                    continue  # taken on when one of its endpoint's attempts ends
                self._in_flight.add(delivery.id)
                self._queued[delivery.url] = self._queued.get(delivery.url, 0) + 1
                tg.start_soon(self._attempt_guarded, delivery)
        finally:
            self._ended_during_run.remove(ended)
        # More may be due: the read stopped at its limit, or stopped taking an endpoint's
        # deliveries at its queue's room (others' may come after them).
        read = Counter(delivery.url for delivery in due)
        return len(due) >= DUE_BATCH or any(n >= room.get(url, PER_ENDPOINT_QUEUE) for url, n in read.items())

    def _due_and_disabled(
        self, exclude: frozenset[int], full: frozenset[str], room: dict[str, int], lease_s: float
    ) -> tuple[list[Delivery], dict[str, str]]:
        """The due deliveries and, when there are any, the disabled endpoints: in one trip to a
        worker thread (each trip is a handoff of the GIL and a wait for it to come back).

        No endpoint gets more than its queue's room: the rest of a batch is neither read whole
        nor claimed (a refill of one endpoint read DUE_BATCH rows, bodies included, to take on
        half as many)."""
        deliveries = self._store.deliveries
        due = deliveries.due(
            self._clock(),
            limit=DUE_BATCH,
            exclude=exclude,
            skip_urls=full,
            owner=self._owner,
            lease_s=lease_s,
            per_url=PER_ENDPOINT_QUEUE,
            room=room,
        )
        # An endpoint that answered 410 stays disabled: disable_endpoint (store) parks what was
        # pending then, and an event created later is parked here rather than sent to it again.
        return due, deliveries.disabled_endpoints() if due else {}

    async def _attempt_guarded(self, delivery: Delivery) -> None:
        limiter = self._limiters.get(delivery.url)
        if limiter is None:
            limiter = self._limiters[delivery.url] = anyio.CapacityLimiter(PER_ENDPOINT_CONCURRENCY)
        delivered = False
        try:
            outcome = await self.attempt(delivery, slot=limiter)
            delivered = outcome.status is not None and 200 <= outcome.status < 300
        except Exception as exc:
            # The outcome could not be recorded (the database failed): the delivery is still pending
            # in the store, under this daemon's lease, and is attempted again (the same event id).
            self.faults.report(WEBHOOKS, exc)
            log.warning("webhook.outcome_not_recorded", event_id=delivery.event_id, error=describe(exc))
        finally:
            limiter.total_tokens = concurrency_after(
                int(limiter.total_tokens),
                delivered=delivered,
                waiting=limiter.statistics().tasks_waiting > 0,
                floor=PER_ENDPOINT_CONCURRENCY,
                ceiling=MAX_PER_ENDPOINT_CONCURRENCY,
            )
            self._in_flight.discard(delivery.id)
            queued = self._queued.pop(delivery.url, 1) - 1
            if queued:
                self._queued[delivery.url] = queued
            for ended in self._ended_during_run:
                ended.add(delivery.id)
            # Look at the store again once the endpoint's queue is down to half (to refill it),
            # or after a failure (its retry may be due before the loop's next wake-up); not after
            # every delivery: each look scans the due deliveries.
            if queued <= PER_ENDPOINT_QUEUE // 2 or not delivered:
                self.poke()
            # Forget an idle endpoint's limiter (and so what its concurrency grew to): spec URLs
            # may differ per job, and a long-running daemon would otherwise keep one limiter for
            # every URL it ever called. Idle: nothing taken on, not merely nothing on the wire.
            if not queued and limiter.borrowed_tokens == 0 and limiter.statistics().tasks_waiting == 0:
                self._limiters.pop(delivery.url, None)

    def _capacity(self, url: str) -> int:
        """Deliveries an endpoint may have taken on: PER_ENDPOINT_QUEUE per PER_ENDPOINT_CONCURRENCY slots."""
        limiter = self._limiters.get(url)
        slots = PER_ENDPOINT_CONCURRENCY if limiter is None else int(limiter.total_tokens)
        return PER_ENDPOINT_QUEUE * slots // PER_ENDPOINT_CONCURRENCY

    def _full_endpoints(self) -> frozenset[str]:
        """Endpoints left out of the next read: their queue is not yet down to half.

        Refilling only then reads a batch at a time; refilling after every attempt read up to
        DUE_BATCH rows, bodies included, to take on one or two of them.
        """
        return frozenset(url for url, n in self._queued.items() if n > PER_ENDPOINT_QUEUE // 2)

    def _secrets_for(self, delivery: Delivery) -> tuple[Secret, ...]:
        settings = self._settings()
        if delivery.secret_ref == "inbox":
            return settings.inbox.webhook_secrets
        for endpoint in settings.webhooks:
            if endpoint.url == delivery.url:
                return endpoint.secrets
        return ()

    async def attempt(self, delivery: Delivery, *, slot: anyio.CapacityLimiter | None = None) -> Outcome:
        """One attempt at one delivery, recorded in the store.

        `slot` (the endpoint's limiter) is held for the exchange with the receiver only: the
        next attempt to the endpoint starts while this outcome is being committed, and the
        outcomes of several attempts share a commit.
        """
        bound = log.bind(event_id=delivery.event_id, url=redact_url(delivery.url), job_id=delivery.job_id)
        secrets = self._secrets_for(delivery)
        if not secrets:
            outcome = Outcome(None, "endpoint is no longer configured")
        else:
            async with _held(slot) if slot is not None else contextlib.nullcontext():
                try:
                    outcome = await self._send(delivery, secrets)
                    crashpoint("after_webhook_sent")
                except Exception as exc:
                    # Whatever breaks one attempt is a failed attempt, retried on the schedule.
                    # Raised out of here it would end the daemon's task group, and the same due
                    # delivery would end it again after every restart.
                    bound.exception("webhook.attempt_error")
                    outcome = Outcome(None, f"{type(exc).__name__}: {exc}")
        decision = decide(
            attempts=delivery.attempts,
            status=outcome.status,
            error=outcome.error,
            retry_after=outcome.retry_after,
            signable=bool(secrets),
            retry_delays_s=self._settings().delivery.retry_delays_s,
            now=self._clock(),
            rng=self._rng,
        )
        await self._carry_out(delivery, decision, bound)
        return outcome

    async def _carry_out(self, delivery: Delivery, decision: Decision, bound: Any) -> None:
        """Record a decision, and disable the endpoint after a 410; log and count it."""
        attempts, status, error = decision.attempts, decision.status, decision.error
        if decision.verdict is Verdict.DELIVERED:
            assert status is not None  # a 2xx
            await self._record(Delivered(delivery.id, attempts, status, decision.at))
            bound.info("webhook.delivered", status=status, attempts=attempts)
            metrics.webhook("delivered")
        elif decision.verdict is Verdict.DISABLE:
            bound.warning("webhook.endpoint_gone", status=status)
            await self._record(EndpointGone(delivery.id, attempts))
            await anyio.to_thread.run_sync(self._store.deliveries.disable_endpoint, delivery.url, GONE_REASON)
            metrics.webhook("gone")
        elif decision.verdict is Verdict.DEAD:
            await self._record(DeadLettered(delivery.id, attempts, status, error, delivery.next_attempt_at))
            bound.error("webhook.dead_lettered", attempts=attempts, status=status, error=error)
            metrics.webhook("dead")
        else:
            await self._record(RetryLater(delivery.id, attempts, status, error, decision.at, delivery.next_attempt_at))
            bound.warning(
                "webhook.retry_scheduled", attempts=attempts, status=status, error=error, wait_s=decision.wait_s
            )
            metrics.webhook("retry")

    async def _record(self, outcome: DeliveryOutcome) -> None:
        """Record an outcome in the store; returns once it is committed.

        Outcomes that end while a commit is under way go into the next one together (a group
        commit): every commit is an fsync, and one per delivery held a fast receiver to about
        200 deliveries a second. See DeliveryStore.record_outcomes.
        """
        commit = self._commit
        commit.outcomes.append(outcome)
        async with self._commit_lock:
            # Whoever gets the lock first commits everything gathered so far; the others find
            # their outcome committed (or its commit failed) when the lock comes to them.
            if not commit.started:
                commit.started = True
                self._commit = _Commit()
                try:
                    await anyio.to_thread.run_sync(self._store.deliveries.record_outcomes, commit.outcomes)
                except BaseException as exc:
                    commit.error = exc
                    raise
        if commit.error is not None:
            raise RuntimeError("the outcome of a webhook attempt was not recorded") from commit.error

    async def _send(self, delivery: Delivery, secrets: Sequence[Secret]) -> Outcome:
        settings = self._settings()
        return await post_event(
            self._http,
            delivery.url,
            event_id=delivery.event_id,
            body=delivery.body,
            secrets=secrets,
            timestamp=int(self._clock()),
            timeout_s=settings.delivery.timeout_s,
            allow_list=settings.inbox.allow_webhook_urls if delivery.secret_ref == "inbox" else None,
            resolver=self._resolver,
        )


@contextlib.asynccontextmanager
async def _held(limiter: anyio.CapacityLimiter) -> AsyncIterator[None]:
    """Hold a token of `limiter`; a free one is taken without a trip round the event loop (which
    anyio's own acquire makes even then: one more loop iteration, with its epoll call, per attempt)."""
    try:
        limiter.acquire_nowait()
    except anyio.WouldBlock:
        await limiter.acquire()
    try:
        yield
    finally:
        limiter.release()
