"""Webhooks as a receiver and an operator meet them: the real `batchd run` and `batchd webhooks`
commands as subprocesses, a receiver on loopback, restarts and a crash in between."""

from __future__ import annotations

import base64
import json
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest
from standardwebhooks.webhooks import Webhook

from batchd.store import Store
from tests.acceptance.conftest import SECRET, DaemonProcess, Hook, Workspace, chat, eventually, harness

pytestmark = pytest.mark.each_database

SECOND_SECRET = "whsec_" + base64.b64encode(b"a second secret for key rotation").decode()


def rotate_secrets(ws: Workspace, delays: str) -> None:
    """Two secrets on the endpoint (key rotation) and the given retry delays."""
    text = ws.config.read_text(encoding="utf-8")
    text = text.replace(f'secret = "{SECRET}"', f'secret = ["{SECRET}", "{SECOND_SECRET}"]')
    text = text.replace("retry_delays_s = [0.2, 0.5, 1.0]", f"retry_delays_s = {delays}")
    ws.config.write_text(text, encoding="utf-8")


def logged(daemon: DaemonProcess, event: str) -> int:
    return sum(1 for entry in daemon.logs() if entry.get("event") == event)


def by_event(hooks: list[Hook]) -> dict[str, list[Hook]]:
    found: dict[str, list[Hook]] = {}
    for hook in hooks:
        found.setdefault(hook.headers["webhook-id"], []).append(hook)
    return found


def stored_bodies(ws: Workspace) -> dict[str, bytes]:
    store = Store(ws.database_url)
    try:
        return {d.event_id: d.body for d in store.deliveries.select()}
    finally:
        store.close()


async def test_refused_attempts_across_restarts_and_a_crash_still_deliver_each_event(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        # Retries 1 s apart: time enough to stop a daemon between two attempts.
        rotate_secrets(h.ws, "[1.0, 1.0, 1.0]")
        h.receiver.refuse_each = 3
        h.ws.drop("alpha.jsonl", [chat("a-1")])
        h.ws.drop("beta.jsonl", [chat("b-1"), chat("b-2")])

        # First daemon: both jobs finish, each event's first attempt is refused; a clean stop.
        first = h.start()
        await eventually(lambda: logged(first, "webhook.retry_scheduled") >= 2, 60)
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0

        # Second daemon: killed while its first attempt waits for an answer, which it never hears.
        second = h.start()
        h.receiver.on_request = lambda _hook: second.kill()
        await eventually(lambda: second.proc.poll() is not None, 30)
        h.receiver.on_request = None
        assert second.proc.returncode == -signal.SIGKILL

        # Third: runs until every event is delivered, then exits.
        third = await h.ws.batchd("run", "--once", "--timeout", "60", timeout=90)
        assert third.returncode == 0, third.stdout + third.stderr

        events = by_event(h.receiver.hooks)
        bodies = stored_bodies(h.ws)
        assert len(events) == 2 and set(events) == set(bodies)
        names = set()
        for event_id, hooks in events.items():
            # Refused three times (one of them the attempt the crash cut off), accepted once, then left alone.
            assert [hook.status for hook in hooks] == [503, 503, 503, 204]
            assert {hook.body for hook in hooks} == {bodies[event_id]}
            for hook in hooks:
                assert len(hook.headers["webhook-signature"].split()) == 2
                for secret in (SECRET, SECOND_SECRET):
                    assert Webhook(secret).verify(hook.body, hook.headers)["id"] == event_id
            names.add(hooks[0].event["data"]["name"])
        assert names == {"alpha", "beta"}


async def test_operator_commands_beside_a_running_daemon(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        daemon = h.start()
        await daemon.until_logged("daemon.ready")
        h.ws.drop("ops.jsonl", [chat("o-1")])
        (first,) = await h.receiver.wait_for(lambda hooks: len(hooks) >= 1)
        event_id = first.headers["webhook-id"]

        async def endpoint() -> dict[str, Any]:
            listing = await h.ws.batchd("webhooks", "--json")
            assert listing.returncode == 0, listing.stderr
            (row,) = json.loads(listing.stdout)
            assert row["url"] == h.receiver.url and row["configured"]
            parsed: dict[str, Any] = row
            return parsed

        row = await endpoint()
        counts = ("pending", "delivered", "failed_attempts", "dead", "disabled")
        assert [row[k] for k in counts] == [0, 1, 0, 0, 0]

        def same_event(hook: Hook) -> None:
            assert hook.headers["webhook-id"] == event_id
            assert hook.body == first.body
            Webhook(SECRET).verify(hook.body, hook.headers)

        # Replays, by event id and by job name: the running daemon sends the same id and bytes again.
        replayed = await h.ws.batchd("webhooks", "replay", event_id)
        assert replayed.returncode == 0 and "queued again" in replayed.stdout, replayed.stderr
        same_event((await h.receiver.wait_for(lambda hooks: len(hooks) >= 2, timeout=15))[1])
        by_job = await h.ws.batchd("webhooks", "replay", "--job", "ops")
        assert by_job.returncode == 0, by_job.stderr
        same_event((await h.receiver.wait_for(lambda hooks: len(hooks) >= 3, timeout=15))[2])

        # A 410 disables the endpoint; enable resumes the parked delivery.
        h.receiver.script = [410]
        assert (await h.ws.batchd("webhooks", "replay", event_id)).returncode == 0
        await h.receiver.wait_for(lambda hooks: len(hooks) >= 4, timeout=15)
        await daemon.until_logged("webhook.endpoint_gone", timeout=15)
        row = await endpoint()
        assert row["endpoint_disabled"] and row["disabled_reason"] == "410 Gone from the receiver"
        assert (row["disabled"], row["delivered"], row["replayed"]) == (1, 0, 3)
        table = await h.ws.batchd("webhooks")
        assert "disabled" in table.stdout and "410 Gone from the receiver" in table.stdout
        refused = await h.ws.batchd("webhooks", "replay", event_id)
        assert refused.returncode == 1 and "disabled" in refused.stderr
        enabled = await h.ws.batchd("webhooks", "enable", h.receiver.url)
        assert enabled.returncode == 0 and "1 parked delivery is due now" in enabled.stdout
        same_event((await h.receiver.wait_for(lambda hooks: len(hooks) >= 5, timeout=15))[4])
        assert h.receiver.hooks[4].status == 204
        assert (await h.ws.batchd("webhooks", "enable", h.receiver.url)).returncode == 1

        # test: a signed batchd.test event now, its answer shown; nothing is stored.
        h.receiver.ok_status, h.receiver.answer_body = 200, b'{"received": true, "by": "the acceptance receiver"}'
        tested = await h.ws.batchd("webhooks", "test", h.receiver.url)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert "HTTP 200" in tested.stdout and '{"received": true, "by": "the acceptance receiver"}' in tested.stdout
        probe = h.receiver.hooks[-1]
        assert Webhook(SECRET).verify(probe.body, probe.headers)["type"] == "batchd.test"
        assert probe.headers["webhook-id"] != event_id
        h.receiver.script = [500]
        failing = await h.ws.batchd("webhooks", "test", h.receiver.url)
        assert failing.returncode == 1 and "HTTP 500" in failing.stdout
        row = await endpoint()
        assert (row["delivered"], row["pending"], row["endpoint_disabled"]) == (1, 0, False)

        # Usage and lookup failures: none of them changes anything, so they run side by side.
        expected_codes = {
            ("webhooks", "replay"): 2,
            ("webhooks", "replay", event_id, "--job", "ops"): 2,
            ("webhooks", "replay", "evt_missing"): 1,
            ("webhooks", "replay", "--job", "no-such-job"): 1,
            ("webhooks", "test", "not-a-url"): 2,
        }
        codes: dict[tuple[str, ...], int] = {}

        async def exit_code(args: tuple[str, ...]) -> None:
            codes[args] = (await h.ws.batchd(*args)).returncode

        async with anyio.create_task_group() as tg:
            for args in expected_codes:
                tg.start_soon(exit_code, args)
        assert codes == expected_codes

        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
