"""Standard Webhooks: events, signatures and the delivery worker (DESIGN §5).

An event's body is built once and stored; every attempt sends those exact
bytes with the same `webhook-id`, a fresh `webhook-timestamp` and signatures
computed for that attempt.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpx
import structlog

from batchd import metrics
from batchd.backoff import retry_after_s, webhook_delay
from batchd.config import Secret, Settings, decode_secret
from batchd.crashpoints import crashpoint
from batchd.models import Delivery, NewEvent
from batchd.store import Store

log = structlog.get_logger("batchd.webhooks")

#: Attempts to one endpoint at the same time; a slow receiver only holds up its own queue.
PER_ENDPOINT_CONCURRENCY = 4
#: Deliveries taken on per endpoint (attempts running and waiting for a slot); more stay in the store.
PER_ENDPOINT_QUEUE = 64
#: New due deliveries picked up per `run_due` call.
DUE_BATCH = 100
#: An answer's body is read up to this many bytes, for this long, so its connection can be reused.
DRAIN_BYTES = 64 * 1024
DRAIN_S = 0.5


def new_event(event_type: str, data: Mapping[str, Any], *, now: float) -> tuple[str, bytes]:
    """A fresh event id and the body bytes that every attempt will send."""
    event_id = f"evt_{uuid.uuid4().hex}"
    body = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created_at": int(now),
        "data": dict(data),
    }
    return event_id, json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def event_targets(settings: Settings, event_type: str, job_webhook_url: str | None) -> list[tuple[str, str]]:
    """Where an event goes: matching [[webhooks]] entries, then the job's own webhook_url."""
    targets = [(ep.url, "config") for ep in settings.webhooks if event_type in ep.events]
    if job_webhook_url and event_type != "batch.rejected":
        targets.append((job_webhook_url, "inbox"))
    return targets


def build_event(
    settings: Settings, event_type: str, data: Mapping[str, Any], *, now: float, job_webhook_url: str | None
) -> NewEvent:
    event_id, body = new_event(event_type, data, now=now)
    return NewEvent(
        id=event_id, type=event_type, body=body, targets=event_targets(settings, event_type, job_webhook_url)
    )


def secret_key(secret: Secret) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    return decode_secret(secret.reveal())


def sign(secrets: Sequence[Secret], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<base64>` entry per secret."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    entries = []
    for secret in secrets:
        digest = hmac.new(secret_key(secret), content, hashlib.sha256).digest()
        entries.append("v1," + base64.b64encode(digest).decode())
    return " ".join(entries)


def verify(
    secrets: Sequence[str], headers: Mapping[str, str], body: bytes, *, now: float | None = None, tolerance_s: int = 300
) -> bool:
    """Check a received event the way a receiver should: fresh timestamp, any valid v1 signature."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        offered = lowered["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = {sign([Secret(s)], msg_id, timestamp, body) for s in secrets}
    return any(hmac.compare_digest(entry, want) for entry in offered for want in expected)


def allowed_webhook_url(url: str, allow_list: Sequence[str]) -> str | None:
    """The allow-list entry a spec's webhook_url matches (scheme, host, port, path prefix), or None."""
    # urlsplit raises on a bad IPv6 literal and .port on a port that is not a number in
    # 0-65535: a user's URL that cannot be parsed matches nothing (an exception here would
    # escape Inbox.take and stop intake).
    try:
        parts = urlsplit(url)
        port = _port(parts)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        return None
    for entry in allow_list:
        try:
            allowed = urlsplit(entry)
            allowed_port = _port(allowed)
        except ValueError:
            continue  # the config check does not look at ports; a bad entry allows nothing
        if (
            parts.scheme == allowed.scheme
            and parts.hostname == allowed.hostname
            and port == allowed_port
            and parts.path.startswith(allowed.path)
        ):
            return entry
    return None


def _port(parts: Any) -> int:
    return int(parts.port or (443 if parts.scheme == "https" else 80))


def _non_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    cgnat = ipaddress.ip_network("100.64.0.0/10")
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or address.is_reserved
        or (isinstance(address, ipaddress.IPv4Address) and address in cgnat)
    )


class Refused(Exception):
    """A spec-provided URL that must not be contacted."""


async def pinned_target(url: str, allow_list: Sequence[str]) -> tuple[str, str]:
    """Resolve a spec webhook URL once and check every address; return (URL with the IP, host).

    A non-public address passes only when the allow-list entry names that very
    IP literal: an operator who writes http://10.0.0.5:9000/ means it, while a
    DNS name that resolves inward is a rebinding attempt.
    """
    entry = allowed_webhook_url(url, allow_list)
    if entry is None:
        raise Refused("URL is not in inbox.allow_webhook_urls")
    parts = urlsplit(url)
    host = parts.hostname or ""
    infos = await anyio.getaddrinfo(host, _port(parts), type=socket.SOCK_STREAM)
    if not infos:
        raise Refused(f"{host} does not resolve")
    explicit = urlsplit(entry).hostname
    chosen: str | None = None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]))
        if _non_public(address) and str(address) != explicit:
            raise Refused(f"{host} resolves to non-public address {address}")
        chosen = chosen or str(address)
    assert chosen is not None
    netloc = f"[{chosen}]" if ":" in chosen else chosen
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), host


@dataclass
class _Commit:
    """Attempt outcomes that go into the store in one transaction."""

    outcomes: list[tuple[int, dict[str, Any], float | None]] = field(default_factory=list)
    started: bool = False
    error: BaseException | None = None


@dataclass(frozen=True)
class Outcome:
    """What one attempt ended with."""

    status: int | None
    error: str | None
    retry_after: float | None = None
    #: the first bytes of the answer's body, when asked for (`batchd webhooks test`)
    excerpt: bytes = b""


class Deliverer:
    """Sends due deliveries, records every outcome, and schedules retries."""

    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        owner: str | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._http = http
        #: the daemon this deliverer belongs to: deliveries are claimed for it (None: not claimed)
        self._owner = owner
        self._clock = clock
        self._rng = rng or random.Random()
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        self._in_flight: set[int] = set()
        #: deliveries taken on per endpoint (running or waiting for a slot)
        self._queued: dict[str, int] = {}
        #: outcomes waiting for the next commit (see _record)
        self._commit = _Commit()
        self._commit_lock = anyio.Lock()
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
                await self.run_due(tg)
                # An endpoint with a full queue is looked at again when one of its attempts ends (a poke).
                exclude, full = frozenset(self._in_flight), self._full_endpoints()
                next_due = partial(self._store.deliveries.next_due_at, exclude, skip_urls=full)
                next_at = await anyio.to_thread.run_sync(next_due)
            except Exception:
                # A locked or vanished database must not end deliveries for the daemon's lifetime.
                log.exception("webhook.loop_failed")
                next_at = None
            wait = idle_s if next_at is None else min(idle_s, max(0.0, next_at - self._clock()))
            with anyio.move_on_after(wait):
                await self._wake.wait()

    async def run_due(self, tg: anyio.abc.TaskGroup) -> None:
        """Start an attempt for every due delivery not already on its way (up to a queue per endpoint)."""
        # Deliveries in flight are still due in the store (their outcome is not recorded yet):
        # they are left out of the read, and so is every endpoint whose queue is full. Otherwise
        # a backlog held by one hanging endpoint fills every batch, and no other endpoint gets a
        # delivery until it times out; and re-reading every delivery in flight (bodies included)
        # on each wake-up cost more than the deliveries themselves. The id list stays short: at
        # most PER_ENDPOINT_QUEUE per endpoint (see _full_endpoints).
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
            due = await anyio.to_thread.run_sync(
                lambda: self._store.deliveries.due(
                    self._clock(), limit=DUE_BATCH, exclude=exclude, skip_urls=full, owner=self._owner, lease_s=lease_s
                )
            )
            # An endpoint that answered 410 stays disabled: Store.disable_endpoint parks what was
            # pending then, and an event created later is parked here rather than sent to it again.
            disabled = await anyio.to_thread.run_sync(self._store.deliveries.disabled_endpoints) if due else {}
            for delivery in due:
                if delivery.id in self._in_flight or delivery.id in ended:
                    continue
                if delivery.url in disabled:
                    reason = disabled[delivery.url]
                    await self._record(delivery.id, {"state": "disabled", "last_error": reason})
                    metrics.webhook("parked")
                    log.info("webhook.parked", event_id=delivery.event_id, url=delivery.url, reason=reason)
                    continue
                if self._queued.get(delivery.url, 0) >= PER_ENDPOINT_QUEUE:
                    continue  # taken on when one of its endpoint's attempts ends
                self._in_flight.add(delivery.id)
                self._queued[delivery.url] = self._queued.get(delivery.url, 0) + 1
                tg.start_soon(self._attempt_guarded, delivery)
        finally:
            self._ended_during_run.remove(ended)

    async def _attempt_guarded(self, delivery: Delivery) -> None:
        limiter = self._limiters.setdefault(delivery.url, anyio.CapacityLimiter(PER_ENDPOINT_CONCURRENCY))
        delivered = False
        try:
            outcome = await self.attempt(delivery, slot=limiter)
            delivered = outcome.status is not None and 200 <= outcome.status < 300
        finally:
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
            # Forget an idle endpoint's limiter: spec URLs may differ per job, and a long-running
            # daemon would otherwise keep one limiter for every URL it ever called.
            if limiter.borrowed_tokens == 0 and limiter.statistics().tasks_waiting == 0:
                self._limiters.pop(delivery.url, None)

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
        bound = log.bind(event_id=delivery.event_id, url=delivery.url, job_id=delivery.job_id)
        secrets = self._secrets_for(delivery)
        if not secrets:
            outcome = Outcome(None, "endpoint is no longer configured")
        else:
            async with slot or contextlib.nullcontext():
                try:
                    outcome = await self._send(delivery, secrets)
                    crashpoint("after_webhook_sent")
                except Exception as exc:
                    # Whatever breaks one attempt is a failed attempt, retried on the schedule.
                    # Raised out of here it would end the daemon's task group, and the same due
                    # delivery would end it again after every restart.
                    bound.exception("webhook.attempt_error")
                    outcome = Outcome(None, f"{type(exc).__name__}: {exc}")
        now = self._clock()
        attempts = delivery.attempts + 1
        if outcome.status is not None and 200 <= outcome.status < 300:
            await self._record(delivery.id, {
                "state": "delivered", "attempts": attempts, "last_status": outcome.status, "last_error": None,
                "delivered_at": now,
            })  # fmt: skip
            bound.info("webhook.delivered", status=outcome.status, attempts=attempts)
            metrics.webhook("delivered")
            return outcome
        if outcome.status == 410:
            bound.warning("webhook.endpoint_gone", status=410)
            await self._record(delivery.id, {"attempts": attempts, "last_status": 410})
            gone = "410 Gone from the receiver"
            await anyio.to_thread.run_sync(self._store.deliveries.disable_endpoint, delivery.url, gone)
            metrics.webhook("gone")
            return outcome
        delays = self._settings().delivery.retry_delays_s
        if attempts > len(delays) or not secrets:
            await self._record(
                delivery.id, {"state": "dead", "attempts": attempts, "last_status": outcome.status,
                "last_error": outcome.error}, seen_next_at=delivery.next_attempt_at,
            )  # fmt: skip
            bound.error("webhook.dead_lettered", attempts=attempts, status=outcome.status, error=outcome.error)
            metrics.webhook("dead")
            return outcome
        delay = webhook_delay(attempts, delays, self._rng, retry_after=outcome.retry_after)
        await self._record(
            delivery.id, {"attempts": attempts, "next_attempt_at": now + delay, "last_status": outcome.status,
            "last_error": outcome.error}, seen_next_at=delivery.next_attempt_at,
        )  # fmt: skip
        bound.warning(
            "webhook.retry_scheduled", attempts=attempts, status=outcome.status, error=outcome.error, wait_s=delay
        )
        metrics.webhook("retry")
        return outcome

    async def _record(self, delivery_id: int, values: dict[str, Any], *, seen_next_at: float | None = None) -> None:
        """Record an outcome in the store; returns once it is committed.

        Outcomes that end while a commit is under way go into the next one together (a group
        commit): every commit is an fsync, and one per delivery held a fast receiver to about
        200 deliveries a second. `seen_next_at`: see Store.record_outcomes.
        """
        commit = self._commit
        commit.outcomes.append((delivery_id, values, seen_next_at))
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
        )


async def post_event(
    http: httpx.AsyncClient,
    url: str,
    *,
    event_id: str,
    body: bytes,
    secrets: Sequence[Secret],
    timestamp: int,
    timeout_s: float,
    allow_list: Sequence[str] | None = None,
    peek: int = 0,
) -> Outcome:
    """One signed POST of an event; never raises for what the network or the receiver does.

    `allow_list` is given for a spec's URL (signed with the inbox secret): it is then checked,
    resolved once and pinned (the SSRF guard). `peek` keeps that many first bytes of the answer.
    """
    headers = {
        "content-type": "application/json",
        "user-agent": "batchd-webhooks",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, event_id, timestamp, body),
    }
    target = url
    extensions: dict[str, Any] = {}
    status: int | None = None
    retry_after: float | None = None
    excerpt = b""
    # timeout_s bounds the whole attempt (resolving included). httpx's timeout bounds each
    # network wait only, so a receiver sending a byte now and then held the attempt, and a
    # slot of its endpoint, for as long as it liked.
    with anyio.move_on_after(timeout_s):
        try:
            if allow_list is not None:
                # Resolve once, check, and connect to exactly the checked address.
                target, _host = await pinned_target(url, allow_list)
                # Host and SNI in their ASCII (IDNA) form, as httpx would send them for the
                # name: a header must be ASCII, and "bücher.example" raised UnicodeEncodeError.
                original = httpx.URL(url)
                headers["host"] = original.netloc.decode("ascii")
                extensions["sni_hostname"] = original.raw_host.decode("ascii")
            async with http.stream(
                "POST",
                target,
                content=body,
                headers=headers,
                timeout=timeout_s,
                follow_redirects=False,
                extensions=extensions,
            ) as response:
                status, retry_after = response.status_code, retry_after_s(response.headers, now=datetime.now(UTC))
                excerpt = await _drain(response, peek)
        except Refused as exc:
            return Outcome(None, f"refused: {exc}")
        except httpx.TimeoutException:
            pass  # the same failure as the deadline below, whichever fires first
        except (httpx.HTTPError, OSError) as exc:
            if status is None:
                return Outcome(None, f"{type(exc).__name__}: {exc}")
    if status is None:
        return Outcome(None, f"timed out: no answer within {timeout_s:g} s")
    return Outcome(status, None if 200 <= status < 300 else f"HTTP {status}", retry_after, excerpt)


async def _drain(response: httpx.Response, peek: int) -> bytes:
    """Read a little of the answer's body, keeping its first `peek` bytes.

    Only the status and Retry-After count. Yet a connection whose answer was not read to its
    end cannot be reused: every delivery paid for a new TCP (and TLS) handshake. So up to
    DRAIN_BYTES are read for DRAIN_S at most; a larger or slower body just closes the
    connection, costing neither memory nor much time.
    """
    kept = bytearray()
    read = 0
    with anyio.move_on_after(DRAIN_S):
        try:
            async for chunk in response.aiter_raw():
                if len(kept) < peek:
                    kept += chunk[: peek - len(kept)]
                read += len(chunk)
                if read > DRAIN_BYTES:
                    break
        except httpx.HTTPError:
            pass  # the status is known; a body cut short changes nothing
    return bytes(kept)
