"""What operators do to deliveries (replay, enable, look) and what keeps deliveries fast, against
a real receiver and a real Store (SQLite and PostgreSQL); plus the SSRF guard's cloud-metadata cases.

Built on test_webhooks' harness: a loopback receiver, a fake clock, a Deliverer.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from standardwebhooks.webhooks import Webhook
from starlette.types import Receive, Scope, Send

from batchd.config import Secret, WebhookEndpoint, load_settings
from batchd.emulator.server import serve_emulator
from batchd.inbox import Inbox
from batchd.models import EndpointStats, JobState
from batchd.store import Store
from batchd.webhooks import (
    MAX_PER_ENDPOINT_CONCURRENCY,
    PER_ENDPOINT_CONCURRENCY,
    PER_ENDPOINT_QUEUE,
    Refused,
    pinned_target,
)
from tests.databases import database_url
from tests.integration.test_webhooks import ALL_EVENTS, SECRET_A, SECRET_B, Answer, harness

pytestmark = pytest.mark.each_database


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for the receiver (served in this loop) to have seen something; it has no event to await."""
    with anyio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - the receiver records requests without signalling
            await anyio.sleep(0.01)


# ---------------------------------------------------------------- replay


async def test_replay_sends_a_delivered_event_again_with_the_same_id_and_body(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        event_id = h.emit()
        await h.round()
        (first,) = h.store.deliveries.select(event_id=event_id)
        assert first.state == "delivered"
        h.clock.now += 60
        assert h.store.deliveries.replay_event(event_id, [(first.url, "config")]) == {first.url: "queued"}
        await h.round()
        sent, again = h.rx.received
        assert again.headers["webhook-id"] == sent.headers["webhook-id"] == event_id
        assert again.body == sent.body == h.store.deliveries.get_event(event_id).body  # type: ignore[union-attr]
        assert again.headers["webhook-timestamp"] == str(int(h.clock()))
        for secret in (SECRET_A, SECRET_B):
            Webhook(secret).verify(again.body, again.headers)
        # The first delivery stays as it was: a record of when it arrived.
        older, newer = h.store.deliveries.select(event_id=event_id)
        assert older == first
        assert (newer.state, newer.attempts, newer.delivered_at) == ("delivered", 1, h.clock())
        (stats,) = h.store.deliveries.endpoint_stats()
        assert stats == EndpointStats(
            url=first.url, delivered=1, replayed=1, secret_ref="config", failed_attempts=0, last_error=None
        )


async def test_replay_gives_a_dead_event_a_fresh_schedule(tmp_path: Path) -> None:
    async with harness(tmp_path, delays=[1]) as h:
        h.rx.script["/hook"] = [Answer(500)]
        event_id = h.emit()
        await h.round()
        h.clock.now += 2
        await h.round()
        (dead,) = h.store.deliveries.select(event_id=event_id)
        assert (dead.state, dead.attempts) == ("dead", 2)
        (stats,) = h.store.deliveries.endpoint_stats()
        assert (stats.dead, stats.failed_attempts, stats.last_error) == (1, 2, "HTTP 500")

        h.store.deliveries.replay_event(event_id, [(dead.url, "config")])
        await h.round()  # refused again: a retry is scheduled, not a dead-letter at once
        _, fresh = h.store.deliveries.select(event_id=event_id)
        assert (fresh.state, fresh.attempts) == ("pending", 1)
        h.rx.script["/hook"] = [Answer(200)]
        h.clock.now = fresh.next_attempt_at
        await h.round()
        assert [d.state for d in h.store.deliveries.select(event_id=event_id)] == ["dead", "delivered"]
        assert {r.headers["webhook-id"] for r in h.rx.received} == {event_id}
        assert len({r.body for r in h.rx.received}) == 1
        (stats,) = h.store.deliveries.endpoint_stats()
        assert (stats.dead, stats.delivered, stats.pending, stats.replayed, stats.failed_attempts) == (0, 1, 0, 1, 3)


async def test_replaying_a_pending_delivery_makes_it_due_now_even_while_an_attempt_runs(tmp_path: Path) -> None:
    async with harness(tmp_path, delays=[300, 300]) as h:
        h.rx.script["/hook"] = [Answer(503, hang=True), Answer(200)]
        event_id = h.emit()
        async with anyio.create_task_group() as tg:
            await h.deliverer.run_due(tg)
            await until(lambda: bool(h.rx.received))
            # The operator replays while the attempt waits for its answer.
            h.clock.now += 1
            (pending,) = h.store.deliveries.select(event_id=event_id)
            assert h.store.deliveries.replay_event(event_id, [(pending.url, "config")]) == {pending.url: "due_now"}
            h.rx.release.set()
        (delivery,) = h.store.deliveries.select(event_id=event_id)
        # The 503 is recorded, yet the delivery stays due now rather than in 300 s.
        assert (delivery.state, delivery.attempts, delivery.last_status) == ("pending", 1, 503)
        assert delivery.next_attempt_at == h.clock()
        await h.round()
        assert h.one(event_id).state == "delivered"
        assert len(h.rx.received) == 2


async def test_an_event_can_be_replayed_to_an_endpoint_configured_since(tmp_path: Path) -> None:
    endpoints = {"/old": ALL_EVENTS, "/new": ["batch.failed"]}
    async with harness(tmp_path, endpoints=endpoints) as h:
        event_id = h.emit("batch.completed")  # /new's filter leaves it out
        await h.round()
        assert h.rx.paths() == ["/old"]
        h.store.deliveries.replay_event(event_id, [(f"{h.url}/new", "config")])
        await h.round()
        assert h.rx.paths() == ["/old", "/new"]
        assert h.rx.received[1].headers["webhook-id"] == event_id


# ---------------------------------------------------------------- enable


async def test_enabling_an_endpoint_resumes_what_was_parked(tmp_path: Path) -> None:
    async with harness(tmp_path, endpoints={"/gone": ALL_EVENTS}) as h:
        gone = f"{h.url}/gone"
        # Both are attempted at once; a later event is parked without an attempt.
        h.rx.script["/gone"] = [Answer(410), Answer(410), Answer(204)]
        first, second = h.emit(), h.emit()
        await h.round()
        third = h.emit()
        await h.round()
        assert h.store.deliveries.disabled_endpoints() == {gone: "410 Gone from the receiver"}
        (stats,) = h.store.deliveries.endpoint_stats()
        assert (stats.disabled, stats.pending, stats.failed_attempts) == (3, 0, 2)
        assert (stats.disabled_at, stats.disabled_reason) == (h.clock(), "410 Gone from the receiver")

        assert h.store.deliveries.enable_endpoint(gone) == 3
        assert h.store.deliveries.enable_endpoint(gone) is None
        assert h.store.deliveries.disabled_endpoints() == {}
        await h.round()
        assert {h.one(first).state, h.one(second).state, h.one(third).state} == {"delivered"}
        (stats,) = h.store.deliveries.endpoint_stats()
        assert (stats.delivered, stats.disabled, stats.disabled_at) == (3, 0, None)


# ---------------------------------------------------------------- throughput mechanics


async def test_outcomes_that_end_during_a_commit_share_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with harness(tmp_path) as h:
        for _ in range(8):
            h.emit()
        record = h.store.deliveries.record_outcomes
        commits: list[int] = []
        others_waiting = threading.Event()

        def slow_first(outcomes: Any) -> None:
            commits.append(len(outcomes))
            if len(commits) == 1:
                assert others_waiting.wait(10)
            record(outcomes)

        monkeypatch.setattr(h.store.deliveries, "record_outcomes", slow_first)
        async with anyio.create_task_group() as tg:
            await h.deliverer.run_due(tg)
            await until(lambda: h.rx.answered == 8)
            # Every other attempt has its answer and waits for the first commit to end.
            await anyio.wait_all_tasks_blocked()
            others_waiting.set()
        # The first commit takes what had ended when it began (at most the endpoint's 4 slots).
        assert len(commits) == 2 and sum(commits) == 8 and commits[0] <= 4
        assert {d.state for d in h.store.deliveries.select()} == {"delivered"}


async def test_an_endpoint_takes_on_a_bounded_queue_and_the_rest_waits_in_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("batchd.webhooks.deliverer.PER_ENDPOINT_QUEUE", 5)
    endpoints = {"/hang": ["batch.failed"], "/ok": ["batch.completed"]}
    async with harness(tmp_path, endpoints=endpoints, timeout_s=60) as h:
        h.rx.script["/hang"] = [Answer(hang=True)]  # every answer waits for the release, then is a 200
        for _ in range(12):
            h.emit("batch.failed")
        ok = h.emit("batch.completed")
        async with anyio.create_task_group() as tg:
            with anyio.fail_after(10):
                while h.one(ok).state != "delivered":
                    await h.deliverer.run_due(tg)
                    await anyio.sleep(0.01)
            await h.deliverer.run_due(tg)
            assert len(h.deliverer._in_flight) == 5
            # The serve loop must not spin on the 7 due deliveries it cannot take on yet.
            assert h.store.deliveries.next_due_at(h.deliverer._in_flight, skip_urls=[f"{h.url}/hang"]) is None
            h.rx.release.set()
            with anyio.fail_after(30):
                while h.store.deliveries.pending_count():
                    await h.deliverer.run_due(tg)
                    await anyio.sleep(0.01)
        assert len(h.rx.received) == 13  # each delivery once
        assert {d.state for d in h.store.deliveries.select()} == {"delivered"}


async def test_a_backlog_filling_the_read_does_not_hold_up_another_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /hang's backlog comes first in due order and fills every read; /ok's one event comes after.
    monkeypatch.setattr("batchd.webhooks.deliverer.PER_ENDPOINT_QUEUE", 4)
    monkeypatch.setattr("batchd.webhooks.deliverer.DUE_BATCH", 10)
    endpoints = {"/hang": ["batch.failed"], "/ok": ["batch.completed"]}
    async with harness(tmp_path, endpoints=endpoints, timeout_s=60) as h:
        h.rx.script["/hang"] = [Answer(hang=True)]
        for _ in range(30):
            h.emit("batch.failed")
        ok = h.emit("batch.completed")
        async with anyio.create_task_group() as tg:
            # Idle for a minute unless told: only the loop's own "more may be due" brings /ok's turn.
            tg.start_soon(lambda: h.deliverer.serve(tg, idle_s=60))
            with anyio.fail_after(10):
                while h.one(ok).state != "delivered":  # noqa: ASYNC110 - the store has no event to await
                    await anyio.sleep(0.01)
            assert h.rx.paths().count("/hang") == 4
            h.rx.release.set()
            tg.cancel_scope.cancel()


async def test_a_delivery_wakes_the_loop_only_to_refill_its_queue_and_a_failure_always(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each wake-up reads the store (a scan of the due deliveries): one per delivery held a fast
    # receiver's rate down. Deliveries wake it once their endpoint's queue is down to half.
    endpoints = {"/ok": ["batch.completed"], "/fail": ["batch.failed"]}
    async with harness(tmp_path, endpoints=endpoints) as h:
        h.rx.script["/fail"] = [Answer(500)]
        for _ in range(PER_ENDPOINT_QUEUE):
            h.emit("batch.completed")
        h.emit("batch.failed")
        pokes = 0

        def counted() -> None:
            nonlocal pokes
            pokes += 1

        monkeypatch.setattr(h.deliverer, "poke", counted)
        await h.round()
        assert h.rx.paths().count("/ok") == PER_ENDPOINT_QUEUE
        # /ok: its queue at half, then each of the last half; /fail: its failed attempt.
        assert pokes == (PER_ENDPOINT_QUEUE // 2 + 1) + 1


@dataclass
class CountingReceiver:
    """ASGI: answers `status` after `delay_s`, noting the most requests it held at once."""

    status: int = 204
    delay_s: float = 0.02
    now: int = 0
    most: int = 0
    answered: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.now += 1
        self.most = max(self.most, self.now)
        await anyio.sleep(self.delay_s)
        self.now -= 1
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        self.answered += 1


async def test_an_endpoint_that_keeps_delivering_takes_more_at_once_up_to_a_bound(tmp_path: Path) -> None:
    fast = CountingReceiver()
    async with serve_emulator(fast) as url, harness(tmp_path) as h:
        h.settings = replace(h.settings, webhooks=(WebhookEndpoint(f"{url}/hook", (Secret(SECRET_A),)),))
        for _ in range(60):
            h.emit()
        await h.round()
        assert {d.state for d in h.store.deliveries.select()} == {"delivered"}
    assert PER_ENDPOINT_CONCURRENCY < fast.most <= MAX_PER_ENDPOINT_CONCURRENCY


async def test_an_endpoint_whose_concurrency_grew_takes_on_more_deliveries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("batchd.webhooks.deliverer.PER_ENDPOINT_QUEUE", 8)
    fast = CountingReceiver()
    async with serve_emulator(fast) as url, harness(tmp_path) as h:
        h.settings = replace(h.settings, webhooks=(WebhookEndpoint(f"{url}/hook", (Secret(SECRET_A),)),))
        for _ in range(150):
            h.emit()
        most = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(h.deliverer.serve, tg)
            with anyio.fail_after(30):
                while h.store.deliveries.pending_count():
                    most = max(most, len(h.deliverer._in_flight))
                    await anyio.sleep(0.005)
            tg.cancel_scope.cancel()
    # 8 at 4 in flight; 8 more per 4 slots it grew by, up to 32 at 16.
    assert 8 < most <= 32


async def test_an_endpoint_that_fails_stays_at_the_first_bound(tmp_path: Path) -> None:
    failing = CountingReceiver(status=500)
    async with serve_emulator(failing) as url, harness(tmp_path) as h:
        h.settings = replace(h.settings, webhooks=(WebhookEndpoint(f"{url}/hook", (Secret(SECRET_A),)),))
        for _ in range(30):
            h.emit()
        await h.round()
        assert {d.attempts for d in h.store.deliveries.select()} == {1}
    assert failing.most == PER_ENDPOINT_CONCURRENCY


async def test_a_retry_after_is_honoured_up_to_a_day(tmp_path: Path) -> None:
    async with harness(tmp_path, delays=[5]) as h:
        h.rx.script["/hook"] = [Answer(503, (("retry-after", "999999999"),))]
        event_id = h.emit()
        start = h.clock()
        await h.round()
        assert h.one(event_id).next_attempt_at == start + 86400
        h.clock.now = start + 86400
        await h.round()
        assert h.one(event_id).state == "dead"  # on schedule, rather than pending for 31 years


# ---------------------------------------------------------------- SSRF: cloud metadata


METADATA = "http://169.254.169.254/latest/meta-data/"


async def test_the_cloud_metadata_address_passes_only_when_the_allow_list_names_it() -> None:
    # Named as that very IP literal: the operator meant it.
    assert await pinned_target(METADATA + "iam", ["http://169.254.169.254/latest/"]) == (
        METADATA + "iam",
        "169.254.169.254",
    )
    # Not on the list at all.
    with pytest.raises(Refused, match="allow_webhook_urls"):
        await pinned_target(METADATA, ["https://hooks.example.com/"])
    # Another spelling of the same address is not the literal the list names.
    with pytest.raises(Refused, match=r"non-public address 169\.254\.169\.254"):
        await pinned_target("http://2852039166/latest/", ["http://2852039166/"])


async def test_a_name_that_resolves_to_the_metadata_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def resolve(host: str, port: int, **_: object) -> list[tuple[Any, ...]]:
        assert host == "hooks.example.com"
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port)),
        ]

    monkeypatch.setattr("batchd.webhooks.guard.anyio.getaddrinfo", resolve)
    # Every address is checked, not only the first.
    with pytest.raises(Refused, match=r"non-public address 169\.254\.169\.254"):
        await pinned_target("https://hooks.example.com/batchd/a", ["https://hooks.example.com/batchd/"])


def test_a_spec_naming_the_metadata_address_is_rejected_at_intake(tmp_path: Path) -> None:
    config = tmp_path / "batchd.toml"
    config.write_text(
        'state_dir = "state"\ninbox_dir = "inbox"\n[inbox]\nallow_webhook_urls = ["https://hooks.example.com/"]\n'
        f'webhook_secret = "{SECRET_A}"\n',
        encoding="utf-8",
    )
    settings = load_settings(config, environ={})
    store = Store(database_url(tmp_path / "batchd.db"))
    try:
        store.migrate()
        inbox = Inbox(lambda: settings, store)
        inbox.ensure_folders()
        (settings.inbox_dir / "data").mkdir()
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
        (settings.inbox_dir / "data" / "x.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
        spec = settings.inbox_dir / "s.json"
        spec.write_text(json.dumps({"input": "data/x.jsonl", "webhook_url": METADATA}), encoding="utf-8")
        job = inbox.take(spec)
        assert job is not None and job.state is JobState.REJECTED
        assert job.reason is not None and "webhook_url" in job.reason
        report = (settings.inbox_dir / "rejected" / "s.json.errors.txt").read_text(encoding="utf-8")
        assert "169.254.169.254" in report
    finally:
        store.close()
