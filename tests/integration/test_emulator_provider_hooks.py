"""The emulator's own provider webhooks: when an OpenAI-dialect or Gemini batch ends, its target gets
one event in that dialect's shape, signed as Standard Webhooks says (checked with the reference
library, `standardwebhooks`), over real loopback HTTP; retried on no answer, 429 and 5xx only, and
never holding the worker up."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from click.testing import CliRunner
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from batchd.asgi_server import serve_app
from batchd.cli.emulator import emulator as emulator_command
from batchd.emulator import provider_hooks
from batchd.emulator.provider_hooks import HookTarget
from tests.integration.emulator_helpers import (
    GEMINI_KEY,
    create_batch,
    gemini_create,
    gemini_line,
    gemini_upload,
    gemini_wait,
    http_emulator,
    openai_create,
    openai_run,
    openai_upload,
    openai_wait,
    request_line,
    to_jsonl,
    upload,
    wait_for_batch,
)

SECRET = "whsec_" + base64.b64encode(b"emulator-provider-hooks-secret!!").decode()
GEMINI_SECRET = "whsec_" + base64.b64encode(b"emulator-gemini-hooks-secret-32b").decode()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    def verified(self, secret: str) -> dict[str, Any]:
        """The event, once the reference library has checked its signature (it raises otherwise)."""
        event: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return event


@dataclass
class Receiver:
    """A loopback server that records what it is sent and answers the statuses it is told (then 200)."""

    url: str
    got: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    #: while not set, requests wait before they are answered
    open: anyio.Event = field(default_factory=anyio.Event)
    arrived: anyio.Event = field(default_factory=anyio.Event)

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(10):
            while len(self.got) < count:
                self.arrived = anyio.Event()
                await self.arrived.wait()


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    made = Receiver(url="")
    made.open.set()

    async def take(request: Request) -> Response:
        made.got.append(Received(dict(request.headers), await request.body()))
        made.arrived.set()
        await made.open.wait()
        return Response(status_code=made.statuses.pop(0) if made.statuses else 200)

    async with serve_app(Starlette(routes=[Route("/{path:path}", take, methods=["POST"])])) as url:
        made.url = url
        yield made
        made.open.set()


@pytest.fixture(autouse=True)
def no_retry_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    # A retry comes at once: no test waits out the delays.
    monkeypatch.setattr(provider_hooks, "RETRY_DELAYS_S", (0.0, 0.0))


async def test_an_openai_batch_that_ends_sends_one_signed_event_and_others_send_none(tmp_path: Path) -> None:
    async with receiver() as hooks:
        target = HookTarget("openai", f"{hooks.url}/hooks/default", SECRET)
        async with http_emulator(tmp_path, provider_webhooks=[target]) as client:
            batch = await openai_run(client, [request_line("a"), request_line("b")])
            await hooks.wait_for(1)
            # A batch created through Together's dialect announces nothing.
            file_id = await upload(client, to_jsonl([request_line("c")]))
            await wait_for_batch(client, await create_batch(client, file_id))
            (sent,) = hooks.got
            event = sent.verified(SECRET)
            assert event == {
                "id": sent.headers["webhook-id"], "object": "event", "created_at": event["created_at"],
                "type": "batch.completed", "data": {"id": batch["id"]},
            }  # fmt: skip
            assert event["id"].startswith("evt_") and isinstance(event["created_at"], int)
            with pytest.raises(Exception):  # noqa: B017 - the library raises its own WebhookVerificationError
                sent.verified(GEMINI_SECRET)
            stats = (await client.get("/_emulator/stats")).json()
            assert stats["provider_webhooks"] == {"events": 1, "answers": {"200": 1}}


@pytest.mark.parametrize(
    ("trigger", "event_type"),
    [({"fail_batch": True}, "batch.failed"), ({"expire_batch": True}, "batch.expired"), (None, "batch.cancelled")],
)
async def test_each_ending_of_an_openai_batch_has_its_event(
    tmp_path: Path, trigger: dict[str, Any] | None, event_type: str
) -> None:
    async with receiver() as hooks:
        target = HookTarget("openai", f"{hooks.url}/hooks/default", SECRET)
        async with http_emulator(tmp_path, provider_webhooks=[target]) as client:
            if trigger is None:
                await client.post("/_emulator/pause")
            created = await openai_create(
                client, await openai_upload(client, to_jsonl([request_line("a", trigger=trigger)]))
            )
            if trigger is None:
                assert (await client.post(f"/openai/v1/batches/{created['id']}/cancel")).status_code == 200
                await client.post("/_emulator/resume")
            await openai_wait(client, created["id"])
            await hooks.wait_for(1)
            event = hooks.got[0].verified(SECRET)
            assert event["type"] == event_type and event["data"] == {"id": created["id"]}


async def test_a_gemini_batch_registered_by_the_control_route_sends_its_shape(tmp_path: Path) -> None:
    async with receiver() as hooks, http_emulator(tmp_path) as client:
        bad = {"dialect": "anthropic", "url": f"{hooks.url}/x", "secret": GEMINI_SECRET}
        assert (await client.post("/_emulator/provider-webhooks", json=bad)).status_code == 400
        for wrong in ({"dialect": "gemini", "url": "ftp://x", "secret": GEMINI_SECRET},
                      {"dialect": "gemini", "url": f"{hooks.url}/x", "secret": "not-a-secret"},
                      {"dialect": "gemini", "url": f"{hooks.url}/x"}):  # fmt: skip
            assert (await client.post("/_emulator/provider-webhooks", json=wrong)).status_code == 400
        target = {"dialect": "gemini", "url": f"{hooks.url}/hooks/gem", "secret": GEMINI_SECRET}
        registered = await client.post("/_emulator/provider-webhooks", json=target)
        assert registered.status_code == 200
        assert registered.json()["targets"] == [{"dialect": "gemini", "url": f"{hooks.url}/hooks/gem"}]
        assert GEMINI_SECRET not in (await client.get("/_emulator/provider-webhooks")).text
        file = await gemini_upload(client, to_jsonl([gemini_line("k1")]))
        operation = await gemini_create(client, {"fileName": file["name"]})
        await gemini_wait(client, operation["name"])
        await hooks.wait_for(1)
        (sent,) = hooks.got
        event = sent.verified(GEMINI_SECRET)
        assert (
            event["type"] == "batch.succeeded"
            and event["version"] == "v1"
            and event["id"] == sent.headers["webhook-id"]
        )
        name = operation["name"]
        assert event["data"] == {"id": name.removeprefix("batches/"), "name": name, "state": "BATCH_STATE_SUCCEEDED"}
        # Cleared: the next batch announces nothing.
        assert (await client.delete("/_emulator/provider-webhooks")).json()["targets"] == []
        again = await gemini_create(client, {"fileName": file["name"]})
        await gemini_wait(client, again["name"])
        assert (await client.get("/_emulator/stats")).json()["provider_webhooks"]["events"] == 1
        assert (await client.get(f"/gemini/v1beta/{again['name']}", headers=GEMINI_KEY)).status_code == 200


async def test_no_answer_429_and_5xx_are_tried_again_with_the_same_event_and_a_401_is_not(tmp_path: Path) -> None:
    async with receiver() as hooks:
        hooks.statuses = [503, 429, 200, 401]
        target = HookTarget("openai", f"{hooks.url}/hooks/default", SECRET)
        async with http_emulator(tmp_path, provider_webhooks=[target]) as client:
            await openai_run(client, [request_line("a")])
            await hooks.wait_for(3)
            assert len({(r.headers["webhook-id"], r.body) for r in hooks.got}) == 1  # the same event each time
            assert all(r.verified(SECRET)["type"] == "batch.completed" for r in hooks.got)
            await openai_run(client, [request_line("b")])  # refused with 401: sent once
            await hooks.wait_for(4)
            stats = (await client.get("/_emulator/stats")).json()["provider_webhooks"]
            assert stats == {"events": 2, "answers": {"503": 1, "429": 1, "200": 1, "401": 1}}


async def test_a_receiver_that_does_not_answer_holds_no_batch_up(tmp_path: Path) -> None:
    async with receiver() as hooks:
        hooks.open = anyio.Event()  # nothing is answered until the end
        target = HookTarget("openai", f"{hooks.url}/hooks/default", SECRET)
        async with http_emulator(tmp_path, provider_webhooks=[target]) as client:
            await openai_run(client, [request_line("a")])
            await hooks.wait_for(1)
            second = await openai_run(client, [request_line("b")])
            assert second["status"] == "completed"
            await hooks.wait_for(2)
            hooks.open.set()


def test_the_command_refuses_a_webhook_it_could_not_send(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--port", "0", "--data-dir", str(tmp_path / "d")]
    no_secret = runner.invoke(emulator_command, [*base, "--provider-webhook", "openai=http://127.0.0.1:1/hooks/x"])
    assert no_secret.exit_code == 2 and "--provider-webhook-secret" in no_secret.output
    not_a_pair = runner.invoke(emulator_command, [*base, "--provider-webhook", "http://127.0.0.1:1/hooks/x"])
    assert not_a_pair.exit_code == 2 and "DIALECT=URL" in not_a_pair.output
    twice = ["--provider-webhook", "openai=http://127.0.0.1:1/a", "--provider-webhook", "openai=http://127.0.0.1:1/b"]
    both = runner.invoke(emulator_command, [*base, *twice, "--provider-webhook-secret", SECRET])
    assert both.exit_code == 2 and "one URL per dialect" in both.output
    other = runner.invoke(
        emulator_command,
        [*base, "--provider-webhook", "together=http://127.0.0.1:1/a", "--provider-webhook-secret", SECRET],
    )
    assert other.exit_code == 2 and "dialect must be one of openai, gemini" in other.output
    assert SECRET not in other.output
