"""A provider's webhooks as poll hints, over a real database: the store's hint write, a poll
answer made stale by a hint, sweeps leaving hinted jobs alone, and `POST /hooks/NAME` (signature,
freshness, rotation, size cap, unknown names) answering as it should and writing nothing when it
refuses. Requests are signed with the reference library, `standardwebhooks`."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from batchd import lifecycle, metrics
from batchd.config import Settings, build_settings
from batchd.health import Health, LoopMonitor, create_metrics_app
from batchd.hooks import MAX_BODY_BYTES, hook_routes
from batchd.lifecycle import Step
from batchd.models import JobState, RemoteBatch, RemoteStatus
from batchd.service import secret_values
from batchd.store import NextCheck, PollAnswer, Signal, Store
from batchd.store.schema import jobs, remote_batches, signals
from tests.databases import database_url
from tests.hand_clock import Clock
from tests.store_helpers import add_in_flight, end_job

pytestmark = pytest.mark.each_database

OLD = "whsec_" + base64.b64encode(b"provider-hooks-old-secret-32byte").decode()
NEW = "whsec_" + base64.b64encode(b"provider-hooks-new-secret-32byte").decode()
GEMINI = "whsec_" + base64.b64encode(b"provider-hooks-gemini-secret-32b").decode()
STRANGER = "whsec_" + base64.b64encode(b"provider-hooks-someone-else-32by").decode()
TOKEN = "listener-token-4b1d"
LATER = 5000.0


def job_id(n: int) -> str:
    return f"{n:032x}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s = Store(database_url(tmp_path / "batchd.db"), clock=clock)
    s.migrate()
    yield s
    s.close()


def snapshot(store: Store) -> list[Any]:
    """Every row a hint could touch: jobs, their batches, the signals."""
    with store.read() as conn:
        return [
            [tuple(row) for row in conn.execute(select(table).order_by(*table.primary_key.columns))]
            for table in (jobs, remote_batches, signals)
        ]


def answer(store: Store, n: int, status: RemoteStatus, next_check_at: float) -> PollAnswer:
    """A poll answer for job n's batch, read against the job as it is now."""
    job = store.jobs.get(job_id(n))
    assert job is not None
    (row,) = store.batches.of_job(job.id)
    assert row.remote_id is not None
    remote = RemoteBatch(id=row.remote_id, status=status, input_file_id="file-1", endpoint="/v1/chat/completions")
    state = lifecycle.state_for_remote(status)
    return PollAnswer(row.id, job.id, remote, job.state, NextCheck(state, 300.0, next_check_at), hint=job.hinted_at)


# ---------------------------------------------------------------- the store


def test_a_hint_makes_the_job_due_now_marks_it_and_wakes_the_daemons(store: Store, clock: Clock) -> None:
    add_in_flight(store, job_id(1), "a", remote_id="batch_a", next_check_at=LATER)
    before = store.signals.read()[Signal.JOBS]
    clock.now += 7
    assert store.jobs.hint("default", "batch_a") == job_id(1)
    job = store.jobs.get(job_id(1))
    assert job is not None
    assert job.next_check_at == clock.now and job.hinted_at == clock.now and job.due_at == clock.now
    assert lifecycle.next_action(job, store.batches.of_job(job.id), clock.now).step is Step.POLL
    assert store.signals.read()[Signal.JOBS] == before + 1
    # A repeated delivery only makes it due now again.
    clock.now += 1
    assert store.jobs.hint("default", "batch_a") == job_id(1)
    again = store.jobs.get(job_id(1))
    assert again is not None and again.due_at == clock.now


def test_a_hint_for_a_batch_batchd_does_not_poll_changes_nothing(store: Store, clock: Clock) -> None:
    add_in_flight(store, job_id(1), "a", remote_id="batch_a", next_check_at=LATER)
    add_in_flight(store, job_id(2), "b", remote_id="batch_b", next_check_at=LATER, provider_name="other")
    add_in_flight(store, job_id(3), "c", remote_id="batch_c", next_check_at=LATER)
    end_job(store, job_id(3), JobState.FAILED, expect=JobState.VALIDATING)
    add_in_flight(store, job_id(4), "d", remote_id="batch_d", next_check_at=LATER)
    store.jobs.record_unexpected(
        job_id(4), expect=JobState.VALIDATING, attempts=1, failures=5, next_check_at=LATER, error="bug", park=True
    )
    before = snapshot(store)
    clock.now += 1
    assert store.jobs.hint("default", "batch_unknown") is None
    assert store.jobs.hint("default", "batch_b") is None  # another provider's batch
    assert store.jobs.hint("default", "batch_c") is None  # ended
    assert store.jobs.hint("default", "batch_d") is None  # parked: an operator's, not a poll's
    assert snapshot(store) == before


def test_a_poll_answer_read_before_a_hint_writes_nothing_and_the_next_one_clears_it(store: Store, clock: Clock) -> None:
    add_in_flight(store, job_id(1), "a", remote_id="batch_a", next_check_at=LATER)
    stale = answer(store, 1, RemoteStatus.IN_PROGRESS, LATER + 300)  # listed before the batch ended
    clock.now += 1
    store.jobs.hint("default", "batch_a")
    store.batches.record_polls([stale])
    job = store.jobs.get(job_id(1))
    assert job is not None and job.state is JobState.VALIDATING
    assert job.due_at == clock.now and job.hinted_at == clock.now  # the hinted poll was not pushed back
    (row,) = store.batches.of_job(job.id)
    assert row.status.value == "validating"  # nor the batch written from a stale answer
    fresh = answer(store, 1, RemoteStatus.COMPLETED, clock.now)
    store.batches.record_polls([fresh])
    polled = store.jobs.get(job_id(1))
    assert polled is not None and polled.state is JobState.DOWNLOADING and polled.hinted_at is None


def test_a_sweep_never_takes_a_hinted_job_and_a_hint_takes_one_back_from_a_sweep(store: Store, clock: Clock) -> None:
    store.cluster.register("d", host="h", pid=1, home="h:/d")
    for n, name in enumerate("abc", start=1):
        add_in_flight(store, job_id(n), name, remote_id=f"batch_{name}", next_check_at=clock.now + 1)
    store.cluster.claim("d", 30.0, limit=10, due_within_s=60.0)
    clock.now += 2
    store.jobs.hint("default", "batch_a")
    hold = clock.now + 600
    assert store.jobs.take_for_sweep("d", clock.now, hold) == 2  # b and c, not the hinted a
    store.jobs.hint("default", "batch_b")  # b's batch ends while the sweep holds it
    held = store.jobs.held("d", hold, after="", limit=10)
    assert [job.name for job in held] == ["c"]
    due = store.jobs.due("d", clock.now, limit=10)
    assert sorted(job.name for job in due) == ["a", "b"]


# ---------------------------------------------------------------- the route


@dataclass
class Receiver:
    store: Store
    clock: Clock
    http: httpx.AsyncClient
    wakes: list[None] = field(default_factory=list)

    async def post(
        self, name: str, event: dict[str, Any], secret: str = OLD, *, at: float | None = None, **headers: str
    ) -> httpx.Response:
        """`event` signed with `secret` at `at` (default: now), as the provider would send it."""
        body = json.dumps(event).encode()
        return await self.http.post(
            f"/hooks/{name}", content=body, headers={**signed(body, secret, at or self.clock.now), **headers}
        )


def signed(body: bytes, secret: str, at: float, msg_id: str = "msg_1") -> dict[str, str]:
    """Standard Webhooks headers, made by the reference library."""
    stamp = datetime.fromtimestamp(at, UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at)),
        "webhook-signature": Webhook(secret).sign(msg_id, stamp, body),
    }


def openai_event(batch_id: str, kind: str = "batch.completed") -> dict[str, Any]:
    return {"id": "evt_1", "object": "event", "created_at": 1000, "type": kind, "data": {"id": batch_id}}


def settings_for(tmp_path: Path) -> Settings:
    raw = {
        "state_dir": str(tmp_path / "state"),
        "provider": {"kind": "openai", "api_key": "k", "webhook_secret": [OLD, NEW]},
        "providers": {
            "gem": {"kind": "gemini", "api_key": "k", "model": "gemini-x", "webhook_secret": GEMINI},
            "plain": {"kind": "openai", "api_key": "k"},
        },
        "metrics": {"listen": "127.0.0.1:0"},
    }
    return build_settings(raw, base_dir=tmp_path, environ={}, config_path=None)


@asynccontextmanager
async def receiver(
    tmp_path: Path, store: Store, clock: Clock, *, tokens: tuple[str, ...] = ()
) -> AsyncIterator[Receiver]:
    settings = settings_for(tmp_path)
    wakes: list[None] = []
    hooks = hook_routes(store, lambda: settings, wake=lambda: wakes.append(None), clock=clock)
    app = create_metrics_app(Health(LoopMonitor(store), store), metrics.Metrics().registry, tokens=tokens, hooks=hooks)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://batchd") as http:
        yield Receiver(store, clock, http, wakes)


async def test_a_signed_event_for_a_batch_in_flight_makes_its_job_due_now(
    tmp_path: Path, store: Store, clock: Clock
) -> None:
    add_in_flight(store, job_id(1), "a", remote_id="batch_a", next_check_at=LATER)
    async with receiver(tmp_path, store, clock) as r:
        clock.now += 3
        answered = await r.post("default", openai_event("batch_a"))
        assert answered.status_code == 200 and answered.json() == {"status": "polling"}
        job = store.jobs.get(job_id(1))
        assert job is not None and job.due_at == clock.now and job.hinted_at == clock.now
        assert len(r.wakes) == 1


async def test_either_secret_of_a_rotation_is_taken_and_no_other(tmp_path: Path, store: Store, clock: Clock) -> None:
    add_in_flight(store, job_id(1), "a", remote_id="batch_a", next_check_at=LATER)
    async with receiver(tmp_path, store, clock) as r:
        assert (await r.post("default", openai_event("batch_a"), NEW)).status_code == 200
        assert (await r.post("default", openai_event("batch_a"), OLD)).status_code == 200
        before = snapshot(store)
        assert (await r.post("default", openai_event("batch_a"), GEMINI)).status_code == 401  # another provider's
        assert (await r.post("default", openai_event("batch_a"), STRANGER)).status_code == 401
        assert snapshot(store) == before and len(r.wakes) == 2


async def test_a_refused_event_changes_nothing(tmp_path: Path, store: Store, clock: Clock) -> None:
    add_in_flight(store, job_id(1), "a", remote_id="batch_a", next_check_at=LATER)
    body = json.dumps(openai_event("batch_a")).encode()
    good = signed(body, OLD, clock.now)
    async with receiver(tmp_path, store, clock) as r:
        before = snapshot(store)
        refusals = {
            "forged": (await r.post("default", openai_event("batch_a"), STRANGER)).status_code,
            "tampered": (
                await r.http.post("/hooks/default", content=body.replace(b"batch_a", b"batch_b"), headers=good)
            ).status_code,
            "stale": (await r.post("default", openai_event("batch_a"), at=clock.now - 301)).status_code,
            "future": (await r.post("default", openai_event("batch_a"), at=clock.now + 301)).status_code,
            "unsigned": (
                await r.http.post("/hooks/default", content=body, headers={**good, "webhook-signature": ""})
            ).status_code,
            "no id": (
                await r.http.post("/hooks/default", content=body, headers={**good, "webhook-id": ""})
            ).status_code,
            "bad time": (
                await r.http.post("/hooks/default", content=body, headers={**good, "webhook-timestamp": "soon"})
            ).status_code,
            "unknown provider": (await r.post("nobody", openai_event("batch_a"))).status_code,
            "provider without a secret": (await r.post("plain", openai_event("batch_a"))).status_code,
            "a get": (await r.http.get("/hooks/default")).status_code,
        }
        assert refusals == {
            "forged": 401, "tampered": 401, "stale": 401, "future": 401, "unsigned": 401, "no id": 400,
            "bad time": 400, "unknown provider": 404, "provider without a secret": 404, "a get": 405,
        }  # fmt: skip
        assert snapshot(store) == before and r.wakes == []
        # Within the tolerance on either side, the same event is taken.
        assert (await r.post("default", openai_event("batch_a"), at=clock.now - 299)).status_code == 200


async def test_a_body_over_the_cap_is_refused_declared_or_streamed(tmp_path: Path, store: Store, clock: Clock) -> None:
    add_in_flight(store, job_id(1), "a", remote_id="batch_a", next_check_at=LATER)
    event = openai_event("batch_a") | {"padding": "x" * MAX_BODY_BYTES}
    body = json.dumps(event).encode()
    headers = signed(body, OLD, clock.now)

    async def streamed() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    async with receiver(tmp_path, store, clock) as r:
        before = snapshot(store)
        declared = await r.http.post("/hooks/default", content=body, headers=headers)
        chunked = await r.http.post("/hooks/default", content=streamed(), headers=headers)
        assert declared.status_code == 413 and chunked.status_code == 413
        assert declared.headers["connection"] == "close"
        assert snapshot(store) == before and r.wakes == []
        # At the cap exactly, it is read (and answered: this one names a batch, signed).
        event["padding"] = "x" * (MAX_BODY_BYTES - len(json.dumps(event).encode()) + len(event["padding"]))
        assert len(json.dumps(event).encode()) == MAX_BODY_BYTES
        assert (await r.post("default", event)).status_code == 200


async def test_valid_events_batchd_does_not_act_on_are_answered_200_and_change_nothing(
    tmp_path: Path, store: Store, clock: Clock
) -> None:
    add_in_flight(store, job_id(1), "a", remote_id="batch_a", next_check_at=LATER)
    async with receiver(tmp_path, store, clock) as r:
        before = snapshot(store)
        unknown = await r.post("default", openai_event("batch_nobody_knows"))
        other_type = await r.post("default", openai_event("batch_a", "response.completed"))
        no_batch = await r.post("default", {"type": "batch.completed", "data": {"id": "../../etc"}})
        assert [a.status_code for a in (unknown, other_type, no_batch)] == [200, 200, 200]
        assert [a.json()["status"] for a in (unknown, other_type, no_batch)] == [
            "no batch of that id is being polled",
            "ignored",
            "ignored",
        ]
        body = b"not json"
        garbled = await r.http.post("/hooks/default", content=body, headers=signed(body, OLD, clock.now))
        assert garbled.status_code == 400
        assert snapshot(store) == before and r.wakes == []


async def test_gemini_events_name_their_batch_by_resource_name_or_bare_id(
    tmp_path: Path, store: Store, clock: Clock
) -> None:
    add_in_flight(
        store, job_id(1), "a", remote_id="batches/abc123", provider="gemini", provider_name="gem", next_check_at=LATER
    )
    async with receiver(tmp_path, store, clock) as r:
        by_name = {"type": "batch.succeeded", "data": {"name": "batches/abc123"}}
        by_id = {"type": "batch.expired", "data": {"id": "abc123"}}
        openai_shaped = openai_event("batches/abc123")  # batch.completed: not a Gemini event
        answers = [await r.post("gem", event, GEMINI) for event in (by_name, by_id, openai_shaped)]
        assert [a.json()["status"] for a in answers] == ["polling", "polling", "ignored"]
        assert len(r.wakes) == 2


def test_the_providers_secrets_are_hidden_wherever_batchd_logs(tmp_path: Path) -> None:
    assert {OLD, NEW, GEMINI} <= set(secret_values(settings_for(tmp_path)))


async def test_the_hooks_need_no_listener_token_and_the_rest_still_does(
    tmp_path: Path, store: Store, clock: Clock
) -> None:
    add_in_flight(store, job_id(1), "a", remote_id="batch_a", next_check_at=LATER)
    async with receiver(tmp_path, store, clock, tokens=(TOKEN,)) as r:
        assert (await r.post("default", openai_event("batch_a"))).status_code == 200
        assert (await r.post("default", openai_event("batch_a"), STRANGER)).status_code == 401
        assert (await r.http.get("/metrics")).status_code == 401
        assert (await r.http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200
