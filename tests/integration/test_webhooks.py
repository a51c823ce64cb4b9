"""Standard Webhooks signing and the delivery worker (DESIGN §5) against a real receiver.

The receiver is a small ASGI app served over loopback; the Store is a real
database (SQLite and PostgreSQL). Time is a fake clock handed to the Store and the Deliverer, so
backoffs are crossed by moving the clock, never by sleeping.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.types import Receive, Scope, Send

from batchd.config import Secret, Settings, WebhookEndpoint, load_settings
from batchd.emulator.server import serve_emulator
from batchd.models import Delivery, JobState
from batchd.store import Store
from batchd.webhooks import Deliverer, Outcome, Refused, build_event, event_targets, pinned_target, sign, verify
from batchd.webhooks.guard import DNS_TTL_S
from tests.databases import database_url
from tests.hand_clock import Clock
from tests.store_helpers import add_job

pytestmark = pytest.mark.each_database

SECRET_A = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SECRET_B = "whsec_dGhpcyBpcyBhbm90aGVyIHNlY3JldCBrZXkhIQ=="
INBOX_SECRET = "whsec_aW5ib3ggc2VjcmV0IGZvciBzcGVjIHVybHMh"
ALL_EVENTS = ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled", "batch.rejected"]


# ---------------------------------------------------------------- signatures


def test_signatures_verify_with_the_reference_verifier() -> None:
    body = json.dumps({"id": "evt_1", "type": "batch.completed", "data": {"name": "ünïcode"}}, ensure_ascii=False)
    raw = body.encode()
    now = int(time.time())
    one = sign([Secret(SECRET_A)], "evt_1", now, raw)
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(now), "webhook-signature": one}
    assert Webhook(SECRET_A).verify(raw, headers) == json.loads(body)
    assert verify([SECRET_A], headers, raw)

    # Rotation: one entry per secret, each verifies with the reference verifier on its own.
    both = sign([Secret(SECRET_A), Secret(SECRET_B)], "evt_1", now, raw)
    assert len(both.split()) == 2 and all(entry.startswith("v1,") for entry in both.split())
    rotated = {**headers, "webhook-signature": both}
    for secret in (SECRET_A, SECRET_B):
        assert Webhook(secret).verify(raw, rotated) == json.loads(body)
        assert verify([secret], rotated, raw)
    with pytest.raises(WebhookVerificationError):
        Webhook(INBOX_SECRET).verify(raw, rotated)
    assert not verify([INBOX_SECRET], rotated, raw)

    tampered = raw.replace(b"evt_1", b"evt_2")
    for signed in (headers, rotated):
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET_A).verify(tampered, signed)
        assert not verify([SECRET_A, SECRET_B], signed, tampered)
    assert not verify([SECRET_A], {**headers, "webhook-id": "evt_2"}, raw)
    assert not verify([SECRET_A], headers, raw, now=now + 301)


def test_verify_accepts_what_the_reference_signs() -> None:
    now = int(time.time())
    signature = Webhook(SECRET_B).sign("evt_9", datetime.fromtimestamp(now, tz=UTC), '{"a":1}')
    headers = {"Webhook-Id": "evt_9", "Webhook-Timestamp": str(now), "Webhook-Signature": f"v1,xxxx {signature}"}
    assert verify([SECRET_B], headers, b'{"a":1}')
    assert not verify([SECRET_A], headers, b'{"a":1}')


# ---------------------------------------------------------------- event targets


def settings_from(tmp_path: Path, text: str) -> Settings:
    config = tmp_path / "batchd.toml"
    config.write_text(f'state_dir = "state"\n{text}', encoding="utf-8")
    return load_settings(config, environ={})


def test_event_targets_filter_by_events_and_add_the_job_url_for_terminal_events(tmp_path: Path) -> None:
    settings = settings_from(
        tmp_path,
        f"""
[[webhooks]]
url = "https://a.example/hook"
secret = "{SECRET_A}"
events = ["batch.completed"]

[[webhooks]]
url = "https://b.example/hook"
secret = "{SECRET_B}"
""",
    )
    job_url = "https://job.example/x"
    assert event_targets(settings, "batch.completed", job_url) == [
        ("https://a.example/hook", "config"),
        ("https://b.example/hook", "config"),
        (job_url, "inbox"),
    ]
    for terminal in ("batch.failed", "batch.expired", "batch.cancelled"):
        assert event_targets(settings, terminal, job_url) == [("https://b.example/hook", "config"), (job_url, "inbox")]
    assert event_targets(settings, "batch.rejected", job_url) == [("https://b.example/hook", "config")]
    assert event_targets(settings, "batch.completed", None) == [
        ("https://a.example/hook", "config"),
        ("https://b.example/hook", "config"),
    ]


# ---------------------------------------------------------------- a real receiver


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    #: hold the response until the test releases it (or the client gives up)
    hang: bool = False


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An ASGI webhook receiver: records every request and answers per a script (per path).

    A path's script is consumed in order; its last answer repeats. Unscripted paths answer 200.
    """

    script: dict[str, list[Answer]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    release: anyio.Event = field(default_factory=anyio.Event)
    answered: int = 0

    def paths(self) -> list[str]:
        return [r.path for r in self.received]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.received.append(Received(scope["path"], headers, body))
        answers = self.script.get(scope["path"], [Answer()])
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if answer.hang:
            with anyio.move_on_after(60):
                await self.release.wait()
        raw_headers = [(k.encode(), v.encode()) for k, v in answer.headers]
        await send({"type": "http.response.start", "status": answer.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": b""})
        self.answered += 1


def real_time_clock() -> Clock:
    """A clock the test moves by hand, starting at the real time (so signatures stay fresh)."""
    return Clock(float(int(time.time())))


@dataclass
class Harness:
    rx: Receiver
    url: str
    clock: Clock
    store: Store
    settings: Settings
    deliverer: Deliverer = field(init=False)

    def emit(self, event_type: str = "batch.completed", *, webhook_url: str | None = None) -> str:
        """A finished job with its event, committed as the daemon does; returns the event id."""
        job_id = uuid.uuid4().hex
        data = {"id": job_id, "name": "n", "status": event_type.removeprefix("batch."), "source": "n.jsonl"}
        event = build_event(self.settings, event_type, data, now=self.clock(), job_webhook_url=webhook_url)
        state = JobState(event_type.removeprefix("batch."))
        add_job(self.store, job_id, "n", state=state, events=[event], webhook_url=webhook_url)
        return event.id

    async def round(self) -> None:
        """Attempt every due delivery and wait for the attempts to end."""
        async with anyio.create_task_group() as tg:
            await self.deliverer.run_due(tg)

    def one(self, event_id: str) -> Delivery:
        (delivery,) = self.store.deliveries.select(event_id=event_id)
        return delivery


@asynccontextmanager
async def harness(
    tmp_path: Path,
    *,
    endpoints: dict[str, list[str]] | None = None,
    allow: list[str] | None = None,
    delays: list[float] | None = None,
    timeout_s: float = 5.0,
) -> AsyncIterator[Harness]:
    """A receiver on loopback, settings whose [[webhooks]] point at its paths, a Store and a Deliverer.

    `endpoints` maps a receiver path to its events; `allow` lists [inbox] allow_webhook_urls,
    where "{url}" stands for the receiver's base URL and "{port}" for its port.
    """
    rx = Receiver()
    async with serve_emulator(rx, host="127.0.0.1", port=0) as url:
        try:
            hooks = "".join(
                f'[[webhooks]]\nurl = "{url}{path}"\nsecret = ["{SECRET_A}", "{SECRET_B}"]\nevents = {json.dumps(ev)}\n'
                for path, ev in (endpoints or {"/hook": ALL_EVENTS}).items()
            )
            port = url.rsplit(":", 1)[1]
            allowed = [a.replace("{url}", url).replace("{port}", port) for a in allow or []]
            settings = settings_from(
                tmp_path,
                f"""
[inbox]
allow_webhook_urls = {json.dumps(allowed)}
webhook_secret = "{INBOX_SECRET}"

[delivery]
timeout_s = {timeout_s}
retry_delays_s = {json.dumps(delays or [5, 300])}

{hooks}""",
            )
            clock = real_time_clock()
            store = Store(database_url(tmp_path / "batchd.db"), clock=clock)
            try:
                store.migrate()
                # The client follows redirects by default: the Deliverer must refuse them per request.
                async with httpx.AsyncClient(follow_redirects=True) as http:
                    h = Harness(rx, url, clock, store, settings)
                    # Reads h.settings at each use, so a test may swap the settings (as a reload does).
                    h.deliverer = Deliverer(store, lambda: h.settings, http, clock=clock, rng=random.Random(7))
                    yield h
            finally:
                store.close()
        finally:
            rx.release.set()


def assert_signed(request: Received, body: bytes, event_id: str, secrets: list[str]) -> None:
    assert request.body == body
    assert request.headers["webhook-id"] == event_id
    for secret in secrets:
        assert Webhook(secret).verify(request.body, request.headers) == json.loads(body)


async def test_a_2xx_answer_delivers(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        h.rx.script["/hook"] = [Answer(204)]
        event_id = h.emit()
        await h.round()
        delivery = h.one(event_id)
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("delivered", 1, 204)
        assert delivery.delivered_at == h.clock()
        (request,) = h.rx.received
        assert request.path == "/hook"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["webhook-timestamp"] == str(int(h.clock()))
        assert_signed(request, delivery.body, event_id, [SECRET_A, SECRET_B])
        assert json.loads(request.body)["id"] == event_id
        await h.round()
        assert len(h.rx.received) == 1


async def test_every_attempt_sends_the_same_id_and_body_freshly_signed(tmp_path: Path) -> None:
    async with harness(tmp_path, delays=[5, 60]) as h:
        h.rx.script["/hook"] = [Answer(500), Answer(503), Answer(200)]
        event_id = h.emit()
        for _ in range(3):
            await h.round()
            next_at = h.store.deliveries.next_due_at()
            if next_at is not None:
                assert h.store.deliveries.due(h.clock()) == []
                h.clock.now = next_at
        delivery = h.one(event_id)
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("delivered", 3, 200)
        requests = h.rx.received
        assert len(requests) == 3
        assert {r.body for r in requests} == {delivery.body}
        assert {r.headers["webhook-id"] for r in requests} == {event_id}
        assert len({r.headers["webhook-timestamp"] for r in requests}) == 3
        assert len({r.headers["webhook-signature"] for r in requests}) == 3
        for request in requests:
            assert_signed(request, delivery.body, event_id, [SECRET_A, SECRET_B])


async def test_an_attempt_ending_during_another_run_is_not_started_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(tmp_path) as h:
        h.rx.script["/hook"] = [Answer(hang=True), Answer(200)]
        event_id = h.emit()
        # The second run_due reads the store while the attempt is in flight, and its answer
        # comes back only after that attempt has ended.
        fetched, attempt_ended = threading.Event(), threading.Event()
        due_deliveries = h.store.deliveries.due
        calls = 0

        def held(*args: Any, **kwargs: Any) -> list[Delivery]:
            nonlocal calls
            calls += 1
            read = due_deliveries(*args, **kwargs)
            if calls == 2:
                fetched.set()
                attempt_ended.wait(10)
            return read

        attempt = h.deliverer.attempt
        returned = anyio.Event()

        async def attempt_and_tell(delivery: Delivery, **kwargs: Any) -> Outcome:
            try:
                return await attempt(delivery, **kwargs)
            finally:
                returned.set()

        monkeypatch.setattr(h.store.deliveries, "due", held)
        monkeypatch.setattr(h.deliverer, "attempt", attempt_and_tell)
        async with anyio.create_task_group() as tg:
            await h.deliverer.run_due(tg)
            tg.start_soon(h.deliverer.run_due, tg)
            assert await anyio.to_thread.run_sync(fetched.wait, 10)
            h.rx.release.set()
            with anyio.fail_after(10):
                await returned.wait()
            await anyio.wait_all_tasks_blocked()
            assert not h.deliverer.busy
            attempt_ended.set()
        assert h.one(event_id).state == "delivered"
        assert len(h.rx.received) == 1


async def test_a_redirect_is_not_followed_and_is_retried(tmp_path: Path) -> None:
    async with harness(tmp_path, endpoints={"/moved": ALL_EVENTS}) as h:
        h.rx.script["/moved"] = [Answer(302, (("location", f"{h.url}/target"),))]
        event_id = h.emit()
        before = h.clock()
        await h.round()
        assert h.rx.paths() == ["/moved"]
        delivery = h.one(event_id)
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("pending", 1, 302)
        assert delivery.last_error == "HTTP 302"
        assert delivery.next_attempt_at >= before + 5 * 0.9


async def test_410_disables_the_endpoint_and_parks_its_deliveries(tmp_path: Path) -> None:
    async with harness(tmp_path, endpoints={"/gone": ALL_EVENTS, "/other": ALL_EVENTS}) as h:
        gone, other = f"{h.url}/gone", f"{h.url}/other"
        h.rx.script["/gone"] = [Answer(410)]
        first, second = h.emit(), h.emit("batch.failed")
        (to_gone, _) = h.store.deliveries.select(event_id=first)
        assert to_gone.url == gone
        await h.deliverer.attempt(to_gone)
        assert h.store.deliveries.disabled_endpoints() == {gone: "410 Gone from the receiver"}
        states = {(d.event_id, d.url): (d.state, d.attempts) for d in h.store.deliveries.select()}
        assert states == {
            (first, gone): ("disabled", 1),
            (first, other): ("pending", 0),
            (second, gone): ("disabled", 0),
            (second, other): ("pending", 0),
        }
        await h.round()
        assert h.rx.paths() == ["/gone", "/other", "/other"]
        # A later event for the disabled endpoint is parked too, not sent.
        third = h.emit()
        await h.round()
        assert h.rx.paths() == ["/gone", "/other", "/other", "/other"]
        third_states = {d.url: d.state for d in h.store.deliveries.select(event_id=third)}
        assert third_states == {gone: "disabled", other: "delivered"}
        assert h.store.deliveries.pending_count() == 0


async def test_retry_after_is_honoured(tmp_path: Path) -> None:
    async with harness(tmp_path, delays=[0.5, 0.5]) as h:
        h.rx.script["/hook"] = [Answer(503, (("retry-after", "2"),)), Answer(200)]
        event_id = h.emit()
        start = h.clock()
        await h.round()
        delivery = h.one(event_id)
        assert (delivery.state, delivery.last_status) == ("pending", 503)
        assert delivery.next_attempt_at >= start + 2
        h.clock.now = start + 1.9
        await h.round()
        assert len(h.rx.received) == 1
        h.clock.now = delivery.next_attempt_at
        await h.round()
        assert len(h.rx.received) == 2
        assert h.one(event_id).state == "delivered"


async def test_after_the_last_delay_a_delivery_is_dead_not_dropped(tmp_path: Path) -> None:
    async with harness(tmp_path, delays=[1, 2]) as h:
        h.rx.script["/hook"] = [Answer(500)]
        event_id = h.emit()
        for attempt in (1, 2, 3):
            await h.round()
            assert len(h.rx.received) == attempt
            next_at = h.store.deliveries.next_due_at()
            if next_at is not None:
                h.clock.now = next_at
        delivery = h.one(event_id)
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("dead", 3, 500)
        assert h.store.deliveries.pending_count() == 0
        h.clock.now += 10**6
        await h.round()
        assert len(h.rx.received) == 3
        assert h.one(event_id).body == h.rx.received[0].body


async def test_a_slow_receiver_times_out_and_is_retried(tmp_path: Path) -> None:
    async with harness(tmp_path, endpoints={"/slow": ALL_EVENTS}, timeout_s=1.0) as h:
        h.rx.script["/slow"] = [Answer(hang=True), Answer(200)]
        event_id = h.emit()
        with anyio.fail_after(10):
            await h.round()
        delivery = h.one(event_id)
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("pending", 1, None)
        assert delivery.last_error == "timed out: no answer within 1 s"
        h.clock.now = delivery.next_attempt_at
        await h.round()
        assert h.one(event_id).state == "delivered"


async def test_a_hanging_endpoint_does_not_delay_another(tmp_path: Path) -> None:
    endpoints = {"/hang": ["batch.failed"], "/ok": ["batch.completed"]}
    async with harness(tmp_path, endpoints=endpoints, timeout_s=60) as h:
        h.rx.script["/hang"] = [Answer(hang=True)]
        # A backlog for the hanging endpoint, older than the one event for the healthy one.
        for _ in range(120):
            h.emit("batch.failed")
        ok = h.emit("batch.completed")
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(10):
                # The daemon calls run_due again and again while attempts are in flight.
                while h.one(ok).state != "delivered":
                    await h.deliverer.run_due(tg)
                    await anyio.sleep(0.01)
            assert h.rx.answered == 1  # only /ok answered; /hang still holds its requests
            assert h.rx.paths().count("/hang") >= 1
            h.rx.release.set()
            with anyio.fail_after(30):
                while h.store.deliveries.pending_count():
                    await h.deliverer.run_due(tg)
                    await anyio.sleep(0.01)
        assert {d.state for d in h.store.deliveries.select()} == {"delivered"}


# ---------------------------------------------------------------- spec URLs (SSRF guard)


async def test_a_dns_name_resolving_to_loopback_is_refused(tmp_path: Path) -> None:
    allow = ["http://localhost:{port}/hooks/"]
    async with harness(tmp_path, endpoints={"/x": ["batch.rejected"]}, allow=allow) as h:
        (entry,) = h.settings.inbox.allow_webhook_urls
        with pytest.raises(Refused, match="non-public"):
            await pinned_target(entry + "a", [entry])
        event_id = h.emit(webhook_url=entry + "a")
        await h.round()
        delivery = h.one(event_id)
        assert (delivery.state, delivery.secret_ref, delivery.attempts) == ("pending", "inbox", 1)
        assert delivery.last_error is not None and delivery.last_error.startswith("refused:")
        assert h.rx.received == []


async def test_an_ip_literal_entry_is_allowed_and_keeps_the_host_header(tmp_path: Path) -> None:
    async with harness(tmp_path, endpoints={"/x": ["batch.rejected"]}, allow=["{url}/hooks/"]) as h:
        url = f"{h.url}/hooks/team-a?k=1"
        pinned, host = await pinned_target(url, h.settings.inbox.allow_webhook_urls)
        assert (pinned, host) == (url, "127.0.0.1")
        event_id = h.emit(webhook_url=url)
        await h.round()
        delivery = h.one(event_id)
        assert (delivery.state, delivery.secret_ref) == ("delivered", "inbox")
        (request,) = h.rx.received
        assert request.path == "/hooks/team-a"
        assert request.headers["host"] == h.url.removeprefix("http://")
        assert_signed(request, delivery.body, event_id, [INBOX_SECRET])
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET_A).verify(request.body, request.headers)


async def test_a_url_outside_the_allow_list_is_refused_at_send_time(tmp_path: Path) -> None:
    async with harness(tmp_path, endpoints={"/x": ["batch.rejected"]}, allow=["{url}/hooks/"]) as h:
        url = f"{h.url}/elsewhere"
        with pytest.raises(Refused, match="allow_webhook_urls"):
            await pinned_target(url, h.settings.inbox.allow_webhook_urls)
        event_id = h.emit(webhook_url=url)
        await h.round()
        delivery = h.one(event_id)
        assert delivery.last_error is not None and delivery.last_error.startswith("refused:")
        assert h.rx.received == []


async def test_an_internationalised_host_is_sent_in_its_idna_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in DNS: the allow-listed IDN name resolves to a "public" address, which is our receiver.
    async def resolve(host: str, port: int, **_: object) -> list[tuple[Any, ...]]:
        # The name resolved is the name checked and sent (IDNA 2008), not the socket module's own
        # encoding of "bücher.example" (IDNA 2003, which names another host for some names).
        assert host == "xn--bcher-kva.example"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr("batchd.webhooks.guard.anyio.getaddrinfo", resolve)
    monkeypatch.setattr("batchd.webhooks.guard._non_public", lambda _address: False)
    allow = ["http://bücher.example:{port}/hooks/"]
    async with harness(tmp_path, endpoints={"/x": ["batch.rejected"]}, allow=allow) as h:
        (entry,) = h.settings.inbox.allow_webhook_urls
        event_id = h.emit(webhook_url=entry + "a")
        await h.round()
        assert h.one(event_id).state == "delivered"
        (request,) = h.rx.received
        assert request.headers["host"] == "xn--bcher-kva.example:" + h.url.rsplit(":", 1)[1]


async def test_a_spec_host_is_resolved_once_per_dns_ttl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[str] = []

    async def resolve(host: str, port: int, **_: object) -> list[tuple[Any, ...]]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr("batchd.webhooks.guard.anyio.getaddrinfo", resolve)
    monkeypatch.setattr("batchd.webhooks.guard._non_public", lambda _address: False)
    async with harness(tmp_path, endpoints={"/x": ["batch.rejected"]}, allow=["http://hooks.test:{port}/hooks/"]) as h:
        (entry,) = h.settings.inbox.allow_webhook_urls
        first = [h.emit(webhook_url=entry + "a"), h.emit(webhook_url=entry + "b")]
        await h.round()
        assert [h.one(e).state for e in first] == ["delivered", "delivered"]
        assert lookups == ["hooks.test"]
        # The DNS TTL runs on the Deliverer's clock: once it has passed, the host is resolved again.
        h.clock.now += DNS_TTL_S
        later = h.emit(webhook_url=entry + "a")
        await h.round()
        assert h.one(later).state == "delivered"
        assert lookups == ["hooks.test", "hooks.test"]
        assert {r.headers["host"] for r in h.rx.received} == {"hooks.test:" + h.url.rsplit(":", 1)[1]}


async def test_an_unforeseen_error_is_a_failed_attempt_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: object) -> tuple[str, str]:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr("batchd.webhooks.guard.pinned_target", broken)
    async with harness(tmp_path, endpoints={"/x": ["batch.rejected"]}, allow=["{url}/hooks/"]) as h:
        event_id = h.emit(webhook_url=f"{h.url}/hooks/a")
        await h.round()
        delivery = h.one(event_id)
        assert (delivery.state, delivery.attempts, delivery.last_error) == ("pending", 1, "RuntimeError: unforeseen")
        assert delivery.next_attempt_at > h.clock()


@asynccontextmanager
async def dripping_receiver(stopped: anyio.Event) -> AsyncIterator[str]:
    """A raw HTTP receiver that sends its answer one byte every 50 ms: never idle for long, never done."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        answer = b"HTTP/1.1 200 OK\r\nx-pad: " + b"a" * 1000 + b"\r\ncontent-length: 0\r\n\r\n"
        async with stream:
            with anyio.move_on_after(30):
                try:
                    await stream.receive()
                    for i in range(len(answer)):
                        await stream.send(answer[i : i + 1])
                        with anyio.move_on_after(0.05):
                            await stopped.wait()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # the client hung up: what a timeout looks like from here

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stopped.set()
            tg.cancel_scope.cancel()


async def test_a_receiver_that_answers_too_slowly_in_total_times_out(tmp_path: Path) -> None:
    stopped = anyio.Event()
    async with dripping_receiver(stopped) as drip, harness(tmp_path, timeout_s=0.3) as h:
        h.settings = replace(h.settings, webhooks=(WebhookEndpoint(f"{drip}/hook", (Secret(SECRET_A),)),))
        event_id = h.emit()
        with anyio.fail_after(5):
            await h.round()
        delivery = h.one(event_id)
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("pending", 1, None)
        assert delivery.last_error == "timed out: no answer within 0.3 s"
